"""Review 27 (faults): atomic writes, the accumulator's save/load and the schedule under hostile input.

Each test failed before the fix it guards (see docs/reliability.md)."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens import atomic as _io


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(_io.TMP_SUFFIX))


# ---------------------------------------------------------------- atomic writes of long names

@pytest.mark.parametrize("name", ["a" * 255, "b" * 230 + ".json", "\u00e9" * 120 + ".txt"],
                         ids=["255-bytes", "235-bytes", "245-bytes-utf8"])
def test_a_file_name_near_the_length_limit_is_written_atomically(tmp_path, name):
    # open(path, "w") writes any name up to 255 bytes; the temporary file ".<name>.<32 hex>.tmp" was 38
    # bytes longer, so write_atomic raised ENAMETOOLONG for names of 218 to 255 bytes
    path = tmp_path / name
    path.write_text("old")
    _io.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_of_a_long_name_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / ("c" * 240)
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_io.os, "fsync", full)
    with pytest.raises(OSError) as info:
        _io.write_text_atomic(path, "new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_an_accumulator_saved_under_a_long_name_loads_back(tmp_path):
    acc = ActivationCovarianceAccumulator(3, precision="float64")
    acc.update(torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    path = acc.save(tmp_path / ("layer." * 40 + "state"))  # 251 bytes with ".npz"
    back = ActivationCovarianceAccumulator.load(path)
    torch.testing.assert_close(back.compute().values, acc.compute().values, rtol=0, atol=0)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- the accumulator's save/load round trip

def _acc(seed: int = 0) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(4, precision="float64")
    acc.update(torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return acc


def test_load_reads_what_save_wrote_under_a_path_without_npz(tmp_path):
    # save("state") writes state.npz (documented); load("state") raised FileNotFoundError for "state"
    acc = _acc()
    written = acc.save(tmp_path / "state")
    assert written == tmp_path / "state.npz"
    back = ActivationCovarianceAccumulator.load(tmp_path / "state")
    torch.testing.assert_close(back.compute().values, acc.compute().values, rtol=0, atol=0)


def test_load_prefers_the_exact_path_and_names_a_missing_one(tmp_path):
    # a file at the exact path is read as it is (a state renamed without its suffix); a missing one is named
    _acc(0).save(tmp_path / "state")
    other = _acc(1)
    (tmp_path / "state").write_bytes((other.save(tmp_path / "other.npz")).read_bytes())
    back = ActivationCovarianceAccumulator.load(tmp_path / "state")
    torch.testing.assert_close(back.compute().values, other.compute().values, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="absent"):
        ActivationCovarianceAccumulator.load(tmp_path / "absent")


# ---------------------------------------------------------------- the schedule

@pytest.mark.parametrize("kind", ["explicit", "log_spaced", "at_fractions", "union"])
@pytest.mark.parametrize("step", [torch.tensor(10), torch.tensor(10.0), torch.tensor([10])], ids=["int", "float", "1-elt"])
def test_a_tensor_step_is_in_the_schedule_as_its_value(kind, step):
    # measure(step=torch.tensor(10)) records step 10, but `step in schedule` compared the tensor by hash
    # (identity) with the explicit steps: maybe_measure skipped every scheduled step given as a tensor
    from spectral_lens.schedule import Schedule

    schedule = {"explicit": Schedule(frozenset({10})), "log_spaced": Schedule.log_spaced(1000, 4),
                "at_fractions": Schedule.at_fractions(100, [0.1]), "union": Schedule.every(7) | Schedule(frozenset({10}))}[kind]
    assert 10 in schedule
    assert step in schedule
    assert torch.tensor(11) not in schedule


def test_steps_that_are_not_whole_numbers_are_never_in_a_schedule():
    from spectral_lens.schedule import Schedule

    schedule = Schedule.every(5) | Schedule(frozenset({7}))
    assert [s for s in range(12) if s in schedule] == [0, 5, 7, 10]
    assert 7.5 not in schedule and torch.tensor(7.5) not in schedule


# ---------------------------------------------------------------- the background worker

@pytest.mark.parametrize("method", ["result", "exception"])
def test_waiting_for_a_job_in_a_done_callback_raises_instead_of_deadlocking_the_worker(method):
    # done-callbacks run on the one worker thread; a callback waiting for a job submitted after its own
    # waited for itself forever (here 2 s, the wait's timeout), and every later compute_async waited behind it
    import threading

    acc = _acc()
    seen, ran = {}, threading.Event()

    def chained(_):
        try:
            seen["value"] = getattr(acc.compute_async(), method)(timeout=2)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            seen["error"] = exc
        finally:
            ran.set()

    from spectral_lens import background

    gate = threading.Event()  # the first job ends after its callback is added, so the callback runs on the worker
    background.submit(lambda notes: gate.wait(30)).add_done_callback(chained)
    gate.set()
    assert ran.wait(30)
    assert isinstance(seen.get("error"), RuntimeError), seen
    assert "worker thread" in str(seen["error"]) and "done-callback" in str(seen["error"])
    # the worker goes on: a later job is solved, and a done job's result can be read in a callback
    later = acc.compute_async()
    torch.testing.assert_close(later.result(timeout=30).values, acc.compute().values, rtol=0, atol=0)
    got, ran2, gate2 = {}, threading.Event(), threading.Event()
    first = background.submit(lambda notes: (gate2.wait(30), acc.compute())[1])
    first.add_done_callback(lambda f: (got.setdefault("v", f.result()), ran2.set()))
    gate2.set()
    assert ran2.wait(30) and got["v"].values.shape == (4,)


# ---------------------------------------------------------------- progress bars on a closed standard error

@pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")  # the tiny model's pool
def test_a_measurement_with_standard_error_closed_runs_without_a_bar(monkeypatch):
    # progress=None asks sys.stderr.isatty(), which raises ValueError on a closed stream: every
    # measurement of a job whose standard error was closed failed before its first batch
    import io
    import sys

    from support.models import TinyLM, lm_pool

    from spectral_lens import SpectralLens

    torch.manual_seed(0)
    lens = SpectralLens(TinyLM().double(), lm_pool(n_batches=2))
    closed = io.StringIO()
    closed.close()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", closed)
    m = lens.measure(step=1, tokens=16)
    assert m.spectra and all(s.values.numel() > 0 for s in m.spectra.values())


# ---------------------------------------------------------------- a load of a path that is not a regular file

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("kind", ["accumulator", "spectrum"])
def test_a_load_of_a_fifo_is_refused_at_once(tmp_path, kind):
    # opening a FIFO blocks until a writer comes: load waited forever (here a helper thread writes junk
    # after 5 s so the old code ends, with another error, instead of hanging the suite)
    import threading
    import time

    from spectral_lens import Spectrum
    from spectral_lens._warnings import SpectrumFormatError, StateFormatError

    fifo = tmp_path / "state.npz"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():
        if not done.wait(5):
            with open(fifo, "wb") as fh:
                fh.write(b"junk")

    helper = threading.Thread(target=unblock, daemon=True)
    helper.start()
    load, error = ((ActivationCovarianceAccumulator.load, StateFormatError) if kind == "accumulator"
                   else (Spectrum.load, SpectrumFormatError))
    start = time.monotonic()
    try:
        with pytest.raises(error, match="not a regular file") as info:
            load(fifo)
    finally:
        done.set()
        helper.join()
    assert str(fifo) in str(info.value) and time.monotonic() - start < 3


def test_a_job_submitted_after_the_worker_shut_down_runs_on_the_caller(monkeypatch):
    # at interpreter exit concurrent.futures shuts the worker down before atexit handlers run, and
    # compute_async there raised "RuntimeError: cannot schedule new futures after (interpreter) shutdown"
    from concurrent.futures import ThreadPoolExecutor

    from spectral_lens import background

    stopped = ThreadPoolExecutor(max_workers=1)
    stopped.shutdown()
    monkeypatch.setattr(background, "_executor", stopped)
    acc = _acc()
    future = acc.compute_async()
    assert future.done()
    torch.testing.assert_close(future.result().values, acc.compute().values, rtol=0, atol=0)
    x = torch.randn(10, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    acc.update(x)
    from spectral_lens._warnings import NonFiniteError

    with pytest.raises(NonFiniteError):  # the job's own error, as from the worker
        acc.compute_async().result()


@pytest.mark.slow
def test_compute_async_in_an_atexit_handler_gives_the_spectrum():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import atexit, torch
        from spectral_lens import ActivationCovarianceAccumulator
        acc = ActivationCovarianceAccumulator(8, precision="float64")
        acc.update(torch.randn(40, 8, dtype=torch.float64))
        acc.compute_async().result()  # the worker exists, and is joined at exit before the handler runs
        atexit.register(lambda: print("atexit", bool((acc.compute_async().result().values == acc.compute().values).all())))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "atexit True" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- a write-protected file

def _in_child(fn) -> int:
    """Run ``fn()`` in a forked child as an unprivileged user (``nobody`` when this is root: root opens any
    file for writing, so a read-only file protects nothing from it); the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "geteuid"), reason="POSIX fork and users")
