"""Exclusive advisory locks (``flock``) on a lock file: one holder at a time, any process.

The kernel releases a lock when its holder's process exits or is killed, so a crash never leaves a
stale lock behind (which is why a lock file is preferable to a pid file). A lock is held on an open
file description, which a forked child shares: only the process that took it releases it (and a child
that outlives a killed holder keeps the lock held until it exits).

On NFS, Linux emulates ``flock`` with POSIX byte-range locks (the descriptor is opened read-write, which
they need), so the lock holds between machines; a mount with ``nolock`` or ``local_lock=flock`` keeps
locks local to one machine. Deleting the lock file while it is held lets a second holder lock a new file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .atomic import named_os_error

try:  # POSIX; elsewhere (Windows) nothing is locked
    import fcntl
except ImportError:  # pragma: no cover - depends on the platform
    fcntl = None

__all__ = ["SUPPORTED", "acquire", "release"]

#: Whether this platform has ``flock`` (a file system may still refuse it: :func:`acquire` returns ``None``).
SUPPORTED = fcntl is not None

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def acquire(lock_file: Path) -> int | None:
    """An exclusive, non-blocking ``flock`` on ``lock_file`` (created if needed); returns its descriptor,
    or ``None`` where the platform or the file system has no locks. Raises ``BlockingIOError`` when
    another holder (another process, or another descriptor in this one) has it, and an ``OSError``
    naming the file when it cannot be opened."""
    if fcntl is None:  # pragma: no cover - depends on the platform
        return None
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise named_os_error(exc, lock_file) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            return None
        raise named_os_error(exc, lock_file) from exc
    return fd


def release(fd: int, owner_pid: int) -> None:
    """Release the lock on ``fd`` and close it. Only the process ``owner_pid`` that took it unlocks: a
    forked child (a ``DataLoader`` worker) closing its inherited copy just closes the descriptor,
    and the lock stays with its owner."""
    try:
        if os.getpid() == owner_pid:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
