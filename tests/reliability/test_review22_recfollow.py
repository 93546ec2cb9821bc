"""Review 22 follow-up: a malformed record line costs that line only, also when the writer appends after it.

Before, a ``log.jsonl`` or ``measurements.jsonl`` that ended without a newline while the writer was open (another
program's partial line; the writer's own failed write whose cut failed too) had the writer's next line glued onto
it: both lines were lost to readers. Resume already cut a truncated last line; these cases came after opening."""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

import spectral_lens.records.writer as writer_module
from spectral_lens import Spectrum
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter


def _open_skip(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = RunRecord.open(path, errors="skip")
    return rec, [str(w.message) for w in caught if issubclass(w.category, RecordWarning)]


@pytest.mark.parametrize("fsync", [False, True])
def test_the_writers_line_after_another_programs_partial_line_survives(tmp_path, fsync):
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=10_000), fsync=fsync) as w:
        w.log(1, 100, train_loss=3.0)
        with open(tmp_path / "r" / "log.jsonl", "ab") as fh:  # another program, cut off mid-line
            fh.write(b'{"step": 2, "tokens": 2')
        w.log(3, 300, train_loss=2.5)
        w.log(4, 400, train_loss=2.4)  # the writer's own last line again: no blank line, no read
    rec, warned = _open_skip(tmp_path / "r")
    assert [e["step"] for e in rec.events] == [1, 3, 4]  # before: [1, 4] (steps 2 and 3 glued into one bad line)
    assert len(warned) == 1 and "log.jsonl, line 2: corrupted record line" in warned[0], warned
    assert (tmp_path / "r" / "log.jsonl").read_bytes().count(b"\n\n") == 0


def test_a_complete_line_without_its_newline_is_kept_beside_the_writers(tmp_path):
    """Another tool's complete JSON object that only lacks its newline: both lines read, no warning."""
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log(1, 100, train_loss=3.0)
        with open(tmp_path / "r" / "log.jsonl", "ab") as fh:
            fh.write(b'{"step": 2, "tokens": 200, "val_loss": 2.9}')
        w.log(3, 300, train_loss=2.5)
    rec = RunRecord.open(tmp_path / "r")  # errors="raise": nothing is malformed
    assert [e["step"] for e in rec.events] == [1, 2, 3]


def test_a_measurement_after_a_partial_line_survives_with_its_spectrum(tmp_path):
    spec = Spectrum(torch.linspace(2.0, 0.1, 32, dtype=torch.float64), n_rows=64, dim=32)
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log_measurement(1, 100, {"act": spec}, val_loss=3.0)
        with open(tmp_path / "r" / "measurements.jsonl", "ab") as fh:
            fh.write(b'{"step": 2, "tokens": 200, "spectra": {"act": {"fi')
        w.log_measurement(3, 300, {"act": spec}, val_loss=2.5)
        assert w.measured_steps() == {1, 3}
    rec, warned = _open_skip(tmp_path / "r")
    assert [m.step for m in rec.measurements] == [1, 3] and len(warned) == 1, warned
    assert torch.equal(rec.measurements[-1].spectra["act"].values, spec.values)


def test_a_failed_write_whose_cut_fails_too_costs_that_line_only(tmp_path, monkeypatch):
    """A short write, then ENOSPC, then a failing ftruncate: the partial line stays; the next line starts on a
    fresh line."""
    real = os

    calls = []

    def short_then_full(fd, data):  # the first call writes 10 bytes, the second finds the disk full
        calls.append(len(data))
        if len(calls) == 1:
            return real.write(fd, data[:10])
        raise OSError(28, "No space left on device")

    def no_truncate(fd, length):
        raise OSError(5, "Input/output error")

    w = RunWriter(tmp_path / "r", RunInfo("r", total_tokens=10_000), fsync=False)
    w.log(1, 100, train_loss=3.0)
    patched = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    patched.write, patched.ftruncate = short_then_full, no_truncate
    monkeypatch.setattr(writer_module, "os", patched)
    with pytest.raises(OSError, match="No space left"):
        w.log(2, 200, train_loss=2.8)
    monkeypatch.undo()
    assert len(calls) == 2 and (tmp_path / "r" / "log.jsonl").read_bytes().endswith(b'\n{"step":2,')
    w.log(3, 300, train_loss=2.5)
    w.close()
    rec, warned = _open_skip(tmp_path / "r")
    assert [e["step"] for e in rec.events] == [1, 3] and len(warned) == 1, warned
