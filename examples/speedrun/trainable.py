"""The zoo's :class:`~examples.tune.trainable.Trainable`: one LR candidate trained to a token budget.

A trial lives in its own ``workdir``: ``ckpt.pt`` (model and optimizer state, written atomically by the
trainer) and the trainer's ``metrics.jsonl``. A promoted trial resumes from ``ckpt.pt``; the LR
schedule and the evaluation points span the ``horizon`` (the trainer's ``stop_tokens``), so a trial
stopped at a rung and continued is the same run as one trained straight to the horizon.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

from examples.nanogpt.train import train
from examples.tune.trainable import Candidate, Report

from .presets import Preset

__all__ = ["ZooTrainable", "lr_scale_of"]

CKPT = "ckpt.pt"


def lr_scale_of(candidate_lrs: Mapping[str, float], reference: Mapping[str, float], base_scale: float) -> float:
    """The trainer's ``lr_scale`` for ``candidate_lrs``: one factor over the reference rates.

    The zoo's trainer scales every optimizer group by one factor; a candidate whose groups are not one
    common multiple of the reference rates cannot be trained and is an error.
    """
    if set(candidate_lrs) != set(reference):
        raise ValueError(f"candidate rates name groups {sorted(candidate_lrs)}, the family's reference rates "
                         f"{sorted(reference)}")
    ratios = {g: candidate_lrs[g] / reference[g] for g in reference}
    first = next(iter(ratios.values()))
    if not all(math.isclose(r, first, rel_tol=1e-6) for r in ratios.values()):
        raise ValueError(f"candidate rates {dict(candidate_lrs)} are not one multiple of the reference rates "
                         f"{dict(reference)} (ratios {ratios}); the zoo scales all groups together")
    return first * base_scale


class ZooTrainable:
    """Trains zoo candidates for the tuner (no spectral measurements).

    Args:
        preset: the speedrun preset (profile, data, micro-batch geometry, validation, device).
        reference_lrs: ``family -> {group: rate}``, the rates ``Candidate.lrs`` are multiples of.
        base_scale: the preset's reference-rate factor over the zoo recipe's rates (the trainer's
            ``lr_scale`` of a candidate at factor 1).
    """

    def __init__(self, preset: Preset, reference_lrs: Mapping[str, Mapping[str, float]], base_scale: float):
        self.preset = preset
        self.reference_lrs = {f: dict(v) for f, v in reference_lrs.items()}
        self.base_scale = base_scale

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Train ``candidate`` to ``budget`` tokens (schedule over ``horizon``), resuming from ``workdir``."""
        if not 0 < budget <= horizon:
            raise ValueError(f"{candidate.key}: budget {budget} must be in (0, horizon={horizon}]")
        if candidate.family not in self.reference_lrs:
            raise KeyError(f"{candidate.key}: family {candidate.family!r} is not in this workload "
                           f"({', '.join(self.reference_lrs)})")
        p = self.preset
        scale = lr_scale_of(candidate.lrs, self.reference_lrs[candidate.family], self.base_scale)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ckpt = workdir / CKPT
        resume = ckpt if ckpt.exists() else None
        seen: dict[str, int] = {}

        def on_eval(model, step: int, tokens: int, val_loss: float) -> None:
            if "start" not in seen:  # the trainer re-evaluates the resumed step: reported already
                seen["start"] = tokens
                if resume is not None:
                    return
            report(int(tokens), float(val_loss))

        train(variant=candidate.family, profile=p.profile, data=p.data, run_dir=workdir, tokens=horizon,
              stop_tokens=budget, batch_tier=candidate.tier, seq_len=p.seq_len, rows=p.rows, lr_scale=scale,
              eval_every_tokens=max(1, int(p.measure_every * horizon)), val_tokens=p.val_tokens,
              resume=resume, save_final=True, seed=p.seed, device=p.device, compile=p.compile,
              attn_impl=p.attn_impl, on_eval=on_eval, verbose=False)
        _keep_latest_checkpoint(workdir)


def _keep_latest_checkpoint(workdir: Path) -> None:
    """Move the newest ``ckpt_<step>.pt`` to ``ckpt.pt`` (atomic rename) and drop the older ones."""
    ckpts = sorted(workdir.glob("ckpt_*.pt"))
    if not ckpts:
        raise RuntimeError(f"{workdir}: the trainer saved no checkpoint")
    os.replace(ckpts[-1], workdir / CKPT)
    for old in ckpts[:-1]:
        old.unlink()
