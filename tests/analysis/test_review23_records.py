"""Review 23: a run record's status through failure, resume and finish.

Before, ``RunWriter(resume=True)`` on a failed run set ``status: "running"`` and dropped ``failure``, and
nothing ever took the "running" back: a resumed run that then finished cleanly, or a script that only
measured the failed run's checkpoints, left a record saying "running" forever, and the failure was gone
from the record."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from spectral_lens.analysis import failure
from spectral_lens.cli import main
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _failed(path, tokens=4000, exc=None, *, resume=False, **extras):
    """A ``with RunWriter`` block that logs one event at ``tokens`` (step ``tokens // 1000``) and raises ``exc``
    (default ``RuntimeError("preempted")``)."""
    exc = RuntimeError("preempted") if exc is None else exc
    with pytest.raises(type(exc)):
        info = None if resume else RunInfo(path.name, family="f", batch_tier=4, total_tokens=10_000, extras=extras)
        with RunWriter(path, info, resume=resume, fsync=False) as w:
            w.log(tokens // 1000, tokens, val_loss=3.0)
            raise exc
    return path


def _history(path):
    return [{k: v for k, v in e.items() if k not in ("resumed", "went_on")} for e in _extras(path).get("failure_history", [])]


def test_a_failed_run_resumed_that_goes_on_and_exits_cleanly_is_no_longer_running(tmp_path, capsys):
    path = _failed(tmp_path / "r", lr=1e-3)
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.info.extras["status"] == "running" and "failure" not in w.info.extras
        w.log(5, 5000, val_loss=2.9)
    extras = _extras(path)
    assert "status" not in extras and "failure" not in extras and extras["lr"] == 1e-3  # before: "running"
    assert _history(path) == [{"failure": "RuntimeError: preempted", "step": 4, "tokens": 4000}]
    assert isinstance(extras["failure_history"][0]["resumed"], float)
    r = RunRecord.open(path)
    assert failure(r) is None and r.info.extras == extras
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  status: ends at 50% of budget\n" in out
    assert "  earlier: failed (RuntimeError: preempted) at step 4, 4000 tokens; resumed, and the training went on\n" in out


def test_a_resume_that_only_measures_the_failed_runs_checkpoints_leaves_it_failed(tmp_path):
    """A script measuring saved checkpoints of a crashed run (lines at or before where it failed) does not
    resume its training: on exit the failure is back, as it was (before: "running", the failure gone)."""
    path = _failed(tmp_path / "m")
    before = _extras(path)
    with RunWriter(path, resume=True, fsync=False, tail_window=None) as w:
        w.log_measurement(2, 2000, {"act:h": Spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), n_rows=8, dim=3)},
                          summarize=False)
        w.log(4, 4000, val_loss=3.1)  # at the failure's tokens: not past them
    assert _extras(path) == before == {"status": "failed", "failure": "RuntimeError: preempted"}
    assert failure(RunRecord.open(path)) == "failed (RuntimeError: preempted)"
    with RunWriter(path, resume=True, fsync=False):  # recording nothing: the same
        pass
    assert _extras(path) == before


def test_every_failure_of_a_run_stays_in_its_history(tmp_path, capsys):
    path = _failed(tmp_path / "h", 2000, RuntimeError("CUDA out of memory.\nmore"))
    _failed(path, 6000, KeyboardInterrupt(), resume=True)
    assert _extras(path)["status"] == "failed" and _extras(path)["failure"] == "KeyboardInterrupt"
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(7, 7000, val_loss=2.8)
    assert "status" not in _extras(path)
    assert _history(path) == [{"failure": "RuntimeError: CUDA out of memory.", "step": 2, "tokens": 2000},
                              {"failure": "KeyboardInterrupt", "step": 6, "tokens": 6000}]
    assert main(["inspect", str(path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  earlier: ")]
    assert lines == ["  earlier: failed (RuntimeError: CUDA out of memory.) at step 2, 2000 tokens; resumed",
                     "  earlier: failed (KeyboardInterrupt) at step 6, 6000 tokens; resumed, and the training went on"]


def test_drop_after_counts_as_the_training_going_on(tmp_path):
    """A training resumed from a checkpoint before the failure (the callbacks call drop_after) that stops
    cleanly before passing the failure's tokens: no status, not "failed" (it did not fail this time)."""
    path = _failed(tmp_path / "d", 4000)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.drop_after(2)
        w.log(3, 3000, val_loss=2.9)
    assert "status" not in _extras(path) and len(_history(path)) == 1


def test_a_status_the_user_gives_while_resumed_is_kept(tmp_path):
    for status in ("complete", "running", "diverged"):
        path = _failed(tmp_path / status)
        with RunWriter(path, resume=True, fsync=False) as w:
            w.log(5, 5000, val_loss=2.9)
            w.update_info(status=status)
        assert _extras(path)["status"] == status and len(_history(path)) == 1


def test_close_without_a_with_block_settles_the_status_too(tmp_path):
    path = _failed(tmp_path / "c")
    w = RunWriter(path, resume=True, fsync=False)
    w.log(5, 5000, val_loss=2.9)
    w.close()
    assert "status" not in _extras(path) and w.info.extras == _extras(path)
    w.close()  # idempotent, writes nothing more
    assert "status" not in _extras(path)


def test_a_failure_after_the_end_moves_to_the_history(tmp_path):
    path = _failed(tmp_path / "e", 4000, status="complete")
    assert _extras(path) == {"status": "complete", "failure_after_end": "RuntimeError: preempted"}
    with RunWriter(path, resume=True, fsync=False):
        pass
    assert _extras(path)["status"] == "complete" and "failure_after_end" not in _extras(path)
    assert _history(path) == [{"failure": "RuntimeError: preempted", "step": 4, "tokens": 4000, "after_end": True}]


def test_a_resumed_block_that_fails_again_is_failed_with_the_new_failure(tmp_path):
    path = _failed(tmp_path / "f", 3000)
    _failed(path, 3000, ValueError("again"), resume=True)  # no progress, and it raised: failed, the new failure
    assert _extras(path)["status"] == "failed" and _extras(path)["failure"] == "ValueError: again"
    assert _history(path) == [{"failure": "RuntimeError: preempted", "step": 3, "tokens": 3000}]


def test_a_settle_that_cannot_write_warns_and_the_exit_stays_clean(tmp_path, monkeypatch):
    import spectral_lens.records.writer as writer_module

    path = _failed(tmp_path / "w")
    w = RunWriter(path, resume=True, fsync=False)

    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_write_json_atomic", full)
    with pytest.warns(RecordWarning, match=r"could not record in run.json that the resumed run stopped"):
        w.close()
    assert w.closed and _extras(path)["status"] == "running"


def test_a_mark_that_could_not_be_written_is_not_settled(tmp_path, monkeypatch):
    """The resumed block raised and its failure could not be written: the settle does not write either
    (it would read the run as stopped cleanly, or as the old failure)."""
    import spectral_lens.records.writer as writer_module

    path = _failed(tmp_path / "n")
    calls = []
    real = writer_module._write_json_atomic

    def once(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(writer_module, "_write_json_atomic", once)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ZeroDivisionError):
        warnings.simplefilter("always")
        with RunWriter(path, resume=True, fsync=False) as w:
            w.log(5, 5000, val_loss=2.9)
            raise ZeroDivisionError("boom")
    assert len(calls) == 2 and [str(c.message) for c in caught if "could not record the run's failure" in str(c.message)]
    assert _extras(path)["status"] == "running"
