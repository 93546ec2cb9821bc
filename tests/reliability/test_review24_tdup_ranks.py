"""``support.ranks.run_ranks`` (review 24):

* ``free_port()`` releases the port before rank 0 binds it, so another process can take it first: rank 0's bind
  failed ("address already in use") and the test failed with no result from any rank (rank 1 waiting for a store
  that was not there until its timeout); the whole launch is now made once more, on a new port;
* pytest interrupted inside ``run_ranks`` (Ctrl-C, a timeout's SIGINT) left the ranks running until their own
  timeouts, and the interpreter's exit joined them (pytest hung as long); killed by a signal (SIGTERM, SIGKILL), it
  left them orphaned. The ranks are now killed in a ``finally``, and (Linux) when the parent dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import ranks


def _bind_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 binds and listens on ``port`` as torch's TCPStore does for ``MASTER_PORT``; each rank then notes the
    port it ran on."""
    if rank == 0:
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
    Path(out, f"rank{rank}.port{port}").write_text("")


@pytest.fixture
def taken(monkeypatch):
    """A port another process listens on, handed out first by ``free_port``; the ports handed out, in order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        real, given = ranks.free_port, []

        def free_port():
            given.append(port if not given else real())
            return given[-1]

        monkeypatch.setattr(ranks, "free_port", free_port)
        yield port, given


def test_a_port_taken_before_rank_0_binds_it_relaunches_the_ranks_on_a_new_one(tmp_path, taken):
    port, given = taken
    assert ranks.run_ranks(_bind_worker, 2, tmp_path, 60.0) == []
    assert len(given) == 2 and given[1] != port  # before: one launch, rank 0 failing on the taken port
    assert sorted(p.name for p in tmp_path.glob(f"rank*.port{given[1]}")) == [f"rank0.port{given[1]}",
                                                                               f"rank1.port{given[1]}"]
    assert not (tmp_path / f"rank0.port{port}").exists()


def test_a_port_taken_twice_is_an_error_naming_it(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(ranks, "free_port", lambda: s.getsockname()[1])
        with pytest.raises(RuntimeError, match=r"MASTER_PORT was taken by another process twice"):
            ranks.run_ranks(_bind_worker, 2, tmp_path, 60.0)



def _gloo_worker(rank: int, port: int, out: str) -> None:
    """A gloo group on ``port`` (torch's TCPStore binds it on rank 0), a barrier, then the port noted."""
    import torch.distributed as dist

    with ranks.gloo_group(rank, port, 2, 30.0):
        dist.barrier()
    Path(out, f"rank{rank}.port{port}").write_text("")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_taken_master_port_relaunches_a_gloo_group(tmp_path, taken):
    """The same with torch's own bind: its ``DistNetworkError`` (EADDRINUSE) is recognised."""
    _, given = taken
    assert ranks.run_ranks(_gloo_worker, 2, tmp_path, 120.0) == []
    assert len(given) == 2
    assert sorted(p.name for p in tmp_path.glob("rank*")) == [f"rank0.port{given[1]}", f"rank1.port{given[1]}"]

PARENT = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from support.ranks import run_ranks

    # Ctrl-C raises KeyboardInterrupt, as in a pytest run from a terminal (a shell's background job, and so this
    # process, may inherit SIGINT ignored, which Python then leaves ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def sleeper(rank, port, out):
        Path(out, f"pid{rank}.tmp").write_text(str(os.getpid()))
        os.replace(Path(out, f"pid{rank}.tmp"), Path(out, f"pid{rank}"))
        time.sleep(60)

    if __name__ == "__main__":
        run_ranks(sleeper, 2, Path(sys.argv[1]), 300.0)
''')


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that its new parent has not reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ranks_end_when_their_parent_is_interrupted_or_killed(tmp_path, sig):
    """A parent in ``run_ranks`` (ranks sleeping 60 s, join deadline 300 s) gets ``sig`` alone: it ends within 20 s
    and so do its ranks (before: SIGINT left the parent joining them at exit, SIGTERM left them orphaned)."""
    (tmp_path / "parent.py").write_text(PARENT)
    tests = str(Path(__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path), tests],
                              stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and parent.poll() is None:
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid[0-9]"))]
            time.sleep(0.05)
        assert len(pids) == 2, f"the ranks did not start (parent exit status {parent.poll()})"
        parent.send_signal(sig)
        parent.wait(timeout=20)
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_alive(p) for p in pids] == [False, False]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
