"""Review 27 (revfaults): the review of the atomic-write probe, the temporary name's cut, the schedule's
step values, the worker thread's refusals and the state loader's memory errors (see docs/reliability.md).

Each test failed before the fix it guards, except those marked "confirmed"."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens import atomic as _io
from spectral_lens.schedule import Schedule


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(_io.TMP_SUFFIX))


# ---------------------------------------------------------------- the write-permission probe

def test_a_file_removed_while_it_is_replaced_is_created_as_before(tmp_path, monkeypatch):
    # the probe (open for writing) ran after the stat: a file removed in between (another process's
    # cleanup, a concurrent replace by unlink + create) made the write fail with FileNotFoundError, where
    # the rename (and open(path, "w")) creates it
    path = tmp_path / "run.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    real_open, real_stat = os.open, os.stat

    def racing_open(file, flags, *args, **kwargs):
        if os.fspath(file) == os.fspath(path) and not flags & os.O_CREAT:
            os.unlink(path)
        return real_open(file, flags, *args, **kwargs)

    def foreign_stat(file, *args, **kwargs):  # owned by another user: the probe runs
        st = real_stat(file, *args, **kwargs)
        if os.fspath(file) != os.fspath(path):
            return st
        fields = list(st)
        fields[4] = st.st_uid + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "open", racing_open)
    monkeypatch.setattr(os, "stat", foreign_stat)
    _io.write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "new" and _leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's ETXTBSY")
def test_the_file_of_a_running_program_is_replaced_as_before(tmp_path):
    # open(O_WRONLY) of a program being run is ETXTBSY, but the rename replaces it (the running process
    # keeps the old inode): the probe made every such write fail with "Text file busy"
    exe = tmp_path / "tool"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    os.chmod(exe, 0o755)
    try:
        proc = subprocess.Popen([str(exe), "30"])
    except OSError as exc:  # a noexec mount
        pytest.skip(f"cannot run a program from {tmp_path}: {exc}")
    try:
        for _ in range(100):  # until exec has opened it
            try:
                os.close(os.open(exe, os.O_WRONLY))
            except OSError as exc:
                if exc.errno == errno.ETXTBSY:
                    break
            time.sleep(0.02)
        else:
            pytest.skip("this kernel lets a running program's file be opened for writing")
        _io.write_text_atomic(exe, "#!/bin/sh\n")
        assert exe.read_text() == "#!/bin/sh\n" and _leftovers(tmp_path) == []
        assert proc.poll() is None  # the running program is unaffected
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners")
def test_an_overwrite_of_the_callers_own_writable_file_costs_no_extra_calls(tmp_path, monkeypatch):
    # every overwrite opened the target (open + close) and asked pathconf (statfs: a round trip to the
    # server on NFS) although the file is the caller's and writable; only a long name needs pathconf,
    # only a file the caller may not write needs the probe
    path = tmp_path / "run.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    seen = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda f, *a, **k: (seen.append(("open", os.fspath(f))), real_open(f, *a, **k))[1])
    monkeypatch.setattr(os, "pathconf", lambda *a: seen.append(("pathconf", a)) or 255)
    _io.write_text_atomic(path, "new", fsync=False)
    _io.write_text_atomic(tmp_path / ("n" * 230), "new", fsync=False)  # cut to 255 bytes without asking
    monkeypatch.undo()
    assert path.read_text() == "new" and seen == [], seen
    assert (tmp_path / ("n" * 230)).read_text() == "new" and _leftovers(tmp_path) == []


def test_writers_of_long_names_at_once_in_one_directory_stay_apart(tmp_path):
    # confirmed: names cut to one common prefix keep the uuid, so concurrent writers never share a
    # temporary file; each target gets its own bytes
    names = ["p" * 240 + f"{i:03d}" for i in range(8)]
    errors = []

    def writer(name: str) -> None:
        try:
            for k in range(20):
                _io.write_text_atomic(tmp_path / name, f"{name[-3:]}:{k}", fsync=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [(tmp_path / n).read_text() for n in names] == [f"{n[-3:]}:19" for n in names]
    assert _leftovers(tmp_path) == []


def test_the_records_cleanup_removes_a_cut_temporary_file(tmp_path):
    # confirmed: a killed writer's temporary file of a long name (cut) is still one RunWriter removes on resume
    from spectral_lens.records import RunInfo, RunWriter

    with RunWriter(tmp_path / "run", RunInfo("r"), fsync=False):
        pass
    stale = tmp_path / "run" / _io._tmp_name("s" * 250)
    stale.write_text("partial")
    assert len(os.fsencode(stale.name)) == 255
    with pytest.warns(Warning, match="removed 1 temporary file"):
        RunWriter(tmp_path / "run", resume=True, fsync=False).close()
    assert not stale.exists()


# ---------------------------------------------------------------- a step's value in a schedule

_SCHEDULES = {
    "every": Schedule.every(1),
    "explicit": Schedule(frozenset({0, 1, 10})),
    "combined": Schedule(frozenset({1})) | Schedule.every(5),
}


@pytest.mark.parametrize("kind", sorted(_SCHEDULES))
@pytest.mark.parametrize("step", [True, False, np.True_, torch.tensor(True), torch.tensor([True])],
                         ids=["True", "False", "np.True_", "tensor(True)", "tensor([True])"])
def test_a_bool_step_is_never_in_a_schedule(kind, step):
    # True == 1 and False == 0: a bool was step 1 or 0 (True in every(1), False in every(5)), and
    # maybe_measure then called measure, which refuses a bool; a bool tensor raised torch's "Subtraction
    # with a bool tensor is not supported" in a periodic schedule
    assert step not in _SCHEDULES[kind]


@pytest.mark.parametrize("kind", sorted(_SCHEDULES))
def test_steps_of_any_numeric_kind_are_compared_by_value(kind):
    # a 0-d numpy array raised "unhashable type: 'numpy.ndarray'" (measure reads it as its value too);
    # several numbers raised torch's "Boolean value of Tensor with more than one value is ambiguous"
    schedule = _SCHEDULES[kind]
    assert np.array(10) in schedule and np.array([10.0]) in schedule
    for whole in (10, np.int64(10), np.uint8(10), np.float32(10.0), 10.0, torch.tensor(10), torch.tensor([10.0])):
        assert whole in schedule, whole
    for other in (torch.tensor([1, 10]), np.array([1, 10]), "10", None, 2.5, float("nan"), float("inf"),
                  torch.tensor(10.5), torch.tensor(10 + 0j)):
        assert other not in schedule, other


def test_a_tensor_step_is_read_once_and_a_bool_tensor_never():
    # confirmed: one host read (a CUDA sync) per question, whatever the schedule's parts (before the value
    # was compared, a periodic schedule read a tensor step two or three times through bool(), an explicit
    # one never, and never found it); a bool tensor or several numbers are decided without a read
    reads = []

    class Counted(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "__bool__", "tolist", "__int__", "__index__", "__float__"):
                reads.append(func.__name__)
            return super().__torch_function__(func, types, args, kwargs or {})

    nested = (Schedule(frozenset({1})) | Schedule.every(5)) | Schedule.log_spaced(100, 4)
    for schedule in (Schedule.every(5), Schedule(frozenset({10})), nested):
        for step, want in ((10, True), (11, False)):
            reads.clear()
            assert (torch.tensor(step).as_subclass(Counted) in schedule) is want
            assert len(reads) == 1, reads
        reads.clear()
        assert torch.tensor(True).as_subclass(Counted) not in schedule
        assert torch.tensor([10, 11]).as_subclass(Counted) not in schedule
        assert reads == []


# ---------------------------------------------------------------- the worker thread

def test_a_job_whose_worker_could_not_start_runs_once_without_a_critical_log(monkeypatch, caplog):
    # the executor queues a job before it starts its thread; when that start failed ("can't start new
    # thread": a pids limit), the job ran on the caller, and its queued copy, run by the next worker,
    # logged CRITICAL "Future ... in unexpected state: FINISHED" to standard error
    import logging

    from spectral_lens import background

    monkeypatch.setattr(background, "_executor", None)  # a fresh worker, started below
    real_start, tries = threading.Thread.start, []

    def failing_once(self):
        tries.append(self.name)
        if len(tries) == 1:
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_once)
    ran = []
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        first = background.submit(lambda notes: ran.append("first") or 1)
        assert first.done() and first.result() == 1  # ran here, as at interpreter exit
        second = background.submit(lambda notes: ran.append("second") or 2)
        assert second.result(timeout=30) == 2  # the queued copy of the first ran before it, on the worker
        background._executor.shutdown(wait=True)
    assert ran == ["first", "second"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("concurrent")] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_reads_a_finished_job_and_runs_its_own():
    # confirmed: the fork check refuses only a job of the parent's that had not ended at the fork; a job
    # that had ended is read in the child, and the child's own jobs run on its own worker
    from spectral_lens import background

    done = background.submit(lambda notes: (notes.append(("kept", UserWarning)), 7)[1])
    with pytest.warns(UserWarning, match="kept"):
        assert done.result(timeout=30) == 7
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            import warnings

            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ok = done.result() == 7 and done.exception() is None and [str(w.message) for w in seen] == ["kept"]
            own = background.submit(lambda notes: os.getpid())
            code = 0 if ok and own.result(timeout=30) == os.getpid() else 2
        except BaseException:  # noqa: BLE001 - the exit code says it
            code = 3
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# ---------------------------------------------------------------- a state file too big for memory

@pytest.mark.parametrize("kind", ["accumulator", "spectrum"])
def test_an_intact_file_too_big_for_memory_stays_a_memory_error_naming_it(tmp_path, monkeypatch, kind):
    # every MemoryError of a load became the format error ("not readable as an accumulator state file"):
    # an intact state of d = 65536 (32 GiB) loaded where memory is short read as a damaged file (a
    # tampered header declaring more than the file holds is still the format error: test_review27_faults)
    from spectral_lens import Spectrum
    from spectral_lens._warnings import SpectrumFormatError, StateFormatError

    if kind == "accumulator":
        acc = ActivationCovarianceAccumulator(4, precision="float64")
        acc.update(torch.randn(12, 4, dtype=torch.float64))
        saved, load, error = acc.save(tmp_path / "state.npz"), ActivationCovarianceAccumulator.load, StateFormatError
    else:
        saved = Spectrum(torch.linspace(1, 0, 5, dtype=torch.float64), n_rows=9, dim=5).save(tmp_path / "s.npz")
        load, error = Spectrum.load, SpectrumFormatError

    def short_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 32.0 GiB for an array with shape (65536, 65536) and data type float64")

    monkeypatch.setattr(np.lib.format, "read_array", short_of_memory)
    with pytest.raises(MemoryError) as info:
        load(saved)
    assert not isinstance(info.value, error) and str(saved) in str(info.value) and "32.0 GiB" in str(info.value)
    monkeypatch.undo()
    assert load(saved) is not None


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to act as two users")
def test_another_users_file_in_a_shared_directory_is_refused_as_open_refuses_it():
    # confirmed (a change of the probe, kept): another user's 0644 file in a directory everyone may write
    # was replaced by the rename (the file then belonged to the writer); it is refused as open(path, "w")
    # refuses it, naming the path given, through a symlink too (link and file kept); the caller's own
    # writable files are written as before
    import tempfile
    from pathlib import Path

    shared = Path(tempfile.mkdtemp())  # (pytest's tmp_path is private to its user)
    os.chmod(shared, 0o777)  # no sticky bit: the rename is allowed
    theirs = shared / "run.json"
    theirs.write_text("theirs")
    os.chmod(theirs, 0o644)
    link = shared / "latest.json"
    link.symlink_to("run.json")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            refused = []
            for path in (theirs, link):
                try:
                    _io.write_text_atomic(path, "mine")
                except PermissionError as exc:
                    refused.append(exc.filename == str(path))
            _io.write_text_atomic(shared / "own.json", "a")
            _io.write_text_atomic(shared / "own.json", "b")
            code = 0 if refused == [True, True] and (shared / "own.json").read_text() == "b" else 2
        except BaseException:  # noqa: BLE001 - the exit code says it
            code = 3
        finally:
            os._exit(code)
    try:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert theirs.read_text() == "theirs" and os.stat(theirs).st_uid == 0
        assert link.is_symlink() and os.readlink(link) == "run.json" and _leftovers(shared) == []
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------- a spectrum loaded as it was saved

def test_a_spectrum_loads_from_the_path_it_was_saved_to(tmp_path):
    # Spectrum.save("s") writes s.npz, as the accumulator's save does; review 27 made the accumulator's
    # load("s") read it, but Spectrum.load("s") still raised FileNotFoundError; the exact path is read first
    from spectral_lens import Spectrum

    spectrum = Spectrum(torch.linspace(1, 0, 5, dtype=torch.float64), n_rows=9, dim=5)
    assert spectrum.save(tmp_path / "s") == tmp_path / "s.npz"
    torch.testing.assert_close(Spectrum.load(tmp_path / "s").values, spectrum.values, rtol=0, atol=0)
    other = Spectrum(torch.linspace(2, 0, 5, dtype=torch.float64), n_rows=9, dim=5)
    (tmp_path / "s").write_bytes(other.save(tmp_path / "o.npz").read_bytes())
    torch.testing.assert_close(Spectrum.load(tmp_path / "s").values, other.values, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="absent"):
        Spectrum.load(tmp_path / "absent")
