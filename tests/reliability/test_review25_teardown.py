"""Review 25: multi-process tests immune to torch 2.13's gloo teardown abort (``tests/support/teardown.py``).

A rank that used a gloo group sometimes dies at interpreter exit with SIGABRT ("terminate called without an active
exception"), after its work is done; a test that checks the ranks' exit status then failed at random. The abort
cannot be forced (a race in gloo's threads), so it is stood in for by ``os.abort()`` at the rank's exit (an
``atexit`` handler: run by the interpreter teardown where the real abort happens, skipped by ``os._exit`` as the
real one is). :func:`support.teardown.end_rank` must end such a rank with status 0 and leave a failing rank's
status and traceback alone; :func:`support.teardown.torn_down` must accept a torchrun run that failed only by that
abort and nothing else."""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from support.ranks import free_port
from support.teardown import TEARDOWN_ABORT, torn_down

ROOT = Path(__file__).resolve().parents[2]


def _abort_at_exit() -> None:
    """The stand-in for the teardown abort: at this process's interpreter exit, libstdc++'s message and SIGABRT."""
    def abort() -> None:
        sys.stderr.write(TEARDOWN_ABORT + "\n")
        sys.stderr.flush()
        os.abort()
    atexit.register(abort)


# ------------------------------------------------------------------------------------- torn_down (torchrun's stderr)
def _summary(*codes: int, message: bool = True) -> subprocess.CompletedProcess:
    """A failed torchrun's captured output in its format (torch 2.13): a failed line per rank, the root cause."""
    lines = [TEARDOWN_ABORT] if message else []
    lines += [f"E1128 api.py:1002] failed (exitcode: {c}) local_rank: {r} (pid: 1{r}) of binary: python"
              for r, c in enumerate(codes) if c]
    lines += ["Root Cause (first observed failure):", "[0]:", f"  exitcode  : {next(c for c in codes if c)} (pid: 10)"]
    return subprocess.CompletedProcess([], 1, stdout="", stderr="\n".join(lines))


@pytest.mark.parametrize("codes, message, accepted", [
    ((0, -6), True, True),        # one rank aborted at exit
    ((-6, -6), True, True),       # both
    ((-15, -6), True, True),      # torchrun stopped the other rank (SIGTERM) once one aborted
    ((0, 1), True, False),        # a rank raised (another one's abort printed the message)
    ((1, -6), True, False),
    ((0, -6), False, False),      # SIGABRT without the teardown's message (an abort elsewhere)
    ((0, -15), True, False),      # no abort among the failures
    ((0, -11), True, False),      # a segfault
])
def test_torn_down_accepts_only_the_teardown_abort(codes, message, accepted):
    assert torn_down(_summary(*codes, message=message)) is accepted


# ------------------------------------------------------------------------------------- end_rank (a rank's own code)
RANK = textwrap.dedent('''
    import atexit, datetime, os, sys
    sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
    import torch, torch.distributed as dist
    from reliability.test_review25_teardown import _abort_at_exit
    from support.ranks import free_port
    from support.teardown import end_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    dist.all_reduce(torch.ones(3))
    _abort_at_exit()
    if sys.argv[2] == "raise":
        raise RuntimeError("the rank's real error")
    sys.stdout.write("DONE")  # unflushed: end_rank flushes
    if sys.argv[2] == "end_rank":
        end_rank()
    dist.destroy_process_group()  # "return": the rank's end before
''')


@pytest.mark.slow
def test_end_rank_exits_0_past_a_teardown_abort_and_a_failing_rank_still_fails():
    """One process group of one gloo rank (a real group: the threads the abort comes from exist); at its exit the
    stand-in abort. Ending by returning, the rank dies with SIGABRT (what the tests saw); by ``end_rank`` it exits 0
    with its output flushed; a rank that raises still fails (non-zero) with its traceback. (Slow: three processes
    importing torch, 10 s on the loaded 2-core machine.)"""
    env = {**os.environ, "PYTHONUNBUFFERED": ""}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(ROOT), how], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for how in ("return", "end_rank", "raise")]
    try:
        done = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=120)) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for d, p in zip(done, procs):
        d.returncode = p.returncode
    returned, ended, raised = done
    assert returned.returncode == -6 and TEARDOWN_ABORT in returned.stderr, returned.stderr[-2000:]
    assert (ended.returncode, ended.stdout, ended.stderr) == (0, "DONE", ""), ended.stderr[-2000:]
    assert raised.returncode != 0 and "RuntimeError: the rank's real error" in raised.stderr, raised.stderr[-2000:]


# ------------------------------------------------------------------------------- torn_down on real torchrun failures
FAKE_RANK = textwrap.dedent('''
    import os, sys
    rank, how = int(os.environ["RANK"]), sys.argv[1]
    if how == "raise" and rank == 1:
        raise RuntimeError("the rank's real error")
    sys.stdout.write(f"DONE rank={rank}\\n")  # the rank's final report line
    sys.stdout.flush()
    if rank == 1 or how == "abort-both":
        sys.stderr.write("TEARDOWN_ABORT\\n")
        sys.stderr.flush()
        os.abort()
''').replace("TEARDOWN_ABORT", TEARDOWN_ABORT)


