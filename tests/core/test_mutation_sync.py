"""Tests added by a hand mutation audit of ``ActivationCovarianceAccumulator.sync``: two ranks simulated
by two threads of one process (torch.distributed's calls replaced by a barrier-based sum/max), so
the sync arithmetic is checked against float64 references in well under a second. The gloo tests
(tests/core/test_sync.py, tests/reliability/test_sync_*.py) check the real collectives; their ranks
have very different means, so the covariance's largest eigenvalue hid a common shift far from the
rows."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError


class _ThreadWorld:
    """``world`` ranks as threads: all_reduce (SUM or MAX) over the tensors the threads pass."""

    def __init__(self, world: int):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None):
        me = self.local.rank
        self.slots[me] = tensor.clone()
        self.barrier.wait()
        stack = torch.stack(self.slots)
        total = stack.amax(0) if op == dist.ReduceOp.MAX else stack.sum(0)
        self.barrier.wait()
        tensor.copy_(total)

    def patch(self, monkeypatch):
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def run(self, fn):
        out, errors = [None] * self.world, []

        def body(rank):
            self.local.rank = rank
            try:
                out[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if errors:
            raise errors[0]
        return out


def test_sync_of_ranks_sharing_a_mean_far_from_zero(monkeypatch):
    """Both ranks' rows have a mean of 1e8 and spreads 1..1e-3: the common shift must be the global
    mean (sum of each rank's m + n * shift over N); the synced covariance then matches float64 to
    round-off of its largest eigenvalue (killed mutant: the shift from the m's alone, ~0, which lost
    every digit of the small directions)."""
    rng = np.random.default_rng(21)
    d = 6
    mean = 1e8 * rng.uniform(0.5, 1.5, d)
    parts = [rng.standard_normal((n, d)) * np.logspace(0, -3, d) + mean for n in (40, 70)]
    world = _ThreadWorld(2)
    world.patch(monkeypatch)

    def rank_fn(rank):
        acc = ActivationCovarianceAccumulator(precision="float64")
        acc.update(torch.from_numpy(parts[rank]))
        acc.sync()
        return acc.covariance().numpy(), acc.n_rows

    rows = np.concatenate(parts)
    ref = np.cov(rows, rowvar=False)
    for cov, n in world.run(rank_fn):
        assert n == 110
        assert np.abs(cov - ref).max() <= 1e-10 * np.linalg.eigvalsh(ref)[-1]


def test_sync_names_a_rank_whose_first_update_has_nan_rows(monkeypatch):
    """Rank 1's update #0 has NaN rows, rank 0's update #2: every rank's error names both, and the
    state's first bad update is the earliest (killed mutants: 'i > 0', which dropped a rank whose
    update #0 was bad, and the latest instead of the earliest first_bad)."""
    world = _ThreadWorld(2)
    world.patch(monkeypatch)
    clean = torch.randn(5, 3, dtype=torch.float64)
    bad = clean.clone()
    bad[1, 2] = float("nan")

    def rank_fn(rank):
        acc = ActivationCovarianceAccumulator(precision="float64", name="blocks.9")
        for batch in ([clean, clean, bad] if rank == 0 else [bad, clean]):
            acc.update(batch)
        acc.sync()
        with pytest.raises(NonFiniteError) as info:
            acc.compute()
        return str(info.value), int(acc._first_bad)

    for message, first in world.run(rank_fn):
        assert "global rank 0's update #2, global rank 1's update #0" in message
        assert first == 0


def test_sync_adds_every_rank_s_skipped_rows(monkeypatch):
    """nonfinite='skip': the synced state counts the rows each rank dropped and equals the clean rows
    of all ranks (killed mutant: each rank kept its own skipped count)."""
    rng = np.random.default_rng(23)
    parts = [rng.standard_normal((12, 3)) + 50.0 for _ in range(2)]
    poisoned = [p.copy() for p in parts]
    poisoned[0][[1, 4], 0] = np.inf
    poisoned[1][7, 2] = np.nan
    world = _ThreadWorld(2)
    world.patch(monkeypatch)

    def rank_fn(rank):
        acc = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
        acc.update(torch.from_numpy(poisoned[rank]))
        acc.sync()
        return int(acc._bad_rows), acc.n_rows

    for skipped, n in world.run(rank_fn):
        assert (skipped, n) == (3, 21)
