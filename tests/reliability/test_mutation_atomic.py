"""Durability order of an atomic write, and ``drop_after`` with a spectrum file shared by a kept and
a dropped line (found by hand mutation testing: skipping the directory fsync after the rename, and
deleting every file a dropped line names, both passed the suite).

``write_atomic`` promises (module docstring): temporary file in the target's directory, fsync,
rename; and the rename itself made durable by an fsync of the directory. ``fsync=False`` skips
the fsyncs but keeps the rename.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens import atomic as _io
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter


def _trace(monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_file_fsync_then_rename_then_directory_fsync(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    calls = _trace(monkeypatch)
    _io.write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    (r,) = [i for i, c in enumerate(calls) if c[0] == "replace"]
    tmp = calls[r][1]
    assert os.path.dirname(tmp) == str(tmp_path) and calls[r][2] == str(target)  # a temporary file next to it
    assert ("fsync", tmp) in calls[:r], calls  # its data is durable before the rename publishes it
    assert ("fsync", str(tmp_path)) in calls[r + 1:], calls  # the rename itself made durable (the directory)


def test_no_fsync_keeps_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old\n")
    calls = _trace(monkeypatch)
    _io.write_text_atomic(target, "new\n", fsync=False)
    assert target.read_text() == "new\n" and [c[0] for c in calls] == ["replace"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_drop_after_keeps_a_spectrum_file_a_kept_line_refers_to(tmp_path):
    spec = Spectrum(np.array([3.0, 2.0, 1.0]), n_rows=10, dim=3)
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=100), fsync=False) as w:
        w.log_measurement(1, 10, {"act": spec})
        w.log_measurement(2, 20, {"act": spec})
    mfile = tmp_path / "r" / "measurements.jsonl"
    lines = [json.loads(x) for x in mfile.read_text().splitlines()]
    # a later line that refers to the earlier line's file (an external tool deduplicating spectra)
    lines[1]["spectra"]["act"]["file"] = lines[0]["spectra"]["act"]["file"]
    mfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    orphan = tmp_path / "r" / "spectra" / "00000002_act.npz"
    with pytest.warns(RecordWarning, match="1 spectrum file"):
        w = RunWriter(tmp_path / "r", resume=True, fsync=False)
    with w:
        assert not orphan.exists()  # resume removed the file no line refers to any more
        assert w.drop_after(1) == 1
    run = RunRecord.open(tmp_path / "r")
    assert [m.step for m in run.measurements] == [1]
    assert np.allclose(run.measurements[0].spectra["act"].values.numpy(), [3.0, 2.0, 1.0])
