"""The toy replication as a :class:`~examples.replicate.workload.Workload` of the shared pipeline.

Budgets count training **examples** (one prediction each); run records store them in their
``tokens`` fields (``RunInfo.total_tokens`` = the example budget, ``tokens_per_step`` = the batch).
"""
from __future__ import annotations

import math
import time
from functools import cached_property
from pathlib import Path
from typing import Mapping

from examples.replicate.machine import machine_info
from examples.tune.trainable import Candidate, Report
from spectral_lens.records import RunInfo, RunWriter

from .measure import ToyLens
from .presets import REFERENCE_LRS, Preset
from .task import Split
from .train import ToyRun, evaluate

__all__ = ["ToyWorkload", "ToyTrainable", "step_at"]


def step_at(fraction: float, steps: int) -> int:
    """The first step at or past ``fraction`` of ``steps``: ``ceil(fraction * steps)``, with the product
    rounded to 9 decimals first, so that float error (``3 * 0.05 * 100 = 15.000000000000002``) cannot
    push an exact step one step late."""
    return math.ceil(round(fraction * steps, 9))


def _between_batches(rung: int, tier: int) -> str:
    return (f"toy: rung budget {rung} is not a whole number of batches of tier {tier}: the rung's last step "
            f"would pass it, its validation would land past the budget, and the tuner would promote on the "
            f"loss from halfway through the rung (protocol: the loss at the rung); use multiples of every tier")


