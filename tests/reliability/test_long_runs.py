"""Costs over long runs and large sweeps (audit): what a record, a measurement or an eigen-solve costs
must not grow with the run's history, and must not copy a d x d matrix more often than needed. Each
test counts (system calls, bytes, allocations), never time."""

from __future__ import annotations

import os

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.records import RecordFormatError, RunInfo, RunRecord, RunWriter


def _spec(d=16, k=1.0):
    return Spectrum(torch.logspace(0, -3, d, dtype=torch.float64) * k, n_rows=4 * d, dim=d)


def _run(path, n, layers=3):
    with RunWriter(path, RunInfo("r", total_tokens=1000 * n), fsync=False) as w:
        for step in range(n):
            w.log(step, 100 * step, train_loss=1.0)
            w.log_measurement(step, 100 * step, {f"act:blocks.{i}": _spec() for i in range(layers)}, val_loss=1.0)
    return path


class _CountStat:
    """Counts ``os.stat`` calls (``Path.is_file``/``exists``, ``os.path.isfile`` all make one)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = os.stat

        def stat(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)


# ---- reading a long run -----------------------------------------------------------------------------


def test_opening_a_run_stats_no_spectrum_file_one_by_one(tmp_path, monkeypatch):
    """``RunRecord.open`` built a ``Path`` and ran a ``stat`` for every spectrum of every measurement to
    check its file exists: 12,000 of them for 1,000 measurements of 12 layers, 0.8 s of the 1.3 s an
    open took on the project's 2-core machine (and the CLI opens every run of a sweep). One listing of
    ``spectra/`` now answers for the writer's files: the number of ``stat`` calls of an open no longer
    grows with the number of measurements."""
    short, long = _run(tmp_path / "short", 4), _run(tmp_path / "long", 40)
    counts = []
    for path in (short, long):
        stats = _CountStat(monkeypatch)
        record = RunRecord.open(path)
        counts.append(stats.n)
        monkeypatch.undo()
        assert len(record.measurements) == (4 if path == short else 40)
    assert counts[0] == counts[1], counts


def test_a_spectrum_file_missing_from_the_listing_is_still_checked_on_its_own(tmp_path, monkeypatch):
    """A file written after the listing (a writer still appending), or named outside ``spectra/``, is
    checked with its own ``stat``; a file that is gone is still refused, naming its line."""
    run = _run(tmp_path / "run", 5)
    from spectral_lens.records import reader

    monkeypatch.setattr(reader, "_spectrum_listing", lambda root: frozenset())
    assert len(RunRecord.open(run).measurements) == 5
    monkeypatch.undo()
    victim = sorted((run / "spectra").iterdir())[7]  # measurement 3 (1-based line 3), its second layer
    victim.unlink()
    with pytest.raises(RecordFormatError, match=rf"line 3: spectrum file .*{victim.name}.* is missing"):
        RunRecord.open(run)
    (run / "spectra" / victim.name).mkdir()  # a directory by that name is no spectrum file either
    with pytest.raises(RecordFormatError, match=rf"line 3: spectrum file .*{victim.name}.* is missing"):
        RunRecord.open(run)


# ---- writing a long run -------------------------------------------------------------------------------


def test_appending_costs_the_same_after_a_long_history(tmp_path, monkeypatch):
    """Regression guard: ``log`` and ``log_measurement`` write their own line and spectrum files only
    (bytes written and files opened per append do not grow with the lines already in the run)."""
    written, opened = [0], [0]
    real_write, real_open = os.write, os.open

    def write(fd, data):
        written[0] += len(data)
        return real_write(fd, data)

    def open_(*args, **kwargs):
        opened[0] += 1
        return real_open(*args, **kwargs)

    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=10**6), fsync=False) as w:
        costs = []
        for step in range(60):
            monkeypatch.setattr(os, "write", write)
            monkeypatch.setattr(os, "open", open_)
            written[0] = opened[0] = 0
            w.log(step, 10 * step, train_loss=1.0, time=0.0)
            w.log_measurement(step, 10 * step, {"act:blocks.0": _spec(), "act:blocks.1": _spec()}, val_loss=1.0)
            monkeypatch.undo()
            costs.append((written[0], opened[0]))
    # the step's digits and the clock's are in the lines: at most a few bytes apart
    assert max(c[0] for c in costs[10:]) - min(c[0] for c in costs[10:]) <= 40, costs
    assert len({c[1] for c in costs}) == 1, costs
