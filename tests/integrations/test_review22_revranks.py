"""Adversarial review of the agreed ``train_loss`` write (``LensDriver.record_train_loss``, review 22): nothing
on rank 0 may raise before the agreement, or the other ranks wait in it until the process-group timeout.

The one thing there was the callback's one-time warning that the record's tokens count optimizer steps (no
token count, no ``tokens_per_step``), which ``tokens()`` gives on rank 0 only (the rank with the writer). Under
warnings as errors (``python -W error``, pytest's ``filterwarnings = error``) it was raised on rank 0 before
the agreement: rank 0 left ``on_log`` / ``on_train_batch_end`` at once and the other ranks waited in the
agreement's ``all_reduce``. The same held where a scheduled measurement came first (the callbacks' ``_measure``
computed the tokens, warning, before the driver's first collective). Now the callbacks count with
``agreed_tokens()``, whose warning is given inside rank 0's next agreed work: rank 0 raises it after the
agreement, the others a ``RuntimeError`` naming rank 0. Fast: one process as rank 0 of 2 (a patched
``all_reduce``); slow: 2 gloo ranks."""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunRecord, RunWriter

WHAT = "recording the training loss (rank 0 writes it)"
STEPS = "tokens count optimizer steps"


def _lens(path: Path | None, schedule: sl.Schedule | None = None) -> sl.SpectralLens:
    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    writer = None if path is None else RunWriter(path, RunInfo("r", batch_tier=1), fsync=False, tail_window=(4, 12))
    return sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(), progress=False,
                           forward_fn=lambda m, b: m(b[0]), schedule=schedule, tail_window=(4, 12))


def _hf_run(lens: sl.SpectralLens) -> None:
    """The HF callback's hooks as ``Trainer.train()`` calls them, without a token count or ``tokens_per_step``
    (the trainer's defaults): a loss logged at steps 2 and 4."""
    import transformers

    from spectral_lens.integrations import SpectralLensCallback

    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb = SpectralLensCallback(lens)
    cb.on_train_begin(None, state, control, model=lens.model)
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(None, state, control)
        if step % 2 == 0:
            cb.on_log(None, state, control, logs={"loss": 3.0 - step / 10})
    cb.on_train_end(None, state, control)


class FakeTrainer:
    def __init__(self) -> None:
        self.global_step, self.log_every_n_steps, self.loggers, self.callback_metrics = 0, 2, [], {}


def _lightning_run(lens: sl.SpectralLens) -> None:
    """The Lightning callback's hooks as ``fit`` calls them, without ``tokens_per_step``: 3 optimizer steps,
    a ``train_loss`` event at step 2 and at the train end."""
    from spectral_lens.integrations import SpectralLensLightningCallback

    cb = SpectralLensLightningCallback(lens)
    trainer = FakeTrainer()
    cb.on_train_start(trainer, lens.model)
    for i in range(3):
        cb.on_train_batch_start(trainer, lens.model, None, i)
        trainer.global_step = i + 1
        cb.on_train_batch_end(trainer, lens.model, torch.tensor(2.0 + i), None, i)
    cb.on_train_end(trainer, lens.model)


RUNS = {"hf": (_hf_run, "transformers"), "lightning": (_lightning_run, "lightning.pytorch")}


@pytest.fixture
def rank0_of_2(monkeypatch):
    """This process as rank 0 of 2 gloo ranks whose peer succeeds; ``state["calls"]``: the all_reduces made."""
    import torch.distributed as dist

    state = {"calls": 0}

    def all_reduce(t, op=None, group=None):
        assert op == dist.ReduceOp.MAX and t.numel() == 2
        state["calls"] += 1

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda group=None: 0, "get_world_size": lambda group=None: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce,
                        "broadcast_object_list": lambda objects, src=0, group=None: None}.items():
        monkeypatch.setattr(dist, name, value)
    return state


@pytest.fixture
def measurement():
    """A measurement of the test lens at step 1, taken in one process (before ``rank0_of_2`` fakes the ranks)."""
    return _lens(None).measure(1, 1)


@pytest.mark.parametrize("framework", sorted(RUNS))
def test_the_steps_warning_as_an_error_is_agreed_before_rank0_raises_it(framework, tmp_path, rank0_of_2):
    """Rank 0, warnings as errors: the tokens-count-steps warning is raised after the first event's agreement
    (one all_reduce), not before it (zero: the other ranks left waiting in theirs)."""
    run, module = RUNS[framework]
    pytest.importorskip(module)
    lens = _lens(tmp_path / "run")
    rank0_of_2["calls"] = 0  # (the lens's constructor made one: its agreement)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.SpectralLensWarning)
        with pytest.raises(sl.SpectralLensWarning, match=STEPS):
            run(lens)
    assert rank0_of_2["calls"] == 1
    lens.writer.close()


