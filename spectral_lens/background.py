"""Host work off the caller's thread: one lazily started worker thread and the futures it resolves.

``compute_async`` (see :mod:`spectral_lens.accumulate`) snapshots state on the caller's thread and
hands the float64 checks and eigen-solve to this module's single worker thread
(``ThreadPoolExecutor(max_workers=1)``, thread name ``spectral-lens_0``), so jobs run one at a time
in submission order and never add threads beyond that one.

Warnings a job raises must reach the user on the user's thread (the ``warnings`` filters and
``catch_warnings`` are process-global and not thread-safe, so a worker must not swap them). Jobs
therefore do not call :func:`warnings.warn`; they append ``(message, category)`` pairs to a list,
and :meth:`SolveFuture.result` re-emits them on the thread that calls it, attributed to that call.

At interpreter exit the worker is joined before ``atexit`` handlers run; a job submitted after that runs on
the submitting thread (``result()`` is then ready at once) instead of raising ``RuntimeError``, and so does a
job whose submit could not start the worker thread (it runs once: the copy left in the queue does nothing).
A job submitted at exit by another thread while the worker still runs the jobs queued before may run
alongside them (jobs are independent: only their order of completion differs).

Done-callbacks run on the worker thread, which resolves one job at a time: a callback that waits there for
an unfinished job (``result()`` / ``exception()``) raises ``RuntimeError`` instead of waiting for itself
forever, with or without a ``timeout`` (the job cannot end while it lasts) (``concurrent.futures.wait`` on
that thread cannot be refused: do not call it in a callback). In a
forked child, waiting for a future of the parent's that had not ended at the fork raises ``RuntimeError``
too: the child has no worker thread, and that future was never resolved there.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["SolveFuture", "emit", "submit"]

_THREAD_PREFIX = "spectral-lens"
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_SETTLED = ("FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")  # concurrent.futures' states of a future that has ended
_on_worker = threading.local()  # ``.active`` is True on the worker thread while it runs a job or its callbacks


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD_PREFIX)
        return _executor


def _forget_executor() -> None:
    # A forked child inherits the executor object but not its thread: submitting to it would never
    # run. Start afresh (lazily) in the child.
    global _executor, _lock
    _executor, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor)


def emit(notes: "list[tuple[str, type[Warning]]]", stacklevel: int = 1) -> None:
    """``warnings.warn`` each collected note; ``stacklevel`` counts from the caller of ``emit``."""
    for message, category in notes:
        warnings.warn(message, category, stacklevel=stacklevel + 1)


class SolveFuture(Future):
    """A :class:`concurrent.futures.Future` resolved by the spectral-lens worker thread.

    Behaves as a plain ``Future`` (``done``, ``cancel``, ``add_done_callback``, ``wait``,
    ``as_completed``), except that :meth:`result` first re-emits, on the calling thread, the warnings
    the job raised (for example :class:`~spectral_lens.NonFiniteRowsWarning`), every time it is
    called, just as the blocking call would have warned; then it returns the value or raises the
    job's exception. :meth:`exception` and done-callbacks do not emit them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._notes: list[tuple[str, type[Warning]]] = []
        self._pid = os.getpid()  # the process whose worker thread runs the job

    def result(self, timeout: float | None = None) -> Any:
        self._refuse_waiting_for_itself("result")
        try:
            return super().result(timeout)
        finally:
            if self.done() and not self.cancelled():
                emit(self._notes, stacklevel=2)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_waiting_for_itself("exception")
        return super().exception(timeout)

    def _refuse_waiting_for_itself(self, method: str) -> None:
        """A ``RuntimeError`` for a wait on the worker thread (in a done-callback: callbacks of a job run
        there) for a future that is not done: only that thread can resolve it, so the wait never ended
        (and every later ``compute_async`` of the process waited behind it)."""
        if self._pid != os.getpid() and self._state not in _SETTLED:  # read without the future's lock, which a
            raise RuntimeError(  # thread of the parent may have held at the fork
                f"SolveFuture.{method}() in process {os.getpid()} for a job submitted in process {self._pid} before it "
                "forked: the job runs on that process's worker thread only, and this copy of the future is never "
                "resolved; call compute_async() again in this process")
        if getattr(_on_worker, "active", False) and not self.done():
            raise RuntimeError(
                f"SolveFuture.{method}() called on spectral-lens's worker thread (in a done-callback) for a job "
                "that has not finished: the one worker runs jobs in order, so it would wait for itself forever; "
                "wait for it from another thread, or add a done-callback to it instead")


def submit(job: Callable[[list], Any]) -> SolveFuture:
    """Run ``job(notes)`` on the worker thread; return a :class:`SolveFuture` of its value.

    ``job`` appends warnings to ``notes`` instead of emitting them; exceptions (any
    ``BaseException``) surface from ``result()``.
    """
    future = SolveFuture()
    once = threading.Lock()

    def run() -> None:
        if not once.acquire(blocking=False):  # run already, here: the submit queued it, then could not start the
            return  # worker ("can't start new thread"); the queued copy logged "Future in unexpected state"
        if not future.set_running_or_notify_cancel():
            return
        notes: list[tuple[str, type[Warning]]] = []
        was = getattr(_on_worker, "active", False)  # True in a callback of a job run inline at exit (see below)
        _on_worker.active = True  # done-callbacks run below, on this thread (see SolveFuture.result)
        try:
            try:
                value = job(notes)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future._notes = notes
                future.set_exception(exc)
            else:
                future._notes = notes
                future.set_result(value)
        finally:
            _on_worker.active = was

    try:
        _get_executor().submit(run)
    except RuntimeError:  # the interpreter is exiting (an atexit handler runs after the worker was joined), or no
        run()  # thread could be started: the job runs here, on the caller's thread, instead of raising
    return future
