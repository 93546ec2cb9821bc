"""Review 30 (tpbounded), 4 gloo ranks: the gradient protocol in bounded-memory mode (``max_resident_samples``) with
two data-parallel replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``: meshes [0, 1] and [2, 3]) and ``group=``
the data-parallel group ([0, 2] and [1, 3]): global ranks 0 and 1 (their groups' rank 0) run it, mesh peers.

Before (process-group timeout 20 s; every failing case by the timeout):

* a failure of global rank 1's ``compute`` outside its recomputations' forwards (replaying a chunk's RNG state; the
  eigendecomposition out of memory) raised on ranks 1 and 3 (their group's agreement) while rank 0 waited in its
  next recomputation forward or in the record's round over the mesh, and rank 2 with it;
* with the fix of that alone, a Ctrl-C reaching rank 1 during its failure's round with rank 0 (``PeerRounds.fail``)
  left ``fail`` as ``KeyboardInterrupt``: rank 1 skipped its group's agreement, in which rank 3 waited.

Now all four raise at once: rank 1 its own error (``KeyboardInterrupt``), rank 0 (its mesh peer) a ``RuntimeError``
quoting it, rank 2 its group's ``RuntimeError`` naming global rank 0, rank 3 its group's naming global rank 1. One
``all_reduce`` more per recomputed chunk on ranks 0 and 1 (counted; none on ranks 2 and 3).

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_tpbounded_dp.py``
"""

from __future__ import annotations

import functools

import pytest
from reliability.test_review28_revtp import _counted
from reliability.test_review30_tpbounded import (
    EIGH,
    RNG,
    bounded_probe,
    compute_fails,
    interrupted_failure_round,
    quoted,
    recomputed,
)
from reliability.test_tensor_parallel import LAYERS, _mesh_2d, _plain, _pool, _tp
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0
GROUP = "RuntimeError: SpectralLens: the gradient protocol (it runs on the group's rank 0) failed on global rank(s)"


def _lens(rank: int) -> SpectralLens:
    mesh = _mesh_2d()
    return SpectralLens(_tp(_plain(), mesh["tp"]), _pool(2), layers=LAYERS, precision="float64", mask_fn=None,
                        progress=False, group=mesh["dp"].get_group(), probe=bounded_probe())


def _rng_fails(rank: int) -> dict:
    return compute_fails(_lens(rank), "rng", rank == 1)


def _eigh_fails(rank: int) -> dict:
    return compute_fails(_lens(rank), "eigh", rank == 1)


def _interrupted(rank: int) -> dict:
    return interrupted_failure_round(_lens(rank), rank == 1)


def _counts(rank: int) -> dict:
    lens = _lens(rank)
    count = recomputed(lens)
    return {"measure": _counted(functools.partial(lens.measure, 1, 1)), "recomputed": count[0]}


CASES = {"counts": _counts, "rng_fails": _rng_fails, "eigh_fails": _eigh_fails, "interrupted": _interrupted}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tpbounded_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [("rng_fails", RNG), ("eigh_fails", EIGH), ("interrupted", "KeyboardInterrupt: ")],
                         ids=["rng", "eigh", "ctrl_c_in_the_failure_round"])
def test_a_compute_failure_on_global_rank_1_raises_on_all_four_ranks_at_once(results, case, own):
    got = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert got[1] == own, got
    assert got[0].startswith(quoted(1, EIGH if case == "interrupted" else own)), got
    assert got[2].startswith(f"{GROUP} [0]; "), got
    assert got[3].startswith(f"{GROUP} [1]; "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_more_per_recomputed_chunk_on_the_ranks_that_run_the_protocol(results):
    got = checked_case(results, "counts", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    assert [r["value"]["recomputed"] >= 2 for r in got] == [True, True, False, False], got
    for r, before in zip(got, BEFORE):
        c = r["value"]
        assert c["measure"] == {**before, "all_reduce": before["all_reduce"] + c["recomputed"]}, c


BEFORE = [  # main at 8c0c0da, counted by _counts, per global rank (0 and 1 run the protocol and its peers' rounds)
    {"all_reduce": 28, "broadcast_object_list": 2}, {"all_reduce": 28, "broadcast_object_list": 2},
    {"all_reduce": 24, "broadcast_object_list": 2}, {"all_reduce": 24, "broadcast_object_list": 2},
]
