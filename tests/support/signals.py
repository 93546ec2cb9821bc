"""Signal a command-line process at a chosen moment (the interrupt tests of the tuner and the jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], signum: int, *, group: bool = False,
                within: float = 120.0) -> tuple[int, str]:
    """Send ``signum`` to ``proc`` (its whole process group with ``group``: what Ctrl-C does) once ``ready()`` holds,
    polled every 50 ms; fail if ``proc`` ends first or ``within`` seconds pass. Then wait for it (60 s) and return
    ``(returncode, stderr)``. ``proc`` must be started with ``start_new_session=True`` and text pipes: its process
    group is killed if anything here fails, so no test leaves it running."""
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err
