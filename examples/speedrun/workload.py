"""The NanoGPT zoo as a replication :class:`~examples.replicate.workload.Workload` (run by ``examples.replicate``).

A measured run trains one family at one batch tier with its tuned rates while
:class:`spectral_lens.SpectralLens` measures every block's activation spectrum and the final
attention output projection's per-sample gradient spectrum on a fixed held-out pool at every
validation point (every ``preset.measure_every`` of the budget, so 10-50% progress is resolved).
The tuner trains candidates with the zoo's one trainable, :class:`examples.tune.zoo.ZooTrainable`,
whose learning-rate schedule spans the measured runs' budget (a trial is a prefix of a measured run).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

import spectral_lens as sl
from examples.nanogpt.data import heldout_pool, load_data
from examples.nanogpt.train import TrainingDiverged, train
from examples.nanogpt.variants import build_config, canonical_name, get_profile
from examples.replicate.machine import machine_info
from examples.tune.zoo import ZooTrainable, lr_scale_of, zoo_reference_lrs
from spectral_lens.records import RunInfo, RunWriter

from .presets import Preset

__all__ = ["ZooWorkload"]


class ZooWorkload:
    """The zoo's speedrun for one :class:`~examples.speedrun.presets.Preset`.

    Args:
        preset: what to train.
        verbose: print one line per finished run.

    Besides the ``Workload`` attributes it has ``fraction``, ``window`` and ``report_sections`` (the
    speedrun's report sections, :mod:`examples.speedrun.summary`), the optional parts the shared
    pipeline reads. A ``ValueError`` names the family and tier when a rung budget is not a whole
    number of that tier's optimizer steps (the tuner's trials must stop exactly on their rungs).
    """

    unit = "tokens"

    def __init__(self, preset: Preset, *, verbose: bool = True):
        self.preset = preset
        self.verbose = verbose
        self.name = f"speedrun-{preset.name}"
        self.families = tuple(canonical_name(f) for f in preset.families)
        self.tiers = tuple(preset.tiers)
        self.reference_tier = preset.reference_tier
        self.target_loss = preset.target_loss
        self.budget = preset.budget
        self.fraction = preset.fraction
        self.window = tuple(preset.tail_window)
        self._pool = None
        for family in self.families:
            for tier in sorted(self.tiers, reverse=True):  # every tier: steps of one need not divide another's
                per_step = self.tokens_per_step(family, tier)
                bad = [r for r in preset.rungs if r % per_step]
                if bad:
                    raise ValueError(f"preset {preset.name!r}: rung budgets {bad} are not multiples of {family} at "
                                     f"tier {tier}'s {per_step:,} tokens per step")

    def tokens_per_step(self, family: str, tier: int) -> int:
        """Training tokens per optimizer step of ``family`` at ``tier`` (the trainer's micro-batch geometry)."""
        p = self.preset
        cfg = build_config(canonical_name(family), get_profile(p.profile))
        seq_len = p.seq_len or cfg.seq_len
        rows = p.rows or (1 if cfg.attn_mask == "window" else max(1, get_profile(p.profile).long_ctx // seq_len))
        return tier * rows * seq_len

    # ---- Workload protocol -------------------------------------------------------------------
    def reference_lrs(self, family: str) -> Mapping[str, float]:
        """The family's rate per optimizer group at ``reference_tier`` (recipe rate x ``preset.lr_factor``)."""
        return zoo_reference_lrs(family, self.preset.lr_factor)

    def trainable(self) -> ZooTrainable:
        """The tuner's callable (trains candidates without measurements; schedule over the run budget)."""
        p = self.preset
        return ZooTrainable(eval_every_tokens=max(1, int(p.measure_every * p.budget)), profile=p.profile,
                            data=p.data, val_tokens=p.val_tokens, seed=p.seed, device=p.device, compile=p.compile,
                            attn_impl=p.attn_impl, seq_len=p.seq_len, rows=p.rows, lr_factor=p.lr_factor,
                            schedule_tokens=p.budget)

    def run(self, family: str, tier: int, lrs: Mapping[str, float], run_dir: Path) -> Path:
        """Train ``family`` at ``tier`` with ``lrs`` and measure into ``run_dir`` (its name is the run id).

        A run whose validation or training loss turns non-finite stops there (the trainer's
        ``TrainingDiverged`` for the training loss), its record marked ``status: "diverged"`` (the reason in
        ``divergence``): a finished run, not trained again by a rerun. So does a run whose activations the lens
        cannot measure (``NonFiniteError``: beyond float32's range, with a finite loss): recorded as failed, it
        stopped the job with status 2 and every rerun trained it into the same error. ``extras["machine"]``
        records what trained it (:func:`examples.replicate.machine.machine_info`).
        """
        p = self.preset
        family = canonical_name(family)
        run_dir = Path(run_dir)
        scale = lr_scale_of(lrs, self.reference_lrs(family), p.lr_factor)
        cfg = build_config(family, get_profile(p.profile))
        per_step = self.tokens_per_step(family, tier)
        device = torch.device(p.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        info = RunInfo(run_dir.name, family=family, batch_tier=tier, tokens_per_step=per_step,
                       seed=p.seed, n_layer=cfg.n_layer, total_tokens=p.budget, batch_size=per_step // (p.seq_len or cfg.seq_len),
                       primary_spectrum=f"act:blocks.{cfg.n_layer - 1}",
                       extras=dict(preset=p.name, profile=p.profile, data=p.data, lrs=dict(lrs), lr_scale=scale,
                                   target_loss=p.target_loss,
                                   machine=machine_info(device)))  # what trained it (GPU, CPU, torch), as the toy's
        pool = self.pool(device)
        state: dict = {}
        with RunWriter(run_dir, info, tail_window=p.tail_window, head_window=p.head_window) as writer:

            def on_eval(model: torch.nn.Module, step: int, tokens: int, val_loss: float) -> None:
                if not math.isfinite(val_loss):  # as examples.toy: the run stops here, diverged (no spectra of
                    writer.log(step, tokens, val_loss=val_loss)  # a broken model); the record shows where
                    raise FloatingPointError(f"speedrun {run_dir.name}: validation loss {val_loss} at "
                                             f"{tokens:,} tokens (step {step})")
                if "lens" not in state:  # zoo blocks return (x, v): pick=0 takes the residual stream
                    state["lens"] = sl.SpectralLens(
                        model, pool, layers="all", pick=0, gradient_samples=p.gradient_samples, writer=writer,
                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
                try:
                    state["lens"].measure(step, tokens, val_loss=val_loss, progress=tokens / p.budget)
                except sl.NonFiniteError as exc:  # activations beyond float32's range (or below it) with a
                    writer.log(step, tokens, val_loss=val_loss)  # finite loss: the run stops here, unmeasured
                    state["unmeasured"] = True
                    raise FloatingPointError(f"speedrun {run_dir.name}: the lens could not measure at {tokens:,} "
                                             f"tokens (step {step}; validation loss {val_loss:.4g}): {exc}") from None
                writer.log(step, tokens, val_loss=val_loss)

            try:
                result = train(variant=family, profile=p.profile, data=p.data, run_dir=run_dir / "train",
                               tokens=p.budget, batch_tier=tier, seq_len=p.seq_len, rows=p.rows, lr_scale=scale,
                               eval_every_tokens=max(1, int(p.measure_every * p.budget)), val_tokens=p.val_tokens,
                               save_final=False, seed=p.seed, device=str(device), compile=p.compile,
                               attn_impl=p.attn_impl, on_eval=on_eval, verbose=False)
            except FloatingPointError as exc:
                if isinstance(exc, TrainingDiverged) and exc.what == "training loss":  # the record shows where
                    writer.log(exc.step, exc.tokens, train_loss=exc.value)
                # a diverged run is a result, not a crash (as examples.toy's): its record ends here marked
                # "diverged" and the pipeline keeps it; raising instead marked it failed, stopped the job, and
                # the rerun trained the same seed at the same rates into the same divergence
                writer.update_info(device=str(device), status="diverged", divergence=str(exc))
                if self.verbose:  # as the verdict reads it: finite losses are a run cut short, not diverged
                    how = "stopped unmeasured" if state.get("unmeasured") else "diverged"
                    print(f"  {info.run_id}: {how} ({exc})", flush=True)
                return run_dir
            reached = min(r["val_loss"] for r in result.history) <= p.target_loss
            writer.update_info(throughput=result.tokens_per_s, final_val_loss=result.final_val_loss,
                               reached_target=bool(reached), device=str(device), status="complete")
        if self.verbose:
            print(f"  {info.run_id}: {result.steps} steps, final val loss {result.final_val_loss:.3f}"
                  f"{'' if reached else ' (target not reached)'}, {result.tokens_per_s:,.0f} tokens/s", flush=True)
        return run_dir

    def report_sections(self, runs, out_dir: Path) -> list[str]:
        """The speedrun's report sections (ours beside the paper's, missed targets, tuning, loss curves)."""
        from .summary import speedrun_sections

        return speedrun_sections(self, runs, Path(out_dir))

    # ---- helpers ---------------------------------------------------------------------------
    def pool(self, device: torch.device) -> list:
        """The fixed held-out measurement pool (the same sequences for every run and checkpoint)."""
        if self._pool is None or self._pool[0] != device:
            data = load_data(self.preset.data)
            batches = list(heldout_pool(data.val, self.preset.pool_seq_len, self.preset.pool_seqs,
                                        batch_size=8, device=device))
            self._pool = (device, batches)
        return self._pool[1]
