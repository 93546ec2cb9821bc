"""A :class:`~examples.tune.trainable.Trainable` for the NanoGPT variant zoo (``examples.nanogpt.train``).

The family is the variant name; the batch tier is the trainer's ``batch_tier``. A family's reference
rates are the zoo recipe's rates (tuned for d12 at tier 8) times ``lr_factor``
(:func:`zoo_reference_lrs`); a candidate's rates must be one common multiple of them (the trainer
scales every optimizer group by one ``lr_scale``), and the trainer's ``lr_scale`` is
``candidate.scale * lr_factor`` (:func:`lr_scale_of`).

Continuation: every call trains with ``tokens=schedule`` and ``stop_tokens=budget`` (the trainer stops
after the first step reaching the budget, evaluates and checkpoints there, and closes its files); the
schedule is ``schedule_tokens`` when set (the measured run's budget, so trials are prefixes of the
measured runs) else the tuner's ``horizon``. A promoted trial resumes from ``workdir/ckpt.pt``. Since
the data order, the learning-rate schedule and the evaluation points depend only on the step, the run
up to a rung is exactly the prefix of the uninterrupted run. A checkpoint the trainer refuses to
continue (made by an older trainer, or on other data) stops the tuner with a ``TrialDirMismatch``.
torch's global random streams are restored after each call (the trainer seeds them), so tuning
in-process leaves the caller's alone.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .trainable import Candidate, Report

__all__ = ["ZooTrainable", "zoo_reference_lrs", "lr_scale_of"]

CKPT = "ckpt.pt"


def zoo_reference_lrs(variant: str, lr_factor: float = 1.0) -> dict[str, float]:
    """The zoo recipe's rate per optimizer group of ``variant`` times ``lr_factor`` (``embed``, ``head``, ``scalar``, ``matrix``)."""
    from examples.nanogpt.variants import build_recipe, canonical_name

    r = build_recipe(canonical_name(variant))
    return {g: v * lr_factor for g, v in
            {"embed": r.embed_lr, "head": r.head_lr, "scalar": r.scalar_lr, "matrix": r.matrix_lr}.items()}


def lr_scale_of(lrs: Mapping[str, float], reference: Mapping[str, float], lr_factor: float = 1.0) -> float:
    """The trainer's ``lr_scale`` for rates ``lrs``: their common factor over ``reference``, times ``lr_factor``.

    Rates that name other groups than ``reference`` or are not one common multiple of it cannot be
    trained by the zoo (one factor scales every group) and raise a ``ValueError`` naming both.
    """
    if set(lrs) != set(reference):
        raise ValueError(f"rates name groups {sorted(lrs)}, the family's reference rates {sorted(reference)}")
    ratios = {g: lrs[g] / reference[g] for g in reference}
    first = next(iter(ratios.values()))
    if not all(math.isclose(r, first, rel_tol=1e-6) for r in ratios.values()):
        raise ValueError(f"rates {dict(lrs)} are not the zoo recipe's rates times one scale (ratios to the "
                         f"reference {dict(reference)}: {ratios}); the zoo scales all groups together")
    return first * lr_factor


