"""Loose ends of the framework callbacks (review 23):

* the callback's ``tokens_per_step`` reaches the run record's ``RunInfo.tokens_per_step`` (``inspect`` showed
  ``None``; the noise-scale baseline in tokens reads it);
* a validation loss kept at a step the schedule already measured is also logged (``spectral_lens/val_loss``),
  so the loggers' curve has the steps the record has, each once;
* a Hugging Face run that logged no training loss (shorter than ``logging_steps``) records the trainer's own
  final ``train_loss``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from support.models import lm_pool

import spectral_lens as sl
from spectral_lens._warnings import SpectralLensWarning
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RunInfo, RunRecord, RunWriter, open_runs


def _events(path, key):
    lines = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e[key]) for e in lines if key in e]


# --------------------------------------------------------------------------------------------------
# the driver: RunInfo.tokens_per_step


def _lens(tmp_path, info):
    writer = RunWriter(tmp_path / "run", info, fsync=False, tail_window=(2, 8))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    return sl.SpectralLens(model, [torch.randn(3, 4)], writer=writer, params=(), layers=["0"], progress=False)


def test_driver_fills_run_info_tokens_per_step(tmp_path):
    lens = _lens(tmp_path, RunInfo("r", batch_tier=1))
    driver = LensDriver(lens, [], tokens_per_step=48)
    driver.record_train_loss(2, 1.5)  # the first agreed work on rank 0 fills it
    lens.writer.close()
    assert RunRecord.open(tmp_path / "run").info.tokens_per_step == 48
    assert lens.writer.info.tokens_per_step == 48
    assert _events(tmp_path / "run", "train_loss") == [(2, 1.5)]
    header = json.loads((tmp_path / "run" / "run.json").read_text())
    assert header["run_id"] == "r" and header["summary_windows"]["tail"] == [2, 8]  # the rest stays


def test_driver_keeps_a_differing_run_info_tokens_per_step_and_warns_once(tmp_path):
    lens = _lens(tmp_path, RunInfo("r", batch_tier=1, tokens_per_step=32))
    driver = LensDriver(lens, [], tokens_per_step=48)
    with pytest.warns(SpectralLensWarning, match=r"tokens_per_step=32.*tokens_per_step=48"):
        driver.record_train_loss(2, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        driver.record_train_loss(4, 1.4)  # said once
    lens.writer.close()
    assert RunRecord.open(tmp_path / "run").info.tokens_per_step == 32


def test_driver_without_tokens_per_step_leaves_run_info_alone(tmp_path):
    lens = _lens(tmp_path, RunInfo("r", batch_tier=1))
    driver = LensDriver(lens, [], tokens_per_step=None)
    with pytest.warns(SpectralLensWarning, match="count optimizer steps"):
        driver.record_train_loss(2, 1.5)
    lens.writer.close()
    assert RunRecord.open(tmp_path / "run").info.tokens_per_step is None


def test_driver_logs_a_kept_validation_loss_once(tmp_path):
    lens = _lens(tmp_path, RunInfo("r", batch_tier=1))
    driver = LensDriver(lens, [], tokens_per_step=4)
    logged = []
    driver.measure(2, 8, log=logged.append)  # the schedule measured step 2 without a loss
    driver.record_val_loss(2, 8, 0.75, log=logged.append)
    driver.record_val_loss(2, 8, 0.5, log=logged.append)  # a second evaluation at the step: nothing
    assert logged[1:] == [{"spectral_lens/val_loss": 0.75}]
    lens.writer.close()
    driver.measure(4, 16, log=logged.append)  # a closed writer: skipped (warns), nothing logged
    driver.record_val_loss(4, 16, 0.5, log=logged.append)
    assert len(logged) == 2
    assert _events(tmp_path / "run", "val_loss") == [(2, 0.75)]


# --------------------------------------------------------------------------------------------------
# Lightning


def _lightning():
    pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from .test_lightning import TinyLit, loader, trainer

    class Metrics(pl.loggers.Logger):
        """Every log_metrics call, as (step, metrics)."""

        def __init__(self):
            super().__init__()
            self.calls = []

        name, version = "metrics", 0

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return TinyLit, loader, trainer, Metrics


def test_lightning_fills_tokens_per_step_and_logs_every_recorded_validation_loss(tmp_path):
    from spectral_lens.integrations import SpectralLensLightningCallback

    TinyLit, loader, trainer, Metrics = _lightning()
    torch.manual_seed(0)
    module = TinyLit()
    writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12))
    # validation after steps 2 and 4; the schedule measures 2 first (a val_loss event), 4 is measured by it
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer, params=(),
                           schedule=sl.Schedule(frozenset({2})), progress=False)
    logger = Metrics()
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=48)
    trainer(tmp_path, cb, logger, max_steps=4, val_check_interval=2, num_sanity_val_steps=0,
            limit_val_batches=1).fit(module, loader(4, 0), loader(1, 1))
    writer.close()

    (run,) = open_runs([tmp_path / "run"])
    assert run.info.tokens_per_step == 48
    tokens, losses = run.val_curve()
    assert [int(t) for t in tokens] == [96, 192]
    logged = [(step, m["spectral_lens/val_loss"]) for step, m in logger.calls if "spectral_lens/val_loss" in m]
    assert [s for s, _ in logged] == [2, 4]  # the step the schedule measured too, each once
    assert [v for _, v in logged] == pytest.approx([float(v) for v in losses], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Hugging Face


def _hf(tmp_path, **kw):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    from .test_callback_curves import RandomTokens, hf_pool, tiny_gpt2

    model = tiny_gpt2()
    writer = RunWriter(tmp_path / "run", RunInfo("hf", batch_tier=1), fsync=False, tail_window=(2, 8))
    lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2),
                           progress=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(16, 0),
                                   eval_dataset=RandomTokens(2, 1))
    return lens, trainer


def test_hf_fills_tokens_per_step_and_logs_every_recorded_validation_loss(tmp_path):
    from spectral_lens.integrations import SpectralLensCallback

    lens, trainer = _hf(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2)
    SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=40).attach(trainer)
    trainer.train()
    lens.writer.close()

    (run,) = open_runs([tmp_path / "run"])
    assert run.info.tokens_per_step == 40
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    logged = [(h["step"], h["spectral_lens/val_loss"]) for h in trainer.state.log_history
              if "spectral_lens/val_loss" in h]
    assert [s for s, _ in evals] == [s for s, _ in logged] == [2, 4]  # the schedule measured both steps first
    assert [v for _, v in logged] == pytest.approx([v for _, v in evals], rel=1e-6)
    assert _events(tmp_path / "run", "val_loss") == logged


def test_hf_run_shorter_than_logging_steps_records_the_trainers_final_loss(tmp_path):
    from spectral_lens.integrations import SpectralLensCallback

    lens, trainer = _hf(tmp_path, max_steps=3, logging_steps=10)
    SpectralLensCallback(lens, tokens_per_step=40).attach(trainer)
    result = trainer.train()
    lens.writer.close()
    assert not [h for h in trainer.state.log_history if "loss" in h]  # the trainer logged no loss in the run
    ((step, loss),) = _events(tmp_path / "run", "train_loss")
    assert step == 3 and loss == pytest.approx(result.metrics["train_loss"], rel=1e-6)
    (run,) = open_runs([tmp_path / "run"])
    assert [(e["step"], e["tokens"]) for e in run.events if e.get("train_loss") is not None] == [(3, 120)]


def test_hf_last_steps_after_the_last_log_record_no_loss_the_trainer_did_not_report(tmp_path):
    """The final ``train_loss`` is the mean over the whole run, not over the steps after the last log: a
    run that logged its loss records only what it logged."""
    from spectral_lens.integrations import SpectralLensCallback

    lens, trainer = _hf(tmp_path, max_steps=5, logging_steps=2)
    SpectralLensCallback(lens, tokens_per_step=40).attach(trainer)
    trainer.train()
    lens.writer.close()
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert _events(tmp_path / "run", "train_loss") == logged and [s for s, _ in logged] == [2, 4]


def test_hf_final_loss_of_a_resumed_call_is_not_recorded(tmp_path):
    """transformers 4 divides a resumed ``train()`` call's loss sum by all the run's steps: not recorded."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from spectral_lens.integrations import SpectralLensCallback

    lens = _lens(tmp_path, RunInfo("r", batch_tier=1))
    cb = SpectralLensCallback(lens, tokens_per_step=4)
    args, control = object(), transformers.TrainerControl()
    final = {"train_runtime": 1.0, "train_loss": 2.5}
    for start, end, recorded in ((4, 6, []), (0, 3, [(3, 2.5)])):
        state = transformers.TrainerState(global_step=start)
        cb.on_train_begin(args, state, control)
        state.global_step = end
        cb.on_log(args, state, control, logs=dict(final))
        cb.on_train_end(args, state, control)  # records it (only train()'s final metrics come before it)
        assert _events(tmp_path / "run", "train_loss") == recorded
    lens.writer.close()
