"""Data safety under real faults (audit): concurrent writers of one run directory, SIGKILLed writers,
failing system calls at every point of a write, and what a crash leaves behind for the next load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunRecord, RunWriter, open_runs


def _spec(d=20):
    return Spectrum(torch.logspace(0, -3, d, dtype=torch.float64), n_rows=4 * d, dim=d)


# ---- one writer per run directory ------------------------------------------------------------------


@pytest.mark.parametrize("second", ["resume", "new"])
def test_a_second_writer_in_the_same_process_is_refused(tmp_path, second):
    """Two RunWriters on one directory were both accepted: the second one's resume deleted the first
    one's spectrum files whose line was not yet appended (as orphans), and a drop_after of one replaced
    the JSONL file under the other's append descriptor (its later lines went to an unlinked file)."""
    run = tmp_path / "run"
    first = RunWriter(run, RunInfo("r"), fsync=False)
    first.log(1, 10, train_loss=1.0)
    with pytest.raises(RuntimeError, match=rf"{run}: another RunWriter has this run directory open"):
        RunWriter(run, resume=True, fsync=False) if second == "resume" else RunWriter(run, RunInfo("r2"), fsync=False)
    first.log(2, 20, train_loss=0.5)  # the first writer is unaffected
    first.close()
    with RunWriter(run, resume=True, fsync=False) as again:  # closed: the directory is free again
        again.log(3, 30, train_loss=0.25)
    assert [e["step"] for e in RunRecord.open(run).events] == [1, 2, 3]


def test_a_writer_that_fails_to_open_releases_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "tokens": 1}\n')  # another run's file, no run.json
    with pytest.raises(FileExistsError, match="holds another run's files"):
        RunWriter(run, RunInfo("r"), fsync=False)
    RunWriter(run, RunInfo("r"), resume=True, fsync=False).close()


_HOLDER = textwrap.dedent('''
    import sys, time
    from spectral_lens.records import RunInfo, RunWriter
    w = RunWriter(sys.argv[1], RunInfo("r"), fsync=False)
    w.log(1, 1, train_loss=1.0)
    print("OPEN", flush=True)
    time.sleep(60)
''')