@pytest.mark.slow
@pytest.mark.parametrize("how, accepted", [("abort", True), ("abort-both", True), ("raise", False)])
def test_torn_down_under_torchrun(tmp_path, how, accepted):
    """Ranks that print their report line and then abort as the teardown does are accepted; a rank that raises is
    not, though the other rank aborted in the teardown (torchrun: a few seconds a run)."""
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "rank.py", how],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and torn_down(proc) is accepted, proc.stderr[-3000:]
    if accepted:
        assert sorted(proc.stdout.split()) == ["DONE", "DONE", "rank=0", "rank=1"], proc.stdout


# ---------------------------------------------------------------------- tests/core/test_lens.py's spawned ranks
def _lens_worker_aborting_at_exit(rank: int, *args) -> None:
    """``tests/core/test_lens.py``'s rank, with the stand-in abort at its exit."""
    from core.test_lens import _worker

    _abort_at_exit()
    _worker(rank, *args)


@pytest.mark.slow
@pytest.mark.distributed
def test_lens_two_ranks_pass_despite_a_teardown_abort(tmp_path):
    """``mp.spawn``'s join raised ``ProcessExitedException`` (signal SIGABRT) when a rank aborted at exit; its ranks
    now end with ``end_rank``, so the abort at exit is never reached and the results are complete."""
    out = str(tmp_path / "m")
    mp.spawn(_lens_worker_aborting_at_exit, args=(2, free_port(), out), nprocs=2, join=True)
    for kind in ("act", "grad"):  # rank 1's spectra (their values: tests/core/test_lens.py)
        values = np.load(f"{out}.{kind}.npy")
        assert values.size > 0 and np.isfinite(values).all() and values[0] > 0, (kind, values)


# ------------------------------------------------------ the Lightning refusal test's rank 1 (Lightning's observer)
SITE = '''
import os, time
if os.environ.get("LOCAL_RANK") == "1":  # Lightning's re-run of the script for rank 1: the abort at its exit
    import atexit, sys

    def abort():
        sys.stderr.write("TEARDOWN_ABORT\\n")
        sys.stderr.flush()
        os.abort()
    atexit.register(abort)
elif "LOCAL_RANK" not in os.environ:  # rank 0: its refusal held back past the observer's 5 s poll
    from spectral_lens.integrations import _lightning_hooks

    def _slow(on_fit_start):
        def on_fit_start_later(self, trainer, pl_module):
            time.sleep(12)
            return on_fit_start(self, trainer, pl_module)
        return on_fit_start_later

    _lightning_hooks.LightningHooks.on_fit_start = _slow(_lightning_hooks.LightningHooks.on_fit_start)
'''.replace("TEARDOWN_ABORT", TEARDOWN_ABORT)


ABORT_AT_EXIT = f"""
import atexit, os, sys

def abort():
    sys.stderr.write({TEARDOWN_ABORT!r} + "\\n")
    sys.stderr.flush()
    os.abort()
atexit.register(abort)  # registered first: run last, after Lightning's own atexit destroy_process_group
"""


@pytest.mark.slow
def test_lightning_ddp_run_exits_0_despite_a_teardown_abort_on_both_ranks(tmp_path):
    """``tests/integrations/test_review22_lightuser_ddp.py``'s script trained to its end (160 steps, no failure,
    no resume), the stand-in abort at both ranks' exit: rank 0 (the script the test runs) used to end with SIGABRT
    and fail the test's ``returncode == 0``; both ranks now end by ``os._exit(0)`` after their report line."""
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from integrations.test_review22_lightuser_ddp import SCRIPT
    from support.lightning_user import run_script

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(ABORT_AT_EXIT)
    done = run_script(tmp_path, SCRIPT, str(tmp_path / "out"), "train", timeout=400,
                      pythonpath=(str(tmp_path / "site"),))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    histories = sorted(re.findall(r"HISTORY rank=\d+ \[[^\]]*\]", done.stdout))
    assert histories == ["HISTORY rank=0 [40, 80, 120, 160]", "HISTORY rank=1 [40, 80, 120, 160]"], done.stdout


@pytest.mark.slow
def test_lightning_refusal_survives_rank_1_aborting_at_exit(tmp_path):
    """Rank 1 refuses and ends; when it died with SIGABRT at exit instead of status 0, Lightning's child-process
    observer in rank 0 killed rank 0 (SIGKILL) before rank 0 printed its own refusal, and the test failed. Rank 1
    now ends by ``os._exit(0)``: both refusals are seen."""
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from integrations.test_review22_revlightuser_ddp import check_refused, run_script

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    check_refused(*run_script(tmp_path, pythonpath=(str(tmp_path / "site"),)))
