"""Review 28 (tpagree), 4 gloo ranks: two data-parallel replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``,
tensor parallelism on ``"tp"``) measured with ``group=`` the data-parallel group, which holds one rank of each
mesh. Global rank 1 is ``(dp 0, tp 1)``: its mesh peer is rank 0, its data-parallel peer rank 3.

Before: a failure while loading rank 1's batch (activation or gradient pool) raised on rank 1, and reached
rank 3 through the lens's agreement over the data-parallel group; rank 0 waited in its next forward's all-reduce
until the process-group timeout, and rank 2 in the data-parallel agreement with rank 0. Now rank 0 learns it from
the peers' round before that forward, and the data-parallel agreement stops rank 2: every rank raises at once.
"""

from __future__ import annotations

import pytest
from reliability.test_review28_tpagree import Sized
from reliability.test_tensor_parallel import LAYERS, _mesh_2d, _plain, _pool, _tp
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _measure(rank: int, **kwargs) -> None:
    mesh = _mesh_2d()
    SpectralLens(_tp(_plain(), mesh["tp"]), kwargs.pop("pool", _pool()), layers=LAYERS, precision="float64",
                 mask_fn=None, progress=False, group=mesh["dp"].get_group(), **kwargs).measure(1, 1)


def _loading_fails_on_rank1(rank: int) -> None:
    """Rank 1 forwards batches 0 and 2 (data-parallel rank 0 of 2); loading batch 2 raises there."""
    _measure(rank, pool=Sized(_pool(), fail_at=2 if rank == 1 else None), params=())


def _gradient_loading_fails_on_rank1(rank: int) -> None:
    """The gradient protocol runs on the data-parallel group's rank 0: ranks 0 and 1, one mesh."""
    _measure(rank, pool=_pool(2), params="lm_head.weight",
             gradient_pool=Sized(_pool(3, seed=5), fail_at=1 if rank == 1 else None))


CASES = {
    "loading_fails_on_rank1": _loading_fails_on_rank1,
    "gradient_loading_fails_on_rank1": _gradient_loading_fails_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tpagree_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, phase, cause", [
    ("loading_fails_on_rank1", "the activation pass", "OSError: batch 2 could not be read"),
    ("gradient_loading_fails_on_rank1", "the gradient protocol", "OSError: batch 1 could not be read"),
])
def test_a_loading_failure_on_one_rank_stops_its_mesh_peer_and_both_data_parallel_peers_at_once(results, case, phase,
                                                                                               cause):
    r0, r1, r2, r3 = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert r1 == cause, r1
    assert r0.startswith(f"RuntimeError: SpectralLens: {phase} of a tensor-parallel rank outside its ") and \
        f"failed on global rank(s) [1] (global rank 1: {cause})" in r0, r0
    assert r2.startswith(f"RuntimeError: SpectralLens: {phase}") and "failed on global rank(s) [0]" in r2, r2
    assert r3.startswith(f"RuntimeError: SpectralLens: {phase}") and "failed on global rank(s) [1]" in r3, r3