def test_a_writer_in_another_process_is_refused_until_it_is_killed(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "OPEN"
        with pytest.raises(RuntimeError, match=str(run)):
            RunWriter(run, resume=True, fsync=False)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with RunWriter(run, resume=True, fsync=False) as w:  # a killed writer leaves no stale lock
        w.log(2, 2, train_loss=0.5)
    assert [e["step"] for e in RunRecord.open(run).events] == [1, 2]


def test_close_releases_the_lock_while_a_forked_child_lives(tmp_path):
    """A forked child (a DataLoader worker) shares the lock's descriptor: closing the writer must
    release the lock itself, not only close this process's descriptor."""
    run = tmp_path / "run"
    w = RunWriter(run, RunInfo("r"), fsync=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(10)
        os._exit(0)
    try:
        w.close()
        assert w.closed
        again = RunWriter(run, resume=True, fsync=False)  # raised "another RunWriter" while the child held it
        assert not again.closed
        again.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_forked_child_closing_its_copy_keeps_the_parents_lock(tmp_path):
    """The converse: a forked child (a DataLoader worker that drops its copy of the lens) closing the
    writer it inherited must not unlock the directory while the parent's writer is still open."""
    run = tmp_path / "run"
    w = RunWriter(run, RunInfo("r"), fsync=False)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            w.close()
            os._exit(0)
        os.waitpid(pid, 0)
        with pytest.raises(RuntimeError, match="another RunWriter"):
            RunWriter(run, resume=True, fsync=False)
        w.log(1, 10, train_loss=1.0)  # the parent's writer still works
    finally:
        w.close()
    RunWriter(run, resume=True, fsync=False).close()


# ---- a failed measurement leaves nothing behind --------------------------------------------------


def _run(path, n=3, fsync=False):
    with RunWriter(path, RunInfo("r", total_tokens=1000), fsync=fsync) as w:
        for step in range(1, n + 1):
            w.log(step, 100 * step, train_loss=3.0 / step)
            w.log_measurement(step, 100 * step, {"act": _spec()}, val_loss=3.0 / step)
    return path


def _raise_at(monkeypatch, name, k, err):
    """``os.<name>`` raising ``OSError(err)`` at its ``k``-th call (1-based) from now on."""

    real, calls = getattr(os, name), []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, fake)
    return calls


@pytest.mark.parametrize("fault", ["enospc_on_append", "eio_on_append_fsync"])
def test_a_measurement_whose_line_cannot_be_appended_leaves_no_spectrum_files(tmp_path, monkeypatch, fault):
    """The spectra were saved, then the append of the line failed (disk full): the files stayed, taking
    space on the full disk, with no line referring to them (and a retry named its files '-2')."""
    import errno

    run = _run(tmp_path / "run")
    with RunWriter(run, resume=True, fsync=fault == "eio_on_append_fsync") as w:
        before = sorted(p.name for p in (run / "spectra").iterdir())
        mbefore = (run / "measurements.jsonl").read_bytes()
        if fault == "enospc_on_append":
            _raise_at(monkeypatch, "write", 1, errno.ENOSPC)  # spectra go through file objects, the line through os.write
        else:
            real_fsync = os.fsync

            def fsync(fd):  # the line's fsync fails; the spectrum files' and directories' do not
                if os.readlink(f"/proc/self/fd/{fd}").endswith("measurements.jsonl"):
                    raise OSError(errno.EIO, "Input/output error")
                return real_fsync(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError) as info:
            w.log_measurement(4, 400, {"act": _spec(), "grad": _spec(12)})
        monkeypatch.undo()
        assert info.value.filename == str(run / "measurements.jsonl")
        assert sorted(p.name for p in (run / "spectra").iterdir()) == before
        assert (run / "measurements.jsonl").read_bytes() == mbefore
        m = w.log_measurement(4, 400, {"act": _spec(), "grad": _spec(12)})  # room again: the retry is clean
    assert m.files == {"act": "spectra/00000004_act.npz", "grad": "spectra/00000004_grad.npz"}
    assert [m.step for m in RunRecord.open(run, verify=True).measurements] == [1, 2, 3, 4]


def test_a_closed_writer_writes_no_spectrum_file(tmp_path):
    """log_measurement on a closed writer saved its spectra into the directory (which another writer
    may own by then) before saying the writer was closed."""
    run = _run(tmp_path / "run")
    w = RunWriter(run, resume=True, fsync=False)
    w.close()
    before = sorted(p.name for p in (run / "spectra").iterdir())
    with pytest.raises(ValueError, match="is closed"):
        w.log_measurement(4, 400, {"act": _spec()})
    assert sorted(p.name for p in (run / "spectra").iterdir()) == before


# ---- the tuner's trial directories ---------------------------------------------------------------


def test_a_trial_marker_write_killed_mid_way_does_not_block_the_trial(tmp_path):
    """A worker killed while writing trial.json (atomically) leaves only '.trial.json.<hex>.tmp' in the
    trial's directory; the next run refused that directory as 'holds files but no trial.json (not made by
    this study)' and the whole tune call stopped until the user deleted it."""
    pytest.importorskip("optuna")
    from examples.tune import tune
    from examples.tune.synthetic import SyntheticTrainable
    from examples.tune.worker import TrialDirMismatch

    kw = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10, 20], multipliers=(1.0,),
              workdir=tmp_path / "w", storage=f"journal:{tmp_path}/j.log", progress=False)
    wd = tmp_path / "w" / "trials" / "tune" / "f" / "b8" / "x1"
    wd.mkdir(parents=True)
    (wd / ".trial.json.0123abcd.tmp").write_text('{"stu')
    res = tune(SyntheticTrainable(), **kw)
    assert [s.state for s in res.trials] == ["complete"]
    assert json.loads((wd / "trial.json").read_text())["rungs"] == [10, 20]
    assert not list(wd.glob(".trial.json.*.tmp"))
    other = tmp_path / "w2" / "trials" / "tune" / "f" / "b8" / "x1"  # anything else is still refused
    other.mkdir(parents=True)
    (other / ".trial.json.0123abcd.tmp").write_text("")
    (other / "model.pt").write_bytes(b"")
    with pytest.raises(TrialDirMismatch, match="holds files but no trial.json"):
        tune(SyntheticTrainable(), **dict(kw, workdir=tmp_path / "w2", storage=f"journal:{tmp_path}/j2.log"))


