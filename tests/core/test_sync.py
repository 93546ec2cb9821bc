"""``sync`` across 2-4 gloo processes equals one float64 pass over all ranks' rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spectral_lens import ActivationCovarianceAccumulator

from support.data import rows_with_spectrum
from support.ranks import run_ranks


def _rank_rows(rank: int, world: int) -> np.ndarray:
    # Ranks get pools of different sizes and very different means: the common shift must be exact.
    rng = np.random.default_rng(100 + rank)
    rows = rows_with_spectrum(50 + 37 * rank, np.logspace(0, -8, 12), 10.0 ** (rank + 1), rng)
    return rows if rank != world - 1 or world < 3 else rows[:0]  # the last rank of >= 3 sees no rows


CASES = [(2, "float64"), (3, "exact"), (4, "float64")]


def _worker(rank: int, port: int, out: str) -> None:
    """One process per rank of the largest world, one default gloo group of all of them; each case syncs
    over the group of its ``world`` lowest ranks (``new_group``, which every process creates; the
    processes of higher rank sit it out), the whole world over the default group. One spawn of 4
    processes instead of 2 + 3 + 4 (each process start imports torch).

    No ``destroy_process_group``: the process leaves by ``os._exit`` after a barrier. Destroying a gloo
    group right after collectives can deadlock in torch itself (torch 2.4: the group's destructor joins
    a worker thread that waits for the GIL the destructor holds; fixed upstream in pytorch/pytorch#154976),
    which hung this test there about one run in two (tools/check_floors.sh)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=max(w for w, _ in CASES))
    for world, precision in CASES:
        group = None if world == dist.get_world_size() else dist.new_group(list(range(world)))
        if rank >= world:
            continue
        acc = ActivationCovarianceAccumulator(12, precision=precision)
        rows = torch.from_numpy(_rank_rows(rank, world))
        for chunk in rows.split(23):
            acc.update(chunk if precision == "float64" else chunk.float())
        acc.sync(group)
        if rank == 0:
            np.save(os.path.join(out, f"cov-{world}-{precision}.npy"), acc.covariance().numpy())
        else:
            acc.covariance()  # every rank holds the global state
    dist.barrier()
    os._exit(0)


JOIN_S = 240  # the 4 ranks (each imports torch) took 9.4 s with the load average at 5 on 2 cores


def run_sync_cases(out: str) -> None:
    """The 4 ranks of :func:`_worker`, by ``support.ranks.run_ranks``: ``mp.spawn`` with a bare ``free_port`` failed
    the test when another process took the port before rank 0 bound it (rank 0: "address already in use"), and a
    hung rank blocked the run with no deadline; ``run_ranks`` relaunches on a new port and kills a hung rank."""
    hung = run_ranks(_worker, max(w for w, _ in CASES), Path(out), JOIN_S)
    assert hung == [], f"tests/core/test_sync.py: ranks {hung} still running after {JOIN_S} s (killed)"


@pytest.fixture(scope="module")
def synced(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sync"))
    run_sync_cases(out)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world,precision", CASES)
def test_sync_equals_single_pass(synced, world, precision):
    rows = np.concatenate([_rank_rows(r, world) for r in range(world)])
    if precision != "float64":
        rows = rows.astype(np.float32).astype(np.float64)
    ref = np.cov(rows, rowvar=False)
    scale = np.linalg.eigvalsh(ref)[-1]
    tol = 1e-10 if precision == "float64" else 2e-5
    assert np.abs(np.load(os.path.join(synced, f"cov-{world}-{precision}.npy")) - ref).max() <= tol * scale


def test_sync_without_process_group_is_a_no_op():
    acc = ActivationCovarianceAccumulator()
    x = torch.randn(10, 3)
    acc.update(x)
    before = acc.covariance().clone()
    acc.sync()
    assert torch.equal(acc.covariance(), before)
