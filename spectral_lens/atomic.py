"""Atomic file writes: a temporary file in the target's directory, fsync, rename.

Every file the library writes goes through :func:`write_atomic`; the examples (checkpoints, tuner
choices, reports) use it too.

A write that fails for any reason (disk full, file-size limit, an exception in the serializer, a
crash) leaves the previous file at ``path`` untouched and removes its temporary file; an ``OSError``
of the write, the fsync or the rename (``ENOSPC``, ``EIO``, ``path`` a directory, ...) is raised with
``filename`` set to ``path`` (a killed
process can leave a ``.*.tmp`` file behind; :class:`~spectral_lens.records.RunWriter` cleans those on
resume). The temporary file's name is the target's, cut to fit the file system's limit on names
(255 bytes; 143 on eCryptfs, asked with ``pathconf`` only when a name is refused as too long).

A device or FIFO at ``path`` (``/dev/null``; ``/dev/stdout`` on a pipe) is written in place, as ``open(path,
"wb")`` does (a FIFO waits for its reader), not replaced by a regular file (before, as root, ``/dev/null``
itself was); it has no old content to keep, and is not fsynced. What is opened is checked: one replaced by a
regular file since the ``stat`` is written atomically. A socket is refused as ``open`` refuses it (``ENXIO``
naming ``path``; before, replaced by a regular file).

Like ``open(path, "w")``, a write to a symlink writes the file it points to (the end of the chain; a
dangling link's target is created) and leaves the link in place: the temporary file goes in the
target's directory, so the rename stays atomic. A file this process may not open for writing (made
read-only, ``chmod a-w``; another user's file in a directory everyone may write) is refused with ``open``'s
``PermissionError``, not replaced (the probe, an ``open`` without truncation, is skipped for the caller's
own file whose mode lets it write; any other error of it is left to the rename). An overwrite
keeps the old file's permission bits, set on the temporary file before its content is written (a private
file's new content is never readable by others, even in a temporary file a killed write leaves; set-user/group-ID
bits, which the write of an unprivileged process clears, are set again after it, each only where the new file has
the old one's owner / group, as ``chown`` clears them: root rewriting another user's set-user-ID program does not
make it one that runs as root); a
new file gets ``open``'s (``0o666`` less the umask). Owner, group, ACLs and extended attributes are
those of the new file (the writing process's), as with any rename-based write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["write_atomic", "write_text_atomic", "write_json_atomic", "fsync_dir", "named_os_error", "TMP_SUFFIX",
           "is_tmp_name"]

#: Suffix of every temporary file written here (``.<name>.<hex>.tmp``).
TMP_SUFFIX = ".tmp"

#: The longest file name, in bytes, where the file system does not say (``NAME_MAX`` of Linux's ext4, XFS,
#: tmpfs, NFS; macOS's APFS); eCryptfs allows 143. A temporary file name is kept within the directory's.
_NAME_MAX = 255


def _name_max(directory: Path) -> int:
    """The longest file name in bytes in ``directory`` (``pathconf``), else :data:`_NAME_MAX`."""
    try:
        found = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such directory (the write names it), no pathconf
        return _NAME_MAX
    return found if isinstance(found, int) and 64 <= found <= _NAME_MAX else _NAME_MAX


def fsync_dir(path: Path) -> None:
    """Best-effort fsync of a directory, so a rename inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def named_os_error(exc: OSError, path: str | os.PathLike, instead_of: str | os.PathLike | None = None) -> OSError:
    """``exc`` itself if it names a file (other than ``instead_of``, a removed temporary file), else the
    same error (same errno, so the same ``OSError`` subclass) with ``filename`` set to ``path``: a write
    or fsync error (``ENOSPC``, ``EIO``) does not say which file it was writing."""
    unnamed = exc.filename is None or (instead_of is not None and exc.filename == os.fspath(instead_of))
    if not unnamed or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


def _write_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or the end of its symlink chain (a
    dangling link's missing target included); a symlink loop raises ``ELOOP`` naming ``path``."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:  # a dangling link: open(path, "w") creates its target
        target = Path(os.path.realpath(path))
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc
    if target.is_symlink():  # realpath gave up on a loop behind a missing component
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))
    return target


