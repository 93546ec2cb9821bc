"""Review 22: the run writer knows which steps its record holds (RunWriter.has_measurement / measured_steps),
and the lens asks it instead of parsing measurements.jsonl itself."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from support.files import bytes_read
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunWriter


def _writer(tmp_path, **kw):
    return RunWriter(tmp_path / "r", RunInfo("r", total_tokens=1000), fsync=False, **kw)


V, T = 64, 16


def test_the_writer_reads_its_measured_steps_once_then_only_what_was_appended(tmp_path, monkeypatch):
    """measured_steps() parsed the whole measurements.jsonl at every call (0.7 s on a 5000-line, 30 MB record);
    the lens kept its own incremental copy of the parse. The writer now parses the file once and then only the
    bytes appended since: its own lines and another program's."""
    with _writer(tmp_path) as w:
        w.log_measurement(1, 100, {})
    file = tmp_path / "r" / "measurements.jsonl"
    line = json.loads(file.read_bytes())
    with open(file, "a") as fh:  # a long record: lines written before the writer below opened
        for step in range(2, 3000):
            fh.write(json.dumps({**line, "step": step}) + "\n")
    with _writer(tmp_path, resume=True) as w:
        assert w.measured_steps() == set(range(1, 3000))
        size = file.stat().st_size
        counted = bytes_read(monkeypatch, "measurements.jsonl")
        w.log_measurement(10_000, 500, {})  # its own line
        with open(file, "a") as fh:  # and another program's
            fh.write(json.dumps({**line, "step": 10_001}) + "\n")
        assert w.has_measurement(10_000) and w.has_measurement(10_001) and w.has_measurement(2)
        assert not w.has_measurement(10_002) and not w.has_measurement(0)
        assert w.measured_steps() == set(range(1, 3000)) | {10_000, 10_001}
        # six calls: each reads the 256 bytes before where it stopped, and the lines appended since
        assert counted[0] < 6 * 256 + 3 * len(json.dumps(line)) < size / 50, (counted[0], size)


def test_the_writers_steps_follow_a_file_replaced_rewritten_or_appended_to_outside_it(tmp_path):
    """The remembered steps are the file's: drop_after (which replaces it), another program replacing it or
    rewriting it in place (same inode), a last line without its newline (counted, and read again once the
    line is complete), bad lines (passed over)."""
    with _writer(tmp_path) as w:
        for step in (1, 2, 3):
            w.log_measurement(step, step * 10, {})
        assert w.measured_steps() == {1, 2, 3}
        w.drop_after(1)
        assert w.measured_steps() == {1} and not w.has_measurement(2)
        w.log_measurement(4, 40, {})
        assert w.measured_steps() == {1, 4}
        file = w.path / "measurements.jsonl"
        lines = file.read_bytes().splitlines(keepends=True)
        other = tmp_path / "other.jsonl"  # another program replaces the file (a new inode)
        other.write_bytes(lines[0].replace(b'"step":1', b'"step":7'))
        os.replace(other, file)
        assert w.measured_steps() == {7}
        with open(file, "r+b") as fh:  # rewritten in place, same inode, as long as before
            fh.write(lines[0].replace(b'"step":1,', b'"step":8,'))
        assert w.measured_steps() == {8}
        with open(file, "ab") as fh:  # a complete line still without its newline, then bad lines
            fh.write(b'{"step": 9}')
        assert w.has_measurement(9) and w.measured_steps() == {8, 9}
        with open(file, "ab") as fh:
            fh.write(b'\nnot json\n{"step": true}\n[1]\n{"step": "10"}\n{"step": 11}\n{"step": 12')
        assert w.measured_steps() == {8, 9, 11} and not w.has_measurement(12)
        with open(file, "ab") as fh:
            fh.write(b"}\n")
        assert w.measured_steps() == {8, 9, 11, 12}


class _Recorder:
    """A duck-typed writer that has has_measurement but no measured_steps."""

    path = "fake-run"
    closed = False
    tail_window, head_window = (2, 8), (10, 40)

    def __init__(self):
        self.steps = {5}
        self.asked = []

    def has_measurement(self, step):
        self.asked.append(step)
        return step in self.steps

    def log_measurement(self, step, tokens, spectra, **kw):
        self.steps.add(step)


def test_the_lens_asks_the_writer_whether_it_holds_the_step(tmp_path):
    """SpectralLens.measure parsed the RunWriter's measurements.jsonl itself (with the writer's private line
    parser) and asked other writers for all their steps; it now asks the writer, has_measurement(step)."""
    writer = _Recorder()
    lens = sl.SpectralLens(TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T), lm_pool(1, batch=4, t=T, vocab=V, seed=99),
                           writer=writer, progress=False, params=())
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.SpectralLensWarning)
        lens.measure(4, 40)
    with pytest.warns(sl.SpectralLensWarning, match=r"run record fake-run already holds a measurement at step 5;"):
        lens.measure(5, 50)
    assert writer.asked == [4, 5]
