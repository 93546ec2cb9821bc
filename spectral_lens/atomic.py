"""Atomic file writes: a temporary file in the target's directory, fsync, rename.

Every file the library writes goes through :func:`write_atomic`; the examples (checkpoints, tuner
choices, reports) use it too.

A write that fails for any reason (disk full, file-size limit, an exception in the serializer, a
crash) leaves the previous file at ``path`` untouched and removes its temporary file; an ``OSError``
of the write, the fsync or the rename (``ENOSPC``, ``EIO``, ``path`` a directory, ...) is raised with
``filename`` set to ``path`` (a killed
process can leave a ``.*.tmp`` file behind; :class:`~spectral_lens.records.RunWriter` cleans those on
resume).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["write_atomic", "write_text_atomic", "write_json_atomic", "fsync_dir", "named_os_error", "TMP_SUFFIX"]

#: Suffix of every temporary file written here (``.<name>.<hex>.tmp``).
TMP_SUFFIX = ".tmp"


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


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = True) -> Path:
    """Call ``write(fh)`` on a binary temporary file next to ``path``, then rename it onto ``path``.

    ``fsync=False`` skips the fsyncs (the rename is still atomic, so readers never see a partial
    file; only durability across a power loss is traded for speed). Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):  # name the target, not the removed temporary file
            named = named_os_error(exc, path, instead_of=tmp)
            if named is not exc:
                raise named from exc
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) atomically; see :func:`write_atomic`."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda fh: fh.write(data), fsync=fsync)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, fsync: bool = True, default=None) -> Path:
    """Write ``obj`` as indented JSON (plus a newline) atomically; see :func:`write_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n", fsync=fsync)
