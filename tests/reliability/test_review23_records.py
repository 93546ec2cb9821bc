"""Review 23: the writer reads each JSONL file once (the resume's orphan scan, ``has_measurement``,
``val_loss_steps``, and after ``drop_after``), and ``drop_after`` splits lines where the reader does.

Before, ``val_loss_steps()`` parsed both files on every call, the resume's orphan scan and the first
``has_measurement`` each parsed ``measurements.jsonl``, and after ``drop_after`` rewrote a file the next
``measured_steps`` parsed it again (on a 37 MB record: a resume with ``drop_after``, ``measured_steps`` and
``val_loss_steps`` 7.6-9.0 s before, 2.6-5.0 s after, on a shared machine)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


@pytest.fixture
def parsed(monkeypatch):
    """The record lines ``json.loads`` parses from now on: a list of their ``step``s (``"log"`` or ``"m"`` by file)."""
    seen: list[tuple[str, int]] = []
    real = json.loads

    def counting(text, *args, **kw):
        obj = real(text, *args, **kw)
        if isinstance(obj, dict) and "step" in obj:
            seen.append(("m" if "spectra" in obj else "log", obj["step"]))
        return obj

    monkeypatch.setattr(json, "loads", counting)
    return seen


def _spec():
    return Spectrum(np.arange(1, 21, dtype=float) ** -1.0, n_rows=64, dim=20)


def _record(path, n=6):
    with RunWriter(path, RunInfo("r", total_tokens=10_000), fsync=False, tail_window=(2, 10)) as w:
        for step in range(1, n + 1):
            w.log(step, step * 100, train_loss=3.0, **({"val_loss": 3.0} if step % 2 == 0 else {}))
            w.log_measurement(step, step * 100, {"act": _spec()}, val_loss=3.0 if step % 3 == 0 else None)
    return path


def test_a_resume_parses_measurements_once_for_the_orphan_scan_and_has_measurement(tmp_path, parsed):
    path = _record(tmp_path / "r")
    parsed.clear()
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.has_measurement(6) and not w.has_measurement(7)
        assert w.measured_steps() == {1, 2, 3, 4, 5, 6}
        assert [f for f, _ in parsed] == ["m"] * 6  # before: 12 (the orphan scan, then has_measurement)


def test_val_loss_steps_parses_only_the_lines_appended_since_its_last_call(tmp_path, parsed):
    path = _record(tmp_path / "r")
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.val_loss_steps() == {2, 3, 4, 6}
        parsed.clear()
        w.log(7, 700, val_loss=2.9)
        with open(path / "measurements.jsonl", "ab") as fh:  # another program's line
            fh.write(b'{"step": 8, "tokens": 800, "val_loss": 2.8, "spectra": {}}\n')
        assert w.val_loss_steps() == {2, 3, 4, 6, 7, 8}
        assert sorted(parsed) == [("log", 7), ("m", 8)]  # before: every line of both files, every call
        parsed.clear()
        assert w.val_loss_steps() == {2, 3, 4, 6, 7, 8} and parsed == []


def test_after_drop_after_the_steps_are_known_without_parsing_the_files_again(tmp_path, parsed):
    path = _record(tmp_path / "r")
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.measured_steps() == {1, 2, 3, 4, 5, 6}
        assert w.drop_after(3) == 3
        parsed.clear()
        assert w.measured_steps() == {1, 2, 3} and w.val_loss_steps() == {2, 3}
        assert parsed == []  # before: both files parsed again (they were replaced)
        w.log_measurement(4, 400, {"act": _spec()}, val_loss=2.9)
        with open(path / "log.jsonl", "ab") as fh:  # another program's line is still seen
            fh.write(b'{"step": 5, "tokens": 500, "val_loss": 2.7}\n')
        assert w.measured_steps() == {1, 2, 3, 4} and w.val_loss_steps() == {2, 3, 4, 5}
    r = RunRecord.open(path)
    assert [m.step for m in r.measurements] == [1, 2, 3, 4] and [e["step"] for e in r.events] == [1, 2, 3, 5]


def test_drop_after_keeps_a_line_with_a_carriage_return_in_it_whole(tmp_path):
    """A line another tool wrote with a carriage return as JSON whitespace is one line to the reader (lines end
    at b"\\n"); drop_after split it at the b"\\r" (bytes.splitlines) and wrote two unreadable lines back."""
    path = _record(tmp_path / "r", 2)
    with open(path / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 2, "tokens": 200,\r"train_loss": 2.5}\n{"step": 9, "tokens": 900, "train_loss": 2.0}\n')
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.drop_after(2) == 0
        assert w.val_loss_steps() == {2}
    r = RunRecord.open(path)  # errors="raise": every line readable
    assert [(e["step"], e["train_loss"]) for e in r.events] == [(1, 3.0), (2, 3.0), (2, 2.5)]


def test_the_orphan_scan_still_keeps_files_a_line_may_refer_to(tmp_path):
    path = _record(tmp_path / "r", 2)
    orphan = path / "spectra" / "00000009_act.npz"
    _spec().save(orphan)
    lines = (path / "measurements.jsonl").read_bytes()
    (path / "measurements.jsonl").write_bytes(lines + b"{not json\n")  # an unreadable line: nothing removed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # nothing removed, nothing said
        RunWriter(path, resume=True, fsync=False).close()
    assert orphan.exists()
    # a last line that is a complete object without its newline refers to its file: kept; the orphan goes
    kept = json.loads(lines.splitlines()[-1])
    kept.update(step=9, spectra={"act": {**kept["spectra"]["act"], "file": "spectra/00000009_act.npz"}})
    other = path / "spectra" / "00000010_act.npz"
    _spec().save(other)
    (path / "measurements.jsonl").write_bytes(lines + json.dumps(kept).encode())
    with pytest.warns(RecordWarning, match=r"removed 0 temporary file\(s\) and 1 spectrum file"):
        RunWriter(path, resume=True, fsync=False).close()
    assert orphan.exists() and not other.exists()
    assert [m.step for m in RunRecord.open(path).measurements] == [1, 2, 9]



def test_a_closed_writer_refuses_update_info(tmp_path):
    """update_info wrote run.json after close(), without the lock: over the next writer's run.json (its failure
    mark, its status), which that writer's next update then overwrote in turn."""
    path = _record(tmp_path / "r", 1)
    old = RunWriter(path, resume=True, fsync=False)
    old.close()
    with RunWriter(path, resume=True, fsync=False) as new:
        new.update_info(status="diverged")
        with pytest.raises(ValueError, match="closed"):
            old.update_info(status="complete", lr=1.0)
    assert json.loads((path / "run.json").read_text())["extras"] == {"status": "diverged"}
    assert old.info.extras == {}
