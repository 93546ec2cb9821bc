"""Optuna storages from one URL string.

- ``None``: in-memory (one process; nothing survives it).
- ``journal:/path/to/tune.log`` (or a path ending in ``.log``/``.journal``): ``JournalStorage`` on a
  ``JournalFileBackend``, for several processes on one machine (or on a shared file system that
  supports the lock file). Resumable. A last line left half-written by a process killed (or out of
  disk space) mid-append is dropped before the next append, under the journal's lock; a malformed
  line elsewhere is refused, naming its line number. Ctrl-C (or a SIGTERM handler) waits for an
  append of the main thread to end, so it never leaves the lock file behind.
- ``sqlite:///path.db``: ``RDBStorage`` over SQLite; single worker only (SQLite locks the whole file
  and Optuna warns against concurrent writers). Resumable.
- ``postgresql://user:pass@host/db`` (or ``mysql://...``): ``RDBStorage``, passed through, for
  several machines.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

__all__ = ["open_storage", "is_single_worker"]

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def _optuna():
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("examples.tune needs Optuna: pip install 'spectral-lens[tune]'") from e
    return optuna


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""


def is_single_worker(url: str | None) -> bool:
    """Whether only one worker process may use this storage (in-memory and SQLite)."""
    return url is None or _scheme(url) == "sqlite"


_SQLITE_HEADER = b"SQLite format 3\x00"


def _refuse_foreign_sqlite_file(url: str) -> None:
    """A ``sqlite:`` URL naming an existing, non-empty file that is not an SQLite database raises
    ``ValueError``: SQLite takes a file shorter than its header for an empty database and rewrites
    it, so a mistyped path to one of the user's small files would be lost."""
    from sqlalchemy.engine import make_url

    try:
        database = make_url(url).database
    except Exception as e:
        raise ValueError(f"storage {url!r} cannot be opened: {type(e).__name__}: {e}") from e
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if path.is_dir():
        raise ValueError(f"storage {url!r}: {str(path)!r} is a directory, expected an SQLite database file")
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
        if header != _SQLITE_HEADER:
            raise ValueError(f"storage {url!r}: {str(path)!r} exists and is not an SQLite database "
                             "(it would be overwritten); name a new file or an existing study database")


def _journal_backend(path: Path):
    """Optuna's ``JournalFileBackend`` on ``path``, whose appends first drop a half-written last line.

    Optuna skips a last line without its newline when reading, but appends after it: the next
    operation would be glued onto the torn one, a line that is not JSON, and every later read of
    the journal raises (the study is lost). Appends here cut the file back to its last newline under
    the journal's lock, so the torn operation (never applied by any reader) costs that line only."""
    return _backend_class()(str(path))


_BACKEND = None


