"""Fault injection on saves: a write that fails mid-way (file-size limit, SIGKILL, an exception in the
serializer) leaves the previous file intact and loadable; short of a kill, its temporary file is removed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, Spectrum
from spectral_lens import atomic as _io
from spectral_lens.records import RunInfo, RunWriter, RunRecord


def _acc(d: int, seed: int) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(d, precision="float64")
    acc.update(torch.randn(50, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return acc


def _spectrum(d: int) -> Spectrum:
    return Spectrum(torch.logspace(0, -4, d, dtype=torch.float64), n_rows=3 * d, dim=d)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(_io.TMP_SUFFIX))


# The child processes of the two subprocess tests below. One fresh interpreter imports torch and
# spectral_lens, then runs each case in a fork of itself (the saves' faults are process-wide: a file-size
# limit, a SIGKILL): one interpreter start for the four cases instead of four (~2-5 s each).
_CHILDREN = textwrap.dedent('''
    import json, os, resource, signal, sys, traceback
    import numpy as np, torch
    from spectral_lens import ActivationCovarianceAccumulator, Spectrum

    def size_limited(kind, path):
        # saves a large object over a small file under RLIMIT_FSIZE: the write fails with EFBIG
        # part-way through (SIGXFSZ ignored so the write raises instead of killing the process)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if kind == "accumulator":
            big = ActivationCovarianceAccumulator(400, precision="float64")
            big.update(torch.randn(10, 400, dtype=torch.float64))
        else:
            big = Spectrum(torch.linspace(1, 0, 200_000, dtype=torch.float64), n_rows=10, dim=200_000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            big.save(path)
        except OSError as exc:
            print("EFBIG", exc.errno)
            return
        print("SAVED")

    def killed(kind, path):
        # SIGKILLed by its own serializer after part of the archive is on disk
        def savez_then_die(file, **arrays):
            file.write(b"PK\\x03\\x04" + b"\\0" * 8192)
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez = savez_then_die
        if kind == "accumulator":
            obj = ActivationCovarianceAccumulator(3, precision="float64")
            obj.update(torch.randn(10, 3, dtype=torch.float64))
        else:
            obj = Spectrum(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), n_rows=9, dim=3)
        obj.save(path)

    results = {}
    for case, kind, path in json.loads(sys.argv[1]):
        r, w = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.dup2(w, 1)
            sys.stdout = os.fdopen(1, "w")
            try:
                dict(size_limited=size_limited, killed=killed)[case](kind, path)
                status = 0
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        results[f"{case}-{kind}"] = dict(returncode=code, stdout=out)
    print(json.dumps(results))
''')

_KINDS = ["accumulator", "spectrum"]


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> dict:
    """Per case (``size_limited-<kind>``, ``killed-<kind>``): its directory, the old object saved there
    and the file's bytes before the child's save, and the child's exit status and output."""
    cases = {}
    for kind in _KINDS:
        for case, old, name in (("size_limited", _acc(6, 0) if kind == "accumulator" else _spectrum(6), "state.npz"),
                                ("killed", _acc(6, 3) if kind == "accumulator" else _spectrum(6), "x.npz")):
            path = tmp_path_factory.mktemp(f"{case}-{kind}") / name
            old.save(path)
            cases[f"{case}-{kind}"] = dict(case=case, kind=kind, path=path, old=old, before=path.read_bytes())
    run = subprocess.run([sys.executable, "-c", _CHILDREN, json.dumps([(c["case"], c["kind"], str(c["path"]))
                                                                      for c in cases.values()])],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for key, got in json.loads(run.stdout.strip().splitlines()[-1]).items():
        cases[key].update(got, stderr=run.stderr)
    return cases


@pytest.mark.parametrize("kind", _KINDS)
def test_size_limited_overwrite_keeps_the_old_file(kind, children):
    c = children[f"size_limited-{kind}"]
    path, old = c["path"], c["old"]
    assert c["returncode"] == 0, c["stderr"][-2000:]
    assert c["stdout"].split()[0] == "EFBIG", c["stdout"]  # the limit did hit the write
    assert path.read_bytes() == c["before"]
    if kind == "accumulator":
        back = ActivationCovarianceAccumulator.load(path)
        assert torch.equal(back.covariance(), old.covariance())
    else:
        assert torch.equal(Spectrum.load(path).values, old.values)
    assert _leftovers(path.parent) == []


class _Boom(RuntimeError):
    pass


def _savez_dies_mid_write(file, **arrays):
    """Writes part of the archive to the open file, then fails (a crash or full disk mid-write)."""
    file.write(b"PK\x03\x04" + b"\0" * 4096)
    raise _Boom("injected failure mid-write")


@pytest.mark.parametrize("kind", ["accumulator", "spectrum"])
def test_exception_mid_write_keeps_the_old_file(kind, tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    old = _acc(5, 1) if kind == "accumulator" else _spectrum(5)
    old.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _savez_dies_mid_write)
    new = _acc(5, 2) if kind == "accumulator" else _spectrum(7)
    with pytest.raises(_Boom):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    loaded = ActivationCovarianceAccumulator.load(path) if kind == "accumulator" else Spectrum.load(path)
    assert loaded.n_rows == old.n_rows
    assert _leftovers(tmp_path) == []


def test_run_metadata_update_failing_mid_write_keeps_run_json(tmp_path, monkeypatch):
    real = _io.write_atomic

    def half_then_fail(fh):
        fh.write(b'{"format": ')
        raise _Boom("injected failure mid-write")

    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=100), fsync=False) as w:
        before = (tmp_path / "run" / "run.json").read_bytes()
        monkeypatch.setattr(_io, "write_atomic", lambda path, write, fsync=True: real(path, half_then_fail, fsync=fsync))
        with pytest.raises(_Boom):
            w.update_info(status="done")
    assert (tmp_path / "run" / "run.json").read_bytes() == before
    assert RunRecord.open(tmp_path / "run").run_id == "r"
    assert _leftovers(tmp_path / "run") == []