def test_a_write_protected_file_is_refused_as_open_refuses_it():
    # open(path, "w") raises PermissionError on a file made read-only (chmod a-w) to protect it, but the
    # rename replaced it without a word: a rerun overwrote a protected result
    import shutil
    import tempfile
    from pathlib import Path

    top = Path(tempfile.mkdtemp())
    try:
        os.chmod(top, 0o777)  # writable by the child, whoever it runs as: only the file is protected
        kept = top / "kept.json"
        kept.write_text("old")
        os.chmod(kept, 0o444)
        if os.geteuid() == 0:
            os.chown(kept, 65534, 65534)
            os.chown(top, 65534, 65534)

        def child() -> int:
            try:
                open(kept, "w").close()
                return 4  # open writes it (a privileged child): nothing to compare
            except PermissionError:
                pass
            try:
                _io.write_text_atomic(kept, "new")
            except PermissionError as exc:
                return 0 if exc.filename == str(kept) else 5
            return 1

        code = _in_child(child)
        if code == 4:
            pytest.skip("this user may write read-only files")
        assert code == 0, code
        assert kept.read_text() == "old" and _leftovers(top) == []
        os.chmod(kept, 0o644)  # writable again: written as before
        _io.write_text_atomic(kept, "new")
        assert kept.read_text() == "new"
    finally:
        shutil.rmtree(top)


