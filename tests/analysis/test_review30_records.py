"""Review 30 (records30): adversarial audit of run records and atomic writes.

Each test failed before the fix it guards (see docs/reliability.md), except
``test_a_damaged_line_costs_that_line_only``, a regression guard (checked against two mutations of the reader)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectral_lens.atomic import write_atomic, write_text_atomic
from spectral_lens.records import (
    RecordFormatError,
    RecordWarning,
    RunInfo,
    RunRecord,
    RunWriter,
)
from spectral_lens.spectrum import Spectrum


def _spectrum(seed: int = 0, n: int = 30) -> Spectrum:
    values = np.sort(np.random.default_rng(seed).random(n))[::-1] + 0.01
    return Spectrum(values, dim=n, kind="activation_covariance", n_rows=500)


# ---- atomic writes onto devices and FIFOs --------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_an_atomic_write_to_a_fifo_writes_into_it_and_keeps_it(tmp_path):
    # the rename replaced the FIFO with a regular file (a reader waiting on it got nothing)
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        write_text_atomic(fifo, '{"a": 1}\n')
    finally:  # joined first: a reader that closed the FIFO but had not yet appended to `got` left no reader for
        reader.join(10)  # the unblocking open below, which then waited for good (a hang seen on a loaded machine)
        if reader.is_alive() and stat.S_ISFIFO(os.stat(fifo).st_mode):  # unblock the reader if nothing was written
            with open(fifo, "wb"):
                pass
            reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got == [b'{"a": 1}\n']
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file


@pytest.mark.skipif(not hasattr(os, "mknod") or os.geteuid() != 0, reason="creating a device needs root")
def test_an_atomic_write_to_a_device_keeps_the_device(tmp_path):
    # as root, an atomic write to /dev/null (a report, a JSON file) replaced /dev/null with a regular file
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    write_text_atomic(null, "hello\n")
    link = tmp_path / "link"
    link.symlink_to(null)  # /dev/stdout is a link too
    write_atomic(link, lambda fh: fh.write(b"x"))
    assert stat.S_ISCHR(os.stat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "null"]


# ---- the permission bits of an overwrite ---------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_private_files_new_content_is_never_readable_by_others(tmp_path):
    # the old file's mode was set on the temporary file only after its content was written: meanwhile (and in
    # the temporary file a killed write leaves behind) the new content of a 0o600 file was 0o644
    target = tmp_path / "ckpt.npz"
    target.write_bytes(b"old secret")
    target.chmod(0o600)
    seen = []

    def write(fh):
        fh.write(b"new ")
        fh.flush()
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        seen.append(stat.S_IMODE(os.stat(tmp).st_mode))
        fh.write(b"secret")

    old_umask = os.umask(0o022)
    try:
        write_atomic(target, write)
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert target.read_bytes() == b"new secret" and stat.S_IMODE(target.stat().st_mode) == 0o600


# ---- spectrum files of steps with other than 8 digits --------------------------------------------


@pytest.mark.parametrize("step", [10**8, 123_456_789_012, -1])
def test_drop_after_and_resume_remove_the_spectrum_files_of_any_step(tmp_path, step):
    # the files are named f"{step:08d}_NAME.npz": 9 digits from step 10**8 on, "-0000001" for step -1; the
    # writer took only 8 digits for its own files, so drop_after left them behind and no resume removed them
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log_measurement(step - 10, 0, {"a": _spectrum(1)})
        w.log_measurement(step, 5, {"a": _spectrum(2), "b": _spectrum(3)})
        kept = set(os.listdir(run / "spectra"))
        assert w.drop_after(step - 10) == 1
    left = set(os.listdir(run / "spectra"))
    assert left == {f"{step - 10:08d}_a.npz"}, sorted(kept)
    orphan = run / "spectra" / f"{step:08d}_c.npz"  # a writer killed before its line was appended left it
    _spectrum(4).save(orphan)
    with pytest.warns(RecordWarning, match="1 spectrum file"):
        RunWriter(run, resume=True, fsync=False).close()
    assert set(os.listdir(run / "spectra")) == left
    assert [m.step for m in RunRecord.open(run, verify=True).measurements] == [step - 10]


# ---- a last line longer than 1 MiB ---------------------------------------------------------------


def test_a_resume_cuts_a_torn_last_line_of_any_length(tmp_path):
    # a crash while the writer appended a line of more than 1 MiB (a measurement of thousands of spectra, a
    # long list logged) left a record no writer could resume: "last line longer than 1 MiB without a newline"
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
    line = b'{"step": 2, "tokens": 20, "hist": [' + b"0.125, " * 400_000 + b"1.0]}\n"
    with open(run / "log.jsonl", "ab") as fh:
        fh.write(line[: len(line) * 3 // 4])  # torn by the crash, 2.1 MB of it written
    with pytest.warns(RecordWarning, match=f"truncated last line \\({len(line) * 3 // 4} bytes\\)"):
        w = RunWriter(run, resume=True, fsync=False)
    with w:
        w.log(3, 30, train_loss=2.0)
    assert [(e["step"], e["train_loss"]) for e in RunRecord.open(run).events] == [(1, 2.5), (3, 2.0)]


def test_a_resume_keeps_a_complete_last_line_of_any_length_that_lacks_its_newline(tmp_path):
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
    hist = [0.125] * 300_000 + [1.0]
    with open(run / "log.jsonl", "ab") as fh:  # another tool's line, complete but for its newline
        fh.write(json.dumps({"step": 2, "tokens": 20, "hist": hist}).encode() + b"  ")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)
        with RunWriter(run, resume=True, fsync=False) as w:
            w.log(3, 30, train_loss=2.0)
    events = RunRecord.open(run).events
    assert [e["step"] for e in events] == [1, 2, 3] and events[1]["hist"] == hist


# ---- errors of the cleanup and of the resume's last-line repair ---------------------------------


def test_drop_after_warns_about_a_spectrum_file_it_cannot_remove_and_goes_on(tmp_path, monkeypatch):
    # the lines were rewritten, but the first spectrum file that could not be removed (another user's file in a
    # shared sticky directory: EACCES) raised out of drop_after: the count was lost, the remaining files were
    # left, and a framework callback's resume failed over a leftover file the next resume removes anyway
    run = tmp_path / "run"
    w = RunWriter(run, RunInfo("r"), fsync=False)
    for step in (1, 2, 3):
        w.log(step, step * 10, train_loss=1.0)
        w.log_measurement(step, step * 10, {"a": _spectrum(step)})
    real_unlink = type(run).unlink
    blocked = run / "spectra" / "00000002_a.npz"

    def unlink(self, *args, **kwargs):
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(type(run), "unlink", unlink)
    with pytest.warns(RecordWarning, match=r"could not remove .*00000002_a\.npz.*Permission denied"):
        assert w.drop_after(1) == 2
    monkeypatch.undo()
    assert sorted(os.listdir(run / "spectra")) == ["00000001_a.npz", "00000002_a.npz"]
    w.log(2, 20, train_loss=0.5)  # the writer goes on
    w.close()
    rec = RunRecord.open(run, verify=True)
    assert [e["step"] for e in rec.events] == [1, 2] and [m.step for m in rec.measurements] == [1]
    with pytest.warns(RecordWarning, match="1 spectrum file"):  # the next resume removes the leftover
        RunWriter(run, resume=True, fsync=False).close()
    assert os.listdir(run / "spectra") == ["00000001_a.npz"]


def test_an_io_error_repairing_the_last_line_on_resume_names_the_file(tmp_path, monkeypatch):
    # the cut of a torn last line (ftruncate) or the newline ending a complete one failing (EIO) raised an
    # OSError without a file name from RunWriter(resume=True)
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
    with open(run / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 2, "tok')

    def ftruncate(fd, length):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(OSError, match="Input/output error") as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        RunWriter(run, resume=True, fsync=False)
    assert info.value.errno == 5 and info.value.filename == str(run / "log.jsonl")
    monkeypatch.undo()
    with pytest.warns(RecordWarning, match="truncated last line"), RunWriter(run, resume=True, fsync=False) as w:
        w.log(2, 20, train_loss=2.0)  # the lock was released, and the next resume repairs the line
    assert [e["step"] for e in RunRecord.open(run).events] == [1, 2]


# ---- regression guard: a damaged line costs that line only (hypothesis) --------------------------

_DAMAGE = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),  # random bytes
    st.sampled_from([b"\xef\xbb\xbf", b"\x00", b"\xff", b"\r", b"[1, 2]", b"3", b"NaN", b"Infinity", b'"x"', b"null",
                     b'{"step": 1, "step": "x"}', b'{"tokens": 5}', b'{"step": true, "tokens": 1}']),
)


def _base_record(root):
    run = root / "base"
    if not run.exists():
        with RunWriter(run, RunInfo("r", total_tokens=10_000), fsync=False) as w:
            for step in range(1, 6):
                w.log(step, step * 10, train_loss=1.0 / step, note="é\u2028")
                w.log_measurement(step, step * 10, {"a": _spectrum(step, 12)}, val_loss=0.5 / step)
    return run


def _rows(rec, name):
    if name == "log.jsonl":
        return [json.dumps(e, sort_keys=True) for e in rec.events]
    return [json.dumps([m.step, m.tokens, m.val_loss, m.files, m.summaries, m.progress, m.time]) for m in rec.measurements]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["log.jsonl", "measurements.jsonl"]), line=st.integers(0, 4), cut=st.floats(0, 1),
       how=st.sampled_from(["replace", "prefix", "suffix", "truncate"]), damage=_DAMAGE)
def test_a_damaged_line_costs_that_line_only(tmp_path_factory, name, line, cut, how, damage):
    """Regression guard (no failure found): the damaged line is skipped with a warning naming the file and its
    line (``errors="raise"``: refused naming them), every other line reads exactly, and a resume appends."""
    root = tmp_path_factory.getbasetemp() / "review30_damage"
    root.mkdir(exist_ok=True)
    base = _base_record(root)
    run = root / "case"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    lines = (base / name).read_bytes().split(b"\n")[:-1]
    raw = lines[line]
    if how == "replace":
        lines[line] = damage
    elif how == "prefix":
        lines[line] = damage + raw
    elif how == "suffix":
        lines[line] = raw + damage
    data = b"\n".join(lines) + b"\n"
    if how == "truncate":  # a torn last line: the crash cut it anywhere
        lines = lines[: line + 1]
        lines[line] = raw[: int(cut * (len(raw) - 1))]
        data = b"\n".join(lines)
    (run / name).write_bytes(data)
    want = _rows(RunRecord.open(base), name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _rows(RunRecord.open(run, errors="skip", verify=True), name)
    kept = [r for i, r in enumerate(want) if i != line]
    assert [r for r in got if r in kept] == (kept if how != "truncate" else want[:line])
    assert len(got) - len(kept if how != "truncate" else want[:line]) <= 1  # at most the damaged line, if valid
    blank = not lines[line].strip()  # whitespace (or a cut before the line's first byte) is no line: no word
    if len(got) < (len(want) if how != "truncate" else line + 1) and not blank:  # skipped: it was named
        assert any(f"{run / name}, line {line + 1}:" in str(w.message) for w in caught), [str(w.message) for w in caught]
        if how != "truncate":
            with pytest.raises(RecordFormatError, match=f"{name}, line {line + 1}:"):
                RunRecord.open(run, verify=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        with RunWriter(run, resume=True, fsync=False) as w:
            w.log(9, 90, train_loss=0.01)
            w.log_measurement(9, 90, {"a": _spectrum(9, 12)})
        rec = RunRecord.open(run, errors="skip", verify=True)
    assert rec.events[-1]["step"] == 9 and rec.measurements[-1].step == 9
    assert [r for r in _rows(rec, name) if r in kept] == [r for r in got if r in kept]


# ---- numbers the reader refuses are refused by the writer ---------------------------------------


@pytest.mark.parametrize("call", [
    lambda w: w.log(10**400, 1, train_loss=1.0),
    lambda w: w.log(1, -(10**400)),
    lambda w: w.log(1, 1, train_loss=10**400),
    lambda w: w.log(1, 1, tokens_per_s=-(10**309)),
    lambda w: w.log_measurement(10**400, 1, {"a": _spectrum()}),
    lambda w: w.log_measurement(1, 10**400),
    lambda w: w.fill_tokens_per_step(10**400),
])
def test_an_integer_beyond_the_float_range_is_refused_before_it_is_written(tmp_path, call):
    # written as it was, the line (or run.json's field) was refused by the reader: RunRecord.open raised for the
    # whole record ("event needs integer 'step' and 'tokens' within the float range")
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
        with pytest.raises(ValueError, match="beyond the float range"):
            call(w)
    rec = RunRecord.open(run, verify=True)
    assert [e["step"] for e in rec.events] == [1] and rec.measurements == [] and rec.info.tokens_per_step is None
    assert os.listdir(run / "spectra") == []


# ---- a record file that is not a regular file ----------------------------------------------------


def _unblock_a_reader_later(fifo, done: threading.Event, after: float = 3.0) -> threading.Thread:
    """A helper that, unless ``done`` is set first, writes junk into ``fifo`` after ``after`` seconds so that
    the old code (which waited on the FIFO for good) ends with another error instead of hanging the suite."""

    def unblock():
        if not done.wait(after):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when nobody reads it
            except OSError:
                return
            os.write(fd, b"junk\n")
            os.close(fd)

    helper = threading.Thread(target=unblock, daemon=True)
    helper.start()
    return helper


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
@pytest.mark.parametrize("name", ["log.jsonl", "measurements.jsonl"])
def test_a_record_file_that_is_a_fifo_is_refused_at_once(tmp_path, name):
    # RunRecord.open (spectral-lens inspect / report) and RunWriter(resume=True) read it and waited for good for
    # a writer (and a link to /dev/zero read without end); run.json and spectrum files were refused already
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
    (run / name).unlink()
    os.mkfifo(run / name)
    for opener in (RunRecord.open, lambda p: RunWriter(p, resume=True, fsync=False)):
        done = threading.Event()
        helper = _unblock_a_reader_later(run / name, done)
        try:
            with pytest.raises(RecordFormatError, match=f"{name}: not a regular file"):
                opener(run)
        finally:
            done.set()
            helper.join(10)
    assert stat.S_ISFIFO(os.stat(run / name).st_mode)
    (run / name).unlink()
    with RunWriter(run, resume=True, fsync=False) as w:  # the lock was released
        w.log(2, 20)


def test_a_failed_runs_end_is_read_past_a_last_line_over_1_mib(tmp_path):
    # _record_end read only the last MiB of each file and skipped the line it cut: a run whose last log line is
    # longer (a long list logged at the crash's step) "ended" at an earlier line, so a script that only measured
    # its checkpoints (lines up to where it ended) counted as going on: the failure was removed at the close
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), RunWriter(run, RunInfo("r", total_tokens=10_000), fsync=False) as w:
        w.log(1, 1000, train_loss=3.0)
        w.log(4, 4000, train_loss=2.0, hist=[0.125] * 200_000)  # 1.4 MB
        raise RuntimeError("preempted")
    with RunWriter(run, resume=True, fsync=False) as w:
        (entry,) = w.info.extras["failure_history"]
        assert (entry["step"], entry["tokens"]) == (4, 4000)
        w.log_measurement(3, 3000, {"a": _spectrum()})  # a checkpoint before the crash, measured
    extras = RunRecord.open(run).info.extras
    assert extras["status"] == "failed" and extras["failure"] == "RuntimeError: preempted"


@pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix" or os.geteuid() != 0,
                    reason="needs root to write as another user")
def test_an_overwrite_by_an_unprivileged_user_keeps_the_set_user_id_bit():
    # with the mode set before the content (above), the write of a process without CAP_FSETID cleared the
    # set-user-ID bit it had just set: 0o4755 became 0o755 (before the reorder, the mode came after the content)
    import tempfile

    root = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to root: nobody could not reach it
    try:
        if any(not p.stat().st_mode & stat.S_IXOTH for p in root.parents if p != Path("/")):
            pytest.skip(f"{root.parent} is not reachable for other users")
        root.chmod(0o777)
        target = root / "tool.sh"
        pid = os.fork()
        if pid == 0:  # the child writes as nobody
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                target.write_text("#!/bin/sh\n")
                target.chmod(0o4755)
                write_text_atomic(target, "#!/bin/sh\necho 2\n")
                code = 0 if stat.S_IMODE(target.stat().st_mode) == 0o4755 else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"mode {oct(stat.S_IMODE(target.stat().st_mode))}"
        assert target.read_text() == "#!/bin/sh\necho 2\n"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- a tensor of several values logged -----------------------------------------------------------


def test_a_tensor_of_several_values_is_logged_as_a_numpy_array_is(tmp_path):
    # a NumPy array was written as a list, a tensor of more than one value raised a bare RuntimeError ("a Tensor
    # with 2 elements cannot be converted to Scalar") that named neither the key nor the writer
    import torch

    run = tmp_path / "run"
    norms = torch.tensor([0.5, 0.25, 1e-30], dtype=torch.float64, requires_grad=True)
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, grad_norms=norms * 1, lr=np.array([0.1, 0.2]), scale=torch.tensor(2.0),
              per_head=torch.tensor([[1, 2], [3, 4]]))
        w.log_measurement(1, 10, {"a": _spectrum()}, val_loss=torch.tensor(3.25))
    (event,) = RunRecord.open(run).events
    assert event["grad_norms"] == [0.5, 0.25, 1e-30] and event["lr"] == [0.1, 0.2]
    assert event["scale"] == 2.0 and event["per_head"] == [[1, 2], [3, 4]]
