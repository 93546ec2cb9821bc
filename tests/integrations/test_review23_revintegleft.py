"""Review of review 23's callback leftovers (``log_val_loss``, ``warn_on_rank0``, HF's forgotten final loss):

* HF: ``on_evaluate`` forgot a pending final ``train_loss`` after any evaluation, so ``train()``'s final metrics
  followed by an evaluation before this callback's ``on_train_end`` (a callback ahead of it that evaluates at the
  train end) recorded none, though it was recorded before; only a training-set evaluation's own metrics (the
  ones that looked like final metrics) are forgotten now;
* a sink whose ``log_val_loss`` cannot be called as ``log_val_loss(step, val_loss)`` (a user's sink written
  before the method joined the protocol, with a method of that name of its own) crashed the training at the
  first kept validation loss, hours in; it is refused when the callback is built;
* a rank-0 warning queued for a measurement (Lightning's missing ``val_loss_key``) that raised instead was given at
  a later run's first agreed work; the measurement's error drops it now;
* 2 gloo ranks (slow): a Lightning ``val_loss_key`` missing on rank 0 under ``-W error``, and a sink's
  ``log_val_loss`` that raises on rank 0, make both ranks raise together, in step; the record keeps the loss.
"""

from __future__ import annotations

import json
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import torch
from support.callbacks import FINAL_METRICS, hf_hooks, lens_trainer

import spectral_lens as sl
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def _events(path, key):
    lines = [json.loads(line) for line in (Path(path) / "log.jsonl").read_text().splitlines()]
    return [[e["step"], e[key]] for e in lines if key in e]


def _lens(path, schedule=None):
    w = None if path is None else RunWriter(Path(path), RunInfo("r", batch_tier=1), fsync=False, tail_window=(2, 8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))  # the tail window (2, 8) fits: no warning of its own
    return sl.SpectralLens(model, [torch.randn(32, 16)], writer=w, params=(), layers=["0"], progress=False,
                           schedule=schedule)


# --------------------------------------------------------------------------------------------------
# 1. HF: an evaluation between the final metrics and on_train_end keeps the final train_loss

_EVAL = {"eval_loss": 1.2, "eval_runtime": 0.1, "epoch": 1.5}


def _hf_run(tmp_path):
    lens = _lens(tmp_path / "run")
    return (lens, *hf_hooks(lens, step=3))


def test_hf_an_evaluation_at_the_train_end_keeps_the_final_train_loss(tmp_path):
    """``train()`` logs its final metrics, then calls ``on_train_end`` on its callbacks in order: one ahead of this
    one that evaluates there (``trainer.evaluate()``: logs, then ``on_evaluate``) left the record without the final
    ``train_loss`` of a run that logged no loss (before: forgotten at that ``on_evaluate``)."""
    lens, cb, state, control = _hf_run(tmp_path)
    cb.on_log(None, state, control, logs=dict(FINAL_METRICS))
    cb.on_log(None, state, control, logs=dict(_EVAL))  # another callback's on_train_end evaluates
    cb.on_evaluate(None, state, control, metrics=dict(_EVAL))
    cb.on_train_end(None, state, control)
    lens.writer.close()
    assert _events(tmp_path / "run", "train_loss") == [[3, 1.9]]


def test_hf_a_training_set_evaluation_at_the_train_end_is_not_the_final_loss(tmp_path):
    """The pruned trial's case still holds: a training-set evaluation (``metric_key_prefix="train"``) right
    before ``on_train_end``, with no final metrics, records nothing; after the final metrics, theirs stands."""
    train_set = {"train_loss": 0.5, "train_runtime": 0.1, "train_samples_per_second": 80.0, "epoch": 1.0}
    lens, cb, state, control = _hf_run(tmp_path)
    cb.on_log(None, state, control, logs=dict(train_set))
    cb.on_evaluate(None, state, control, metrics=dict(train_set))
    cb.on_train_end(None, state, control)
    lens.writer.close()
    assert _events(tmp_path / "run", "train_loss") == []


