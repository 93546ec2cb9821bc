"""Mutation audit of ``spectral_lens.background``: a cancelled job's body never runs, and a running job
cannot be cancelled (its future delivers the value), as for any ``concurrent.futures.Future``."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from spectral_lens.background import submit


def test_a_cancelled_job_never_runs_and_a_running_one_cannot_be_cancelled():
    started, release, ran = threading.Event(), threading.Event(), []

    def blocker(notes):
        started.set()
        assert release.wait(30)
        return "blocker"

    running = submit(blocker)
    assert started.wait(30)
    queued = submit(lambda notes: ran.append("queued") or "queued")
    assert running.running() and not running.cancel()  # already running: not cancellable
    assert queued.cancel()
    release.set()
    assert running.result(timeout=30) == "blocker"
    assert submit(lambda notes: "after").result(timeout=30) == "after"  # the worker went past the cancelled job
    assert ran == [] and queued.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=0)
