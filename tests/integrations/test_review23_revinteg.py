"""Review of the merged callback change of review 23 (``RunInfo.tokens_per_step`` filled by the callbacks, a kept
validation loss logged, the HF final ``train_loss`` of a run that logged none):

* the callback's ``tokens_per_step`` must be a positive integer, as its error says: a fraction (``1.5``) was taken,
  counted ``int(step * 1.5)`` tokens, went into ``run.json`` truncated (``1``) and then warned at the next agreed
  work that the record's ``1`` differs from the callback's ``1.5``; ``True`` counted as 1 and ``nan`` was taken
  until the first token count raised mid-training;
* the HF final-metrics path took any log with ``train_loss`` and ``train_runtime`` for ``train()``'s final
  metrics: ``trainer.evaluate(train_dataset, metric_key_prefix="train")`` (the well-known recipe for a training
  set's loss, from a callback at each epoch's end) logs both, so its evaluation loss was recorded as a
  ``train_loss`` event, and at that epoch's end the trainer's own logged loss made a second event at the step
  (``total_flos``, which only the final metrics carry, is popped by the Printer/ProgressCallback first): the
  last such log is now recorded at ``on_train_end``, which only the final metrics come before.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

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
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RunInfo, RunRecord, RunWriter

# --------------------------------------------------------------------------------------------------
# tokens_per_step: a positive integer


@pytest.mark.parametrize("bad", [1.5, 4096.5, True, math.nan, math.inf, "48", 0, -4])
def test_driver_refuses_a_tokens_per_step_that_is_not_a_positive_integer(tmp_path, bad):
    lens = tiny_lens(tmp_path, writer=False)
    with pytest.raises(ValueError, match=r"tokens_per_step must be a positive integer, got "):
        LensDriver(lens, [], tokens_per_step=bad)


def test_driver_takes_integer_types_and_records_a_python_int(tmp_path):
    np = pytest.importorskip("numpy")
    lens = tiny_lens(tmp_path)
    driver = LensDriver(lens, [], tokens_per_step=np.int64(48))
    assert type(driver.tokens_per_step) is int and driver.tokens(3) == 144
    driver.record_train_loss(2, 1.5)
    lens.writer.close()
    header = json.loads((tmp_path / "run" / "run.json").read_text())
    assert header["tokens_per_step"] == 48 and type(header["tokens_per_step"]) is int
    assert RunRecord.open(tmp_path / "run").info.tokens_per_step == 48


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_callbacks_refuse_a_fractional_tokens_per_step(tmp_path, framework):
    """Before, ``tokens_per_step=1.5`` was taken: ``run.json`` got 1 while the tokens were counted with 1.5."""
    if framework == "hf":
        pytest.importorskip("transformers", reason="the hf extra is not installed")
        from spectral_lens.integrations import SpectralLensCallback as Callback
    else:
        pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
        from spectral_lens.integrations import SpectralLensLightningCallback as Callback
    with pytest.raises(ValueError, match=r"tokens_per_step must be a positive integer, got 1\.5"):
        Callback(tiny_lens(tmp_path, writer=False), tokens_per_step=1.5)


# --------------------------------------------------------------------------------------------------
# HF: only train()'s final metrics stand in for a run's missing training loss


def _hooks(tmp_path):
    lens = tiny_lens(tmp_path)
    return (lens, *hf_hooks(lens))


def test_hf_an_evaluation_with_prefix_train_is_no_final_train_loss(tmp_path):
    """An evaluation with ``metric_key_prefix="train"`` logs ``train_loss`` and ``train_runtime`` as the final
    metrics do: no event for it; the trainer's own loss at the step is recorded once, and the final metrics of
    a run that logged a loss add nothing."""
    lens, cb, state, control = _hooks(tmp_path)
    state.global_step = 4
    cb.on_log(None, state, control, logs=dict(TRAIN_SET_EVALUATION))
    cb.on_log(None, state, control, logs={"loss": 2.0, "learning_rate": 1e-3, "epoch": 1.0})
    state.global_step = 6
    cb.on_log(None, state, control, logs=dict(FINAL_METRICS))
    cb.on_train_end(None, state, control)
    lens.writer.close()
    assert events(tmp_path / "run", "train_loss") == [(4, 2.0)]


def test_hf_final_metrics_still_stand_in_for_a_run_that_logged_no_loss(tmp_path):
    """An evaluation's ``train_loss`` before: not recorded; ``train()``'s final one, at the train end: recorded
    at its step, with its tokens."""
    lens, cb, state, control = _hooks(tmp_path)
    state.global_step = 2
    cb.on_log(None, state, control, logs=dict(TRAIN_SET_EVALUATION))
    state.global_step = 3
    cb.on_log(None, state, control, logs=dict(FINAL_METRICS))
    assert events(tmp_path / "run", "train_loss") == []  # recorded at the train end: only the final metrics
    cb.on_train_end(None, state, control)  # come before it
    lens.writer.close()
    assert events(tmp_path / "run", "train_loss") == [(3, 1.9)]
    assert [(e["step"], e["tokens"]) for e in RunRecord.open(tmp_path / "run").events] == [(3, 12)]


def test_hf_an_interrupted_train_records_no_later_evaluations_train_loss(tmp_path):
    """``train()`` raised (no final metrics, no ``on_train_end``); a later ``trainer.evaluate(train_ds,
    metric_key_prefix="train")`` is no training loss (before: recorded as one)."""
    lens, cb, state, control = _hooks(tmp_path)
    state.global_step = 3
    cb.on_log(None, state, control, logs=dict(TRAIN_SET_EVALUATION))
    lens.writer.close()
    assert events(tmp_path / "run", "train_loss") == []


def test_hf_trainer_evaluating_its_training_set_at_each_epoch_end_records_each_logged_loss_once(tmp_path):
    """A real ``Trainer`` with the recipe's callback (an evaluation of the training set, prefix ``train``, at
    each epoch's end, before the trainer logs its epoch loss): the record holds the trainer's logged losses,
    one per step (before: the first epoch's evaluation loss too, at the same step as that epoch's loss)."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

    from .test_callback_curves import RandomTokens

    class TrainSetLoss(transformers.TrainerCallback):
        trainer = None

        def on_epoch_end(self, args, state, control, **kwargs):
            kept = copy.deepcopy(control)  # the recipe: evaluate() clears should_log, which the epoch's loss needs
            self.trainer.evaluate(eval_dataset=RandomTokens(4, 0), metric_key_prefix="train")
            return kept

    train_set_loss = TrainSetLoss()  # ahead of the lens's callback (and of the PrinterCallback, whose one hook is on_log)
    trainer, writer = lens_trainer(tmp_path, 8, callbacks=[train_set_loss], num_train_epochs=2,
                                   logging_strategy="epoch")
    train_set_loss.trainer = trainer
    trainer.train()
    writer.close()
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [s for s, _ in logged] == [2, 4]
    assert any("train_runtime" in h and "total_flos" not in h for h in trainer.state.log_history)  # the recipe ran
    assert events(tmp_path / "run", "train_loss") == logged


