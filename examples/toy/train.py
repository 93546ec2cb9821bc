"""Training one toy run: the family switches, the optimizer groups, the schedule, checkpoints.

The chain Baseline -> RoPE -> Muon -> Untied is cumulative (paper App. F):

============  ============  ==========  =======================================================
family        positions     readout     optimizer groups (reference rates: see ``presets``)
============  ============  ==========  =======================================================
Baseline      learned       tied        ``adam``: AdamW on every parameter
RoPE          rotary        tied        ``adam``
Muon          rotary        tied        ``embed``: AdamW on the embeddings; ``hidden``: Muon
Untied        rotary        untied      ``embed``, ``head``: AdamW; ``hidden``: Muon
============  ============  ==========  =======================================================

The learning rate of every group follows one schedule set against a *horizon* (the budget of the
longest run the schedule is planned for): linear warm-up over the first 5% of the horizon, then a
linear decay to 10% at the horizon. A run trained to a smaller budget is exactly the prefix of the
run to the horizon, which is what the tuner's promotions need (``examples/tune/trainable.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from examples.checkpoint import read_checkpoint, state_problems
from examples.nanogpt.muon import Muon

from spectral_lens.atomic import write_atomic

from .model import ToyConfig, ToyTransformer

__all__ = ["FAMILIES", "Family", "ToyRun", "lr_multiplier", "evaluate", "forward_in_chunks"]

WARMUP = 0.05
FINAL_LR = 0.1


@dataclass(frozen=True)
class Family:
    """One stage of the chain: the model switches and the optimizer groups."""

    name: str
    pos: str
    tied_head: bool
    muon: bool

    @property
    def groups(self) -> tuple[str, ...]:
        """The optimizer group names whose rates the tuner sets."""
        if not self.muon:
            return ("adam",)
        return ("embed", "hidden") if self.tied_head else ("embed", "head", "hidden")


FAMILIES = {
    "Baseline": Family("Baseline", pos="learned", tied_head=True, muon=False),
    "RoPE": Family("RoPE", pos="rope", tied_head=True, muon=False),
    "Muon": Family("Muon", pos="rope", tied_head=True, muon=True),
    "Untied": Family("Untied", pos="rope", tied_head=False, muon=True),
}
"""The chain, in order."""


def lr_multiplier(seen: int, batch: int, horizon: int) -> float:
    """Schedule factor for the step that starts after ``seen`` examples (batch ``batch``, horizon ``horizon``)."""
    done = (seen + batch) / horizon
    warm = min(1.0, done / WARMUP)
    decay = 1.0 - (1.0 - FINAL_LR) * min(1.0, seen / horizon)
    return warm * decay


FORWARD_ROWS = 256
"""Examples per forward pass of the evaluations: a pass over more is slower on a CPU (its (rows, 64, 256)
MLP temporaries leave the cache) and gives the same logits, bit for bit (every row is computed alone)."""


def forward_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int = FORWARD_ROWS
                      ) -> torch.Tensor:
    """``fn(x)`` computed ``rows`` examples at a time and concatenated (``fn`` must treat rows independently)."""
    if len(x) <= rows:
        return fn(x)
    return torch.cat([fn(x[i : i + rows]) for i in range(0, len(x), rows)])


@torch.no_grad()
def evaluate(model: ToyTransformer, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    """Mean cross-entropy of the next token on ``(x, y)`` in eval mode (mode restored).

    The loss is summed per ``chunk`` examples (this grouping fixes the float sum); the forward passes
    take :data:`FORWARD_ROWS` examples at a time, which changes no logit."""
    was = model.training
    model.eval()
    try:
        total = 0.0
        for i in range(0, len(x), chunk):
            logits = forward_in_chunks(model, x[i : i + chunk])
            total += float(F.cross_entropy(logits, y[i : i + chunk], reduction="sum"))
        return total / len(x)
    finally:
        model.train(was)


class ToyRun:
    """Model, optimizers and data order of one run; trains in steps of ``batch`` examples.

    Args:
        family: a key of :data:`FAMILIES`.
        batch: examples per optimizer step (the tier).
        lrs: the rate of each optimizer group of the family (``Family.groups``).
        config: the model shape (the family sets ``pos`` and ``tied_head``).
        seed: seeds the initialization and the order of the training examples.
    """

    def __init__(self, family: str, batch: int, lrs: Mapping[str, float], config: ToyConfig, seed: int = 0):
        if family not in FAMILIES:
            raise ValueError(f"toy: unknown family {family!r}, expected one of {list(FAMILIES)}")
        self.family = FAMILIES[family]
        missing = set(self.family.groups) - set(lrs)
        extra = set(lrs) - set(self.family.groups)
        if missing or extra:
            raise ValueError(f"toy {family}: learning rates for groups {sorted(lrs)}, expected {list(self.family.groups)}")
        if batch < 1:
            raise ValueError(f"toy: batch must be >= 1, got {batch}")
        self.batch = int(batch)
        self.lrs = {k: float(v) for k, v in lrs.items()}
        torch.manual_seed(seed)
        cfg = ToyConfig(**{**config.__dict__, "pos": self.family.pos, "tied_head": self.family.tied_head})
        self.model = ToyTransformer(cfg)
        self.optimizers = self._optimizers()
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.seen = 0
        self.step = 0

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        m = self.model
        adam = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        if not self.family.muon:
            return [torch.optim.AdamW([{"params": list(m.parameters()), "name": "adam", "base_lr": self.lrs["adam"]}],
                                      lr=self.lrs["adam"], **adam)]
        embed = [p for n, p in m.named_parameters() if n.startswith(("wte.", "wpe."))]
        hidden = [p for n, p in m.named_parameters() if n.startswith("blocks.")]
        groups = [{"params": embed, "name": "embed", "base_lr": self.lrs["embed"]}]
        if not self.family.tied_head:
            groups.append({"params": [m.lm_head.weight], "name": "head", "base_lr": self.lrs["head"]})
        muon = Muon([{"params": hidden, "name": "hidden", "base_lr": self.lrs["hidden"]}], lr=self.lrs["hidden"],
                    momentum=0.95, shape_scale="sqrt_ratio")
        return [torch.optim.AdamW(groups, lr=self.lrs["embed"], **adam), muon]

    def train_until(self, budget: int, horizon: int, x: torch.Tensor, y: torch.Tensor,
                    on_step: Callable[["ToyRun", float], None] | None = None) -> None:
        """Take steps until ``budget`` examples are seen (the last step may pass it); ``on_step(run, loss)``
        is called after every step."""
        if horizon < budget:
            raise ValueError(f"toy: horizon {horizon} is below the budget {budget}")
        self.model.train()
        while self.seen < budget:
            mult = lr_multiplier(self.seen, self.batch, horizon)
            for opt in self.optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
            idx = torch.randint(len(x), (self.batch,), generator=self.gen)
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in self.optimizers:
                opt.step()
            self.step += 1
            self.seen += self.batch
            if on_step is not None:
                on_step(self, float(loss.detach()))

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue: weights, optimizer states, data order, counters."""
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "gen": self.gen.get_state(), "seen": self.seen, "step": self.step}

    def load_state_dict(self, state: dict, *, origin: str = "toy state") -> None:
        """Restore :meth:`state_dict`. Everything is checked first (keys, shapes, the optimizer count,
        the counters), so a rejected state (a ``ValueError`` naming ``origin``) leaves the run untouched."""
        problems = ["not a dict"] if not isinstance(state, dict) else \
            [f"missing {k!r}" for k in ("model", "optimizers", "gen", "seen", "step") if k not in state]
        if not problems:
            problems = state_problems(self.model, self.optimizers, state["model"], state["optimizers"])
            gen = state["gen"]
            if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8 and gen.shape == self.gen.get_state().shape):
                problems.append("'gen' is not a CPU generator state")
            else:  # an invalid Mersenne Twister state is refused by set_state: here, not after the model loaded
                try:
                    torch.Generator().set_state(gen)
                except (RuntimeError, TypeError, NotImplementedError) as exc:
                    problems.append(f"'gen' is not a CPU generator state ({exc})")
            for k in ("seen", "step"):
                if isinstance(state[k], bool) or not isinstance(state[k], int) or state[k] < 0:
                    problems.append(f"{k!r} = {state[k]!r}, expected an int >= 0")
        if problems:
            raise ValueError(f"{origin}: not a checkpoint of this {self.family.name} run: {'; '.join(problems)}")
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.gen.set_state(state["gen"])
        self.seen, self.step = int(state["seen"]), int(state["step"])

    def save(self, path: Path) -> None:
        """Write a checkpoint atomically (temporary file in the same directory, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        write_atomic(path, lambda fh: torch.save(state, fh))

    def load(self, path: Path) -> None:
        """Restore a checkpoint written by :meth:`save` (``weights_only=True``: no pickle); a rejected
        checkpoint raises a ``ValueError`` naming ``path`` and leaves the run untouched."""
        self.load_state_dict(read_checkpoint(path), origin=str(path))
