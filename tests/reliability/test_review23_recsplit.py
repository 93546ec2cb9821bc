"""Review 23 (``audit-recsplit``): the status lifecycle's left-over gaps.

* A resumed failed run whose writer was killed (SIGKILL: no close, no settle) kept the ``"running"`` it had
  set for good, through every later resume: only ``"failed"`` was withdrawn on resume, so a later writer
  settled nothing. A later ``RunWriter(resume=True)`` holds the lock, so a ``"running"`` whose last
  ``failure_history`` entry a resume wrote is an earlier writer's stale mark: it settles it at its close as
  its own (went on past the record's end at its open: status removed; else the failure restored).
* A failure that is NaN (a hand-written ``run.json``) never compared equal to its history entry, so a
  resume that did not go on restored it but left the entry: one more duplicate per resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from spectral_lens.analysis import failure
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


def _history(path):
    return [{k: v for k, v in e.items() if k not in ("resumed", "went_on")} for e in _extras(path).get("failure_history", [])]


def _failed_run(path, tokens=400):
    with pytest.raises(RuntimeError), RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log(tokens // 100, tokens, train_loss=1.0)
        raise RuntimeError("preempted")


def _killed_resume(path, tokens=None):
    """A resume whose process dies without closing (as SIGKILL: the kernel releases the lock, nothing is
    settled): the files closed and the lock released, writing nothing."""
    w = RunWriter(path, resume=True, fsync=False)
    if tokens is not None:
        w.log(tokens // 100, tokens, train_loss=1.0)
    w._close()


def test_a_killed_resume_is_settled_by_the_next_writer_that_does_not_go_on(tmp_path):
    path = tmp_path / "r"
    _failed_run(path)
    _killed_resume(path, tokens=600)
    assert _extras(path)["status"] == "running"
    RunWriter(path, resume=True, fsync=False).close()  # a script that records nothing
    # before: "running" for good (and the failure only in the history)
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}
    assert failure(RunRecord.open(path)) == "failed (RuntimeError: preempted)"


def test_a_killed_resume_through_later_killed_resumes_is_settled_once(tmp_path):
    path = tmp_path / "r"
    _failed_run(path)
    _killed_resume(path, tokens=500)
    _killed_resume(path, tokens=600)
    _killed_resume(path)
    assert _extras(path)["status"] == "running" and len(_history(path)) == 1
    with RunWriter(path, resume=True, fsync=False) as w:  # the training goes on past the record's end
        w.log(7, 700, train_loss=1.0)
    extras = _extras(path)
    assert "status" not in extras and "failure" not in extras
    assert _history(path) == [{"failure": "RuntimeError: preempted", "step": 4, "tokens": 400}]


def test_measuring_a_killed_resumes_checkpoint_is_no_going_on(tmp_path):
    """The killed writer's own lines count as recorded before: a script measuring its checkpoint at 500
    (past the failure's 400, before the record's end at 600) does not go on with the training."""
    path = tmp_path / "r"
    _failed_run(path)
    _killed_resume(path, tokens=600)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log_measurement(5, 500, {})
    assert _extras(path)["status"] == "failed"


def test_a_killed_resume_failing_again_is_failed_with_the_new_failure(tmp_path):
    path = tmp_path / "r"
    _failed_run(path, tokens=9700)
    _killed_resume(path)
    with pytest.raises(ValueError), RunWriter(path, resume=True, fsync=False):
        raise ValueError("again")
    extras = _extras(path)
    assert extras["status"] == "failed" and extras["failure"] == "ValueError: again"
    assert "failure_after_end" not in extras and len(_history(path)) == 1


def test_a_running_without_a_resume_entry_restores_no_failure(tmp_path):
    """A ``"running"`` on a run that has no history entry of a resume is no killed resume's mark: no failure is
    restored. Review 24: it is no writer's either (the next writer holds the lock), so that writer's close
    removes it (before: kept for good, as a status someone set)."""
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.update_info(status="running", failure_history=[{"failure": "x", "after_end": True, "resumed": 1.0}])
    RunWriter(path, resume=True, fsync=False).close()
    assert _extras(path) == {"failure_history": [{"failure": "x", "after_end": True, "resumed": 1.0}]}


@pytest.mark.slow
def test_a_sigkilled_resume_is_settled_by_the_next_writer(tmp_path):
    path = tmp_path / "r"
    _failed_run(path)
    code = ("import os, signal, sys\nfrom spectral_lens.records import RunWriter\n"
            "w = RunWriter(sys.argv[1], resume=True, fsync=False)\nw.log(6, 600, train_loss=1.0)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL and _extras(path)["status"] == "running"
    RunWriter(path, resume=True, fsync=False).close()
    assert _extras(path) == {"status": "failed", "failure": "RuntimeError: preempted"}


@pytest.mark.parametrize("text", [math.nan, [1, math.nan], {"why": "oom", "n": 2}, None])
def test_a_failure_that_is_no_string_is_restored_without_duplicating_its_entry(tmp_path, text):
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log(4, 400, train_loss=1.0)
        w.update_info(status="failed", failure=text)  # as a hand-written run.json has it
    for _ in range(3):  # resumes that do not go on
        RunWriter(path, resume=True, fsync=False).close()
    extras = _extras(path)
    assert extras["status"] == "failed" and "failure_history" not in extras  # before (NaN): 3 entries
    assert json.dumps(extras.get("failure")) == json.dumps(text) or (text is None and "failure" not in extras)


@pytest.mark.parametrize("name", ["log.jsonl", "measurements.jsonl"])
def test_drop_after_cuts_a_partial_last_line_instead_of_burying_it_mid_file(tmp_path, name):
    """Another program's partial last line (mid-write): ``drop_after`` replaces the file, so its writer's rest
    goes to the replaced file; the line was kept and ended with a newline, and the next line made it a broken
    line mid-file: ``RunRecord.open`` refused the whole record. Now it is cut off with a warning, as a
    resume does."""
    from spectral_lens.records import RecordWarning

    path = tmp_path / "r"
    w = RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False)
    for s in range(1, 6):
        w.log(s, s * 100, train_loss=1.0)
        w.log_measurement(s, s * 100, {})
    with open(path / name, "ab") as fh:
        fh.write(b'{"step": 6, "tokens": 6')
    with pytest.warns(RecordWarning, match="partial last line"):
        assert w.drop_after(3) == 2
    w.log(4, 400, train_loss=1.0)
    w.log_measurement(4, 400, {})
    w.close()
    r = RunRecord.open(path)  # before: RecordFormatError (a corrupted line 4)
    assert [e["step"] for e in r.events] == [1, 2, 3, 4] and [m.step for m in r.measurements] == [1, 2, 3, 4]


def test_drop_after_keeps_a_complete_last_line_without_its_newline(tmp_path):
    path = tmp_path / "r"
    w = RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False)
    for s in range(1, 6):
        w.log(s, s * 100, train_loss=1.0)
    with open(path / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 2, "tokens": 250, "lr": 0.1}')
    w.drop_after(3)
    w.close()
    assert [e["step"] for e in RunRecord.open(path).events] == [1, 2, 3, 2]


def test_the_settle_takes_off_an_entry_whose_failure_is_a_nan_of_another_read():
    """``_settled`` compared the history's last entry with ``==``: a NaN ``failure`` read twice into two float
    objects never compared equal, so the entry stayed beside the restored failure (one more per resume).
    Through ``RunWriter`` CPython's ``json`` hands out one NaN object, which hid it."""
    from spectral_lens.records._status import _settled

    withdrawn = {"failure": [float("nan")], "step": 4, "tokens": 400, "resumed": 1.5}
    extras = {"status": "running", "failure_history": [{"failure": "old"}, {**withdrawn, "failure": [float("nan")]}]}
    out = _settled(extras, withdrawn, went_on=False)
    assert out["status"] == "failed" and out["failure_history"] == [{"failure": "old"}]
