"""Review 23's callback change on 2 gloo ranks (slow): the HF callback's hooks as ``Trainer.train()`` calls them
on every rank, rank 0 with the run record. Every rank must make the same collectives at the same points: the
scheduled measurement's, the agreement on its sinks and loggers (inside which rank 0 fills ``run.json``'s
``RunInfo.tokens_per_step``), the agreement on a validation loss kept at a measured step (and logged), and the
agreement on ``train()``'s final ``train_loss`` of a run that logged none (at ``on_train_end``, after an
evaluation with ``metric_key_prefix="train"`` that is not taken for it). Under warnings as errors, rank 0's
warning that the ``RunInfo``'s ``tokens_per_step`` differs from the callback's makes both ranks raise together.
The Lightning callback at a validation of a measured step whose ``val_loss`` only rank 0 logged
(``self.log(..., rank_zero_only=True)`` on rank 0 alone): both ranks make the agreement (before: rank 1
returned, and rank 0's agreement met rank 1's next one, leaving the ranks out of step)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens._warnings import SpectralLensWarning
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def _imports(rank):
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401


def _hf_hooks(rank: int, info: RunInfo):
    """A 3-step run from step 0 with ``logging_steps`` beyond it: measured at step 2, evaluated there, a
    ``metric_key_prefix="train"`` evaluation at step 2, the final metrics at step 3. Rank 0 returns its record."""
    import transformers

    from spectral_lens.integrations import SpectralLensCallback

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    writer = None if path is None else RunWriter(path, info, fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(), progress=False,
                           forward_fn=lambda m, b: m(b[0]), schedule=sl.Schedule(frozenset({2})))
    cb = SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=48)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    try:
        cb.on_train_begin(None, state, control, model=model)
        for step in (1, 2, 3):
            state.global_step = step
            cb.on_step_end(None, state, control)
            if step == 2:
                cb.on_evaluate(None, state, control, metrics={"eval_loss": 1.25})
                cb.on_log(None, state, control, logs={"train_loss": 0.5, "train_runtime": 0.1, "epoch": 1.0})
        cb.on_log(None, state, control, logs={"train_runtime": 1.0, "train_loss": 1.9, "epoch": 1.5})
        cb.on_train_end(None, state, control)
    finally:
        if writer is not None:
            writer.close()
    if path is None:
        return None
    record = RunRecord.open(path)
    header = json.loads((path / "run.json").read_text())
    return {"train_loss": [[e["step"], e["train_loss"]] for e in record.events if e.get("train_loss") is not None],
            "val_loss": [[e["step"], e["val_loss"]] for e in record.events if e.get("val_loss") is not None],
            "measured": [m.step for m in record.measurements], "tokens_per_step": header["tokens_per_step"],
            "logged": [h for h in state.log_history if "spectral_lens/val_loss" in h]}


def _hf_ok(rank):
    return _hf_hooks(rank, RunInfo("r", batch_tier=1))


def _hf_differing_warning_as_error(rank):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        return _hf_hooks(rank, RunInfo("r", batch_tier=1, tokens_per_step=32))


class _FakeTrainer:
    """What the Lightning callback's hooks read of a ``Trainer`` in ``fit``."""

    def __init__(self) -> None:
        self.global_step, self.log_every_n_steps, self.loggers, self.callback_metrics = 0, 50, [], {}
        self.sanity_checking = False
        self.state = type("State", (), {"fn": "fit"})()


def _lightning_val_loss_on_rank0_only(rank):
    """Measured at step 2 (the schedule), then validated there, ``val_loss`` among rank 0's metrics only; the
    train end's ``train_loss`` event. Rank 0 returns its record's events."""
    from spectral_lens.integrations import SpectralLensLightningCallback

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    writer = None if path is None else RunWriter(path, RunInfo("r", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(), progress=False,
                           forward_fn=lambda m, b: m(b[0]), schedule=sl.Schedule(frozenset({2})))
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=48)
    trainer = _FakeTrainer()
    try:
        cb.on_train_start(trainer, model)
        for i in range(2):
            cb.on_train_batch_start(trainer, model, None, i)
            trainer.global_step = i + 1
            cb.on_train_batch_end(trainer, model, torch.tensor(2.0 + i), None, i)
        trainer.callback_metrics = {"val_loss": torch.tensor(1.25)} if rank == 0 else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpectralLensWarning)  # rank 1: val_loss is not among its metrics
            cb.on_validation_end(trainer, model)
        cb.on_train_end(trainer, model)
    finally:
        if writer is not None:
            writer.close()
    if path is None:
        return None
    return [[e["step"], e.get("val_loss"), e.get("train_loss")] for e in RunRecord.open(path).events]


CASES = {"imports": _imports, "hf_ok": _hf_ok, "hf_differing": _hf_differing_warning_as_error,
         "lightning_val_loss_on_rank0_only": _lightning_val_loss_on_rank0_only}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stay_in_step_through_the_review23_callback_writes(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=30, join_s=400, preload="spectral_lens.integrations")
    assert [r["error"] for r in checked_case(results, "imports", None)] == [None, None]
    r0, r1 = checked_case(results, "hf_ok", 25.0)
    assert [r0["error"], r1["error"]] == [None, None], (r0, r1)
    got = r0["value"]
    assert got["measured"] == [2] and got["tokens_per_step"] == 48
    assert got["val_loss"] == [[2, 1.25]] and got["train_loss"] == [[3, 1.9]]
    assert [(h["step"], h["spectral_lens/val_loss"]) for h in got["logged"]] == [(2, 1.25)]
    assert r1["value"] is None
    r0, r1 = (r["error"] for r in checked_case(results, "hf_differing", 25.0))
    assert r0.startswith("SpectralLensWarning: spectral-lens callback: the run record") and "tokens_per_step=32" in r0
    assert r1.startswith("RuntimeError: SpectralLens: a sink's log_measurement or the trainer's loggers failed on "
                         "global rank(s) [0]"), r1
    r0, r1 = checked_case(results, "lightning_val_loss_on_rank0_only", 25.0)
    assert [r0["error"], r1["error"]] == [None, None], (r0, r1)
    assert r0["value"] == [[2, 1.25, None], [2, None, 2.5]] and r1["value"] is None