# ---------------------------------------------------------------- a state file whose array header lies

@pytest.mark.parametrize("kind", ["accumulator", "spectrum"])
def test_an_array_declaring_a_huge_shape_is_a_format_error_naming_the_file(tmp_path, kind):
    # a damaged or tampered .npy header inside the archive declaring 8 TiB: numpy's allocation raised a bare
    # MemoryError, not the format error naming the file that every other damaged file gets
    import io
    import zipfile

    from numpy.lib import format as npy_format

    from spectral_lens import Spectrum
    from spectral_lens._warnings import SpectrumFormatError, StateFormatError

    if kind == "accumulator":
        saved, member, load, error = _acc().save(tmp_path / "good.npz"), "s.npy", ActivationCovarianceAccumulator.load, StateFormatError
    else:
        saved = Spectrum(torch.linspace(1, 0, 5, dtype=torch.float64), n_rows=9, dim=5).save(tmp_path / "good.npz")
        member, load, error = "values.npy", Spectrum.load, SpectrumFormatError
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(bad, "w") as dst:
        assert member in src.namelist()
        for name in src.namelist():
            if name == member:
                buf = io.BytesIO()
                npy_format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (2**20, 2**20)})
                buf.write(b"\0" * 64)
                dst.writestr(name, buf.getvalue())
            else:
                dst.writestr(name, src.read(name))
    with pytest.raises(error) as info:
        load(bad)
    assert str(bad) in str(info.value)


def test_the_temporary_name_fits_a_file_system_with_shorter_names(tmp_path, monkeypatch):
    # eCryptfs allows 143-byte names: the temporary name follows the directory's limit (pathconf)
    real = os.pathconf
    monkeypatch.setattr(_io.os, "pathconf", lambda p, n: 143 if n == "PC_NAME_MAX" else real(p, n))
    made = []
    real_open = open

    def spy(file, *args, **kwargs):
        name = os.path.basename(os.fspath(file))
        if len(os.fsencode(name)) > 143:  # refused as eCryptfs refuses it
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fspath(file))
        made.append(name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    _io.write_text_atomic(tmp_path / ("d" * 140), "x")
    assert (tmp_path / ("d" * 140)).read_text() == "x"
    assert made and all(len(os.fsencode(n)) <= 143 for n in made), made


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "geteuid"), reason="POSIX fork and users")
def test_a_directory_that_refuses_the_temporary_file_is_named(tmp_path):
    # a writable file in a read-only directory: open(path, "w") writes it, the atomic write cannot (its
    # temporary file goes in the directory); the error said "Permission denied: <file>", whose mode allows it
    import shutil
    import tempfile
    from pathlib import Path

    top = Path(tempfile.mkdtemp())
    try:
        kept = top / "kept.json"
        kept.write_text("old")
        os.chmod(kept, 0o666)
        if os.geteuid() == 0:
            os.chown(top, 65534, 65534)
            os.chown(kept, 65534, 65534)
        os.chmod(top, 0o555)

        def child() -> int:
            try:
                _io.write_text_atomic(kept, "new")
            except PermissionError as exc:
                return 0 if exc.filename == str(kept) and f"in {top}" in str(exc) else 5
            return 4 if kept.read_text() == "new" else 1  # 4: a privileged child writes it

        code = _in_child(child)
        if code == 4:
            pytest.skip("this user may write into read-only directories")
        assert code == 0, code
        assert kept.read_text() == "old" and _leftovers(top) == []
    finally:
        os.chmod(top, 0o755)
        shutil.rmtree(top)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_waiting_in_a_forked_child_for_the_parents_job_raises():
    # the child inherits the future but not the worker thread that resolves it: result() waited forever
    # (here 3 s, the wait's timeout)
    import threading

    from spectral_lens import background

    gate = threading.Event()
    pending = background.submit(lambda notes: gate.wait(30))
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                pending.result(timeout=3)
            except RuntimeError as exc:
                code = 0 if "before it forked" in str(exc) else 2
            except BaseException:  # noqa: BLE001 - the old TimeoutError
                code = 3
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        gate.set()
    assert pending.result(timeout=30) is True  # the parent's future resolves as before
