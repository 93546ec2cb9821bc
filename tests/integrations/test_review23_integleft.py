"""Review 23's callback leftovers:
* a validation loss kept at an already measured step reached the trainer's loggers but not the lens's own sinks
  (``TensorBoardSink``, ``WandbSink``): their ``val_loss`` curve had gaps there. Sinks with ``log_val_loss`` now
  get it, once per step (a measurement with a loss logs it with its scalars, as before);
* Lightning: a ``val_loss`` logged on rank 0 only (``self.log(..., rank_zero_only=True)``) made rank 1 warn that
  the key is missing, though rank 0's loss is the one recorded; the warning is now rank 0's, given inside rank 0's
  agreed work (no collective of its own), so under ``-W error`` every rank raises together;
* HF: a pruned Optuna trial calls ``on_train_end`` right after the evaluation that pruned it, without final
  metrics: a training-set evaluation (``metric_key_prefix="train"``) logged just before was recorded as the
  run's final ``train_loss``;
* ``logging_strategy="no"``: one ``train_loss`` point, the whole run's mean, at the last step (documented).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from support.callbacks import (
    FINAL_METRICS,
    TRAIN_SET_EVALUATION,
    events,
    fake_two_ranks,
    hf_hooks,
    lens_trainer,
    tiny_lens,
)

import spectral_lens as sl
from spectral_lens._warnings import SpectralLensWarning
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.integrations.tensorboard import TensorBoardSink
from spectral_lens.records import RunRecord


class _SummaryWriter:
    """What TensorBoardSink calls on a ``SummaryWriter``: the scalars, kept."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, global_step, value))

    def flush(self):
        pass


class _WandbRun:
    def __init__(self):
        self.logged = []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        self.logged.append(dict(data))


# --------------------------------------------------------------------------------------------------
# 1. the sinks get a kept validation loss, once per step


def test_hf_kept_val_loss_reaches_the_sinks_once_per_step(tmp_path):
    """Step 2 is measured by the schedule (no loss), then evaluated twice: the TensorBoard and W&B sinks get its
    loss once, under the tag a measurement with a loss uses (step 4: measured at its evaluation, with the loss);
    the record and the sinks hold the same ``(step, val_loss)`` (before: the sinks lacked step 2)."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from spectral_lens.integrations import SpectralLensCallback, WandbSink

    tb, run = _SummaryWriter(), _WandbRun()
    lens = tiny_lens(tmp_path, schedule=sl.Schedule(frozenset({2})))
    cb = SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=4,
                              sinks=[TensorBoardSink(tb, figures=False), WandbSink(run)])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.on_train_begin(None, state, control)
    for step in (1, 2, 3, 4):
        state.global_step = step
        cb.on_step_end(None, state, control)
        if step == 2:
            cb.on_evaluate(None, state, control, metrics={"eval_loss": 1.25})
            cb.on_evaluate(None, state, control, metrics={"eval_loss": 1.5})  # a second evaluation: kept once
        if step == 4:
            cb.on_evaluate(None, state, control, metrics={"eval_loss": 0.75})
    lens.writer.close()
    expected = [(2, 1.25), (4, 0.75)]
    tokens, losses = RunRecord.open(tmp_path / "run").val_curve()
    assert list(zip((tokens / 4).tolist(), losses.tolist())) == expected  # tokens_per_step=4
    assert [(s, v) for tag, s, v in tb.scalars if tag == "spectral_lens/val_loss"] == expected
    assert [(d["spectral_lens/step"], d["spectral_lens/val_loss"]) for d in run.logged
            if "spectral_lens/val_loss" in d] == expected


def test_driver_kept_val_loss_without_a_writer_reaches_a_sink_and_a_closed_writer_keeps_none(tmp_path):
    """A lens without a writer still logs a kept loss (as the loggers get it); a closed writer keeps none, and
    neither do the sinks (the curves stay the record's). A sink without ``log_val_loss`` is passed over."""
    tb = _SummaryWriter()
    driver = LensDriver(tiny_lens(tmp_path, writer=False), [TensorBoardSink(tb, figures=False), object.__new__(
        type("OnlyMeasurements", (), {"log_measurement": lambda self, m, tail=None, head=None: None}))], None)
    driver.last_step = 3
    driver.record_val_loss(3, 3, 2.5)
    assert tb.scalars == [("spectral_lens/val_loss", 3, 2.5)]

    tb2 = _SummaryWriter()
    lens = tiny_lens(tmp_path)
    lens.writer.close()
    driver = LensDriver(lens, [TensorBoardSink(tb2, figures=False)], None)
    driver.last_step = 3
    driver.record_val_loss(3, 3, 2.5)
    assert tb2.scalars == []


# --------------------------------------------------------------------------------------------------
# 2. Lightning: the missing val_loss is rank 0's to warn about, inside its agreed work


@pytest.fixture
def as_rank(monkeypatch):
    """This process as rank ``as_rank["rank"]`` of 2 gloo ranks; ``as_rank["calls"]``: the all_reduces made."""
    return fake_two_ranks(monkeypatch)


def _validation_end(tmp_path, rank, metrics):
    """The Lightning callback's ``on_validation_end`` at step 2, which the schedule measured already, with these
    ``callback_metrics`` on this rank (rank 0 holds the record)."""
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from spectral_lens.integrations import SpectralLensLightningCallback

    lens = tiny_lens(tmp_path, writer=rank == 0)
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=4)
    cb.driver.last_step = 2
    trainer = types.SimpleNamespace(sanity_checking=False, state=types.SimpleNamespace(fn="fit"), global_step=2,
                                    callback_metrics=metrics, loggers=[])
    cb.on_validation_end(trainer, None)
    return lens