# --------------------------------------------------------------------------------------------------
# 2. a sink's log_val_loss that cannot take (step, val_loss) is refused up front


class _Sink:
    def __init__(self):
        self.losses = []

    def log_measurement(self, measurement, tail=None, head=None):
        pass


class _OwnValLoss(_Sink):
    def log_val_loss(self, val_loss):  # the user's own method, written before the protocol named one
        self.losses.append(val_loss)


class _Compatible(_Sink):
    def log_val_loss(self, step, val_loss, *, extra=None):
        self.losses.append((step, val_loss))


def test_a_sink_whose_log_val_loss_takes_other_arguments_is_refused_when_built(tmp_path):
    """Before: accepted, then the first validation loss kept at a measured step raised a ``TypeError`` from
    inside the training (every rank stopping with it)."""
    with pytest.raises(TypeError, match=r"sink _OwnValLoss's log_val_loss\(val_loss\) cannot be called as "
                                        r"log_val_loss\(step, val_loss\)"):
        LensDriver(_lens(None), [_OwnValLoss()], None)
    sink = _Compatible()
    driver = LensDriver(_lens(None), [sink, _Sink()], None)  # one that fits, one without the method
    driver.last_step = 2
    driver.record_val_loss(2, 2, 1.5)
    assert sink.losses == [(2, 1.5)]


def test_the_callbacks_refuse_such_a_sink(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from spectral_lens.integrations import SpectralLensCallback

    with pytest.raises(TypeError, match="log_val_loss"):
        SpectralLensCallback(_lens(None), sinks=[_OwnValLoss()])


# --------------------------------------------------------------------------------------------------
# 3. 2 gloo ranks


class _RaisingSink(_Sink):
    def log_val_loss(self, step, val_loss):
        raise OSError("the sink's disk is full")


DEBUG = False  # True: the errors with their messages (when this test fails)


def _outcome(fn, path):
    """``fn()``'s error type (or ``None``) and, on rank 0, the record's val_loss events after it."""
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001
        error = type(exc).__name__ + (": " + str(exc)[:300] if DEBUG else "")
    return [error, None if path is None else _events(path, "val_loss")]


def _lightning_validation(rank, metrics):
    """The Lightning callback, step 2 measured, and a validation end at ``step`` with these ``callback_metrics``."""
    from spectral_lens.integrations import SpectralLensLightningCallback

    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    lens = _lens(path)
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=4)
    cb.driver.last_step = 2
    trainer = types.SimpleNamespace(sanity_checking=False, state=types.SimpleNamespace(fn="fit"), global_step=2,
                                    callback_metrics=metrics, loggers=[])
    return lens, path, cb, trainer


