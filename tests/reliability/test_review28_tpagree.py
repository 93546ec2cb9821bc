"""Review 28 (tpagree): failures between the forwards agreed by the ranks of one tensor-parallel mesh where the
lens's ``group`` holds one rank of it (each rank's own group here), 2 gloo ranks, a 1-D mesh of both.

Before (this model, pools of 4 batches): a failure while loading rank 1's batch (activation or gradient pool),
or in its ``mask_fn``, raised on rank 1 alone; rank 0 entered its next forward's all-reduce and waited until the
process-group timeout (20 s here). A pool without ``len`` one batch longer on rank 0 (not compared before the
pass) left rank 0 in a forward alone: its all-reduce met rank 1's check of the layers (a gloo abort or the
timeout). A probe with another ``chunk_size`` on rank 1 ran other numbers of forwards (the same outcome). Now the
peers agree before each forward (``_tensor_parallel.PeerRounds``) and compare the lens's and the probe's
settings before any (``check_same_forwards``): every rank raises at once, the failed rank its own error, its peer
a ``RuntimeError`` naming its global rank, what failed and its error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values
from support.fsdp_pools import Unsized, counted
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import PerSampleGradientProbe, SpectralLens

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: rank 0's error after 20 s)
DEADLINE_S = 15.0  # an agreed error comes at once
JOIN_S = 400.0


class Sized:
    """A pool with a ``len`` whose loading of batch ``fail_at`` raises (a broken file on one rank)."""

    def __init__(self, batches, fail_at=None):
        self.batches, self.fail_at = batches, fail_at

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                raise OSError(f"batch {i} could not be read")
            yield batch


def _lens(rank: int, pool, **kwargs) -> SpectralLens:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    if "probe" not in kwargs:
        kwargs.setdefault("params", ())
    return SpectralLens(_tp(_plain(), _mesh()), pool, layers=LAYERS, precision="float64", progress=False,
                        group=groups[rank], **kwargs)


def _equal_counted(rank: int) -> dict:
    """Pools alike on both ranks: the spectra, and this rank's all_reduce calls with and without a gradient
    protocol (4 batches of 4 sequences)."""
    values, act = counted(lambda: _values(_lens(rank, _pool(), mask_fn=None).measure(1, 1)))
    _, both = counted(lambda: _lens(rank, _pool(), mask_fn=None, params="lm_head.weight").measure(1, 1))
    return {"values": values, "act": act, "both": both}


def _loading_fails_on_rank1(rank: int) -> None:
    _lens(rank, Sized(_pool(), fail_at=2 if rank == 1 else None), mask_fn=None).measure(1, 1)


def _mask_fn_fails_on_rank1(rank: int) -> None:
    calls = []

    def mask_fn(batch):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ValueError("mask_fn: no attention mask in batch 1")

    _lens(rank, _pool(), mask_fn=mask_fn).measure(1, 1)


def _mask_not_bool_on_rank1(rank: int) -> None:
    """The lens's own check before a forward: a mask that is not a bool tensor, on rank 1 only."""
    def mask_fn(batch):
        return torch.ones(batch[0].shape, dtype=torch.int64 if rank == 1 else torch.bool)

    _lens(rank, _pool(), mask_fn=mask_fn).measure(1, 1)


def _gradient_loading_fails_on_rank1(rank: int) -> None:
    _lens(rank, _pool(2), mask_fn=None, params="lm_head.weight",
          gradient_pool=Sized(_pool(3, seed=5), fail_at=1 if rank == 1 else None)).measure(1, 1)


def _unsized_longer_on_rank0(rank: int) -> None:
    _lens(rank, Unsized(_pool(3 - rank)), mask_fn=None).measure(1, 1)


def _other_chunk_size_on_rank1(rank: int) -> None:
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2 if rank == 1 else 4)
    _lens(rank, _pool(2), mask_fn=None, probe=probe).measure(1, 1)


def _plain_no_peer_rounds(rank: int) -> dict:
    """A plain model (no DTensor parameters) under the default group and each rank's own group: no peers' rounds
    (patched to raise here), so no new collective."""
    import spectral_lens.lens as lens_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the tensor-parallel peers' rounds ran on a model without tensor parallelism")

    saved, lens_mod.PeerRounds = lens_mod.PeerRounds, refuse
    try:
        groups = [dist.new_group([r]) for r in range(WORLD)]
        out = {}
        for where, group in (("world", None), ("own", groups[rank])):
            lens = SpectralLens(_plain(), _pool(), layers=LAYERS, params="lm_head.weight", precision="float64",
                                mask_fn=None, progress=False, group=group)
            out[where] = sorted(_values(lens.measure(1, 1)))
        return out
    finally:
        lens_mod.PeerRounds = saved


def _one_replica_other_chunk_size(rank: int) -> None:
    """One replica (the default group is the mesh): every rank runs the gradient protocol, so the probe's
    settings are compared with the lens's (one all_reduce, as before)."""
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2 if rank == 1 else 4)
    SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, probe=probe, precision="float64", mask_fn=None,
                 progress=False).measure(1, 1)


