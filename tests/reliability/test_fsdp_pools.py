"""Pools under FSDP whose lengths the ranks cannot compare up front, on 2 gloo CPU ranks, one spawn.

Every forward of an FSDP model all-gathers its weights, so every rank must run as many forwards. Pools
with a ``len`` are compared before any forward (``test_review16.py``). Before this fix:

1. an activation pool without a ``len`` (a re-iterable whose ``__iter__`` is a generator, a
   ``DataLoader`` over an ``IterableDataset``) of different lengths on the ranks left the longer rank
   waiting in the all-gather of a forward the other never ran: the process-group timeout on every rank
   (15 s here, 30 min by default); so did an error while iterating one rank's pool;
2. the gradient pools were not compared at all: every rank runs the gradient protocol under FSDP, and
   gradient pools of different lengths (with a ``len`` or without), or whose batches hold different
   numbers of samples, left a rank in a forward or backward the other never ran: the timeout.

Now the ranks agree as they go (one small ``all_reduce`` per round of ``world`` activation batches, and
per gradient batch, only under FSDP): every rank raises the same ``ValueError`` naming each rank's
count, or the failed rank its own error and the others a ``RuntimeError`` naming it, at once, with the
ranks in step for the next collective. Pools of equal lengths measure the unwrapped model's spectra
(float64), and the collectives of the non-FSDP path are unchanged (counted). One spawn runs every case
(the slow tier); the agreement itself (``agree_counts``, a subgroup's global ranks) is checked in one
process with ``torch.distributed`` patched.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from support.fsdp_pools import Unsized, errors, gloo
from support.fsdp_pools import assert_equal_spectra as _assert_equal_spectra
from support.fsdp_pools import counted as _counted
from support.fsdp_pools import fsdp2 as _fsdp2
from support.fsdp_pools import measure as _measure
from support.fsdp_pools import ok as _ok
from support.fsdp_pools import plain as _plain
from support.fsdp_pools import pool as _pool
from support.fsdp_pools import spectra as _spectra
from support.ranks import run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens._agree import agree_counts, refuse_other_counts

WORLD = 2
PG_TIMEOUT_S = 15  # a collective left waiting fails after this (the default is 30 min for gloo)
DEADLINE_S = 10.0  # an agreed error comes at once, well inside the timeout
PARAM = "transformer.h.1.attn.c_proj.weight"


# ---------------------------------------------------------------- 1. activation pools without a len
def _unsized_equal(rank):
    """Both ranks' unsized pools give the same 3 batches: rank 1's share is a batch short (an unmeasured
    forward); the spectra, and the all_reduce calls against those of the same pool as a list."""
    out = {}
    for n in (3, 4):
        m, unsized = _counted(lambda n=n: _measure(_fsdp2(), Unsized(_pool(n))))
        _, listed = _counted(lambda n=n: _measure(_fsdp2(), _pool(n)))
        out[str(n)] = {"spectra": _spectra(m), "unsized": unsized, "listed": listed}
    return out


def _unsized_iterable_dataset(rank):
    """A DataLoader over an IterableDataset (no len) of 3 batches on both ranks."""
    from torch.utils.data import DataLoader, IterableDataset

    class Batches(IterableDataset):
        def __iter__(self):
            return iter(_pool(3))

    return _spectra(_measure(_fsdp2(), DataLoader(Batches(), batch_size=None)))


def _unsized_longer_on_rank0(rank):
    """Rank 0's pool gives 3 batches, rank 1's 2: found in the second round (rank 0 has 1 batch there)."""
    _measure(_fsdp2(), Unsized(_pool(3 - rank)))


def _unsized_longer_on_rank1(rank):
    """Rank 0's pool gives 2 batches, rank 1's 4: found in the second round (rank 0 has none left, rank 1's
    fills the round: it may have more)."""
    _measure(_fsdp2(), Unsized(_pool(2 + 2 * rank)))


def _unsized_fails_on_rank1(rank):
    """Loading rank 1's third batch raises (after two rounds' forwards)."""
    _measure(_fsdp2(), Unsized(_pool(4), fail_at=2 if rank == 1 else None))


def _mask_fn_fails_on_rank1(rank):
    """The mask_fn raises on rank 1's batch (before its forward, so it can be agreed)."""
    def mask_fn(batch):
        if rank == 1:
            raise KeyError("attention_mask")

    _measure(_fsdp2(), Unsized(_pool(2)), mask_fn=mask_fn)


def _non_fsdp_collectives(rank):
    """Without FSDP (float32, the default precision): the all_reduce calls for an unsized pool and a list."""
    model = _plain().float()

    def run(pool):
        return SpectralLens(model, pool, params=(), progress=False).measure(1, 1)

    return {"unsized": _counted(lambda: run(Unsized(_pool(3))))[1], "listed": _counted(lambda: run(_pool(3)))[1]}


