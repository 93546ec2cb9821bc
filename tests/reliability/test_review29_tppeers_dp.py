"""Review 29 (tppeers), 4 gloo ranks: two data-parallel replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``),
measured with ``group=`` the data-parallel group. Global rank 1 is ``(dp 0, tp 1)``: its mesh peer is rank 0, its
data-parallel peer rank 3.

Before: a failure of rank 1's activation ``compute`` reached rank 3 through the lens's agreement over the
data-parallel group; rank 0 (and, through it, rank 2) went on into the gradient protocol's check and waited there
until the process-group timeout. Likewise a bad argument of ``measure`` on rank 1. Now the mesh's round after the
compute (or the peers' check before the pass) stops rank 0, and the data-parallel agreement rank 2: every rank
raises at once.
"""

from __future__ import annotations

import pytest
from reliability.test_review29_tppeers import BEFORE, SOLVE
from reliability.test_tensor_parallel import LAYERS, _mesh_2d, _plain, _pool, _tp
from support.lens_faults import compute_raises
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens._warnings import NonFiniteError

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _lens(rank: int) -> SpectralLens:
    mesh = _mesh_2d()
    return SpectralLens(_tp(_plain(), mesh["tp"]), _pool(2), layers=LAYERS, precision="float64", mask_fn=None,
                        progress=False, group=mesh["dp"].get_group(), params="lm_head.weight")


def _compute_fails_on_rank1(rank: int) -> None:
    lens = _lens(rank)
    with compute_raises(rank, {1: NonFiniteError(SOLVE)}):
        lens.measure(1, 1)


def _bad_tokens_on_rank1(rank: int) -> None:
    _lens(rank).measure(1, 1.5 if rank == 1 else 1)


CASES = {"compute_fails_on_rank1": _compute_fails_on_rank1, "bad_tokens_on_rank1": _bad_tokens_on_rank1}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tppeers_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_an_activation_compute_failure_on_one_rank_stops_its_mesh_peer_and_both_data_parallel_peers(results):
    r0, r1, r2, r3 = [r["error"] or "" for r in checked_case(results, "compute_fails_on_rank1", DEADLINE_S)]
    assert r1.startswith(f"NonFiniteError: {SOLVE}"), r1
    assert r0.startswith("NonFiniteError: SpectralLens: computing the activation spectra of a tensor-parallel rank "
                         f"failed on global rank(s) [1] (global rank 1: NonFiniteError: {SOLVE}"), r0
    assert r2.startswith("NonFiniteError: SpectralLens: computing the activation spectra failed on global rank(s) [0]"), r2
    assert r3.startswith("NonFiniteError: SpectralLens: computing the activation spectra failed on global rank(s) [1]"), r3


@pytest.mark.slow
@pytest.mark.distributed
def test_a_bad_argument_on_one_rank_stops_its_mesh_peer_and_both_data_parallel_peers(results):
    r0, r1, r2, r3 = [r["error"] or "" for r in checked_case(results, "bad_tokens_on_rank1", DEADLINE_S)]
    cause = "TypeError: SpectralLens.measure: step and tokens must be integers"
    assert r1.startswith(cause), r1
    assert r0.startswith(f"RuntimeError: SpectralLens: {BEFORE} failed on global rank(s) [1] (global rank 1: {cause}"), r0
    # the data-parallel agreement on the arguments comes first: rank 3 learns it there and carries it to its mesh
    # peer, rank 2, in their check before the pass
    assert r3.startswith("RuntimeError: SpectralLens: checking measure()'s arguments and the lens failed on global "
                         "rank(s) [1]"), r3
    assert r2.startswith(f"RuntimeError: SpectralLens: {BEFORE} failed on global rank(s) [3]"), r2
