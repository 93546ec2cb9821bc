"""The contract between the learning-rate tuner and whatever it tunes.

A *candidate* is one learning-rate setting of one family at one batch tier; a *trainable* is the
callable a workload (the toy task, the NanoGPT zoo, a user's own model) hands to the tuner. The
tuner only ever talks to a trainable through :class:`Trainable`, so it never imports a model.

Budgets are cumulative resource counts in the workload's own unit (training tokens for the zoo,
training examples for the toy). A trial promoted from one rung to the next is called again with a
larger ``budget`` and continues from the checkpoint it left in ``workdir``. ``horizon`` is the last
rung's budget: a trainable sets its learning-rate schedule (warmup, decay) against the horizon, so the
run a trial makes up to rung ``k`` is exactly the prefix of the run it would make to the horizon,
and continuing is the same as never having stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

__all__ = ["Candidate", "Trainable", "Report"]

Report = Callable[[int, float], None]
"""``report(resource, val_loss)``: one validation point of a trial (resource in the workload's unit)."""


@dataclass(frozen=True)
class Candidate:
    """One learning-rate configuration of ``family`` at batch tier ``tier``.

    Attributes:
        family: the variant family (e.g. ``"RoPE"``).
        tier: the batch tier ``B``.
        scale: the learning-rate factor applied to every reference rate of the family
            (``center(B / B0) * multiplier``; one factor scales every optimizer group together).
        lrs: the resulting rate of each optimizer group, ``reference_lr * scale``.
        origins: the (center, multiplier) pairs that produced this factor, e.g.
            ``(("sqrt", 1.0), ("linear", 0.707...))``; several after de-duplication.
    """

    family: str
    tier: int
    scale: float
    lrs: Mapping[str, float]
    origins: tuple[tuple[str, float], ...] = field(default=())

    @property
    def key(self) -> str:
        """A stable identifier, e.g. ``"RoPE/b32/x0.3536"``: used for trial names and workdirs."""
        return f"{self.family}/b{self.tier}/x{self.scale:.4g}"


class Trainable(Protocol):
    """What the tuner trains: one call trains one candidate up to a budget."""

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Train ``candidate`` until ``budget`` resource units have been consumed in total.

        Continue from the checkpoint in ``workdir`` when there is one (a promoted trial), else start
        from scratch; call ``report(resource, val_loss)`` at each validation point (at least once, at
        ``budget``); save a checkpoint into ``workdir`` (atomically) before returning. A diverged run
        reports ``float("nan")`` or raises; the tuner records the trial as failed and goes on.
        """
        ...