class ToyTrainable:
    """The tuner's trainable: trains a candidate on the toy task, continuing from ``workdir/checkpoint.pt``.

    Validation loss (the held-out pool) is reported halfway through each call and at its budget (the
    tuner promotes on the loss at the budget; more points would cost more than the training). Picklable (holds only the preset), so tuner workers may run in other processes.
    """

    def __init__(self, preset: Preset):
        self.preset = preset

    @cached_property
    def data(self) -> Split:
        """The task's examples (built once per process)."""
        return self.preset.task.split()

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Train ``candidate`` to ``budget`` examples (see :class:`examples.tune.trainable.Trainable`)."""
        if budget % candidate.tier:
            raise ValueError(_between_batches(budget, candidate.tier))
        p, d = self.preset, self.data
        run = ToyRun(candidate.family, candidate.tier, candidate.lrs, p.model, seed=p.seed)
        ckpt = Path(workdir) / "checkpoint.pt"
        if ckpt.exists():
            run.load(ckpt)
            # this rung's own checkpoint (a retry after a crash) overshoots the budget by less than one
            # batch (the last step's); a later rung's is at least one batch past it
            if run.seen >= budget + candidate.tier:
                raise ValueError(f"{ckpt}: the checkpoint has seen {run.seen} examples, a batch or more past this "
                                 f"rung's budget {budget}; it was made under another rung schedule: delete it")
        state = {"mid": (run.seen + budget) // 2}

        def on_step(r: ToyRun, loss: float) -> None:
            if not math.isfinite(loss):
                raise FloatingPointError(f"toy {candidate.key}: training loss {loss} at {r.seen} examples")
            if state["mid"] is not None and state["mid"] <= r.seen < budget:
                report(r.seen, evaluate(r.model, d.x_heldout, d.y_heldout))
                state["mid"] = None

        try:
            run.train_until(budget, horizon, d.x_train, d.y_train, on_step)
        except FloatingPointError:
            report(run.seen, float("nan"))
            return
        report(run.seen, evaluate(run.model, d.x_heldout, d.y_heldout))
        run.save(ckpt)


class ToyWorkload:
    """The toy replication of a :class:`~examples.toy.presets.Preset` (see the Workload contract)."""

    unit = "examples"

    def __init__(self, preset: Preset):
        self.preset = preset
        self.name = f"toy-{preset.name}"
        self.families = tuple(preset.families)
        self.tiers = tuple(preset.tiers)
        self.reference_tier = preset.reference_tier
        self.target_loss = preset.target_loss
        self.budget = preset.budget
        self.fraction = preset.fraction
        self.window = tuple(preset.window)
        for rung in preset.tuner.rungs:
            for tier in self.tiers:
                if rung % tier:
                    raise ValueError(_between_batches(rung, tier))
        self._trainable = ToyTrainable(preset)

    def reference_lrs(self, family: str) -> Mapping[str, float]:
        """The family's reference rates (:data:`~examples.toy.presets.REFERENCE_LRS`)."""
        if family not in REFERENCE_LRS:
            raise ValueError(f"toy: unknown family {family!r}, expected one of {list(REFERENCE_LRS)}")
        return dict(REFERENCE_LRS[family])

    def trainable(self) -> ToyTrainable:
        """The tuner's trainable (no spectral measurements)."""
        return self._trainable

    def run(self, family: str, tier: int, lrs: Mapping[str, float], run_dir: Path) -> Path:
        """Train one measured run into ``run_dir`` (its name is the run id) and close its record.

        A run whose training or validation loss turns non-finite stops there (at a measurement or at an
        evaluation-only step), its record marked ``status: "diverged"`` (with the reason in ``divergence``): a
        finished run, not trained again by a rerun. ``extras["machine"]`` records what trained it
        (:func:`examples.replicate.machine.machine_info`).
        """
        p, d = self.preset, self._trainable.data
        run = ToyRun(family, tier, lrs, p.model, seed=p.seed)
        steps = math.ceil(p.budget / tier)
        info = RunInfo(run_dir.name, family=family, batch_tier=tier, tokens_per_step=tier, seed=p.seed,
                       n_layer=p.model.n_layer, total_tokens=p.budget, batch_size=tier,
                       primary_spectrum=f"act:blocks.{p.model.n_layer - 1}",
                       extras={"unit": "examples", "lrs": dict(lrs), "preset": p.name, "task": p.task.__dict__,
                               "machine": machine_info()})  # what trained it: CPU, OS, torch, BLAS, threads
        measure_steps = {step_at(f, steps) for f in p.measure_fractions}
        eval_steps = {step_at(k * p.eval_every, steps) for k in range(1, int(round(1 / p.eval_every)) + 1)}
        with RunWriter(run_dir, info, tail_window=p.window, head_window=(2, 8)) as writer:
            lens = ToyLens(run.model, d.x_heldout, d.y_heldout, d.phase_heldout, p.task.c, writer,
                           gradient_samples=p.gradient_samples)
            clock = {"train": 0.0, "t": time.perf_counter()}

            def checkpoint(r: ToyRun, loss: float | None) -> None:
                clock["train"] += time.perf_counter() - clock["t"]
                if not math.isfinite(loss if loss is not None else 0.0):
                    writer.log(r.step, r.seen, train_loss=loss)  # the record shows where it diverged
                    raise FloatingPointError(f"toy {run_dir.name}: training loss {loss} at {r.seen} examples")
                progress = min(1.0, r.seen / p.budget)
                rate = r.seen / clock["train"] if clock["train"] > 0 else None
                if r.step in measure_steps:
                    try:
                        lens.measure(r.step, r.seen, progress)
                    except FloatingPointError as exc:  # a non-finite validation loss: no spectra of a broken
                        # model; or a finite one whose activations the lens cannot measure (measure.Unmeasurable)
                        writer.log(r.step, r.seen, val_loss=getattr(exc, "val_loss", math.nan), train_loss=loss,
                                   tokens_per_s=rate)
                        raise
                    writer.log(r.step, r.seen, train_loss=loss, tokens_per_s=rate)
                elif r.step in eval_steps:
                    val = lens.val_loss()
                    writer.log(r.step, r.seen, val_loss=val, train_loss=loss, tokens_per_s=rate)
                    if not math.isfinite(val):  # as at a measurement: the run stops here, diverged
                        raise FloatingPointError(f"toy {run_dir.name}: validation loss {val} at {r.seen} examples")
                clock["t"] = time.perf_counter()

            try:
                checkpoint(run, None)
                run.train_until(p.budget, p.budget, d.x_train, d.y_train, checkpoint)
            except FloatingPointError as exc:
                # a diverged run is a result, not a crash: its record ends here marked "diverged", and the
                # verdict names it and leaves it out of rho, as the library does every diverged run (its
                # examples-to-target stand if it reached the target first; spectral_lens.analysis.divergence);
                # raising instead lost it, and the rerun trained the same seed at the same rate into the
                # same divergence, so the job could never finish
                writer.update_info(status="diverged", divergence=str(exc))
                return run_dir
            writer.update_info(throughput=run.seen / max(clock["train"], 1e-9), status="complete")
        return run_dir

    def report_sections(self, runs, out_dir: Path) -> list[str]:
        """The toy's own report sections and figures (Fig. 4a, 11a, 11b analogues; the paper table)."""
        from .report import toy_sections

        return toy_sections(self, runs, out_dir)