def _tmp_name(name: str, name_max: int = _NAME_MAX) -> str:
    """``.<name>.<hex>.tmp``, ``name`` cut (whole characters) so that it fits in ``name_max`` bytes:
    a target whose own name is within the limit but less than 38 bytes under it can be written (its
    full temporary name was refused, ``ENAMETOOLONG``, where ``open(path, "w")`` succeeds)."""
    tail = f".{uuid.uuid4().hex}{TMP_SUFFIX}"
    return f".{_cut(name, name_max - 1 - len(tail))}{tail}"


def _cut(name: str, room: int) -> str:
    """``name`` cut (whole characters) to at most ``room`` bytes."""
    name = name[:room]
    while len(os.fsencode(name)) > room:  # multi-byte characters (or undecodable bytes) take more room
        name = name[:-1]
    return name


#: ``.<name>.<32 hex>.tmp``: the names :func:`_tmp_name` gives
_TMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{32}" + re.escape(TMP_SUFFIX), re.DOTALL)


def is_tmp_name(name: str, target: str | os.PathLike) -> bool:
    """Whether ``name`` is one :func:`write_atomic` gives the temporary file of a write to the file ``target`` (in
    ``target``'s directory): ``.<target's name>.<32 hex digits>.tmp``, the name cut as :func:`_tmp_name` cuts it
    (to 255 bytes, or the directory's limit). A killed write leaves such a file; a caller cleaning up removes
    only these, not every ``.*.tmp`` of a directory it does not own (a symlinked record file's target folder)."""
    m = _TMP_NAME.fullmatch(name)
    if m is None:
        return False
    target = Path(target)
    tail = 1 + 32 + len(TMP_SUFFIX)
    return m.group(1) in {target.name, *(_cut(target.name, nm - 1 - tail) for nm in {_NAME_MAX, _name_max(target.parent)})}