# ---------------------------------------------------------------- 2. gradient pools under FSDP
def _gradient_pools_equal(rank):
    """The gradient protocol over the same 3-batch gradient pool, with a len and without: the spectra and
    the all_reduce calls."""
    out = {"none": _counted(lambda: _measure(_fsdp2(), _pool(2)))[1]}  # activations only
    for kind, pool in (("listed", _pool(3, seed=3)), ("unsized", Unsized(_pool(3, seed=3)))):
        m, calls = _counted(lambda pool=pool: _measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=pool))
        out[kind] = {"spectra": _spectra(m), "calls": calls}
    return out


def _gradient_pools_capped(rank):
    """Gradient pools of different lengths (3 and 2 batches of 4) cut to the same 8 samples: they work."""
    return _spectra(_measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=_pool(3 - rank, seed=3),
                             gradient_samples=8))


def _gradient_pools_longer_on_rank0(rank):
    """Gradient pools (with a len) of 3 and 2 batches, no cap."""
    _measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=_pool(3 - rank, seed=3))


def _gradient_pools_unsized_longer_on_rank1(rank):
    """Gradient pools without a len of 2 and 3 batches, no cap."""
    _measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=Unsized(_pool(2 + rank, seed=3)))


def _gradient_batches_of_other_sizes(rank):
    """Gradient pools of the same 8 samples: rank 0 in 2 batches of 4, rank 1 in 4 batches of 2 (with
    chunk_size 2 both would run 4 passes, with the default chunking rank 0 runs 2: the ranks differ)."""
    pool = _pool(2, seed=3)
    if rank == 1:
        pool = [(x[i:i + 2], y[i:i + 2]) for x, y in pool for i in (0, 2)]
    _measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=pool)


def _gradient_pool_fails_on_rank1(rank):
    """Loading rank 1's second gradient batch raises."""
    _measure(_fsdp2(), _pool(2), params=PARAM, gradient_pool=Unsized(_pool(3, seed=3), fail_at=1 if rank else None))