# ---- writers SIGKILLed at random moments -----------------------------------------------------------

_APPENDER = textwrap.dedent('''
    import sys, torch, warnings
    warnings.simplefilter("ignore")
    from spectral_lens import Spectrum
    from spectral_lens.records import RunInfo, RunWriter
    path, start, fsync, drop = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    w = RunWriter(path, RunInfo("r", total_tokens=10**6), resume=True, fsync=fsync)
    print("READY", flush=True)
    if drop >= 0:
        w.drop_after(drop)
        print("DROPPED", flush=True)
    s = start
    while True:
        w.log(s, s, train_loss=1.0 / (s + 1))
        print("L", s, flush=True)
        w.log_measurement(s, s, {"a": Spectrum(torch.logspace(0, -3, 40, dtype=torch.float64), n_rows=80, dim=40),
                                 "b": Spectrum(torch.logspace(0, -2, 30, dtype=torch.float64), n_rows=80, dim=30)},
                          val_loss=0.5)
        print("M", s, flush=True)
        if s % 5 == 0:
            w.update_info(status=f"at {s}")
        s += 1
''')


def _kill_loop(run, kills: int, seed: int, drops: bool) -> None:
    """Resume the run in a child, SIGKILL it after a random delay, check that every line the child
    reported written reads back (spectra included) and nothing but a truncated last line is skipped."""
    import random
    import warnings

    rng = random.Random(seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    logged, measured, start = set(), set(), 0
    for it in range(kills):
        drop = rng.choice(sorted(measured)) if drops and measured and it % 3 == 2 else -1
        child = subprocess.Popen([sys.executable, "-c", _APPENDER, str(run), str(start), str((it + seed) % 2), str(drop)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "READY", child.communicate()[1][-2000:]
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        rows = [line.split() for line in out.splitlines()]
        if ["DROPPED"] in rows:
            logged, measured = {s for s in logged if s <= drop}, {s for s in measured if s <= drop}
        logged |= {int(r[1]) for r in rows if r[0] == "L"}
        measured |= {int(r[1]) for r in rows if r[0] == "M"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = RunRecord.open(run, verify=True)  # errors="raise": no line may be corrupted
        events, ms = {e["step"] for e in rec.events}, {m.step for m in rec.measurements}
        if drop >= 0 and ["DROPPED"] not in rows:  # killed in or right after drop_after: either state
            logged = {s for s in logged if s <= drop or s in events}
            measured = {s for s in measured if s <= drop or s in ms}
        assert logged <= events and measured <= ms, (it, sorted(logged - events), sorted(measured - ms))
        assert all("truncated last line" in str(w.message) for w in caught), [str(w.message) for w in caught]
        start = max(events | ms | {-1}) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RunWriter(run, resume=True, fsync=False).close()  # resume cleans what the kills left
    referenced = {Path(f).name for m in RunRecord.open(run).measurements for f in m.files.values()}
    assert {p.name for p in (run / "spectra").iterdir()} == referenced
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_writer_killed_at_random_moments_loses_no_reported_line(tmp_path):
    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=10**6), fsync=False):
        pass
    _kill_loop(tmp_path / "run", kills=1, seed=1, drops=False)  # fsync on


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_many_times_loses_no_reported_line(tmp_path):
    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=10**6), fsync=False):
        pass
    _kill_loop(tmp_path / "run", kills=24, seed=1, drops=True)