def _old_stat(path: Path) -> os.stat_result | None:
    """The ``stat`` of the file at ``path``, or None when there is none."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _owner_may_write(st: os.stat_result) -> bool:
    """Whether this process owns the file of ``st`` and its mode lets the owner write it: ``open`` would (the
    common case, so no probe is needed; on Windows, without ``geteuid``, the probe always runs)."""
    geteuid = getattr(os, "geteuid", None)
    return geteuid is not None and st.st_uid == geteuid() and bool(st.st_mode & stat.S_IWUSR)


def _refuse_unwritable(target: Path, path: Path) -> None:
    """The ``PermissionError`` that ``open(path, "w")`` raises, naming ``path``, when the existing regular
    file ``target`` may not be opened for writing: a file made read-only (``chmod a-w``) to protect it was
    replaced by the rename without a word. Opened without truncation and closed. Any other error of the
    probe is left to the rename, which decides as it did before the probe: a file removed meanwhile
    (``ENOENT``) is created, a running program's file (``ETXTBSY``) or one under a lease (``EWOULDBLOCK``)
    is replaced."""
    try:
        fd = os.open(target, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0))  # no O_NONBLOCK on Windows
    except PermissionError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from None
    except OSError:
        return
    os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = True,
                 sync_dir: bool = True) -> Path:
    """Call ``write(fh)`` on a binary temporary file next to ``path``, then rename it onto ``path``.

    A symlink at ``path`` is written through (its target is replaced, the link kept) and an existing
    file's permission bits are kept, as ``open(path, "w")`` would (see the module docstring).
    ``fsync=False`` skips the fsyncs (the rename is still atomic, so readers never see a partial
    file; only durability across a power loss is traded for speed). ``sync_dir=False`` (with ``fsync``)
    fsyncs the file but not its directory: for a caller that writes several files into one directory
    and fsyncs it once after the last rename (``RunWriter.log_measurement``), before anything refers
    to them; until then the renames are not durable (a write through a symlink still fsyncs the target's
    directory, which is not the caller's). Returns ``path``.
    """
    path = Path(path)
    target = _write_target(path)
    old = _old_stat(path)  # the target's, links followed by the kernel: realpath cannot follow /dev/stdout's
    if old is not None and _is_special(old):  # (/proc/self/fd/1 -> "pipe:[N]"). A device or FIFO (/dev/null,
        if _write_in_place(path, write):  # /dev/stdout piped): replaced by the rename before
            return path
        old = _old_stat(path)  # replaced since the stat (a regular file, or none): the mode and probe are its
    mode = None if old is None else stat.S_IMODE(old.st_mode)
    if old is not None and stat.S_ISREG(old.st_mode) and not _owner_may_write(old):
        _refuse_unwritable(target, path)
    tmp = target.with_name(_tmp_name(target.name))
    created = False
    try:
        try:
            fh = open(tmp, "wb")  # noqa: SIM115 - entered below
        except OSError as exc:  # the directory's limit on names is below 255 bytes (eCryptfs): asked only then
            if exc.errno != errno.ENAMETOOLONG:  # (pathconf is a round trip to the server on NFS)
                raise
            tmp = target.with_name(_tmp_name(target.name, _name_max(target.parent)))
            fh = open(tmp, "wb")  # noqa: SIM115 - entered below
        with fh:
            created = True
            if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):  # only those of the same owner / group
                mode = _set_id_kept(mode, old, os.fstat(fh.fileno()))
            if mode is not None:  # before the content: a private file's was readable by all while written
                os.chmod(tmp, mode)  # (and in the temporary file a killed write left); the descriptor still writes
            write(fh)
            fh.flush()
            if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):  # a write by a process without CAP_FSETID
                os.chmod(tmp, mode)  # clears the set-user/group-ID bits: set again
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not created and exc.errno in (errno.EACCES, errno.EPERM):
            # the directory refused the temporary file, although the file itself may be writable: say so
            raise OSError(exc.errno, f"{exc.strerror or exc}: cannot create a file in {target.parent} (an atomic write "
                          "creates a temporary file there and renames it onto the file)", os.fspath(path)) from exc
        if isinstance(exc, OSError):  # name the target, not the removed temporary file
            named = named_os_error(exc, path, instead_of=tmp)
            if named is not exc:
                raise named from exc
        raise
    if fsync and (sync_dir or target != path):  # written through a symlink: the target's directory is not the
        fsync_dir(target.parent)  # one the caller fsyncs
    return path


def _is_special(st: os.stat_result) -> bool:
    """Whether the file of ``st`` (the write's target, symbolic links followed) is neither a regular file nor a
    directory: a character or block device, a FIFO, a socket. From the ``stat`` the write takes anyway (review
    30 added one of its own: 3 us of the 44 us an atomic write of a small file takes on tmpfs)."""
    return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))


def _write_in_place(path: Path, write: Callable[[IO[bytes]], None]) -> bool:
    """``write(fh)`` on ``path`` opened for writing as ``open(path, "wb")`` does, for a device or FIFO: a rename
    would replace it with a regular file (as root, ``/dev/null`` itself), and it holds no old content to keep.
    Opened without ``O_CREAT`` / ``O_TRUNC`` and checked with ``fstat``: ``False`` (nothing written) when what it
    opened is a regular file or there is none any more (replaced since the ``stat`` that :func:`_is_special` read; the
    caller writes it atomically; before, a regular file was truncated and written in place). An ``OSError``
    names ``path``; no fsync (a pipe refuses it)."""
    try:
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))  # waits for a FIFO's reader, as open()
        except FileNotFoundError:
            return False
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return False
            fh = open(fd, "wb")  # noqa: SIM115 - entered below; it closes fd
        except BaseException:
            os.close(fd)
            raise
        with fh:
            write(fh)
    except OSError as exc:
        named = named_os_error(exc, path)
        if named is not exc:
            raise named from exc
        raise
    return True


def _set_id_kept(mode: int, old: os.stat_result, new: os.stat_result) -> int:
    """``mode`` without the set-user-ID bit unless the new file has the old one's owner, and without the
    set-group-ID bit unless it has its group: the new file is the writer's (root's, writing another user's
    set-user-ID program: a program run as root), and ``chown`` clears these bits for the same reason."""
    if new.st_uid != old.st_uid:
        mode &= ~stat.S_ISUID
    if new.st_gid != old.st_gid:
        mode &= ~stat.S_ISGID
    return mode


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) atomically; see :func:`write_atomic`."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, fsync: bool = True, default=None) -> Path:
    """Write ``obj`` as indented JSON (plus a newline) atomically; see :func:`write_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n", fsync=fsync)
