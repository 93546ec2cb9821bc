"""A :class:`~examples.tune.trainable.Trainable` for the NanoGPT variant zoo (``examples.nanogpt.train``).

The family is the variant name; a candidate's ``scale`` is the trainer's ``lr_scale`` (it multiplies
every optimizer group's base rate, i.e. the variant recipe's rates at tier 8, so the family's
reference rates are :func:`zoo_reference_lrs`). The batch tier is the trainer's ``batch_tier``.

Continuation: every call trains with ``tokens=horizon`` (so the learning-rate schedule is the
horizon's), checkpoints at every evaluation (``checkpoint_every_tokens = eval_every_tokens``) and
stops at the first evaluation at or past ``budget``; a promoted trial resumes from the newest
checkpoint in ``workdir``. Since the data order and the schedule depend only on the step, the run up
to a rung is exactly the prefix of the uninterrupted run to the horizon.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .trainable import Candidate, Report

__all__ = ["ZooTrainable", "zoo_reference_lrs"]


def zoo_reference_lrs(variant: str) -> dict[str, float]:
    """The zoo recipe's base rate per optimizer group of ``variant`` (``embed``, ``head``, ``scalar``, ``matrix``)."""
    from examples.nanogpt.variants import build_recipe, canonical_name

    r = build_recipe(canonical_name(variant))
    return {"embed": r.embed_lr, "head": r.head_lr, "scalar": r.scalar_lr, "matrix": r.matrix_lr}


class _Stop(Exception):
    """Raised from ``on_eval`` to end a call at its rung budget (a checkpoint exists at that step)."""


@dataclass(frozen=True)
class ZooTrainable:
    """Train zoo variants for the tuner.

    Attributes:
        eval_every_tokens: tokens between validation reports (and checkpoints); choose it so that
            every rung budget is a multiple of it and of each tier's tokens per step.
        profile, data, val_tokens, seed, device, compile: passed to ``examples.nanogpt.train.train``.
    """

    eval_every_tokens: int
    profile: str = "tiny"
    data: str = "pydoc"
    val_tokens: int | None = None
    seed: int = 0
    device: str | None = None
    compile: bool = False

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Train ``candidate.family`` at ``batch_tier=candidate.tier`` and ``lr_scale=candidate.scale`` up to ``budget`` tokens."""
        from examples.nanogpt.train import train

        ref = zoo_reference_lrs(candidate.family)
        for group, lr in candidate.lrs.items():
            if group not in ref or not math.isclose(lr, ref[group] * candidate.scale, rel_tol=1e-6):
                raise ValueError(f"ZooTrainable: candidate {candidate.key} rate {group}={lr!r} is not the zoo recipe's "
                                 f"rate times the scale ({ref.get(group)!r} x {candidate.scale:.6g}); build the "
                                 "family's reference rates with zoo_reference_lrs()")
        workdir = Path(workdir)
        ckpts = sorted(workdir.glob("ckpt_*.pt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))

        def on_eval(model, step, tokens, val_loss):
            report(tokens, val_loss)
            if tokens >= budget:
                if tokens != budget:
                    raise ValueError(f"ZooTrainable: {candidate.key} evaluates at {tokens} tokens, past the rung budget "
                                     f"{budget}; choose budgets that are multiples of eval_every_tokens="
                                     f"{self.eval_every_tokens} and of the tier's tokens per step")
                raise _Stop

        try:
            train(variant=candidate.family, profile=self.profile, data=self.data, run_dir=workdir, tokens=horizon,
                  batch_tier=candidate.tier, lr_scale=candidate.scale, eval_every_tokens=self.eval_every_tokens,
                  checkpoint_every_tokens=self.eval_every_tokens, val_tokens=self.val_tokens, seed=self.seed,
                  device=self.device, compile=self.compile, resume=ckpts[-1] if ckpts else None,
                  on_eval=on_eval, verbose=False)
        except _Stop:
            pass
        for old in ckpts[:-1]:  # keep the newest checkpoint of the previous call and the ones just written
            old.unlink(missing_ok=True)