def test_lightning_rank1_without_rank0s_val_loss_is_quiet(tmp_path, as_rank):
    """``self.log("val_loss", ..., rank_zero_only=True)``: rank 1's metrics lack it, rank 0's loss is recorded;
    rank 1 makes the one agreement and says nothing (before: it warned that the key is missing)."""
    as_rank["rank"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        _validation_end(tmp_path, 1, {})
    assert as_rank["calls"] == 2  # the lens's constructor's agreement, then this one


def test_lightning_rank0_without_val_loss_warns_inside_the_agreement(tmp_path, as_rank):
    """Rank 0 lacks the key: nothing is recorded, and it warns; under ``-W error`` the warning is raised inside
    the agreed work, so the agreement's collective is still made and rank 1 raises with it (before: rank 0
    raised before the all_reduce and rank 1 waited in it)."""
    as_rank["rank"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        with pytest.raises(SpectralLensWarning, match=r"val_loss_key 'val_loss' is not among the logged metrics "
                                                      r"\['val_acc'\] on rank 0"):
            _validation_end(tmp_path, 0, {"val_acc": torch.tensor(0.5)})
    assert as_rank["calls"] == 2  # the lens's constructor's agreement, then this one
    with pytest.warns(SpectralLensWarning, match="is not among the logged metrics"):
        lens = _validation_end(tmp_path / "again", 0, {})
    lens.writer.close()
    assert events(tmp_path / "again" / "run", "val_loss") == []


# --------------------------------------------------------------------------------------------------
# 3. HF: a pruned trial's on_train_end after a training-set evaluation records no train_loss

def _hf_run(tmp_path):
    lens = tiny_lens(tmp_path)
    return (lens, *hf_hooks(lens, step=2))


def test_hf_pruned_trial_records_no_training_set_evaluation_as_its_train_loss(tmp_path):
    """The call order of ``Trainer._evaluate`` for a pruned Optuna trial: a callback's training-set evaluation
    (``Trainer.evaluate`` logs, then calls ``on_evaluate``), the trainer's evaluation (logs, ``on_evaluate``), then
    ``_report_to_hp_search`` calls ``on_train_end`` and raises ``TrialPruned``: no ``train_loss`` is recorded
    (before: the training-set evaluation's 0.5, at step 2)."""
    lens, cb, state, control = _hf_run(tmp_path)
    cb.on_log(None, state, control, logs=dict(TRAIN_SET_EVALUATION))
    cb.on_evaluate(None, state, control, metrics=dict(TRAIN_SET_EVALUATION))
    cb.on_log(None, state, control, logs={"eval_loss": 1.2, "eval_runtime": 0.1, "epoch": 1.0})
    cb.on_evaluate(None, state, control, metrics={"eval_loss": 1.2, "eval_runtime": 0.1, "epoch": 1.0})
    cb.on_train_end(None, state, control)  # pruned
    lens.writer.close()
    assert events(tmp_path / "run", "train_loss") == []


def test_hf_final_metrics_after_a_training_set_evaluation_are_still_recorded(tmp_path):
    """The same evaluations, then ``train()`` finishes: its final metrics' ``train_loss`` is recorded."""
    lens, cb, state, control = _hf_run(tmp_path)
    cb.on_log(None, state, control, logs=dict(TRAIN_SET_EVALUATION))
    cb.on_evaluate(None, state, control, metrics=dict(TRAIN_SET_EVALUATION))
    state.global_step = 3
    cb.on_log(None, state, control, logs=dict(FINAL_METRICS))
    cb.on_train_end(None, state, control)
    lens.writer.close()
    assert events(tmp_path / "run", "train_loss") == [(3, 1.9)]


# --------------------------------------------------------------------------------------------------
# 4. logging_strategy="no": one point, the whole run's mean, at the last step (as documented)


def test_hf_logging_strategy_no_records_the_runs_mean_loss_at_its_last_step(tmp_path):
    """A real ``Trainer`` with ``logging_strategy="no"``: the record's one ``train_loss`` event is the final
    metrics' ``train_loss`` (the mean over every step), at the last step, as the docs say."""
    trainer, writer = lens_trainer(tmp_path, 12, max_steps=3, logging_strategy="no")
    out = trainer.train()
    writer.close()
    assert not any("loss" in h for h in trainer.state.log_history)
    assert events(tmp_path / "run", "train_loss") == [(3, pytest.approx(out.training_loss))]
