"""Review 26 (revzoofix): the torchrun ending of ``python -m examples.nanogpt train`` (merge add988d: a barrier,
then ``destroy_process_group``, then ``os._exit``) when a rank fails at the end of the run. Rank 0 alone writes
the final checkpoint; here that write fails (a stand-in ``OSError``, a full disk) after the last collective, while
rank 1 has finished and waits for it at the end barrier. Every rank must end non-zero within a bounded time (no
rank waits at the barrier for the process-group timeout), rank 0 with its one-line error, and the run's
``metrics.jsonl`` must be complete although the ranks end by ``os._exit`` (no ``atexit`` flush).

Checked with the ranks started by torchrun, and as two plain processes (no launcher to stop the survivor: a
launch by hand or by a scheduler that does not kill the other tasks)."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["train", "--variant", "RoPE", "--profile", "tiny", "--steps", "2", "--batch-tier", "2", "--seq-len", "64",
         "--rows", "1", "--val-tokens", "128", "--device", "cpu", "--quiet"]
RANK = textwrap.dedent(f'''
    import os, runpy, sys
    sys.path.insert(0, {str(ROOT)!r})
    import examples.nanogpt.train as T
    real = T._save_checkpoint
    def save(path, *a, **k):  # rank 0's final checkpoint cannot be written
        raise OSError(28, "No space left on device (stand-in)", str(path))
    T._save_checkpoint = save
    runpy.run_module("examples.nanogpt", run_name="__main__", alter_sys=True)
''')
DEADLINE_S = 300  # far below gloo's 30-minute default timeout, far above a 2-step run (~20 s on the 2-core machine)


def _check(tmp_path: Path, statuses: list[int], stderr: str, took: float) -> None:
    assert took < DEADLINE_S
    assert all(s != 0 for s in statuses), (statuses, stderr[-3000:])
    assert "python -m examples.nanogpt train: error: [Errno 28] No space left on device (stand-in)" in stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["val_loss"] is not None  # written in full before os._exit


@pytest.mark.slow  # two ranks importing torch and training 2 steps: 20-60 s on the 2-core machine
@pytest.mark.distributed
def test_a_rank_failing_at_the_end_fails_the_torchrun_job_without_a_hang(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "rank.py"), *TRAIN, "--run-dir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    _check(tmp_path, [proc.returncode], proc.stderr, time.monotonic() - t0)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_failing_at_the_end_ends_every_plain_rank_non_zero(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    for attempt in range(3):  # a port taken between free_port() and rank 0's bind: launch again on a new one
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), *TRAIN, "--run-dir", str(tmp_path / "run")],
                                  cwd=tmp_path, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        try:
            outs = [p.communicate(timeout=DEADLINE_S) for p in procs]
        finally:
            for p in procs:
                p.kill()
        stderr = "\n".join(err for _, err in outs)
        if "address already in use" not in stderr.lower():
            break
    _check(tmp_path, [p.returncode for p in procs], stderr, time.monotonic() - t0)
    assert procs[0].returncode == 2  # the one-line error's status, through os._exit
    assert "Traceback" in outs[1][1]  # rank 1: the failed barrier's traceback (gloo: connection reset)