# --------------------------------------------------------------------------------------------------
# a validation loss that only rank 0 has: every rank still makes the agreement's collective


@pytest.fixture
def as_rank(monkeypatch):
    """This process as rank ``as_rank["rank"]`` of 2 gloo ranks; ``as_rank["calls"]``: the all_reduces made."""
    return fake_two_ranks(monkeypatch)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("loss", [None, 0.75])
def test_record_val_loss_agrees_on_every_rank_whatever_its_own_loss(tmp_path, as_rank, rank, loss):
    """At a measured step, each rank makes the one agreement whether or not it has a loss: Lightning's
    ``callback_metrics`` lack ``val_loss`` on the ranks that did not log it (``self.log(..., rank_zero_only=True)``
    called on rank 0 only, as Lightning documents). Before, a rank without one returned at once while rank 0
    waited in the agreement's all_reduce, which the other rank's next training collective then met."""
    as_rank["rank"] = rank
    lens = tiny_lens(tmp_path, writer=rank == 0)
    as_rank["calls"] = 0  # (the lens's constructor made one: its agreement)
    driver = LensDriver(lens, [], tokens_per_step=4)
    driver.last_step = 2  # measured at step 2 without a loss
    logged = []
    driver.record_val_loss(2, 8, loss, log=logged.append)
    assert as_rank["calls"] == 1
    if rank == 0:
        lens.writer.close()
        expected = [] if loss is None else [(2, loss)]
        assert events(tmp_path / "run", "val_loss") == expected
        assert logged == [{"spectral_lens/val_loss": v} for _, v in expected]
    else:
        assert logged == []
    driver.record_val_loss(2, 8, loss, log=logged.append)  # a second evaluation at the step: agreed too
    assert as_rank["calls"] == 2


# --------------------------------------------------------------------------------------------------
# the run.json rewrite keeps the writer's own marks, and they keep it


def test_tokens_per_step_fill_and_the_writers_failure_marks_keep_each_other(tmp_path):
    """A run that failed, resumed (the writer marks it ``"running"``), the callback fills ``tokens_per_step``, the
    block fails again: ``run.json`` has both the new failure and ``tokens_per_step``, and the extras the user
    gave; the same after a clean resume and close (the writer settles its own ``"running"`` mark)."""
    path = tmp_path / "run"
    with pytest.raises(RuntimeError), RunWriter(path, RunInfo("r", batch_tier=1, extras={"lr": 0.1}), fsync=False):
        raise RuntimeError("first")
    for attempt in ("second", None):
        with pytest.raises(RuntimeError) if attempt else contextlib.nullcontext(), RunWriter(path, resume=True, fsync=False) as w:
            lens = sl.SpectralLens(torch.nn.Sequential(torch.nn.Linear(4, 4)), [torch.randn(3, 4)], writer=w,
                                   params=(), layers=["0"], progress=False)
            LensDriver(lens, [], tokens_per_step=48).record_train_loss(2, 1.5)
            assert json.loads((path / "run.json").read_text())["tokens_per_step"] == 48
            if attempt:
                raise RuntimeError(attempt)
        header = json.loads((path / "run.json").read_text())
        assert header["tokens_per_step"] == 48 and header["extras"]["lr"] == 0.1, header
        assert header["run_id"] == "r" and header["summary_windows"]["tail"], header
        if attempt:
            assert header["extras"]["status"] == "failed" and "second" in header["extras"]["failure"], header
        else:
            assert header["extras"].get("status") != "running", header
    assert RunRecord.open(path).info.tokens_per_step == 48