# the cases that broke the process group before the fix run after the others (a timeout there leaves
# the group unusable), the ones that worked first
CASES = {
    "unsized_equal": _unsized_equal,
    "unsized_iterable_dataset": _unsized_iterable_dataset,
    "non_fsdp_collectives": _non_fsdp_collectives,
    "gradient_pools_equal": _gradient_pools_equal,
    "gradient_pools_capped": _gradient_pools_capped,
    "mask_fn_fails_on_rank1": _mask_fn_fails_on_rank1,
    "unsized_longer_on_rank0": _unsized_longer_on_rank0,
    "unsized_longer_on_rank1": _unsized_longer_on_rank1,
    "unsized_fails_on_rank1": _unsized_fails_on_rank1,
    "gradient_pools_longer_on_rank0": _gradient_pools_longer_on_rank0,
    "gradient_pools_unsized_longer_on_rank1": _gradient_pools_unsized_longer_on_rank1,
    "gradient_batches_of_other_sizes": _gradient_batches_of_other_sizes,
    "gradient_pool_fails_on_rank1": _gradient_pool_fails_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("fsdp_pools"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=600, preload="torch.distributed.fsdp")


def _errors(results, case) -> list[str]:
    return errors(results, case, DEADLINE_S)


# ---------------------------------------------------------------- 1. activations
@gloo
def test_unsized_pools_of_equal_lengths_measure_the_unwrapped_models_spectra(results):
    for got in _ok(results, "unsized_equal"):
        for n in (3, 4):
            _assert_equal_spectra(got[str(n)]["spectra"], _measure(_plain(), _pool(n)))
            # one all_reduce per round of 2 batches (3: rounds of 2 and 1; 4: 2, 2 and an empty one), as for
            # the list (test_review17.py), which also has its one length check before the forwards
            assert got[str(n)]["unsized"] - got[str(n)]["listed"] == -1, got[str(n)]
    for got in _ok(results, "unsized_iterable_dataset"):
        _assert_equal_spectra(got, _measure(_plain(), _pool(3)))


@gloo
def test_the_non_fsdp_paths_collectives_are_unchanged(results):
    for got in _ok(results, "non_fsdp_collectives"):
        # agree the pass, the layers and batches, the widths, the sync (one per layer), the spectra, the
        # windows are broadcast (not an all_reduce), the record: as for a list
        assert got["unsized"] == got["listed"], got


@gloo
def test_unsized_pools_of_different_lengths_raise_the_same_error_on_every_rank(results):
    for case, counts in (("unsized_longer_on_rank0", "global rank 0: 3, global rank 1: 2"),
                         ("unsized_longer_on_rank1", "global rank 0: 2, global rank 1: 4 or more")):
        for error in _errors(results, case):
            assert error.startswith("ValueError: SpectralLens: the ranks' pools gave different numbers of batches "
                                    f"({counts})"), (case, error)
            assert "same whole pool" in error


@gloo
def test_a_failure_while_iterating_one_ranks_unsized_pool_is_agreed(results):
    r0, r1 = _errors(results, "unsized_fails_on_rank1")
    assert r1 == "OSError: batch 2 could not be read", r1
    assert r0.startswith("RuntimeError: SpectralLens: loading the pool's batches or their masks (mask_fn) failed on "
                         "global rank(s) [1]"), r0
    r0, r1 = _errors(results, "mask_fn_fails_on_rank1")
    assert r1 == "KeyError: 'attention_mask'", r1
    assert r0.startswith("RuntimeError: SpectralLens: loading the pool's batches or their masks (mask_fn) failed on "
                         "global rank(s) [1]"), r0


# ---------------------------------------------------------------- 2. gradients
@gloo
def test_gradient_pools_of_equal_lengths_measure_the_unwrapped_models_spectra(results):
    want = _measure(_plain(), _pool(2), params=PARAM, gradient_pool=_pool(3, seed=3))
    for got in _ok(results, "gradient_pools_equal"):
        for kind in ("listed", "unsized"):
            _assert_equal_spectra(got[kind]["spectra"], want)
        # the protocol's agreement, and one all_reduce per gradient batch and one for the pool's end
        assert got["listed"]["calls"] == got["unsized"]["calls"] == got["none"] + 1 + 3 + 1, got
    capped = _measure(_plain(), _pool(2), params=PARAM, gradient_pool=_pool(2, seed=3), gradient_samples=8)
    for got in _ok(results, "gradient_pools_capped"):
        _assert_equal_spectra(got, capped)


@gloo
def test_gradient_pools_of_different_lengths_raise_the_same_error_on_every_rank(results):
    for case, detail in (("gradient_pools_longer_on_rank0", "batch 3: global rank 0: 4 samples, global rank 1: none left"),
                         ("gradient_pools_unsized_longer_on_rank1", "batch 3: global rank 0: none left, global rank 1: 4 samples"),
                         ("gradient_batches_of_other_sizes", "batch 1: global rank 0: 4 samples, global rank 1: 2 samples")):
        for error in _errors(results, case):
            assert error.startswith(f"ValueError: SpectralLens: the ranks' gradient pools differ at {detail}"), \
                (case, error)
            assert "same whole gradient pool" in error


@gloo
def test_a_failure_while_iterating_one_ranks_gradient_pool_is_agreed(results):
    r0, r1 = _errors(results, "gradient_pool_fails_on_rank1")
    assert r1 == "OSError: batch 1 could not be read", r1
    assert r0.startswith("RuntimeError: SpectralLens: loading the gradient pool's batches failed on global rank(s) [1]"), r0


# ---------------------------------------------------------------- the agreement in one process
@pytest.fixture
def subgroup_rank0(monkeypatch):
    """This process is group rank 0 of a two-rank subgroup of global ranks [1, 3]; ``other[0]``: the slot
    that group rank 1 contributes to the all_reduce (0: it failed, c + 1: its count c)."""
    other = [0]

    def all_reduce(t, op=None, group=None):
        assert op == dist.ReduceOp.MAX and group is _GROUP and t.tolist()[1] == 0
        t[1] = other[0]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: {0: 1, 1: 3}[r])
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return other


_GROUP = object()


def test_counts_and_failures_are_agreed_naming_global_ranks(subgroup_rank0):
    subgroup_rank0[0] = 0 + 1
    assert agree_counts(_GROUP, 0, None, "loading") == [0, 0]  # an empty pool on both ranks
    subgroup_rank0[0] = 4 + 1
    assert agree_counts(_GROUP, 2, None, "loading") == [2, 4]
    with pytest.raises(ValueError, match=r"different numbers of batches \(global rank 1: 2, global rank 3: 4 or more\)"):
        refuse_other_counts(_GROUP, [2, 4], 4)
    refuse_other_counts(_GROUP, [3, 3], 4)  # equal: nothing raised
    subgroup_rank0[0] = 0  # group rank 1 failed
    with pytest.raises(RuntimeError, match=r"loading failed on global rank\(s\) \[3\]"):
        agree_counts(_GROUP, 2, None, "loading")
    with pytest.raises(KeyError, match="own"):  # a failed rank raises its own error
        agree_counts(_GROUP, 2, KeyError("own"), "loading")