@pytest.mark.parametrize("framework", sorted(RUNS))
def test_the_steps_warning_is_still_given_once_and_the_losses_recorded(framework, tmp_path, rank0_of_2):
    """Warnings shown: one steps warning (it names tokens_per_step=), every event recorded, tokens as steps and
    no tokens_per_s; one all_reduce per event."""
    run, module = RUNS[framework]
    pytest.importorskip(module)
    lens = _lens(tmp_path / "run")
    rank0_of_2["calls"] = 0  # (the lens's constructor made one: its agreement)
    with pytest.warns(sl.SpectralLensWarning, match=STEPS) as caught:
        run(lens)
    lens.writer.close()
    assert sum(STEPS in str(w.message) for w in caught) == 1
    events = [e for e in RunRecord.open(tmp_path / "run").events if e.get("train_loss") is not None]
    expected = [(2, 2, 2.8), (4, 4, 2.6)] if framework == "hf" else [(2, 2, 2.5), (3, 3, 4.0)]
    assert [(e["step"], e["tokens"], e["train_loss"]) for e in events] == expected
    assert all(e.get("tokens_per_s") is None for e in events)
    assert rank0_of_2["calls"] == 2


@pytest.mark.parametrize("framework", sorted(RUNS))
def test_the_steps_warning_of_a_measurement_is_agreed_too(framework, tmp_path, measurement, rank0_of_2, monkeypatch):
    """A measurement scheduled at step 1 comes before the first loss event: rank 0 raises the steps warning (an
    error) in the agreement on its sinks (one all_reduce), after the measurement's own collectives (here
    ``lens.measure`` returns a measurement taken in one process), not before them (zero)."""
    run, module = RUNS[framework]
    pytest.importorskip(module)
    lens = _lens(tmp_path / "run", sl.Schedule(steps=frozenset({1})))
    rank0_of_2["calls"] = 0  # (the lens's constructor made one: its agreement)
    measured = []
    monkeypatch.setattr(lens, "measure", lambda step, tokens, val_loss=None: measured.append((step, tokens))
                        or measurement)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.SpectralLensWarning)
        with pytest.raises(sl.SpectralLensWarning, match=STEPS):
            run(lens)
    assert measured == [(1, 1)] and rank0_of_2["calls"] == 1
    lens.writer.close()


# ---------------------------------------------------------------- 2 gloo ranks
def _imports(rank):
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401


def _as_errors(run, rank: int, schedule: sl.Schedule | None = None):
    """``run`` on this rank under warnings as errors, rank 0 with a run record, the other without."""
    path = Path(tempfile.mkdtemp()) / "run" if rank == 0 else None
    lens = _lens(path, schedule)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", sl.SpectralLensWarning)
            run(lens)
    finally:
        if lens.writer is not None:
            lens.writer.close()


def _hf_as_errors(rank):
    _as_errors(_hf_run, rank)


def _lightning_as_errors(rank):
    _as_errors(_lightning_run, rank)


def _hf_measured_as_errors(rank):
    _as_errors(_hf_run, rank, sl.Schedule(steps=frozenset({1})))


def _lightning_measured_as_errors(rank):
    _as_errors(_lightning_run, rank, sl.Schedule(steps=frozenset({1})))


CASES = {"imports": _imports, "hf": _hf_as_errors, "lightning": _lightning_as_errors,
         "hf_measured": _hf_measured_as_errors, "lightning_measured": _lightning_measured_as_errors}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_raise_together_when_rank0s_steps_warning_is_an_error(tmp_path):
    """2 gloo ranks (a 30 s collective timeout), warnings as errors: rank 0 raises the steps warning and rank 1
    a RuntimeError naming it, both at once and in step, at the first loss event, or (``*_measured``) in the
    agreement on the sinks of a measurement scheduled at step 1 (before: rank 1 waited in the agreement, or in
    the measurement's first collective, until the timeout)."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=30, join_s=300, preload="spectral_lens.integrations")
    assert [r["error"] for r in checked_case(results, "imports", None)] == [None, None]
    sinks = "a sink's log_measurement or the trainer's loggers"
    for case, what in (("hf", WHAT), ("lightning", WHAT), ("hf_measured", sinks), ("lightning_measured", sinks)):
        r0, r1 = (r["error"] for r in checked_case(results, case, 20.0))
        assert r0 is not None and r0.startswith("SpectralLensWarning: ") and STEPS in r0, (case, r0)
        assert r1 is not None and re.match(r"RuntimeError: SpectralLens: " + re.escape(what)
                                           + r" failed on global rank\(s\) \[0\]", r1), (case, r1)
