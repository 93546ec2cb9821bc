"""Review 24 (``audit-records``): the run record's status lifecycle leftovers (``docs/records.md``, "Failed runs").

* "Went on" was judged by tokens only: a failed run restarted from an EARLIER checkpoint without ``drop_after``
  that trained (logged ``train_loss``) but stopped before the failure's tokens had the failure restored at the
  close, although the training went on. A ``log`` line with ``train_loss`` or ``tokens_per_s`` (a line of
  training) at a step where the record held one (the step trained again) now counts as going on, wherever
  its tokens; measurements, ``val_loss`` events and training lines at steps the record lacked (a script
  measuring, evaluating or backfilling checkpoints, such as ``trainer_state.log_history``) still count only
  past the record's end.
* A status the caller said with ``update_info`` (``"complete"``, ``"diverged"``) without going on left the
  history entry unmarked: a later ``"running"`` and a measure-only resume restored the failure the caller had
  settled. The entry is now marked ``"settled": STATUS`` at the close.
* A ``"running"`` that a resumed writer finds with nothing to restore (after an ``after_end`` entry, a
  ``went_on`` or ``settled`` one, or no history) stayed ``"running"`` through every later writer. The writer
  holds the lock, so no other writer is running: at its close the ``"running"`` is removed (the analyses
  read ``"running"`` as no status), unless the writer said a status itself.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from spectral_lens.analysis import failure
from spectral_lens.records import RunInfo, RunRecord, RunWriter

TOTAL = 10_000


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _failed(path, tokens=800, every=100):
    with contextlib.suppress(RuntimeError), RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        for t in range(every, tokens + 1, every):
            w.log(t // 100, t, train_loss=1.0)
        raise RuntimeError("preempted")


def _measure_only(path):
    """A resume that records nothing (a script measuring checkpoints it finds measured)."""
    RunWriter(path, resume=True, fsync=False).close()


# -- 1. a restart from an earlier checkpoint without drop_after went on -------------------------------------


@pytest.mark.parametrize("scalars", [{"train_loss": 1.0}, {"tokens_per_s": 5e5}, {"train_loss": float("nan")}])
def test_a_restart_from_an_earlier_checkpoint_that_trains_went_on(tmp_path, scalars):
    """Failed at 800 tokens, restarted from the checkpoint at 400 without ``drop_after``, trained steps 5 and 6
    again (the record held training lines there) and stopped cleanly: the training went on. Before, the
    failure came back (600 is not past 800)."""
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        for t in (500, 600):
            w.log(t // 100, t, **scalars)
    extras = _extras(path)
    assert "status" not in extras and "failure" not in extras, extras  # before: failed (RuntimeError: preempted)
    assert extras["failure_history"][-1]["went_on"] is True
    assert failure(RunRecord.open(path)) is None
    _measure_only(path)  # the failure the run moved past stays in the history
    assert "status" not in _extras(path)


def test_a_training_line_at_the_failures_own_tokens_went_on(tmp_path):
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(8, 800, train_loss=1.0)
    assert "status" not in _extras(path)  # before: failed


@pytest.mark.parametrize("how", ["measure", "val_loss", "lr"])
def test_checkpoint_work_before_the_records_end_is_still_no_going_on(tmp_path, how):
    """Measuring or evaluating the failed run's checkpoints (a measurement, a ``val_loss`` event, an event
    without a training scalar) before the record's end is no training: the failure is restored, as before."""
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        if how == "measure":
            w.log_measurement(4, 400, {}, val_loss=2.0)
        elif how == "val_loss":
            w.log(4, 400, val_loss=2.0, train_loss=None)
        else:
            w.log(4, 400, lr=1e-3)
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}


def test_a_backfill_of_the_curves_before_the_records_end_is_no_going_on(tmp_path):
    """A training line at a step the record lacks, before its end, trains no step again: ``log_history``
    backfilling a checkpoint's curves (``docs/guide-checkpoints.md``) into a failed run's record, which held
    ``train_loss`` every second step, writes the others (and ``lr``): the failure stays, as before."""
    from spectral_lens.integrations.trainer_state import log_history

    path = tmp_path / "r"
    _failed(path, every=200)
    state = tmp_path / "checkpoint-6" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"global_step": 6, "num_input_tokens_seen": 600, "log_history": [
        {"step": s, "loss": 1.0, "learning_rate": 1e-3, "num_input_tokens_seen": 100 * s} for s in range(1, 7)]}))
    with RunWriter(path, resume=True, fsync=False) as w:
        assert log_history(w, state.parent) == 6  # train_loss at 1, 3, 5 and lr everywhere
    assert sum(1 for e in RunRecord.open(path).events if e.get("train_loss") is not None) == 7
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}
    with RunWriter(path, resume=True, fsync=False) as w:  # training step 6 again (held): going on
        w.log(6, 600, train_loss=0.9)
    assert "status" not in _extras(path)


