"""``Schedule``: the training steps at which ``SpectralLens.maybe_measure`` measures."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from ._args import as_integer, check_count

__all__ = ["Schedule"]


def _whole(step: Any) -> int | None:
    """``step`` as an ``int`` when it is a whole number (a number, a numpy scalar, a one-element array or
    tensor: read once, so a CUDA tensor syncs once), else ``None``: a bool (of any kind), a fraction, nan,
    several numbers, a string."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype == torch.bool or step.dtype.is_complex:  # decided without reading it
            return None
        step = step.item()
    elif isinstance(step, (np.ndarray, np.generic)):
        if step.size != 1 or step.dtype.kind not in "iuf":
            return None
        step = step.item()
    if isinstance(step, bool):
        return None
    try:
        return as_integer(step)
    except (TypeError, ValueError, OverflowError):
        return None


def _count(owner: str, name: str, value: Any) -> int:
    """``value`` as an ``int``, as :meth:`Schedule.every` takes its ``k``: a float that is a whole number (``1e3``)
    is taken as it; a fraction (``10.5``, which moved the measured steps), a bool, a string or nan is a
    ``TypeError`` naming ``owner``, ``name`` and the value."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer (a whole float such as 1e3 is taken), got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Schedule:
    """When to measure, as a set of training steps.

    Build with :meth:`every`, :meth:`log_spaced` or :meth:`at_fractions`, combine with ``|``, and ask
    ``step in schedule``. A schedule is its explicit ``steps``, plus every ``period``-th step from
    ``start``, plus the steps of any schedule in ``parts``.
    """

    steps: frozenset[int] = field(default_factory=frozenset)
    period: int | None = None
    start: int = 0
    parts: tuple["Schedule", ...] = ()

    @classmethod
    def every(cls, k: int, start: int = 0) -> "Schedule":
        """Every ``k`` steps from ``start`` (inclusive); integers (a float such as ``1e3`` that is one is taken
        as it; ``2.5`` is refused: it matched only the steps that are multiples of it, 0, 5, 10, ...)."""
        k, start = (int(v) if isinstance(v, float) and v.is_integer() else v for v in (k, start))
        if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k < 1:
            raise ValueError(f"Schedule.every: k must be >= 1, got {k}")
        return cls(period=check_count("Schedule.every", "k", k, 1), start=check_count("Schedule.every", "start", start, 0))

    @classmethod
    def log_spaced(cls, total_steps: int, n: int, first: int = 1) -> "Schedule":
        """About ``n`` steps spaced evenly in log between ``first`` and ``total_steps`` (inclusive); integers (a
        whole float such as ``1e3`` is taken as it, ``10.5`` or a bool is a ``TypeError``), as for :meth:`every`."""
        total_steps, n, first = (_count("Schedule.log_spaced", k, v) for k, v in
                                 (("total_steps", total_steps), ("n", n), ("first", first)))
        if total_steps < first or first < 1 or n < 1:
            raise ValueError(f"Schedule.log_spaced: need total_steps >= first >= 1 and n >= 1, got {total_steps}, {first}, {n}")
        if n == 1:
            return cls(frozenset({total_steps}))
        ratio = (total_steps / first) ** (1 / (n - 1))
        return cls(frozenset(min(total_steps, round(first * ratio**i)) for i in range(n)))

    @classmethod
    def at_fractions(cls, total_steps: int, fractions: Iterable[float] = (0.2,)) -> "Schedule":
        """The steps at fractions of training progress (the paper's early prediction uses 0.2).

        For a loop ``for step in range(total_steps)``: fraction ``f`` maps to step
        ``min(ceil(f * total_steps), total_steps - 1)``, so ``1.0`` is the last step the loop runs
        (``total_steps - 1``) and every fraction is measured. ``f * total_steps`` is rounded to 6
        decimals before the ceiling, so a fraction is the step its decimal value names
        (``at_fractions(100, [0.07])`` is step 7, although the float ``0.07 * 100`` is ``7.000000000000001``).
        ``total_steps`` is an integer, as for :meth:`every` (``10.5`` or a bool is a ``TypeError``).
        """
        total_steps = _count("Schedule.at_fractions", "total_steps", total_steps)
        if total_steps < 1:
            raise ValueError(f"Schedule.at_fractions: total_steps must be >= 1, got {total_steps}")
        out = set()
        for f in fractions:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"Schedule.at_fractions: fraction {f} outside [0, 1]")
            out.add(min(int(math.ceil(round(f * total_steps, 6))), total_steps - 1))
        return cls(frozenset(out))

    def __contains__(self, step: int) -> bool:
        """Whether ``step`` is measured. A step is compared by its value, as ``measure`` reads it: a
        one-element tensor or array (``torch.tensor(10)``, ``np.int64(10)``, ``10.`` too) is its number (a
        tensor hashes by identity, so it was never found among the explicit ``steps``: ``maybe_measure``
        skipped the step silently). A CUDA tensor is read with one host sync, as ``measure`` reads it (pass
        ``int`` steps to avoid it). Anything else is never measured (``measure`` refuses it): a bool (``True``
        is not step 1), 2.5, nan, several numbers.

        A plain ``int`` (what a training loop passes every step) skips the conversion: :func:`_whole`'s type
        checks and a second call made it 4.5-9x slower (0.3 to 1.7-2.7 us, review 27's CPU check)."""
        if type(step) is not int:  # a bool (its own type) or an int subclass too: converted
            step = _whole(step)
            if step is None:
                return False
        periodic = self.period is not None and step >= self.start and (step - self.start) % self.period == 0
        return step in self.steps or periodic or any(step in p for p in self.parts)

    def __or__(self, other: "Schedule") -> "Schedule":
        return Schedule(parts=(self, other))
