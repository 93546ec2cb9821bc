"""Run records under faults: a malformed line costs that line only; resume keeps every complete line
and cleans what a killed writer left behind."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.records import RecordFormatError, RecordWarning, RunInfo, RunRecord, RunWriter


def _spec(d=30):
    return Spectrum(torch.logspace(0, -3, d, dtype=torch.float64), n_rows=4 * d, dim=d)


def _run(path, n=3):
    with RunWriter(path, RunInfo("r", total_tokens=1000), fsync=False) as w:
        for step in range(1, n + 1):
            w.log(step, 100 * step, train_loss=3.0 / step)
            w.log_measurement(step, 100 * step, {"act": _spec()}, val_loss=3.0 / step, scalars={"noise_scale": 5.0})
    return path


BAD_LINES = {
    "scalars_list": {"step": 9, "tokens": 900, "scalars": [1], "spectra": {}},
    "summaries_list": {"step": 9, "tokens": 900, "spectra": {"act": {"file": "spectra/00000001_act.npz", "summaries": [2]}}},
    "scalar_string": {"step": 9, "tokens": 900, "scalars": {"noise_scale": "big"}, "spectra": {}},
    "spectra_entry_list": {"step": 9, "tokens": 900, "spectra": {"act": [1]}},
    "kind_number": {"step": 9, "tokens": 900, "spectra": {"act": {"file": "spectra/00000001_act.npz", "kind": 3}}},
    "nested": "[" * 50_000 + "]" * 50_000,
    "nested_object": '{"step": 9, "tokens": 900, "scalars": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
    # integers beyond the float range raised OverflowError (a traceback from the CLI), not a line error
    "scalar_huge_int": {"step": 9, "tokens": 900, "scalars": {"noise_scale": 10**400}, "spectra": {}},
    "val_loss_huge_int": {"step": 9, "tokens": 900, "val_loss": 10**400, "spectra": {}},
    "summary_huge_int": {"step": 9, "tokens": 900,
                         "spectra": {"act": {"file": "spectra/00000001_act.npz", "summaries": {"rankme": -10**400}}}},
    "tokens_huge_int": {"step": 9, "tokens": 10**400, "spectra": {}},
    "step_bool": {"step": True, "tokens": 900, "spectra": {}},
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_malformed_measurement_line_costs_that_line_only(tmp_path, case):
    run = _run(tmp_path / "run")
    mfile = run / "measurements.jsonl"
    lines = mfile.read_text().splitlines(keepends=True)
    bad = BAD_LINES[case]
    lines.insert(1, (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    mfile.write_text("".join(lines))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = RunRecord.open(run, errors="skip", verify=True)
    assert [m.step for m in rec.measurements] == [1, 2, 3]
    msgs = [str(w.message) for w in caught if issubclass(w.category, RecordWarning)]
    assert len(msgs) == 1 and f"{mfile}, line 2" in msgs[0], msgs
    with pytest.raises(RecordFormatError, match="line 2"):
        RunRecord.open(run)


@pytest.mark.parametrize("event", [{"step": 9, "tokens": 9, "val_loss": "low"}, "{" * 50_000 + "}" * 50_000,
                                   {"step": 9, "tokens": 9, "val_loss": 10**400},
                                   {"step": 9, "tokens": 9, "tokens_per_s": 10**400},
                                   {"step": 9, "tokens": 10**400}, {"step": False, "tokens": 9}],
                         ids=["loss_string", "nested", "loss_huge_int", "tps_huge_int", "tokens_huge_int", "step_bool"])
def test_a_malformed_event_line_costs_that_line_only(tmp_path, event):
    run = _run(tmp_path / "run")
    log = run / "log.jsonl"
    log.write_text(log.read_text() + (event if isinstance(event, str) else json.dumps(event)) + "\n")
    with pytest.warns(RecordWarning, match=r"log.jsonl, line 4"):
        rec = RunRecord.open(run, errors="skip")
    assert len(rec.events) == 3
    rec.val_curve()
    rec.throughput()


def test_resume_keeps_a_complete_last_line_that_lacks_its_newline(tmp_path):
    run = _run(tmp_path / "run")
    mfile = run / "measurements.jsonl"
    mfile.write_bytes(mfile.read_bytes().rstrip(b"\n"))
    assert [m.step for m in RunRecord.open(run).measurements] == [1, 2, 3]  # readers keep it too
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)  # nothing is dropped, so nothing to warn about
        with RunWriter(run, resume=True, fsync=False) as w:
            w.log_measurement(4, 400, {"act": _spec()})
    assert [m.step for m in RunRecord.open(run, verify=True).measurements] == [1, 2, 3, 4]


def test_resume_still_cuts_a_truncated_last_line(tmp_path):
    run = _run(tmp_path / "run")
    mfile = run / "measurements.jsonl"
    data = mfile.read_bytes()
    mfile.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 1] + data[data.rfind(b"\n", 0, len(data) - 1) + 1 : -20])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunWriter(run, resume=True, fsync=False).close()
    msgs = " | ".join(str(w.message) for w in caught)
    assert "truncated" in msgs and "1 spectrum file(s)" in msgs, msgs  # the cut line's spectrum goes too
    assert [m.step for m in RunRecord.open(run).measurements] == [1, 2]
    assert len(list((run / "spectra").iterdir())) == 2


def test_resume_removes_orphan_temp_and_spectrum_files(tmp_path):
    run = _run(tmp_path / "run")
    spectra = run / "spectra"
    kept = sorted(p.name for p in spectra.iterdir())
    # what a writer killed mid-measurement leaves: a temp file, and spectra whose line never came
    (spectra / ".00000004_act.npz.0123abcd.tmp").write_bytes(b"PK partial")
    (run / ".run.json.0123abcd.tmp").write_text("{")
    _spec().save(spectra / "00000004_act.npz")
    unrelated = spectra / "notes.txt"
    unrelated.write_text("user file, not ours")
    with pytest.warns(RecordWarning, match=r"removed 2 temporary file\(s\) and 1 spectrum file"):
        RunWriter(run, resume=True, fsync=False).close()
    assert sorted(p.name for p in spectra.iterdir()) == sorted(kept + ["notes.txt"])
    assert not (run / ".run.json.0123abcd.tmp").exists()
    assert len(RunRecord.open(run, verify=True).measurements) == 3


def test_resume_cleans_nothing_when_a_line_is_unreadable(tmp_path):
    run = _run(tmp_path / "run")
    mfile = run / "measurements.jsonl"
    lines = mfile.read_text().splitlines(keepends=True)
    lines[0] = "{corrupted\n"  # its spectrum file may still be referenced: do not delete it
    mfile.write_text("".join(lines))
    before = sorted(p.name for p in (run / "spectra").iterdir())
    RunWriter(run, resume=True, fsync=False).close()
    assert sorted(p.name for p in (run / "spectra").iterdir()) == before


def _short_write_then(err):
    """An ``os.write`` that writes 10 bytes of the first call (a disk filling up), then raises ``err``."""
    import os

    real, calls = os.write, []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == 1:
            return real(fd, data[:10])
        raise OSError(err, os.strerror(err))

    return write


@pytest.mark.parametrize("fault", ["enospc_after_short_write", "eio_on_write", "eio_on_fsync"])
def test_a_failed_append_names_the_file_and_leaves_no_partial_line(tmp_path, monkeypatch, fault):
    import errno
    import os

    run = _run(tmp_path / "run")
    lfile = run / "log.jsonl"
    with RunWriter(run, resume=True, fsync=fault == "eio_on_fsync") as w:
        before = lfile.read_bytes()
        if fault == "enospc_after_short_write":
            monkeypatch.setattr(os, "write", _short_write_then(errno.ENOSPC))
        elif fault == "eio_on_write":
            monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        else:
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OSError) as info:
            w.log(4, 400, train_loss=1.0)
        monkeypatch.undo()
        assert info.value.filename == str(lfile), info.value  # the error names the file
        assert info.value.errno in (errno.ENOSPC, errno.EIO)
        assert lfile.read_bytes() == before  # no partial line left behind
        w.log(5, 500, train_loss=0.5)  # the disk has room again: the next line is not glued onto a torn one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        events = RunRecord.open(run).events
    assert [e["step"] for e in events] == [1, 2, 3, 5]


@pytest.mark.parametrize("resume", [False, True])
def test_the_new_record_files_are_durable_directory_entries(tmp_path, monkeypatch, resume):
    """RunWriter created log.jsonl, measurements.jsonl and spectra/ after the last fsync of the run
    directory (the one after run.json's rename): lines fsynced into the files could vanish with the
    files' directory entries on a power loss."""
    import os

    from spectral_lens import atomic
    from spectral_lens.records import writer

    run = tmp_path / "runs" / "r"
    if resume:
        with RunWriter(run, RunInfo("r"), fsync=False):
            pass
        for name in ("log.jsonl", "measurements.jsonl"):
            (run / name).unlink()
    seen = []

    def fsync_dir(path):
        seen.append((str(path), set(os.listdir(path))))

    monkeypatch.setattr(writer, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    RunWriter(run, None if resume else RunInfo("r"), resume=resume).close()
    assert any(p == str(run) and {"run.json", "log.jsonl", "measurements.jsonl", "spectra"} <= names
               for p, names in seen), seen
    assert any(p == str(run.parent) and "r" in names for p, names in seen), seen


@pytest.mark.parametrize("bad", [{"val_loss": "low"}, {"progress": [0.5]}, {"scalars": {"noise_scale": "big"}},
                                 {"scalars": {"noise_scale": 10**400}}, {"summaries": {"b": {"rankme": None}}},
                                 "second_spectrum_unsaveable"],
                         ids=["val_loss", "progress", "scalar", "scalar_huge_int", "summary", "second_spectrum"])
def test_a_refused_measurement_writes_nothing(tmp_path, bad):
    """log_measurement saved every spectrum before converting val_loss, scalars and summaries: a bad
    value raised 'could not convert string to float' (not naming the argument) and left spectrum files
    that no line refers to (and so did a second spectrum that could not be saved)."""
    run = _run(tmp_path / "run")
    spectra = {"a": _spec(), "b": _spec()}
    kwargs = {}
    if bad == "second_spectrum_unsaveable":
        spectra["b"] = Spectrum(torch.tensor([2.0, 1.0]), n_rows=5, dim=2, metadata={"t": torch.ones(2)})
        what = r"metadata\['t'\]"
    else:
        kwargs = bad
        key = next(iter(bad))
        what = {"val_loss": "val_loss", "progress": "progress", "scalars": r"scalars\['noise_scale'\]",
                "summaries": r"summaries\['b'\]\['rankme'\]"}[key]
    before = sorted(p.name for p in (run / "spectra").iterdir())
    mbefore = (run / "measurements.jsonl").read_bytes()
    with RunWriter(run, resume=True, fsync=False) as w:
        with pytest.raises((TypeError, ValueError), match=what):
            w.log_measurement(4, 400, spectra, **kwargs)
    assert sorted(p.name for p in (run / "spectra").iterdir()) == before
    assert (run / "measurements.jsonl").read_bytes() == mbefore


@pytest.mark.parametrize("extras", [{"throughput": "fast"}, {"status": object()}], ids=["throughput", "unserializable"])
def test_a_refused_update_info_changes_nothing(tmp_path, extras):
    """update_info wrote throughput='fast', which RunRecord.throughput then refused; and an extra json
    cannot write was already merged into w.info.extras when the write failed."""
    run = _run(tmp_path / "run")
    before = (run / "run.json").read_bytes()
    with RunWriter(run, resume=True, fsync=False) as w:
        with pytest.raises(TypeError, match="throughput must be a number" if "throughput" in extras else "not JSON"):
            w.update_info(**extras)
        assert w.info.extras == {}
    assert (run / "run.json").read_bytes() == before
    assert RunRecord.open(run).throughput() is None


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "copy"])
def test_a_writer_cannot_be_pickled_or_copied(tmp_path, how):
    """A pickled RunWriter carried its raw file descriptors: unpickled in another process it appended
    to whatever files those numbers named there; a copy appended beside the original."""
    import copy
    import pickle

    w = RunWriter(tmp_path / "r", RunInfo("r", family="f", batch_tier=1))
    w.log(0, 0, loss=1.0)
    do = {"pickle": pickle.dumps, "deepcopy": copy.deepcopy, "copy": copy.copy}[how]
    with pytest.raises(TypeError, match=r"RunWriter .*cannot be pickled or copied.*resume=True"):
        do(w)
    w.log(1, 1, loss=0.5)  # the writer still works
    w.close()
    assert [e["step"] for e in RunRecord.open(tmp_path / "r").events] == [0, 1]