# -- 2. a status said without going on settles the entry ----------------------------------------------------


@pytest.mark.parametrize("said", ["complete", "diverged"])
def test_a_status_said_without_going_on_brings_back_no_failure(tmp_path, said):
    """A failed run resumed, declared ``complete`` (or ``diverged``) without training: its entry is marked
    ``settled``. A later writer saying ``"running"`` and a measure-only resume then restored the failure the
    caller had settled (before); now the run is no longer failed."""
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status=said)
    assert _extras(path)["status"] == said
    with RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status="running")
    _measure_only(path)
    extras = _extras(path)
    assert extras.get("status") != "failed" and "failure" not in extras, extras  # before: failed (preempted)
    assert [e["failure"] for e in extras["failure_history"]] == ["RuntimeError: preempted"]
    assert extras["failure_history"][-1]["settled"] == said
    assert failure(RunRecord.open(path)) is None


def test_a_running_said_without_going_on_still_restores_the_failure(tmp_path):
    """The caller's own ``"running"`` without training is the resume's mark: the next resume that does not go
    on restores the failure (unchanged)."""
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status="running")
    assert _extras(path)["status"] == "running" and "settled" not in _extras(path)["failure_history"][-1]
    _measure_only(path)
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}


# -- 3. a "running" nothing is left to restore is settled ---------------------------------------------------


def test_a_running_after_an_after_end_entry_is_settled(tmp_path):
    """A run past 95% whose measuring script says ``"running"`` and fails: ``failure_after_end`` beside the
    caller's ``"running"``; the next resume withdraws it into an ``after_end`` entry. Before, the
    ``"running"`` stayed through that writer and every later one."""
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        w.log(97, 9_700, train_loss=1.0)
    with contextlib.suppress(RuntimeError), RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status="running")
        raise RuntimeError("measuring failed")
    extras = _extras(path)
    assert extras["failure_after_end"] == "RuntimeError: measuring failed"
    assert extras["status"] == "running"  # the caller's: kept by the writer that said it
    _measure_only(path)  # withdraws the after_end
    extras = _extras(path)
    assert "status" not in extras and extras["failure_history"][-1]["after_end"] is True, extras  # before: running
    _measure_only(path)
    assert _extras(path) == extras


def test_a_running_after_a_went_on_entry_is_settled(tmp_path):
    path = tmp_path / "r"
    _failed(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(9, 900, train_loss=1.0)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(10, 1000, train_loss=1.0)
        w.update_info(status="running")
    assert _extras(path)["status"] == "running"  # said by the writer: kept at its close
    _measure_only(path)
    extras = _extras(path)
    assert "status" not in extras and "failure" not in extras, extras  # before: running for good
    assert extras["failure_history"][-1]["went_on"] is True and len(extras["failure_history"]) == 1


def test_a_found_running_that_fails_past_95_percent_is_after_the_end(tmp_path):
    """A ``"running"`` with nothing to restore is no resumed failure: a block failing on a record past 95% is
    ``failure_after_end``, and the ``"running"`` is settled at the close."""
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        w.log(97, 9_700, train_loss=1.0)
        w.update_info(status="running")
    with contextlib.suppress(RuntimeError), RunWriter(path, resume=True, fsync=False):
        raise RuntimeError("measuring failed")
    extras = _extras(path)
    assert extras == {"failure_after_end": "RuntimeError: measuring failed"}, extras


def test_a_running_said_again_is_kept(tmp_path):
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=TOTAL), fsync=False) as w:
        w.update_info(status="running")
    with RunWriter(path, resume=True, fsync=False) as w:
        w.update_info(status="running")
        w.log(1, 100, train_loss=1.0)
    assert _extras(path)["status"] == "running"
