"""Review 23 (``audit-rev-recsplit``): adversarial review of the writer split (``records/_status.py``,
``records/_scan.py``) and its three record fixes.

* ``drop_after`` cutting a partial last line of ``measurements.jsonl`` counted the cut line as a line of
  unknown references and so removed no spectrum file at all: the dropped measurements' spectra stayed behind,
  and a second ``drop_after`` (their lines gone) could not remove them. The cut line is no line of the file
  any more; only a line kept protects files. A tail of blanks (no line: the reader passes it over) was
  warned about as a partial line and blocked the removal too.
* A stale ``"running"`` whose last ``failure_history`` entry (a resume's, by its ``resumed``) has no
  ``failure`` key (written by hand or another tool) made the settle raise ``KeyError``: a ``RecordWarning``
  at every close, and the ``"running"`` never settled.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter


def _spec():
    return Spectrum(np.arange(1, 21, dtype=float) ** -1.0, n_rows=64, dim=20)


def _record(path, n=5):
    w = RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False, tail_window=(2, 10))
    for s in range(1, n + 1):
        w.log(s, s * 100, train_loss=1.0)
        w.log_measurement(s, s * 100, {"act": _spec()}, val_loss=2.0)
    return w


def _spectra(path):
    return sorted(os.listdir(path / "spectra"))


@pytest.mark.parametrize("tail", [b'{"step": 6, "tokens": 600, "spectra": {"act": {"file": "spec',
                                  b'{"step": 6, "note": "\xc3'])  # cut mid-line; mid a UTF-8 character
def test_drop_after_cutting_a_partial_line_removes_the_dropped_spectra(tmp_path, tail):
    path = tmp_path / "r"
    w = _record(path)
    with open(path / "measurements.jsonl", "ab") as fh:
        fh.write(tail)
    with pytest.warns(RecordWarning, match="measurements.jsonl: dropping a partial last line"):
        assert w.drop_after(3) == 2
    # before: all five files stayed (the cut line counted as unknown references)
    assert _spectra(path) == ["00000001_act.npz", "00000002_act.npz", "00000003_act.npz"]
    assert w.measured_steps() == {1, 2, 3} and w.val_loss_steps() == {1, 2, 3} and not w.has_measurement(4)
    w.log_measurement(4, 400, {"act": _spec()})
    assert w.measured_steps() == {1, 2, 3, 4}
    w.close()
    rec = RunRecord.open(path, verify=True)
    assert [m.step for m in rec.measurements] == [1, 2, 3, 4]


@pytest.mark.parametrize("tail", [b"   ", b"\t \r"])
def test_drop_after_passes_over_a_blank_tail(tmp_path, tail):
    """Blanks after the last newline are no line (the reader passes them over without a word): no warning,
    and the dropped measurements' spectra are removed."""
    path = tmp_path / "r"
    w = _record(path)
    with open(path / "measurements.jsonl", "ab") as fh:
        fh.write(tail)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # before: "dropping a partial last line (3 bytes)"
        assert w.drop_after(3) == 2
    assert _spectra(path) == ["00000001_act.npz", "00000002_act.npz", "00000003_act.npz"]
    w.close()
    assert [m.step for m in RunRecord.open(path).measurements] == [1, 2, 3]


def test_an_unreadable_kept_line_still_keeps_every_spectrum(tmp_path):
    """The rule the cut line no longer triggers still holds for a line that stays: its references are unknown."""
    path = tmp_path / "r"
    w = _record(path)
    with open(path / "measurements.jsonl", "ab") as fh:
        fh.write(b"not json\n")
    assert w.drop_after(3) == 2
    assert len(_spectra(path)) == 5
    w.close()


def _extras(path):
    return json.loads((path / "run.json").read_text())["extras"]


@pytest.mark.parametrize("went_on", [False, True])
def test_a_stale_running_whose_entry_has_no_failure_is_settled(tmp_path, went_on):
    path = tmp_path / "r"
    with RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log(4, 400, train_loss=1.0)
        w.update_info(status="running", failure_history=[{"step": 4, "tokens": 400, "resumed": 1.0}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # before: "could not record ... KeyError: 'failure'"
        with RunWriter(path, resume=True, fsync=False) as w:
            if went_on:
                w.log(5, 500, train_loss=1.0)
    if went_on:
        assert _extras(path) == {"failure_history": [{"step": 4, "tokens": 400, "resumed": 1.0, "went_on": True}]}
    else:
        assert _extras(path) == {"status": "failed"}


def test_a_users_running_after_a_settled_resume_brings_back_no_failure(tmp_path):
    """A run fails at step 4, a resume goes on to step 8 (its "running" settled: no status), a later writer says
    update_info(status="running") and closes; a measure-only resume then took that "running" for a killed writer's
    mark (the history's last entry was a resume's) and restored the failure the run had moved past. A settled entry
    is now marked went_on, which no later "running" is taken for."""
    path = tmp_path / "r"
    with pytest.raises(RuntimeError), RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        for s in range(1, 5):
            w.log(s, s * 100, train_loss=1.0)
        raise RuntimeError("preempted")
    with RunWriter(path, resume=True, fsync=False) as w:
        for s in range(5, 9):
            w.log(s, s * 100, train_loss=1.0)
    extras = json.loads((path / "run.json").read_text())["extras"]
    assert "status" not in extras and extras["failure_history"][-1]["went_on"] is True
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log(9, 900, train_loss=1.0)
        w.update_info(status="running")
    with RunWriter(path, resume=True, fsync=False):
        pass  # measures nothing new
    extras = json.loads((path / "run.json").read_text())["extras"]
    # review 24: that "running", no writer's, is removed at the measure-only close (before: kept for good)
    assert "status" not in extras and "failure" not in extras, extras  # before: failed, "RuntimeError: preempted"
    assert [e["failure"] for e in extras["failure_history"]] == ["RuntimeError: preempted"]