# ---- the zoo trainer's run directory ---------------------------------------------------------------


def test_a_checkpoint_save_killed_mid_way_leaves_no_temporary_after_the_next_run(tmp_path):
    """A trainer killed inside write_atomic(ckpt) leaves '.ckpt_<step>.pt.<hex>.tmp', as large as a
    checkpoint; nothing removed it, so every preemption during a save left one more in the run directory."""
    from examples.nanogpt.train import train

    small = dict(variant="RoPE", profile="tiny", data="pydoc", steps=1, batch_tier=1, seq_len=64, rows=1,
                 val_tokens=64, device="cpu", verbose=False, save_final=False)
    stale = tmp_path / ".ckpt_000004.pt.0123456789abcdef0123456789abcdef.tmp"  # a save killed mid-way
    stale.write_bytes(b"PK\x03\x04 partial checkpoint")
    user = tmp_path / ".notes.tmp"  # not the trainer's: kept
    user.write_text("mine")
    train(run_dir=tmp_path, **small)  # the next run in the directory (a resume, or a fresh start)
    assert not stale.exists() and user.exists()


def test_step_and_tokens_are_whole_numbers_converted_exactly(tmp_path):
    """A 0-d tensor or NumPy count is taken exactly (the default progress was computed from the
    unconverted float32 tensor: 0.30000001 for 300 / 1000), and a fractional count is refused naming
    the argument instead of being truncated while the progress kept the fraction."""
    import numpy as np

    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=1000), fsync=False) as w:
        assert w.log_measurement(torch.tensor(3), torch.tensor(300), {}).progress == 0.3
        m = w.log_measurement(np.int64(4), 400.0, {})
        assert (m.step, m.tokens, m.progress) == (4, 400, 0.4) and type(m.tokens) is int
        for bad, err in ((2.7, ValueError), (torch.tensor(2.5), ValueError), ("300", TypeError)):
            with pytest.raises(err, match="log_measurement: tokens must be"):
                w.log_measurement(5, bad, {})
        with pytest.raises(ValueError, match="log: step must be a whole number"):
            w.log(1.5, 10, train_loss=1.0)
    lines = open_runs([tmp_path / "r"])[0].measurements
    assert [(m.step, m.tokens, m.progress) for m in lines] == [(3, 300, 0.3), (4, 400, 0.4)]


def test_measured_steps_reads_the_measurement_lines_and_passes_over_bad_ones(tmp_path):
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=1000), fsync=False) as w:
        assert w.measured_steps() == set()
        w.log_measurement(3, 300, {"act": _spec()})
        w.log_measurement(7, 700, {})
        w.log(9, 900, train_loss=1.0)  # an event, not a measurement
        with open(tmp_path / "r" / "measurements.jsonl", "ab") as f:
            f.write(b'not json\n{"step": true}\n[1, 2]\n{"step": "8"}\n')
        assert w.measured_steps() == {3, 7}


def test_val_loss_steps_reads_both_files_and_passes_over_bad_lines(tmp_path):
    with RunWriter(tmp_path / "r", RunInfo("r", total_tokens=1000), fsync=False) as w:
        assert w.val_loss_steps() == set()
        w.log_measurement(3, 300, {}, val_loss=2.5)
        w.log_measurement(5, 500, {})  # no loss
        w.log(7, 700, val_loss=2.0)
        w.log(9, 900, train_loss=1.0, val_loss=None)
        for name in ("measurements.jsonl", "log.jsonl"):
            with open(tmp_path / "r" / name, "ab") as f:
                f.write(b'not json\n{"step": true, "val_loss": 1.0}\n{"step": 11, "val_loss": true}\n'
                        b'{"step": "12", "val_loss": 1.0}\n{"step": 13, "val_loss": "1.0"}\n')
        assert w.val_loss_steps() == {3, 7}
        assert w.measured_steps() == {3, 5, 11, 13}
