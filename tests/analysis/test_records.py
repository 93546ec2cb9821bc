"""Run records: round trip, crash-safety, corrupted files, and reading while another process writes."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
import warnings

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.records import (
    RecordFormatError,
    RecordWarning,
    RunInfo,
    RunRecord,
    RunWriter,
    open_runs,
    runs_table,
)


def _spec(d=256, a=1.0, kind="activation_covariance", n_rows=4096):
    v = np.arange(1, d + 1, dtype=np.float64) ** -a
    return Spectrum(v, n_rows=n_rows, dim=d, kind=kind, source="blocks.1")


def _write(path, n=4, **info_kw):
    info = RunInfo("r1", family="fam", batch_tier=4, total_tokens=1000, n_layer=2, **info_kw)
    with RunWriter(path, info, fsync=False) as w:
        for i in range(n):
            w.log(i * 10, i * 100, train_loss=4.0 - i * 0.1, tokens_per_s=1000.0 + i)
            w.log_measurement(
                i * 10, i * 100,
                {"act:blocks.1": _spec(a=1.0 + 0.1 * i), "grad/o proj": _spec(128, 0.5, "gradient", 128)},
                val_loss=4.0 - i * 0.1, scalars={"noise_scale": 100.0 + i},
            )
    return path


def test_round_trip(tmp_path):
    path = _write(tmp_path / "run")
    rec = RunRecord.open(path)
    assert rec.info.run_id == "r1" and rec.info.batch_tier == 4 and rec.info.n_layer == 2
    assert len(rec.events) == 4 and rec.events[1]["train_loss"] == pytest.approx(3.9)
    assert len(rec.measurements) == 4
    m = rec.measurements[2]
    assert (m.step, m.tokens, m.progress, m.line) == (20, 200, 0.2, 3)
    assert m.val_loss == pytest.approx(3.8) and m.scalars == {"noise_scale": 102.0}
    assert m.names("gradient") == ["grad/o proj"]
    assert m.files["grad/o proj"].startswith("spectra/00000020_") and "/" not in m.files["grad/o proj"][8:]
    spec = m.spectra["act:blocks.1"]
    np.testing.assert_array_equal(spec.values.numpy(), _spec(a=1.2).values.numpy())
    # default summaries: a [100, 200] tail fits 256 ranks; the d2 scale rule gives (100, 200)
    assert m.summaries["act:blocks.1"]["alpha_tail"] == pytest.approx(1.2)
    assert m.summaries["act:blocks.1"]["alpha_head"] == pytest.approx(1.2)
    tokens, losses = rec.val_curve()
    np.testing.assert_allclose(tokens, [0, 100, 200, 300])
    assert rec.throughput(warmup=0.0) == pytest.approx(1001.5)
    rows = rec.table()
    assert len(rows) == 8 and rows[0]["scalar.noise_scale"] == 100.0 and rows[0]["run_id"] == "r1"
    assert runs_table([rec]) == rows


def test_summaries_skip_windows_the_rows_cannot_resolve(tmp_path):
    path = _write(tmp_path / "run", n=1)
    m = RunRecord.open(path).measurements[0]
    grad = m.summaries["grad/o proj"]
    assert "alpha_tail" not in grad  # window [100, 200] exceeds 128 ranks
    assert grad["alpha_head"] == pytest.approx(0.5)
    assert grad["rankme"] > 1


def test_writer_refuses_existing_run_and_resumes(tmp_path):
    path = _write(tmp_path / "run", n=2)
    with pytest.raises(FileExistsError, match="resume=True"):
        RunWriter(path, RunInfo("r1"))
    with pytest.raises(ValueError, match="resuming run 'r1' with info for run 'other'"):
        RunWriter(path, RunInfo("other"), resume=True)
    with RunWriter(path, resume=True, fsync=False) as w:
        assert w.info.family == "fam"
        w.log_measurement(99, 990, {"act:blocks.1": _spec()}, val_loss=3.0)
        w.update_info(status="done")
    rec = RunRecord.open(path)
    assert [m.step for m in rec.measurements] == [0, 10, 99]
    assert rec.info.extras["status"] == "done"
    with pytest.raises(ValueError, match="needs a RunInfo"):
        RunWriter(tmp_path / "new")
    with pytest.raises(TypeError, match="expected a Spectrum"), RunWriter(tmp_path / "x", RunInfo("x")) as w:
        w.log_measurement(0, 0, {"a": np.ones(3)})


def test_writer_refuses_another_runs_leftovers_without_run_json(tmp_path):
    """run.json lost or deleted, log/measurements/spectra still there: a new run must not append to
    them (it used to: the new run read back the old run's events and measurements); resume=True
    still adopts them, and an empty directory or an empty spectra/ is no leftover."""
    path = _write(tmp_path / "run", n=2)
    (path / "run.json").unlink()
    before = {f.name: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    with pytest.raises(FileExistsError) as exc:
        RunWriter(path, RunInfo("new"), fsync=False)
    msg = str(exc.value)
    assert str(path) in msg and "log.jsonl, measurements.jsonl, spectra/ (4 files)" in msg and "no run.json" in msg
    assert {f.name: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before  # nothing written
    (path / "log.jsonl").unlink()
    (path / "measurements.jsonl").unlink()
    with pytest.raises(FileExistsError, match=r"\(spectra/ \(4 files\)\)"):
        RunWriter(path, RunInfo("new"), fsync=False)
    # resume=True keeps its meaning: start run.json from info and append to what is there
    path = _write(tmp_path / "run2", n=2)
    (path / "run.json").unlink()
    with RunWriter(path, RunInfo("r1", total_tokens=1000), resume=True, fsync=False) as w:
        w.log(99, 990, val_loss=1.0)
    assert [e["step"] for e in RunRecord.open(path).events] == [0, 10, 99]
    (tmp_path / "empty" / "spectra").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with RunWriter(tmp_path / "empty", RunInfo("e"), fsync=False) as w:
        w.log(0, 0, val_loss=2.0)
    assert len(RunRecord.open(tmp_path / "empty").events) == 1


def test_same_step_twice_keeps_both_files(tmp_path):
    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False) as w:
        w.log_measurement(5, 50, {"a": _spec(a=1.0)})
        w.log_measurement(5, 50, {"a": _spec(a=2.0)})
    ms = RunRecord.open(tmp_path / "r").measurements
    assert ms[0].files["a"] != ms[1].files["a"]
    assert ms[1].summaries["a"]["alpha_head"] == pytest.approx(2.0)
    assert ms[0].spectra["a"].values[1] == pytest.approx(0.5)


def test_drop_after_removes_later_steps_and_their_spectra(tmp_path):
    path = _write(tmp_path / "run", n=4)  # steps 0, 10, 20, 30; two spectra each
    spectra = path / "spectra"
    w = RunWriter(path, resume=True, fsync=False)
    assert w.drop_after(10) == 2
    assert sorted(p.name[:8] for p in spectra.iterdir()) == ["00000000"] * 2 + ["00000010"] * 2
    # the writer appends to the rewritten files; a replayed step gets its file name back
    w.log(20, 200, train_loss=1.0)
    m = w.log_measurement(20, 200, {"act:blocks.1": _spec(a=2.0)})
    assert m.files["act:blocks.1"] == "spectra/00000020_act_blocks.1.npz"
    assert w.drop_after(20) == 0  # nothing after 20: the files are left alone
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no orphan, no truncated line
        rec = RunRecord.open(path, verify=True)
    assert [e["step"] for e in rec.events] == [0, 10, 20] and rec.events[-1]["train_loss"] == 1.0
    assert [m.step for m in rec.measurements] == [0, 10, 20]
    assert rec.measurements[-1].summaries["act:blocks.1"]["alpha_head"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="is closed"):
        w.drop_after(0)


def test_drop_after_is_atomic_and_keeps_lines_it_cannot_read(tmp_path, monkeypatch):
    path = _write(tmp_path / "run", n=3)
    mfile, lfile = path / "measurements.jsonl", path / "log.jsonl"
    lines = mfile.read_bytes().splitlines(keepends=True)
    mfile.write_bytes(lines[0] + b"not json\n" + b"".join(lines[1:]))
    before = {p: p.read_bytes() for p in (mfile, lfile)}
    n_files = len(list((path / "spectra").iterdir()))
    w = RunWriter(path, resume=True, fsync=False)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        w.drop_after(0)
    assert {p: p.read_bytes() for p in (mfile, lfile)} == before  # untouched, no temporary file left
    assert sorted(p.name for p in path.iterdir()) == [".writer.lock", "log.jsonl", "measurements.jsonl", "run.json", "spectra"]
    monkeypatch.undo()
    assert w.drop_after(0) == 2
    w.close()
    assert mfile.read_bytes() == lines[0] + b"not json\n"  # the unreadable line is kept ...
    assert len(list((path / "spectra").iterdir())) == n_files  # ... and with it every spectrum file
    assert [json.loads(x)["step"] for x in lfile.read_bytes().splitlines()] == [0]


def test_nan_loss_round_trips(tmp_path):
    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False) as w:
        w.log_measurement(1, 10, {}, val_loss=float("nan"))
    assert math.isnan(RunRecord.open(tmp_path / "r").measurements[0].val_loss)


def test_truncated_last_line_is_skipped_and_repaired_on_resume(tmp_path):
    path = _write(tmp_path / "run", n=3)
    mfile = path / "measurements.jsonl"
    full = mfile.read_bytes()
    mfile.write_bytes(full + b'{"step": 30, "tokens": 300, "spec')  # crash mid-write
    with pytest.warns(RecordWarning, match=r"measurements.jsonl, line 4: truncated last line"):
        rec = RunRecord.open(path)
    assert [m.step for m in rec.measurements] == [0, 10, 20]  # nothing earlier lost
    with pytest.warns(RecordWarning, match="dropping a truncated last line"):
        w = RunWriter(path, resume=True, fsync=False)
    w.log_measurement(30, 300, {"act:blocks.1": _spec()})
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = RunRecord.open(path)
    assert [m.step for m in rec.measurements] == [0, 10, 20, 30]


def test_corrupted_middle_line_raises_or_skips(tmp_path):
    path = _write(tmp_path / "run", n=4)
    mfile = path / "measurements.jsonl"
    lines = mfile.read_bytes().split(b"\n")
    lines[1] = b'{"step": 10, "tokens": 1' + b"\x00garbage"
    mfile.write_bytes(b"\n".join(lines))
    with pytest.raises(RecordFormatError, match=r"measurements.jsonl, line 2: corrupted record line"):
        RunRecord.open(path)
    with pytest.warns(RecordWarning, match="line 2"):
        rec = RunRecord.open(path, errors="skip")
    assert [m.step for m in rec.measurements] == [0, 20, 30]
    # a valid JSON line of the wrong shape is named too
    lines[1] = b'["not", "an", "object"]'
    mfile.write_bytes(b"\n".join(lines))
    with pytest.raises(RecordFormatError, match="line 2.*JSON object"):
        RunRecord.open(path)


def test_missing_spectrum_file(tmp_path):
    path = _write(tmp_path / "run", n=4)
    rec = RunRecord.open(path)
    victim = path / rec.measurements[2].files["grad/o proj"]
    victim.unlink()
    with pytest.raises(RecordFormatError, match=rf"line 3: spectrum file .*{victim.name}.* is missing"):
        RunRecord.open(path)
    with pytest.warns(RecordWarning, match="line 3"):
        rec = RunRecord.open(path, errors="skip")
    assert [m.step for m in rec.measurements] == [0, 10, 30]


def test_corrupt_spectrum_file_lazy_and_verify(tmp_path):
    path = _write(tmp_path / "run", n=3)
    rec = RunRecord.open(path)
    victim = path / rec.measurements[1].files["act:blocks.1"]
    victim.write_bytes(b"PK\x03\x04 not really a zip")
    rec = RunRecord.open(path)  # lazy: opening works
    with pytest.raises(RecordFormatError, match=r"measurements.jsonl, line 2: spectrum 'act:blocks.1'"):
        rec.measurements[1].spectra["act:blocks.1"]
    assert rec.measurements[0].spectra["act:blocks.1"].dim == 256  # others unaffected
    with pytest.raises(RecordFormatError, match="line 2"):
        RunRecord.open(path, verify=True)
    with pytest.warns(RecordWarning):
        rec = RunRecord.open(path, verify=True, errors="skip")
    assert [m.step for m in rec.measurements] == [0, 20]


def test_membership_does_not_load_spectra_and_early_alpha_loads_only_its_neighbours(tmp_path):
    from spectral_lens.analysis import early_alpha

    path = _write(tmp_path / "run", n=10)  # progress 0.0, 0.1, ..., 0.9
    expected = early_alpha(RunRecord.open(path), 0.2)
    rec = RunRecord.open(path)
    for m in rec.measurements[6:]:  # far from 0.2: not among the 5 nearest measurements
        (path / m.files["act:blocks.1"]).write_bytes(b"PK\x03\x04 not really a zip")
    m = rec.measurements[9]
    assert "act:blocks.1" in m.spectra and "nope" not in m.spectra  # answered from the line, no file read
    got = early_alpha(rec, 0.2)  # used to load (and choke on) every spectrum of the run via `in`
    assert got == expected and got.steps == (20, 20) and got.n_noise == 5
    with pytest.raises(RecordFormatError, match="line 10: spectrum 'act:blocks.1'"):
        m.spectra["act:blocks.1"]  # the corrupted file is still reported on access


def test_bad_run_directories(tmp_path):
    with pytest.raises(RecordFormatError, match="not a spectral-lens run directory"):
        RunRecord.open(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RecordFormatError, match="corrupted run metadata"):
        RunRecord.open(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RecordFormatError, match="not a spectral-lens run file"):
        RunRecord.open(tmp_path)
    with pytest.raises(ValueError, match="errors must be one of"):
        RunRecord.open(tmp_path, errors="ignore")
    with pytest.raises(ValueError, match="batch_tier must be a positive"):
        RunInfo("x", batch_tier=0)


def test_open_runs_expands_sweep_root_and_rejects_duplicate_ids(tmp_path):
    for name in ("a", "b"):
        with RunWriter(tmp_path / "sweep" / name, RunInfo(name), fsync=False):
            pass
    assert [r.run_id for r in open_runs([tmp_path / "sweep"])] == ["a", "b"]
    with RunWriter(tmp_path / "dup", RunInfo("a"), fsync=False):
        pass
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        open_runs([tmp_path / "sweep", tmp_path / "dup"])


# ---- concurrent reader ---------------------------------------------------------------------------

N_LIVE = 25


def _live_writer(path: str, n: int) -> None:
    info = RunInfo("live", batch_tier=1, total_tokens=n * 100)
    with RunWriter(path, info, fsync=True) as w:
        for i in range(n):
            w.log(i, i * 100, val_loss=5.0 - 0.01 * i)
            w.log_measurement(i, (i + 1) * 100, {"act": _spec(512, 1.0 + 0.01 * i), "act2": _spec(300, 1.5)},
                              val_loss=5.0 - 0.01 * i)
            time.sleep(0.01)


def test_reader_in_another_process_never_sees_missing_files(tmp_path):
    path = tmp_path / "live"
    proc = mp.get_context("spawn").Process(target=_live_writer, args=(str(path), N_LIVE))
    proc.start()
    seen, reads = [], 0
    deadline = time.time() + 60
    try:
        while time.time() < deadline:
            if (path / "run.json").exists():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RecordWarning)  # a line in flight may be partial
                    rec = RunRecord.open(path, verify=True)  # loads every spectrum it references
                reads += 1
                n = len(rec.measurements)
                assert not seen or n >= seen[-1]
                assert [m.step for m in rec.measurements] == list(range(n))
                seen.append(n)
                if n == N_LIVE:
                    break
            if not proc.is_alive() and seen and seen[-1] == N_LIVE:
                break
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    assert seen[-1] == N_LIVE
    assert reads > 3 and len(set(seen)) > 2  # the reader really overlapped with the writer
    assert RunRecord.open(path).measurements[-1].spectra["act"].values[1] == pytest.approx(2 ** -(1.0 + 0.01 * (N_LIVE - 1)))


def test_refresh_sees_new_lines_and_dataframe_needs_pandas(tmp_path, monkeypatch):
    import sys

    path = _write(tmp_path / "run", n=2)
    rec = RunRecord.open(path)
    with RunWriter(path, resume=True, fsync=False) as w:
        w.log_measurement(20, 200, {"act:blocks.1": _spec()})
    assert len(rec.measurements) == 2 and len(rec.refresh().measurements) == 3
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        rec.to_dataframe()


def test_alpha_trajectory_does_not_keep_every_spectrum(tmp_path):
    from spectral_lens.analysis import alpha_trajectory, early_alpha

    path = _write(tmp_path / "run", n=6)
    rec = RunRecord.open(path)
    progress, alpha, steps = alpha_trajectory(rec)
    np.testing.assert_allclose(alpha, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], rtol=1e-9)
    assert early_alpha(rec, 0.2).value == pytest.approx(alpha[2])  # early_alpha keeps what it reads ...
    for m in rec.measurements:
        (path / m.files["act:blocks.1"]).unlink()
    assert rec.measurements[2].spectra["act:blocks.1"].dim == 256
    with pytest.raises(RecordFormatError, match="line 6: spectrum file .* is missing"):
        rec.measurements[5].spectra["act:blocks.1"]  # ... the trajectory read it from disk and let it go


def test_verify_checks_every_spectrum_without_keeping_them(tmp_path):
    """``open(verify=True)`` loaded every spectrum through the lazy mapping's cache, so a verified record (a
    report over many runs) held every spectrum of the run in memory at once; now each is checked and let go."""
    import gc
    import tracemalloc

    d, n = 20_000, 12
    with RunWriter(tmp_path / "run", RunInfo("big", family="f", batch_tier=1), fsync=False) as w:
        for i in range(n):
            w.log_measurement(i, 10 * i, {"act:x": _spec(d, a=1.0 + i / 10, n_rows=d)})
    total = n * d * 8  # bytes of the float64 values of every spectrum
    gc.collect()
    tracemalloc.start()
    try:
        rec = RunRecord.open(tmp_path / "run", verify=True)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < total / 4, (held, total)  # before: every spectrum (held > total)
    lazy = RunRecord.open(tmp_path / "run")
    for a, b in zip(rec.measurements, lazy.measurements, strict=True):  # loaded on access as before
        np.testing.assert_array_equal(a.spectra["act:x"].values.numpy(), b.spectra["act:x"].values.numpy())
    np.testing.assert_array_equal(rec.measurements[3].spectra["act:x"].values.numpy(), _spec(d, a=1.3).values.numpy())