def _lightning_rank_zero_only(rank):
    """``self.log("val_loss", ..., rank_zero_only=True)`` under ``-W error``: rank 1 lacks the key and stays quiet;
    rank 0 records its loss at the measured step 2 and measures step 3 with it."""
    lens, path, cb, trainer = _lightning_validation(rank, {"val_loss": torch.tensor(1.5)} if rank == 0 else {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_validation_end(trainer, None)
        trainer.global_step = 3
        cb.on_validation_end(trainer, None)
    if path is None:
        return None
    lens.writer.close()
    tokens, losses = RunRecord.open(path).val_curve()  # the kept loss's event and the measurement's loss
    return [[t // 4, v] for t, v in zip(tokens.tolist(), losses.tolist())]  # tokens_per_step=4


def _lightning_missing_key(rank):
    """Both ranks validate at a measured step (2) and at an unmeasured one (3) without ``val_loss`` in
    ``callback_metrics``, under ``-W error``: rank 0 raises its warning inside the agreed work, rank 1 the
    agreement's error, at each step (no rank waits in a collective the other skipped)."""
    _, _, cb, trainer = _lightning_validation(rank, {})
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.append(_outcome(lambda: cb.on_validation_end(trainer, None), None)[0])
        trainer.global_step = 3
        out.append(_outcome(lambda: cb.on_validation_end(trainer, None), None)[0])
    return out


def _sink_raises(rank):
    """HF: an evaluation at a measured step, rank 0's sink raising in ``log_val_loss``: both ranks raise; the
    record (written before the sinks) holds the loss."""
    import transformers

    from spectral_lens.integrations import SpectralLensCallback

    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    lens = _lens(path)
    cb = SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=4, sinks=[_RaisingSink()] if rank == 0 else [])
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.driver.last_step = state.global_step = 2
    out = _outcome(lambda: cb.on_evaluate(None, state, control, metrics={"eval_loss": 1.25}), None)
    if path is not None:
        lens.writer.close()
        out[1] = _events(path, "val_loss")
    return out


def _imports(rank):
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401


CASES = {"imports": _imports, "lightning_rank_zero_only": _lightning_rank_zero_only,
         "lightning_missing_key": _lightning_missing_key, "sink_raises": _sink_raises}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stay_in_step_for_rank0s_warning_and_sink_error(tmp_path):
    """2 gloo ranks (a 30 s collective timeout), each case followed by a barrier: a ``val_loss`` rank 0 alone
    logged is recorded with no warning on rank 1 (before review 23: rank 1 raised it under ``-W error`` and rank 0
    waited in the agreement); a key missing on rank 0 raises on both ranks, at a measured step and at a new one;
    rank 0's sink raising in ``log_val_loss`` raises on both, after the record kept the loss."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=30, join_s=400, preload="spectral_lens.integrations")
    assert [r["error"] for r in checked_case(results, "imports", None)] == [None, None]
    got = checked_case(results, "lightning_rank_zero_only", 20.0)
    assert [(r["error"], r["value"]) for r in got] == [(None, [[2, 1.5], [3, 1.5]]), (None, None)], got
    got = checked_case(results, "lightning_missing_key", 20.0)
    assert [r["value"] for r in got] == [["SpectralLensWarning"] * 2, ["RuntimeError"] * 2], got
    got = checked_case(results, "sink_raises", 20.0)
    assert [r["value"] for r in got] == [["OSError", [[2, 1.25]]], ["RuntimeError", None]], got


# --------------------------------------------------------------------------------------------------
# 4. a queued rank-0 warning does not outlive the measurement it was about


def test_a_measurement_that_raised_leaves_no_queued_warning_for_the_next_run(tmp_path):
    """Lightning queues its missing-``val_loss_key`` warning for the measurement after validation; that
    measurement raised (an out-of-memory, the run ends): the warning was given at the next run's first agreed
    work (a ``train_loss`` event of another ``fit``), about a run that was over (before: still queued)."""
    driver = LensDriver(_lens(tmp_path / "run"), [], 4)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    driver.lens.measure = boom
    driver.warn_on_rank0("val_loss_key 'val_loss' is not among the logged metrics")
    with pytest.raises(RuntimeError, match="out of memory"):
        driver.measure(3, 12)
    del driver.lens.measure
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        driver.record_train_loss(4, 1.0)
    driver.lens.writer.close()
    assert _events(tmp_path / "run", "train_loss") == [[4, 1.0]]


@pytest.mark.slow
def test_hf_trainer_with_a_callback_evaluating_at_the_train_end_records_the_final_train_loss(tmp_path):
    """A real ``Trainer`` (3 steps, no loss logged) and a callback ahead of this one that evaluates in
    ``on_train_end``: the record's one ``train_loss`` event is the final metrics' mean, at the last step."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

    class EvaluateAtTheEnd(transformers.TrainerCallback):
        trainer = None

        def on_train_end(self, args, state, control, **kwargs):
            self.trainer.evaluate()

    at_end = EvaluateAtTheEnd()
    trainer, writer = lens_trainer(tmp_path, 12, eval_n=8, callbacks=[at_end], max_steps=3, logging_steps=10)
    at_end.trainer = trainer
    out = trainer.train()
    writer.close()
    assert any("eval_loss" in h for h in trainer.state.log_history)  # the evaluation ran, after the final metrics
    assert _events(tmp_path / "run", "train_loss") == [[3, pytest.approx(out.training_loss)]]
