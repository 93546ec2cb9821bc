"""Shared by the 2-rank FSDP pool tests (``tests/reliability/test_fsdp_pools.py``, ``test_review17.py``): the
slow-tier marker, the small float64 model plain and sharded, pools, and an ``all_reduce`` counter."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from spectral_lens import SpectralLens
from support.models import TinyGPT, lm_pool
from support.ranks import checked_case


def gloo(test):
    """The tests that spawn the ranks: the slow tier."""
    return pytest.mark.slow(pytest.mark.distributed(test))


class Unsized:
    """A re-iterable pool without a ``len`` (each pass a fresh generator); ``fail_at``: the index of the
    batch whose loading raises (a broken file on one rank)."""

    def __init__(self, batches, fail_at=None):
        self.batches, self.fail_at = batches, fail_at

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                raise OSError(f"batch {i} could not be read")
            yield batch


def plain():
    torch.manual_seed(0)
    return TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12).double()


def fsdp2():
    from torch.distributed.fsdp import fully_shard

    model = plain()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def pool(n, seed=1):
    return lm_pool(n, batch=4, t=12, vocab=37, seed=seed)


def spectra(m):
    return {k: {"values": v.values.tolist(), "n_rows": v.n_rows} for k, v in m.spectra.items()}


def counted(fn):
    """``fn()``'s value and the number of ``dist.all_reduce`` calls it made on this rank."""
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting
    try:
        return fn(), len(calls)
    finally:
        dist.all_reduce = real


def measure(model, pool, **kwargs):
    kwargs.setdefault("params", ())
    return SpectralLens(model, pool, precision="float64", progress=False, **kwargs).measure(1, 1)


def ok(results, case) -> list:
    """Each rank's value of ``case`` (``support.ranks.run_gloo_cases``), none of them an error."""
    got = checked_case(results, case, None)
    for rank, r in enumerate(got):
        assert r["error"] is None, f"{case} on rank {rank}: {r['error']}"
    return [r["value"] for r in got]


def errors(results, case, deadline_s: float) -> list[str]:
    """Each rank's error: raised within ``deadline_s`` (no timeout), with the ranks in step afterwards."""
    got = checked_case(results, case, deadline_s)
    return [r["error"] or "" for r in got]


def assert_equal_spectra(got, want):
    """``got`` (:func:`spectra` of a rank's measurement) equals the measurement ``want`` within float64
    round-off."""
    assert sorted(got) == sorted(want.spectra)
    for name, spectrum in want.spectra.items():
        assert got[name]["n_rows"] == spectrum.n_rows
        diff = (torch.tensor(got[name]["values"], dtype=torch.float64) - spectrum.values).abs().max().item()
        assert diff <= 1e-12 * spectrum.values.max().item(), (name, diff)