@dataclass(frozen=True)
class ZooTrainable:
    """Train zoo variants for the tuner (no spectral measurements).

    Attributes:
        eval_every_tokens: tokens between validation reports. Every rung budget must be a multiple
            of each tier's tokens per step (else the trainer stops past the rung and the call fails).
        profile, data, val_tokens, seed, device, compile, attn_impl, seq_len, rows: passed to
            ``examples.nanogpt.train.train`` (``seq_len``/``rows`` ``None``: the profile's geometry).
        lr_factor: the reference rates are the recipe's times this (see :func:`zoo_reference_lrs`).
        schedule_tokens: the learning-rate schedule's length; ``None``: the tuner's ``horizon`` (its
            last rung). Set it to the measured runs' budget when that is longer than the last rung.
    """

    eval_every_tokens: int
    profile: str = "tiny"
    data: str = "pydoc"
    val_tokens: int | None = None
    seed: int = 0
    device: str | None = None
    compile: bool = False
    attn_impl: str = "auto"
    seq_len: int | None = None
    rows: int | None = None
    lr_factor: float = 1.0
    schedule_tokens: int | None = None

    def __post_init__(self) -> None:
        """Refuse settings the trainer would refuse, before any trial (else every trial fails alone)."""
        from examples.nanogpt.train import _check_arguments, _device
        from examples.nanogpt.variants import get_profile

        _check_arguments(eval_every_tokens=self.eval_every_tokens, val_tokens=self.val_tokens, seq_len=self.seq_len,
                         rows=self.rows, schedule_tokens=self.schedule_tokens)
        get_profile(self.profile)
        _device(self.device)
        if self.data not in ("pydoc", "stdlib") and not Path(self.data).is_dir():
            raise ValueError(f"ZooTrainable: data={self.data!r}: expected 'pydoc', 'stdlib' or a directory of .bin shards")
        if self.attn_impl not in ("auto", "dense", "flex"):
            raise ValueError(f"ZooTrainable: attn_impl={self.attn_impl!r}, expected 'auto', 'dense' or 'flex'")
        if not (isinstance(self.lr_factor, (int, float)) and math.isfinite(self.lr_factor) and self.lr_factor > 0):
            raise ValueError(f"ZooTrainable: lr_factor={self.lr_factor!r}, expected a finite number > 0")

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Train ``candidate`` to ``budget`` tokens, resuming from ``workdir/ckpt.pt``; report every evaluation."""
        from examples.nanogpt.train import CheckpointMismatch, train

        schedule = self.schedule_tokens or horizon
        if not 0 < budget <= horizon <= schedule:
            raise ValueError(f"ZooTrainable: {candidate.key}: need 0 < budget ({budget}) <= horizon ({horizon}) "
                             f"<= schedule_tokens ({schedule})")
        try:
            scale = lr_scale_of(candidate.lrs, zoo_reference_lrs(candidate.family, self.lr_factor), self.lr_factor)
        except ValueError as e:
            raise ValueError(f"ZooTrainable: candidate {candidate.key}: {e}; build the family's reference rates "
                             f"with zoo_reference_lrs(family, lr_factor={self.lr_factor})") from None
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
            if tokens > budget:  # raised after the trainer has returned (and closed its files)
                seen["past"] = tokens
                return
            report(int(tokens), float(val_loss))

        try:
            with _callers_rng_kept():  # train() seeds torch's global generators; the tuner may run in the caller's process
                train(variant=candidate.family, profile=self.profile, data=self.data, run_dir=workdir, tokens=schedule,
                      stop_tokens=budget, batch_tier=candidate.tier, seq_len=self.seq_len, rows=self.rows,
                      lr_scale=scale, eval_every_tokens=self.eval_every_tokens, val_tokens=self.val_tokens,
                      resume=resume, save_final=True, seed=self.seed, device=self.device, compile=self.compile,
                      attn_impl=self.attn_impl, on_eval=on_eval, verbose=False)
        except CheckpointMismatch as e:
            # the directory's fault, not the candidate's: failing the trial alone would fail every promoted
            # trial in turn and choose among the others; stop the tuner instead (the worker re-raises this)
            from .worker import TrialDirMismatch

            raise TrialDirMismatch(f"tune: {candidate.key}: {e}; the tuner stops: delete {workdir} (and any other "
                                   "trial directory made before) to train the trial again from the start (the same "
                                   "losses on the same data), or the whole tuning directory if the data changed"
                                   ) from None
        _keep_latest_checkpoint(workdir)
        if "past" in seen:
            raise ValueError(f"ZooTrainable: {candidate.key} stopped at {seen['past']} tokens, past the rung budget "
                             f"{budget}; choose rung budgets that are multiples of the tier's tokens per step")


def _callers_rng_kept():
    """``torch.random.fork_rng`` over the CPU and every CUDA device: torch's global random streams are
    restored after the block (``train`` calls ``torch.manual_seed``, which reset the caller's stream)."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def _keep_latest_checkpoint(workdir: Path) -> None:
    """Move the newest ``ckpt_<step>.pt`` to ``ckpt.pt`` (atomic rename) and drop the older ones."""
    ckpts = sorted(workdir.glob("ckpt_*.pt"))
    if not ckpts:
        raise RuntimeError(f"{workdir}: the trainer saved no checkpoint")
    os.replace(ckpts[-1], workdir / CKPT)
    for old in ckpts[:-1]:
        old.unlink()