CASES = {  # the cases the old code fails last: a timeout there leaves the process group unusable
    "equal_counted": _equal_counted,
    "plain_no_peer_rounds": _plain_no_peer_rounds,
    "loading_fails_on_rank1": _loading_fails_on_rank1,
    "mask_fn_fails_on_rank1": _mask_fn_fails_on_rank1,
    "mask_not_bool_on_rank1": _mask_not_bool_on_rank1,
    "gradient_loading_fails_on_rank1": _gradient_loading_fails_on_rank1,
    "other_chunk_size_on_rank1": _other_chunk_size_on_rank1,
    "unsized_longer_on_rank0": _unsized_longer_on_rank0,
    "one_replica_other_chunk_size": _one_replica_other_chunk_size,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tpagree"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _errors(results, case) -> list[str]:
    return [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]


def _peer_error(error: str, what: str, cause: str) -> None:
    """``error`` is the peer's: a RuntimeError naming global rank 1, what failed and (quoted) its error."""
    assert error.startswith(f"RuntimeError: SpectralLens: {what} failed on global rank(s) [1] (global rank 1: "
                            f"{cause}"), error
    assert "; this rank stopped too" in error, error


ACTIVATION = "the activation pass of a tensor-parallel rank outside its forwards (loading a batch of the pool, its mask_fn)"


@pytest.mark.slow
@pytest.mark.distributed
def test_pools_alike_measure_as_before_with_one_all_reduce_per_forward_and_one_at_the_end(results):
    got = checked_case(results, "equal_counted", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    assert got[0]["value"]["values"] == got[1]["value"]["values"]
    # before the fix 3 all_reduces for the activations (the peers' forwards and settings, their layers, their
    # digests) and 1 for the gradient protocol (its samples, batches and settings); the rounds add one per forward
    # (4 batches) and one at the end in each (the forwards' own collectives are functional ones, not counted)
    # (review 29: one round more after the activation compute, test_review29_tppeers; review 30: one after rank 0's
    # record write, test_review30_tplens)
    assert [(r["value"]["act"], r["value"]["both"]) for r in got] == [(3 + 5 + 1 + 1, 3 + 5 + 1 + 1 + 5 + 1)] * WORLD, got


GRADIENT = "the gradient protocol of a tensor-parallel rank outside its passes (loading a batch of the gradient pool)"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, what, cause", [
    ("loading_fails_on_rank1", ACTIVATION, "OSError: batch 2 could not be read"),
    ("mask_fn_fails_on_rank1", ACTIVATION, "ValueError: mask_fn: no attention mask in batch 1"),
    ("mask_not_bool_on_rank1", ACTIVATION, "TypeError: ActivationCapture.mask: mask must be a bool tensor"),
    ("gradient_loading_fails_on_rank1", GRADIENT, "OSError: batch 1 could not be read"),
], ids=["loading", "mask_fn", "mask_check", "gradient_loading"])
def test_a_failure_on_one_rank_of_the_mesh_between_forwards_is_agreed_by_its_peer(results, case, what, cause):
    """A batch's loading, its mask_fn, the lens's check of its mask (activation pool) or a gradient pool batch's
    loading failing on rank 1: its own error there, and its peer's RuntimeError naming it and quoting it."""
    r0, r1 = _errors(results, case)
    assert r1 == cause if case != "mask_not_bool_on_rank1" else r1.startswith(cause), r1  # (the check says more)
    _peer_error(r0, what, cause)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_probe_chunk_size_of_its_own_on_one_rank_of_the_mesh_is_refused_on_both(results):
    for error in _errors(results, "other_chunk_size_on_rank1"):
        assert error.startswith("ValueError: SpectralLens: the tensor-parallel ranks [0, 1] run the gradient "
                                "protocol with other settings"), error
        assert "chunk_size=" in error, error


@pytest.mark.slow
@pytest.mark.distributed
def test_pools_without_len_of_other_lengths_on_the_ranks_of_one_mesh_are_refused_on_both(results):
    for error in _errors(results, "unsized_longer_on_rank0"):
        assert error.startswith("ValueError: SpectralLens: the tensor-parallel ranks [0, 1] would run different "
                                "numbers of forwards (global rank 0: 3 or more, global rank 1: 2)"), error


@pytest.mark.slow
@pytest.mark.distributed
def test_a_plain_model_runs_no_peers_rounds(results):
    got = checked_case(results, "plain_no_peer_rounds", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    for r in got:
        assert r["value"]["world"] == r["value"]["own"] == ["act:h.0", "act:h.1", "grad:lm_head.weight"], r


@pytest.mark.slow
@pytest.mark.distributed
def test_a_probe_chunk_size_of_its_own_in_one_replica_is_refused_by_the_settings_agreement(results):
    for error in _errors(results, "one_replica_other_chunk_size"):
        assert error.startswith("ValueError: SpectralLens: the ranks' lenses are configured differently (probe="
                                "chunk_size=4"), error
        assert "probe=chunk_size=2" in error, error
