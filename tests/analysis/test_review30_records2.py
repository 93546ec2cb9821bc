"""Review 30 (records2): run-record follow-ups left by today's two record reviews.

Each test failed before the fix it guards (see docs/reliability.md)."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _spectrum(seed: int = 0, n: int = 30) -> Spectrum:
    values = np.sort(np.random.default_rng(seed).random(n))[::-1] + 0.01
    return Spectrum(values, dim=n, kind="activation_covariance", n_rows=500)


def _info(**kw) -> RunInfo:
    base = dict(family="F", batch_tier=8, tokens_per_step=1000, seed=0, n_layer=12, total_tokens=10**6,
                batch_size=16, primary_spectrum="act:a")
    base.update(kw)
    return RunInfo("r", **base)


# ---- 1. one directory fsync per measurement, after every spectrum's rename, before the line ----------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_a_measurement_fsyncs_the_spectra_directory_once_after_the_renames_and_before_its_line(tmp_path, monkeypatch):
    # Spectrum.save fsynced spectra/ once per spectrum, then log_measurement once more: N + 1 per measurement
    run = tmp_path / "run"
    w = RunWriter(run, _info())
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync-{kind}", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    try:
        w.log_measurement(10, 100, {f"act:{i}": _spectrum(i) for i in range(5)})
    finally:
        monkeypatch.undo()
        w.close()
    spectra = os.path.realpath(run / "spectra")
    dirs = [e for e in events if e[0] == "fsync-dir"]
    assert dirs == [("fsync-dir", spectra)]  # once per measurement (before: 6)
    kinds = [e[0] for e in events]
    at = kinds.index("fsync-dir")
    assert kinds[:at] == ["fsync-file", "replace"] * 5  # each spectrum fsynced before its rename, all renamed
    assert events[at + 1:] == [("fsync-file", os.path.realpath(run / "measurements.jsonl"))]  # then the line
    assert len(RunRecord.open(run).measurements[-1].spectra) == 5


def test_spectrum_save_alone_still_fsyncs_its_directory(tmp_path, monkeypatch):
    # the default of Spectrum.save (and write_atomic) keeps its own directory fsync: durable on its own
    dirs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (dirs.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd))[1])
    _spectrum().save(tmp_path / "s.npz")
    monkeypatch.undo()
    assert dirs == [False, True]


# ---- 3. drop_after refuses a step that is not an integer ------------------------------------------------------


@pytest.mark.parametrize("bad", [2.7, "2", True, float("nan")])
def test_drop_after_refuses_a_step_that_is_not_an_integer(tmp_path, bad):
    # drop_after(2.7) was int(2.7) == 2: step 2's lines kept, everything after silently removed
    with RunWriter(tmp_path / "run", _info(), fsync=False) as w:
        for step in (1, 2, 3):
            w.log(step, step * 10, train_loss=1.0)
            w.log_measurement(step, step * 10, {"act:a": _spectrum(step)})
        with pytest.raises(TypeError, match=r"RunWriter\.drop_after: step must be an integer"):
            w.drop_after(bad)
        assert w.measured_steps() == {1, 2, 3}  # nothing removed
        assert w.drop_after(np.int64(2)) == 1 and w.drop_after(2.0) == 0  # integral values as before
    assert [m.step for m in RunRecord.open(tmp_path / "run").measurements] == [1, 2]


# ---- 4. the resume's warnings point at the user's RunWriter(...) call ----------------------------------------


def _warned_here(run, **kw) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        w = RunWriter(run, resume=True, fsync=False, **kw)
    w.close()
    return [g for g in got if issubclass(g.category, RecordWarning)]


def test_the_resume_warnings_point_at_the_callers_line(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log_measurement(1, 10, {"act:a": _spectrum()})
    with open(run / "log.jsonl", "ab") as fh:  # a line cut off by a crash
        fh.write(b'{"step": 2, "tok')
    (run / "spectra" / "00000005_act_a.npz").write_bytes(b"orphan")  # a spectrum file no line refers to
    got = _warned_here(run)
    assert len(got) == 2, [str(g.message) for g in got]
    assert {g.filename for g in got} == {__file__}  # before: writer.py (RunWriter.__init__, _open)


def test_the_no_lock_warning_points_at_the_callers_line(tmp_path, monkeypatch):
    from spectral_lens import _locks
    monkeypatch.setattr(_locks, "acquire", lambda path: None)  # a file system without locks
    monkeypatch.setattr(_locks, "SUPPORTED", True)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        RunWriter(tmp_path / "run", _info(), fsync=False).close()
    assert [g.filename for g in got if "does not support locks" in str(g.message)] == [__file__]


# ---- 5. empty record files left by a crash right after creating them -----------------------------------------


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("empty", [("log.jsonl",), ("log.jsonl", "measurements.jsonl"), ("run.json",),
                                   ("run.json", "log.jsonl", "measurements.jsonl")])
def test_empty_record_files_are_an_empty_run_of_this_name(tmp_path, empty, resume):
    # an empty log.jsonl was "another run's files" (FileExistsError); an empty run.json a RecordFormatError on
    # resume and a FileExistsError without: no writer could open the directory
    run = tmp_path / "run"
    run.mkdir()
    for name in empty:
        (run / name).write_bytes(b"")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with RunWriter(run, _info(), resume=resume, fsync=False) as w:
            w.log(1, 10, train_loss=2.0)
    said = [(str(g.message).split(": ")[0][-8:], g.filename) for g in got if issubclass(g.category, RecordWarning)]
    assert [str(g.message) for g in got if "is empty (a crash" not in str(g.message)] == []
    assert len(said) == ("run.json" in empty) and all(f == __file__ for _, f in said)
    rec = RunRecord.open(run)
    assert rec.info.run_id == "r" and rec.info.total_tokens == 10**6 and [e["step"] for e in rec.events] == [1]


def test_an_empty_run_json_beside_another_runs_lines_loses_nothing(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log(1, 10, train_loss=2.0)
    (run / "run.json").write_bytes(b"")
    with pytest.raises(FileExistsError, match="log.jsonl"):  # lines of a run: refused without resume
        RunWriter(run, _info(), fsync=False)
    with pytest.raises(ValueError, match="run.json is empty"):  # a resume needs the RunInfo to write it again
        RunWriter(run, resume=True, fsync=False)
    assert (run / "log.jsonl").read_bytes().count(b"\n") == 1 and (run / "run.json").read_bytes() == b""
    with pytest.warns(RecordWarning, match="is empty"):
        RunWriter(run, _info(), resume=True, fsync=False).close()  # appended to, as with run.json missing
    assert [e["step"] for e in RunRecord.open(run).events] == [1]


# ---- 2. a resume with a RunInfo that differs from the record ---------------------------------------------------


def _recorded(tmp_path, measured: bool = True, **kw) -> Path:
    run = tmp_path / "run"
    with RunWriter(run, _info(**kw), fsync=False) as w:
        w.log(1, 1000, train_loss=2.0)
        if measured:
            w.log_measurement(1, 1000, {"act:a": _spectrum()})
    return run


@pytest.mark.parametrize("field, value", [("total_tokens", 2 * 10**6), ("batch_size", 32), ("family", "G"),
                                          ("batch_tier", 4), ("seed", 1), ("n_layer", 24),
                                          ("tokens_per_step", 2000), ("primary_spectrum", "act:b")])
def test_a_resume_with_a_differing_field_names_it_before_writing_anything(tmp_path, field, value):
    # every field but run_id was dropped without a word: a doubled budget left every fraction as it was
    run = _recorded(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError) as err:
        RunWriter(run, _info(**{field: value}), resume=True, fsync=False)
    msg = str(err.value)
    assert f"{field}: recorded {getattr(_info(), field)!r}, given {value!r}" in msg
    assert "RunWriter(path, resume=True)" in msg and "update_info" in msg
    assert ("fractions" in msg) == (field == "total_tokens")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written
    with RunWriter(run, _info(), resume=True, fsync=False) as w:  # the same values: resumed
        assert w.info.total_tokens == 10**6


def test_a_resume_names_every_differing_field(tmp_path):
    run = _recorded(tmp_path)
    with pytest.raises(ValueError, match=r"seed: recorded 0, given 7; batch_size: recorded 16, given 32"):
        RunWriter(run, _info(batch_size=32, seed=7), resume=True, fsync=False)


def test_a_resume_fills_the_fields_the_record_lacked(tmp_path):
    run = _recorded(tmp_path, total_tokens=None, batch_size=None)
    assert RunRecord.open(run).measurements[0].progress is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunWriter(run, _info(), resume=True, fsync=False) as w:  # None given: the record's
            assert (w.info.total_tokens, w.info.batch_size) == (10**6, 16)
    rec = RunRecord.open(run)
    assert (rec.info.total_tokens, rec.info.batch_size) == (10**6, 16)
    assert rec.progress(rec.measurements[0]) == pytest.approx(1000 / 10**6)
    with RunWriter(run, RunInfo("r"), resume=True, fsync=False) as w:  # fields not given: the record's kept
        assert w.info.batch_size == 16


def test_a_budget_changed_before_any_measurement_is_updated_with_a_warning(tmp_path):
    run = _recorded(tmp_path, measured=False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with RunWriter(run, _info(total_tokens=3 * 10**6), resume=True, fsync=False) as w:
            m = w.log_measurement(2, 2000, {"act:a": _spectrum()})
    said = [g for g in got if "total_tokens changed" in str(g.message)]
    assert len(said) == 1 and said[0].filename == __file__ and "1000000 to 3000000" in str(said[0].message)
    assert RunRecord.open(run).info.total_tokens == 3 * 10**6 and m.progress == pytest.approx(2000 / 3e6)


def test_differing_extras_are_a_warning_pointing_to_update_info(tmp_path):
    run = _recorded(tmp_path, extras={"lr": 0.04})
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with RunWriter(run, _info(extras={"lr": 0.05, "git": "abc"}), resume=True, fsync=False) as w:
            assert w.info.extras.get("lr") == 0.04 and "git" not in w.info.extras
    said = [g for g in got if "extras" in str(g.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert "lr: recorded 0.04, given 0.05" in str(said[0].message) and "update_info" in str(said[0].message)
    assert "git: recorded '(none)'" in str(said[0].message)


# ---- 6. a killed atomic write through a symlinked record file ----------------------------------------------


def test_the_resume_removes_a_temp_file_left_beside_a_symlinked_record_files_target(tmp_path):
    # write_atomic puts the temporary file beside the link's target; the resume's cleanup scanned only the run
    # directory and spectra/, so a killed drop_after / update_info left it there for good
    from spectral_lens.atomic import _tmp_name
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log(1, 10, train_loss=2.0)
    elsewhere.mkdir()
    long = "x" * 250 + ".json"  # a target whose temporary name is cut to fit 255 bytes
    for name, target in (("log.jsonl", "log-target.jsonl"), ("run.json", long)):
        os.replace(run / name, elsewhere / target)
        os.symlink(elsewhere / target, run / name)
    left = [elsewhere / _tmp_name("log-target.jsonl"), elsewhere / _tmp_name(long)]
    assert len(left[1].name.encode()) == 255 and long not in left[1].name
    kept = [elsewhere / ".other.jsonl.0123456789abcdef0123456789abcdef.tmp",  # another file's temporary file
            elsewhere / ".log-target.jsonl.notahexname.tmp", elsewhere / "log-target.jsonl.tmp",
            elsewhere / (".log-target.jsonl" + ".0123456789abcdef0123456789abcdef.tmp.bak")]
    for p in left + kept:
        p.write_bytes(b"partial")
    with pytest.warns(RecordWarning, match="removed 2 temporary file"):
        RunWriter(run, resume=True, fsync=False).close()
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert [e["step"] for e in RunRecord.open(run).events] == [1]


def test_is_tmp_name_matches_write_atomics_names_only(tmp_path):
    from spectral_lens.atomic import _tmp_name, is_tmp_name
    for target in ("a.json", "é" * 127 + ".npz", "y" * 255):
        assert is_tmp_name(_tmp_name(target), tmp_path / target)
        assert not is_tmp_name(_tmp_name(target), tmp_path / ("z" + target))
    assert not is_tmp_name(".a.json.0123456789ABCDEF0123456789ABCDEF.tmp", tmp_path / "a.json")  # uuid4().hex: lower
    assert not is_tmp_name(".a.js.0123456789abcdef0123456789abcdef.tmp", tmp_path / "a.json")  # not cut: too short


def test_a_link_to_a_file_in_the_run_directory_counts_its_temp_file_once(tmp_path):
    from spectral_lens.atomic import _tmp_name
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log(1, 10, train_loss=2.0)
    os.replace(run / "log.jsonl", run / "real-log.jsonl")
    os.symlink("real-log.jsonl", run / "log.jsonl")
    (run / _tmp_name("real-log.jsonl")).write_bytes(b"partial")
    with pytest.warns(RecordWarning, match="removed 1 temporary file"):
        RunWriter(run, resume=True, fsync=False).close()
