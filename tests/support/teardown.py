"""torch 2.13's gloo teardown abort, for the tests whose ranks' exit status counts.

On this CPU build of torch 2.13 a process that used a gloo process group sometimes dies at interpreter exit with
SIGABRT and :data:`TEARDOWN_ABORT` on stderr (libstdc++: a ``std::thread`` destroyed while joinable; gloo's
``pt_gloo_runloop``/``gloo_tcp_loop`` threads are still alive after ``destroy_process_group()``), after all the rank's
work is done. Reproduced without spectral-lens (2026-11-28, this machine): a plain gloo script of 2 ranks under
``torchrun`` (a few all_reduces, with or without DDP, ``destroy_process_group``, exit) aborted a rank in 32 of 237 runs,
and in 0 of 184 when its ranks ended with ``os._exit`` after ``destroy_process_group()``.

- Ranks that run the tests' own code end with :func:`end_rank` (``os._exit(0)`` once their work is done).
- A run of code the tests do not end themselves (a user script under torchrun) is accepted with :func:`torn_down`
  only when that abort is its one failure, and the caller then checks every rank's final report line.

``support.ranks.run_ranks`` needs neither: it reads the ranks' results from files and ignores their exit status
(other than :data:`support.ranks.PORT_TAKEN_EXIT`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NoReturn

#: what libstdc++ prints when a ``std::thread`` is destroyed while joinable
TEARDOWN_ABORT = "terminate called without an active exception"


def end_rank() -> NoReturn:
    """End a rank's process whose work is done (results written, reports printed): destroy the default process
    group if one is left, flush stdout and stderr, and ``os._exit(0)``, which skips the interpreter teardown where
    the abort happens (and ``atexit`` handlers: Lightning's destroys the group, done here first). Call it only on
    the success path: a rank that raised must still end non-zero with its traceback."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torn_down(proc: subprocess.CompletedProcess) -> bool:
    """Whether a failed ``torchrun`` (its output captured as text) failed only because rank(s) aborted in the C++
    teardown at their exit: :data:`TEARDOWN_ABORT` in its stderr, and every exit code torchrun's error summary
    reports is -6 (SIGABRT) or -15 (SIGTERM: torchrun stops the other ranks once one failed). A rank that failed
    otherwise (an exception: exit code 1) makes it ``False``. The caller must then check every rank's final
    report line (written at the script's end), so a rank that aborted or was stopped earlier still fails."""
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    return TEARDOWN_ABORT in proc.stderr and "-6" in codes and set(codes) <= {"-6", "-15"}
