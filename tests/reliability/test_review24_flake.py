"""``support.ranks`` under a relaunch and a kill (review 24, flake hunt):

* a launch that found its MASTER_PORT taken left the files its ranks had written in ``out``; when the relaunch's
  rank then wrote none (hung, died), :func:`case_results` read the first launch's file as its result;
* ``write_case`` wrote in place: a rank stopped while writing (killed at the join deadline or by a relaunch; here:
  a file-size limit, deterministic) left a truncated file, and :func:`case_results` raised ``JSONDecodeError``
  instead of reporting the rank's result missing.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

import pytest
from support import ranks


@contextlib.contextmanager
def _first_port_taken(monkeypatch):
    """``run_ranks``'s first launch gets a port this test listens on (taken), later ones a free port:
    yields the taken port and the list of ports handed out."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        given = []
        real = ranks.free_port
        monkeypatch.setattr(ranks, "free_port", lambda: given.append(port if not given else real()) or given[-1])
        yield port, given


def _stale_worker(rank: int, port: int, out: str) -> None:
    """First launch (on the taken port, named in ``out``/taken): rank 1 writes its result, then rank 0 fails to bind.
    Relaunch: rank 0 writes its result, rank 1 hangs past the join deadline."""
    taken = int(Path(out, "taken").read_text())
    if rank == 1:
        if port == taken:
            ranks.write_case(out, "case", 1, {"launch": "first"})
        time.sleep(60)
    if port == taken:
        deadline = time.monotonic() + 30
        while not Path(out, "case.rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # "address already in use"
    ranks.write_case(out, "case", 0, {"launch": "second"})


@pytest.mark.slow  # waits out the 15 s join deadline (rank 1 hangs)
def test_a_relaunch_does_not_read_the_first_launchs_results(tmp_path, monkeypatch):
    with _first_port_taken(monkeypatch) as (port, given):
        (tmp_path / "taken").write_text(str(port))
        hung = ranks.run_ranks(_stale_worker, 2, tmp_path, 15.0)  # per launch; one took 1.2 s at load 5
    assert len(given) == 2 and hung == [1]
    assert ranks.case_results(tmp_path, ["case"], 2)["case"] == [{"launch": "second"}, None]  # before: rank 1's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.rank0.json", "taken"]  # first-launch result


def _cut_worker(rank: int, port: int, out: str) -> None:
    """Rank 1's result file may not grow past 64 bytes (as if it were killed while writing): its write fails."""
    import resource

    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        ranks.write_case(out, "case", rank, {"rank": rank, "pad": "x" * 4096})
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="a file-size limit (POSIX) stands for the kill")
def test_a_rank_stopped_while_writing_its_result_leaves_none(tmp_path):
    assert ranks.run_ranks(_cut_worker, 2, tmp_path, 60.0) == []
    got = ranks.case_results(tmp_path, ["case"], 2)["case"]  # before: JSONDecodeError on rank 1's 64 bytes
    assert got[0]["rank"] == 0 and got[1] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.rank0.json"]  # no temporary file left



@pytest.mark.slow  # 4 gloo ranks (~10 s)
@pytest.mark.distributed
def test_core_test_sync_relaunches_when_its_master_port_is_taken(tmp_path, monkeypatch):
    """tests/core/test_sync.py (fast tier) spawned its ranks with ``mp.spawn`` on a bare ``free_port()``: a port taken
    before rank 0 bound it failed the module ("address already in use"). It runs them by ``run_ranks`` now."""
    import importlib

    test_sync = importlib.import_module("core.test_sync")
    with _first_port_taken(monkeypatch) as (_, given):
        test_sync.run_sync_cases(str(tmp_path))
    assert len(given) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cov-2-float64.npy", "cov-3-exact.npy", "cov-4-float64.npy"]