def _backend_class():
    """The backend class, made on first use (Optuna is an optional extra) under a module-level name,
    so that a storage still pickles (``pickle`` finds the class through the module's ``__getattr__``)."""
    global _BACKEND
    if _BACKEND is None:
        from optuna.storages.journal import JournalFileBackend

        class TornTailJournalBackend(JournalFileBackend):
            def append_logs(self, logs) -> None:
                with _signals_deferred():
                    self._append_logs(logs)

            def _append_logs(self, logs) -> None:
                data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
                self._lock.acquire()
                try:
                    with open(self._file_path, "r+b") as f:
                        end = f.seek(0, os.SEEK_END)
                        if end:
                            f.seek(end - 1)
                            if f.read(1) != b"\n":
                                _drop_torn_tail(f, end)
                        f.seek(0, os.SEEK_END)
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    self._lock.release()

        TornTailJournalBackend.__module__, TornTailJournalBackend.__qualname__ = __name__, "TornTailJournalBackend"
        _BACKEND = TornTailJournalBackend
    return _BACKEND


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _handle(signum: int, frame, handler) -> None:
    """What ``signum`` would have done under ``handler``: call it, or take the default action
    (SIGINT's too, when set to SIG_DFL: it ends the process), or nothing for SIG_IGN."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, handler)     # no longer deferred: the default action ends the process
        os.kill(os.getpid(), signum)


class _Deferral:
    """The handler :func:`_signals_deferred` installs: while ``active`` it notes each signal in
    ``pending``; after, it hands it to the handler it replaced (``saved``). So a signal arriving while
    the handlers are put back, or a deferral left installed because a signal's handler raised
    between two of those swaps, is handled as it would have been, never dropped."""

    def __init__(self) -> None:
        self.active = True
        self.saved: dict[int, object] = {}
        self.pending: list[tuple[int, object]] = []

    def __call__(self, signum: int, frame) -> None:
        if self.active:
            self.pending.append((signum, frame))
        else:
            _handle(signum, frame, self.saved[signum])


@contextlib.contextmanager
def _signals_deferred():
    """Run the block with SIGINT's and SIGTERM's Python handlers held off; a signal arriving meanwhile is
    handled (the saved handler called, or its default action taken) once it ends; each pending one is
    handled even when an earlier one raised (the first exception is raised after).

    Optuna's journal lock is not safe to interrupt: a ``KeyboardInterrupt`` between taking the lock and
    its release leaves the lock file behind (every process then waits 30 s to break it), and one inside
    the release turns into a ``FileNotFoundError`` (seen: the command line's Ctrl-C ended in 'error:
    [Errno 2] ... .rename', status 2, instead of 130). Python runs signal handlers in the main thread
    only, so other threads' appends (the heartbeat's) need nothing. The cost: Ctrl-C waits for the
    append (milliseconds; up to Optuna's 30 s while a lock left by a killed process is broken).

    Putting the handlers back is two swaps, and a signal can arrive between them (its handler may raise
    there): the pending signals are handled first, then the deferral hands later ones on by itself
    (:class:`_Deferral`), and then the handlers are swapped back, each swap retried if a handler raised
    in it. The old restore, a plain loop, was cut short by a Ctrl-C after SIGINT's swap: SIGTERM stayed
    with the deferral, which noted it for nobody (dropped from then on), and the pending ones were lost.
    (Blocking the signals with ``pthread_sigmask`` would not do: it is per thread, and the heartbeat
    thread would take the signal and have the main thread run its handler anyway.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deferral = _Deferral()
    try:
        for signum in _DEFERRED:
            handler = signal.getsignal(signum)
            if isinstance(handler, _Deferral) and not handler.active:
                handler = handler.saved[signum]   # one left installed by a swap cut short: the handler it stood for
            if handler is not None:   # None: a handler not set from Python (left alone)
                deferral.saved[signum] = handler
                signal.signal(signum, deferral)
        yield
    finally:
        raised = None
        done = 0
        while True:   # every pending one, in arrival order (a KeyboardInterrupt must not drop a SIGTERM after it)
            while done < len(deferral.pending):
                signum, frame = deferral.pending[done]
                done += 1
                try:
                    _handle(signum, frame, deferral.saved[signum])
                except BaseException as e:   # noqa: BLE001 - raised once all were handled
                    raised = raised or e
            if not deferral.active:
                break
            deferral.active = False   # from here on the deferral hands a signal on; one more pass for any noted just now
        for signum, handler in deferral.saved.items():
            while signal.getsignal(signum) is deferral:
                try:
                    signal.signal(signum, handler)
                except BaseException as e:   # noqa: BLE001 - a signal's handler ran in the swap and raised
                    raised = raised or e
        if raised is not None:
            raise raised


def __getattr__(name):
    if name == "TornTailJournalBackend":
        return _backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _drop_torn_tail(f, end: int) -> None:
    """Truncate the open journal ``f`` (``end`` bytes) after its last newline."""
    block, pos = 1 << 16, end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            f.truncate(start + i + 1)
            return
        pos = start
    f.truncate(0)


def _first_malformed_line(path: Path) -> str | None:
    """``"line N (first bytes)"`` for the first complete line of the journal that is not JSON, else None."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return None  # a half-written last line: dropped before the next append
            try:
                json.loads(line)
            except ValueError:
                return f"line {n} ({line[:60]!r})"
    return None


def open_storage(url: str | None):
    """The Optuna storage for ``url`` (see the module docstring); a clear ``ValueError`` if it cannot be opened."""
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(url, str) or not url:
        raise ValueError(f"storage URL must be a non-empty string or None, got {url!r}")
    scheme = _scheme(url)
    if scheme == "journal" or (not scheme and url.endswith((".log", ".journal"))):
        path = Path(url[len("journal:"):] if scheme == "journal" else url).expanduser()
        if not str(path) or path.is_dir():
            raise ValueError(f"storage {url!r}: journal path {str(path)!r} must name a file")
        if not path.parent.is_dir():
            raise ValueError(f"storage {url!r} cannot be opened: directory {str(path.parent)!r} does not exist")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ValueError(f"storage {url!r} cannot be opened: {str(path)!r} is not writable")
        # Optuna raises only once a line follows the bad one (mid-run, as a bare JSONDecodeError): say it here
        bad = _first_malformed_line(path) if path.is_file() else None
        if bad is not None:
            raise ValueError(f"storage {url!r} cannot be opened: {bad} of {str(path)!r} is not a JSON operation "
                             "(the journal is damaged; Optuna cannot replay past it)")
        try:
            return optuna.storages.JournalStorage(_journal_backend(path))
        except Exception as e:
            raise ValueError(f"storage {url!r} cannot be opened: {type(e).__name__}: {e}") from e
    if scheme == "sqlite":
        _refuse_foreign_sqlite_file(url)
    if scheme in _RDB_SCHEMES:
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError as e:
            raise ValueError(f"storage {url!r} cannot be opened: missing database driver ({e})") from e
        except Exception as e:
            raise ValueError(f"storage {url!r} cannot be opened: {type(e).__name__}: {e}") from e
    raise ValueError(f"storage {url!r}: unknown scheme {scheme or '(none)'!r}; expected None (in-memory), "
                     "'journal:/path/file.log', 'sqlite:///file.db' (one worker) or an RDB URL such as "
                     "'postgresql://user:pass@host/db'")
