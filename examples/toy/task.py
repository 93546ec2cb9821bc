"""The cyclic next-token task of the paper's toy model (Sec. 5, App. F; protocol.md section 10).

For a cycle length ``c``, a step ``d``, an offset ``o``, a context length ``L`` and a latent phase
``a`` in Z_c, the context is ``x(a) = (o + (a + j d) mod c)_{j < L}`` and the target is the next
element ``y(a) = o + (a + L d) mod c``. The model sees the ``L`` context tokens and predicts ``y``
from the last position (last-token pooling).

Where the paper is silent we choose (docs/replication-toy.md explains why):

* ``c`` is a prime larger than ``L``. Then ``(L - j) d = 0 mod c`` has no solution with
  ``0 <= j < L`` and ``d != 0``, so the target never occurs in its own context: the answer cannot be
  copied, it has to be computed (with ``c <= L`` the sequence repeats inside the context and a model
  solves the task by copying).
* the step ``d`` is drawn uniformly from ``1 .. max_step``, the phase ``a`` uniformly from Z_c, and
  the offset ``o`` uniformly from ``offsets`` (token blocks of width ``c`` inside the vocabulary).
* the ``n_examples`` examples are i.i.d. draws of ``(o, d, a)`` (seeded), the first ``heldout`` of
  them the held-out split. The task has only ``len(offsets) * max_step * c`` distinct examples, fewer
  than 32,000 at the paper's scale, so held-out examples mostly also occur in training: validation
  loss measures how well the model fits the task's distribution, as a language model's does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["CyclicTask", "Split", "cyclic_sequences", "is_prime"]


def is_prime(n: int) -> bool:
    """Whether ``n`` is a prime number."""
    if n < 2:
        return False
    return all(n % k for k in range(2, math.isqrt(n) + 1))


def cyclic_sequences(a: torch.Tensor, d: torch.Tensor, o: torch.Tensor, c: int, length: int) -> torch.Tensor:
    """Rows ``(o + (a + j d) mod c)_{j < length}`` for 1-D integer tensors ``a``, ``d``, ``o`` (int64).

    With ``length = L + 1`` the last column is the target ``y(a)`` of the first ``L`` columns.
    """
    if not (a.shape == d.shape == o.shape) or a.ndim != 1:
        raise ValueError(f"cyclic_sequences: a, d, o must be 1-D of one shape, got {tuple(a.shape)}, "
                         f"{tuple(d.shape)}, {tuple(o.shape)}")
    j = torch.arange(length, dtype=torch.int64)
    return o[:, None] + (a[:, None] + j[None, :] * d[:, None]) % c


class Split(NamedTuple):
    """The examples of a :class:`CyclicTask`: int64 contexts ``(N, L)``, targets ``(N,)`` and, for the
    held-out split, the target's phase ``y - o`` in Z_c (what the Fourier probes group by)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor
    phase_heldout: torch.Tensor


@dataclass(frozen=True)
class CyclicTask:
    """One instance of the task and its train / held-out split.

    Attributes:
        c: cycle length (a prime larger than ``context``).
        context: context length ``L`` (paper: 64).
        vocab: vocabulary size (paper: 1,024); every token ``o + k`` must be below it.
        max_step: steps ``d`` are drawn from ``1 .. max_step`` (at most ``c - 1``).
        offsets: the offsets ``o``.
        n_examples: examples in total (paper: 32,000), split into train and held-out.
        heldout: examples in the held-out split.
        seed: seed of the one shuffle that picks and splits the examples.
    """

    c: int = 67
    context: int = 64
    vocab: int = 1024
    max_step: int = 66
    offsets: tuple[int, ...] = (0,)
    n_examples: int = 32_000
    heldout: int = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_prime(self.c) or self.c <= self.context:
            raise ValueError(f"CyclicTask: c={self.c} must be a prime larger than context={self.context} "
                             "(else the target appears in its own context and can be copied)")
        if not 1 <= self.max_step < self.c:
            raise ValueError(f"CyclicTask: max_step={self.max_step} must be in 1 .. c-1={self.c - 1}")
        if not self.offsets or min(self.offsets) < 0 or max(self.offsets) + self.c > self.vocab:
            raise ValueError(f"CyclicTask: offsets {self.offsets} must keep every token o + k (k < c={self.c}) "
                             f"inside the vocabulary of {self.vocab}")
        if not 0 < self.heldout < self.n_examples:
            raise ValueError(f"CyclicTask: need 0 < heldout={self.heldout} < n_examples={self.n_examples}")

    def split(self) -> Split:
        """The train and held-out examples (deterministic in ``seed``)."""
        offsets = torch.tensor(sorted(set(self.offsets)), dtype=torch.int64)
        gen = torch.Generator().manual_seed(self.seed)
        n = self.n_examples
        o = offsets[torch.randint(len(offsets), (n,), generator=gen)]
        d = torch.randint(1, self.max_step + 1, (n,), generator=gen)
        a = torch.randint(self.c, (n,), generator=gen)
        rows = cyclic_sequences(a, d, o, self.c, self.context + 1)
        x, y = rows[:, :-1].contiguous(), rows[:, -1].contiguous()
        h = self.heldout
        return Split(x[h:], y[h:], x[:h], y[:h], (y[:h] - o[:h]) % self.c)