@pytest.mark.parametrize("kind", _KINDS)
def test_save_killed_mid_write_keeps_the_old_file(kind, children):
    c = children[f"killed-{kind}"]
    path, old = c["path"], c["old"]
    assert c["returncode"] == -9, (c["returncode"], c["stderr"][-2000:])
    assert path.read_bytes() == c["before"]
    loaded = ActivationCovarianceAccumulator.load(path) if kind == "accumulator" else Spectrum.load(path)
    assert loaded.n_rows == old.n_rows
    assert len(_leftovers(path.parent)) == 1  # a killed process cannot clean up; RunWriter(resume=True) does


def test_text_and_figure_writes_failing_mid_write_keep_the_old_file(tmp_path, monkeypatch):
    # write_text_atomic (reports, tuner choices) and plot.save_figure (report figures) both go through
    # write_atomic: a failure mid-write leaves the previous file and no temporary file.
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from spectral_lens.plot import save_figure

    text = _io.write_text_atomic(tmp_path / "report.md", "old\n")
    fig = Figure()
    fig.subplots().plot([1, 2, 3])
    png = save_figure(fig, tmp_path / "fig.png")
    old_png = png.read_bytes()
    assert old_png.startswith(b"\x89PNG") and text.read_text() == "old\n"

    def half_then_fail(fh, **kwargs):
        fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, png)
    monkeypatch.setattr(_io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        _io.write_text_atomic(text, "new\n")
    assert text.read_text() == "old\n" and png.read_bytes() == old_png
    assert _leftovers(tmp_path) == []


def test_a_write_onto_a_directory_names_the_target_not_the_temporary_file(tmp_path, capsys):
    """'report --out D' with D/report.md a directory said 'D/.report.md.<hex>.tmp: Is a directory',
    naming a temporary file that no longer exists."""
    target = tmp_path / "report.md"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        _io.write_text_atomic(target, "x")
    assert info.value.filename == str(target), info.value
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["enospc_in_write", "eio_in_fsync"])
def test_a_failed_write_names_the_file(tmp_path, monkeypatch, fault):
    import errno
    import os

    path = tmp_path / "x.npz"
    old = _spectrum(5)
    old.save(path)
    before = path.read_bytes()
    if fault == "enospc_in_write":
        def savez(fh, **arrays):
            fh.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(np, "savez", savez)
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as info:
        _spectrum(7).save(path)
    monkeypatch.undo()
    assert info.value.filename == str(path), info.value
    assert info.value.errno == (errno.ENOSPC if fault == "enospc_in_write" else errno.EIO)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_a_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    """A symlink at the path was replaced by a regular file (the rename went onto the link), so the
    linked file kept its old content; write_atomic writes through the link as open(path, "w") does,
    with its temporary file in the target's directory so the rename stays atomic."""
    import os

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    target = real_dir / "report.md"
    target.write_text("old\n")
    link = link_dir / "report.md"
    link.symlink_to(os.path.relpath(target, link_dir))
    chain = link_dir / "chain.md"  # a link to a link
    chain.symlink_to("report.md")
    assert _io.write_text_atomic(link, "new\n") == link
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(target, link_dir)
    assert target.read_text() == "new\n"
    _io.write_text_atomic(chain, "newer\n")
    assert chain.is_symlink() and link.is_symlink()
    assert target.read_text() == "newer\n"
    dangling = link_dir / "dangling.md"  # open(path, "w") creates the missing target
    dangling.symlink_to(os.path.relpath(real_dir / "fresh.md", link_dir))
    _io.write_text_atomic(dangling, "fresh\n")
    assert dangling.is_symlink() and (real_dir / "fresh.md").read_text() == "fresh\n"
    assert _leftovers(real_dir) == [] and _leftovers(link_dir) == []


def test_a_failed_write_through_a_symlink_names_the_link_and_keeps_the_target(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "real.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to("real.txt")

    def write(fh):
        fh.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        _io.write_atomic(link, write)
    assert info.value.filename == str(link), info.value
    assert link.is_symlink() and target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []
    loop = tmp_path / "loop.txt"
    loop.symlink_to("loop.txt")
    with pytest.raises(OSError) as info:
        _io.write_text_atomic(loop, "x")
    assert info.value.errno == errno.ELOOP and info.value.filename == str(loop), info.value
    assert loop.is_symlink() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_an_overwrite_keeps_the_files_permission_bits(tmp_path, mode):
    """The replacement got the temporary file's default mode (0o666 less the umask), so a private
    0o600 file became world-readable and an executable script lost its x bits."""
    import os
    import stat

    path = tmp_path / "private.json"
    path.write_text("{}\n")
    os.chmod(path, mode)
    _io.write_json_atomic(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == mode
    link = tmp_path / "link.json"
    link.symlink_to("private.json")
    _io.write_json_atomic(link, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == '{\n  "a": 2\n}\n'


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        _io.write_text_atomic(tmp_path / "new.txt", "x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640
