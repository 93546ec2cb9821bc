"""Review 30 (revrecords30): adversarial review of review 30's records and atomic-write changes.

Tests marked "regression guard" passed on the reviewed code too (they pin what was confirmed); the others failed
on it (see docs/reliability.md)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_lens import atomic
from spectral_lens.atomic import write_atomic, write_text_atomic
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter
from spectral_lens.records import writer as writer_mod
from spectral_lens.spectrum import Spectrum


def _spectrum(seed: int = 0, n: int = 12) -> Spectrum:
    values = np.sort(np.random.default_rng(seed).random(n))[::-1] + 0.01
    return Spectrum(values, dim=n, kind="activation_covariance", n_rows=500)


# ---- atomic writes: set-ID bits, the in-place path -----------------------------------------------


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to own a file as another user")
def test_root_rewriting_another_users_set_id_program_does_not_make_it_run_as_root(tmp_path):
    # the old mode (0o6755) was set on the new file, which is root's: a program that ran as nobody (set-user-ID)
    # and group nogroup (set-group-ID) now ran as root; chown clears the bits for that reason
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    os.chown(tool, 65534, 65534)
    tool.chmod(0o6755)
    write_text_atomic(tool, "#!/bin/sh\necho 2\n")
    st_ = tool.stat()
    assert (st_.st_uid, st_.st_gid) == (0, os.getegid())
    assert stat.S_IMODE(st_.st_mode) == 0o755, oct(stat.S_IMODE(st_.st_mode))
    own = tmp_path / "own.sh"  # root's own set-ID program keeps its bits (same owner and group)
    own.write_text("#!/bin/sh\n")
    own.chmod(0o6755)
    write_text_atomic(own, "#!/bin/sh\necho 3\n", fsync=False)
    assert stat.S_IMODE(own.stat().st_mode) == 0o6755 and own.read_text() == "#!/bin/sh\necho 3\n"


def test_a_file_that_became_regular_after_the_stat_is_written_atomically(tmp_path, monkeypatch):
    # the stat saw a device or FIFO, then a regular file took its place (another writer's rename): the in-place
    # path truncated it with open(path, "wb"), and a write that failed left it empty instead of as it was
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(atomic, "_is_special", lambda st: True)

    def failing(fh):
        fh.write(b"half")
        raise RuntimeError("serializer failed")

    with pytest.raises(RuntimeError, match="serializer failed"):
        write_atomic(target, failing)
    assert target.read_bytes() == b"old"
    assert write_text_atomic(target, "new", fsync=False) == target and target.read_bytes() == b"new"
    gone = tmp_path / "gone.json"  # removed since the stat: created by the atomic write
    write_text_atomic(gone, "x", fsync=False)
    assert gone.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone.json", "report.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_replaced_by_a_private_file_between_the_stat_and_the_open(tmp_path, monkeypatch):
    # regression guard of the race itself: the FIFO the stat saw is a 0o600 file when it is opened; it is written
    # atomically with its own mode (not the FIFO's 0o644: the private content readable by all)
    target = tmp_path / "out.json"
    os.mkfifo(target, 0o644)
    real = atomic._is_special

    def racing(arg):
        special = real(arg)
        if special and stat.S_ISFIFO(os.stat(target).st_mode):
            target.unlink()
            target.write_bytes(b"old")
            target.chmod(0o600)
        return special

    monkeypatch.setattr(atomic, "_is_special", racing)
    old_umask = os.umask(0o022)
    try:
        write_text_atomic(target, "new")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(not os.path.exists("/dev/null") or not stat.S_ISCHR(os.stat("/dev/null").st_mode),
                    reason="a POSIX /dev/null")
def test_a_write_through_a_link_to_dev_null_keeps_the_link_and_the_device(tmp_path):
    # regression guard (any user): the link is written through, in place, nothing created beside it
    link = tmp_path / "out.json"
    link.symlink_to("/dev/null")
    assert write_text_atomic(link, '{"a": 1}\n') == link
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd") or not os.path.islink("/dev/fd"), reason="Linux /dev/fd")
def test_a_write_to_dev_fd_of_a_pipe_goes_into_the_pipe():
    # regression guard (/dev/stdout piped is /proc/self/fd/1): realpath reads the magic link as "pipe:[N]", a
    # file that does not exist; the stat that picks the in-place write must follow the link as the kernel does
    r, w = os.pipe()
    try:
        assert write_text_atomic(f"/dev/fd/{w}", "hello\n") == Path(f"/dev/fd/{w}")
        assert os.read(r, 100) == b"hello\n"
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets")
def test_a_socket_is_refused_as_open_refuses_it():
    # regression guard (review 30 changed it; before, the rename replaced a live socket with a regular file)
    root = Path(tempfile.mkdtemp(prefix="sl"))  # a socket path must be short (108 bytes)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(root / "s"))
        with pytest.raises(OSError) as info:
            write_text_atomic(root / "s", "x")
        assert info.value.errno == errno.ENXIO and info.value.filename == str(root / "s")
        assert stat.S_ISSOCK(os.stat(root / "s").st_mode) and os.listdir(root) == ["s"]
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


# ---- the backwards line search ---------------------------------------------------------------------


def _backward(path: Path, size: int | None = None) -> tuple[list[bytes], int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if size is None else size
        return list(writer_mod._lines_backward(fd, size)), writer_mod._last_line_start(fd, size)
    finally:
        os.close(fd)


_LINE_BYTES = st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"}", b"\xc3\xa9", b"\xe2\x80\xa8", b"\xf0\x9f\x98\x80"])


@settings(max_examples=150, deadline=None)
@given(data=st.lists(_LINE_BYTES, max_size=40).map(b"".join), chunk=st.integers(1, 9), no_pread=st.booleans())
def test_the_backward_search_equals_a_split_at_every_chunk_boundary(tmp_path_factory, data, chunk, no_pread):
    # regression guard: a newline on a chunk boundary, CRLF or a UTF-8 character split across chunks, a file
    # that is exactly a chunk, empty, or only newlines: the lines and the last line's start equal a forward split
    # (with pread, and with lseek / read as where there is none)
    path = tmp_path_factory.getbasetemp() / "review30_backward.bin"
    path.write_bytes(data)
    old, pread = writer_mod._CHUNK, getattr(os, "pread", None)
    writer_mod._CHUNK = chunk
    if no_pread and pread is not None:
        del os.pread
    try:
        lines, start = _backward(path)
    finally:
        writer_mod._CHUNK = old
        if pread is not None:
            os.pread = pread
    assert lines == data.split(b"\n")[::-1]
    assert start == data.rfind(b"\n") + 1


@pytest.mark.parametrize("where", ["newline_last_of_a_chunk", "newline_first_of_a_chunk", "exactly_1_mib"])
def test_a_resume_cuts_a_torn_line_at_a_mib_boundary(tmp_path, where):
    # regression guard with the real 1 MiB chunk: the cut is right after the last newline, wherever it falls
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
    head = (run / "log.jsonl").read_bytes()
    mib = 1 << 20
    if where == "exactly_1_mib":  # a file of exactly 1 MiB, its one newline the previous line's
        torn = b'{"step": 2, "tok' + b"x" * (mib - len(head) - 16)
    else:  # the last newline is the last byte of the second MiB from the end / the first byte of the last MiB
        pad = b'{"step": 2, "tokens": 20, "pad": "' + b"p" * (mib // 2) + b'"}\n'
        tail = mib if where == "newline_last_of_a_chunk" else mib - 1  # the torn line's length
        torn = pad + b'{"step": 3, "tok' + b"y" * (tail - 16)
    with open(run / "log.jsonl", "ab") as fh:
        fh.write(torn)
    size = (run / "log.jsonl").stat().st_size
    assert where != "exactly_1_mib" or size == mib
    newline = size - len(torn) + (len(pad) if where != "exactly_1_mib" else 0) - 1
    assert (run / "log.jsonl").read_bytes()[newline:newline + 1] == b"\n"
    assert newline == {"newline_last_of_a_chunk": size - mib - 1, "newline_first_of_a_chunk": size - mib,
                       "exactly_1_mib": len(head) - 1}[where]
    keep = size - len(torn) + (0 if where == "exactly_1_mib" else len(pad))
    data = (run / "log.jsonl").read_bytes()
    assert _backward(run / "log.jsonl") == (data.split(b"\n")[::-1], keep)  # as _record_end reads it
    with pytest.warns(RecordWarning, match=f"truncated last line \\({size - keep} bytes\\)"):
        RunWriter(run, resume=True, fsync=False).close()
    assert (run / "log.jsonl").stat().st_size == keep
    assert (run / "log.jsonl").read_bytes().endswith(b"\n")


def test_reading_a_long_last_line_backwards_takes_time_linear_in_its_length(tmp_path, monkeypatch):
    # each chunk was prepended to the part of the line read so far and the whole re-split: time quadratic in the
    # line's length (a 128 MiB last line: 7.3 s of CPU, now 0.2 s; here 1.5e5 chunks of 4 bytes: about 15 s, 0.3 s)
    path = tmp_path / "log.jsonl"
    line = b'{"step": 1, "tokens": 10, "x": "' + b"z" * 600_000 + b'"}'
    path.write_bytes(b'{"step": 0, "tokens": 0}\n' + line)
    monkeypatch.setattr(writer_mod, "_CHUNK", 4)
    t0 = time.process_time()
    lines, _ = _backward(path)
    took = time.process_time() - t0
    assert lines == [line, b'{"step": 0, "tokens": 0}']
    assert took < 3.0, f"{took:.1f} s of CPU"


# ---- the spectrum-file names a resume or drop_after removes ---------------------------------------


_NOT_THE_WRITERS = [
    "000000001_a.npz",  # 9 digits with a leading 0: f"{step:08d}" gives 8, or 9+ without one
    "-00000001_a.npz",  # 8 digits after "-" with a leading 0: -1 is "-0000001"
    "\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661_a.npz",  # Arabic-Indic digits (\d took them)
    "\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11_a.npz",  # fullwidth digits
]
_NEVER = [  # matched by neither pattern (regression guard)
    "0000001_a.npz", "00000001_a.npy", "00000001_a.npz.bak", "00000001a.npz", "00000001_.npz.tmp", "notes.npz",
    "2024-01-15_a.npz", "00000001_a b.npz", "+0000001_a.npz", "00000001_a.NPZ",
]
_WRITERS = ["00000001_a.npz", "00000001_a-2.npz", "100000000_a.npz", "-0000001_a.npz", "-10000000_a.npz",
            "123456789012_a.b-c.npz"]


def test_a_resume_removes_only_the_names_the_writer_gives(tmp_path):
    # the widened pattern (\d{8,}, -\d{7,}) took names the writer cannot give: a user's file in spectra/ named so
    # was removed by the next resume (and by drop_after, named by a measurement line); the writer's own are
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log_measurement(5, 50, {"kept": _spectrum(5)})
    for name in _NOT_THE_WRITERS + _NEVER + _WRITERS:
        (run / "spectra" / name).write_bytes(b"user")
    with pytest.warns(RecordWarning, match=f"{len(_WRITERS)} spectrum file"):
        RunWriter(run, resume=True, fsync=False).close()
    assert sorted(os.listdir(run / "spectra")) == sorted(["00000005_kept.npz", *_NOT_THE_WRITERS, *_NEVER])
    for name in _NOT_THE_WRITERS:
        assert not writer_mod._SPECTRUM_FILE.fullmatch(name), name
    for step in (0, 7, 10**8 - 1, 10**8, 10**12, -1, -(10**7) + 1, -(10**7), -(10**9)):  # every name it gives
        assert writer_mod._SPECTRUM_FILE.fullmatch(f"{step:08d}_a.npz"), step


# ---- integers beyond the float range, and the ones that are fine ----------------------------------


def test_integers_at_the_float_range_edge_and_of_every_kind(tmp_path):
    # regression guard: 2**1024 - 1 rounds to 2**1024 (refused, as the reader refuses it); the largest integer a
    # float holds, NumPy integers and 1e15 tokens (an int or a whole float) are written and read back exactly
    run = tmp_path / "run"
    edge = (1 << 1024) - (1 << 970) - 1  # rounds down to the largest float
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        for bad in ((1 << 1024) - 1, -(1 << 1024) + 1):
            with pytest.raises(ValueError, match="beyond the float range"):
                w.log(1, bad)
            with pytest.raises(ValueError, match="beyond the float range"):
                w.log(1, 1, train_loss=bad)
        with pytest.raises(TypeError, match="must be an integer"):
            w.log(True, 1)
        with pytest.raises(TypeError, match="must be a number"):
            w.log(1, 1, train_loss=np.bool_(True))
        w.log(np.int64(2**62), np.uint64(2**64 - 1), train_loss=np.int32(3), tokens_per_s=edge)
        w.log(3, 10**15, val_loss=1)
        w.log(4, 1e15)
        w.log_measurement(10**30, 10**15, {"a": _spectrum()}, val_loss=np.float32(0.5))
    rec = RunRecord.open(run, verify=True)
    assert [(e["step"], e["tokens"]) for e in rec.events] == [(2**62, 2**64 - 1), (3, 10**15), (4, 10**15)]
    assert rec.events[0]["tokens_per_s"] == edge and rec.events[0]["train_loss"] == 3
    assert [(m.step, m.tokens) for m in rec.measurements] == [(10**30, 10**15)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordWarning)
        RunWriter(run, resume=True, fsync=False).close()  # the 31-digit step's spectrum file is the writer's
    assert os.listdir(run / "spectra") == [f"{10**30}_a.npz"]


# ---- portability: no Unix-only call, binary descriptors -------------------------------------------


def test_a_platform_without_pread_appends_after_another_programs_line(tmp_path, monkeypatch):
    # the check of the last byte before an append (another program wrote since) called os.pread, which Windows
    # lacks: AttributeError from log() there; read with lseek / read as the resume's repair is
    run = tmp_path / "run"
    monkeypatch.delattr(os, "pread", raising=False)
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
        with open(run / "log.jsonl", "ab") as fh:
            fh.write(b'{"step": 2, "tokens": 20}')  # another tool's line, no newline yet
        w.log(3, 30, train_loss=2.0)
    assert [e["step"] for e in RunRecord.open(run).events] == [1, 2, 3]


def test_every_descriptor_on_a_jsonl_file_is_binary(tmp_path, monkeypatch):
    # os.open without O_BINARY is a text-mode descriptor on Windows: writes turn "\n" into "\r\n", reads stop at a
    # Ctrl-Z and no longer match the offsets lseek gives (the resume's repair, where a failed run ended). Spied with
    # a stand-in flag (Linux has no O_BINARY), removed before the real open
    fake = 1 << 30
    monkeypatch.setattr(writer_mod, "_BINARY", fake, raising=False)
    real_open, seen = os.open, []

    def spy(path, flags, *args, **kwargs):
        if str(path).endswith(".jsonl"):
            seen.append((Path(path).name, bool(flags & fake)))
        return real_open(path, flags & ~fake, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log(1, 10, train_loss=2.5)
        w.log_measurement(1, 10, {"a": _spectrum()})
        w.log(2, 20, train_loss=2.0)
        w.drop_after(1)
        raise RuntimeError("preempted")
    with RunWriter(run, resume=True, fsync=False) as w:  # reads where the failed run ended
        w.log(2, 20, train_loss=2.0)
    assert {name for name, _ in seen} == {"log.jsonl", "measurements.jsonl"} and len(seen) >= 6, seen
    assert all(binary for _, binary in seen), seen
    monkeypatch.undo()
    assert writer_mod._BINARY == getattr(os, "O_BINARY", 0)


# ---- what the resume's cleanup says, and RunInfo's error on a huge integer ---------------------------


def test_a_resume_does_not_count_a_spectrum_file_it_could_not_remove_as_removed(tmp_path, monkeypatch):
    # drop_after's warning says the next resume removes a file it could not; that resume's unlink failing too
    # (EACCES) was passed over, and its warning said "removed ... 1 spectrum file(s)" of the file still there
    run = tmp_path / "run"
    with RunWriter(run, RunInfo("r"), fsync=False) as w:
        w.log_measurement(1, 10, {"a": _spectrum(1)})
    blocked = run / "spectra" / "00000002_a.npz"
    _spectrum(2).save(blocked)
    (run / "spectra" / "00000003_a.npz").write_bytes(b"x")
    real_unlink = type(run).unlink

    def unlink(self, *args, **kwargs):
        if self == blocked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(type(run), "unlink", unlink)
    with pytest.warns(RecordWarning, match=r"removed 0 temporary file\(s\) and 1 spectrum file\(s\) .*; could not "
                                           r"remove 1: .*00000002_a\.npz \(Permission denied\)"):
        RunWriter(run, resume=True, fsync=False).close()
    assert sorted(os.listdir(run / "spectra")) == ["00000001_a.npz", "00000002_a.npz"]


def test_run_info_refuses_an_integer_too_long_to_print_naming_the_field():
    # the message counted the digits with str(), which refuses an integer of over 4,300 digits: Python's own
    # "Exceeds the limit (4300 digits) for integer string conversion", naming no field
    with pytest.raises(ValueError, match=r"RunInfo.total_tokens is an integer beyond the float range \(about 5001 "):
        RunInfo("r", total_tokens=10**5000)
    with pytest.raises(ValueError, match=r"RunInfo.seed is an integer beyond the float range \(about 401 digits"):
        RunInfo("r", seed=-(10**400))
