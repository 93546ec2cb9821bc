"""Review 30 (revtpbounded), 2 gloo ranks: bounded-memory mode (``max_resident_samples``) where every rank runs the
gradient protocol (one tensor-parallel replica: the lens's ``group`` the world, the mesh of both ranks; FSDP and
ZeRO-3 take the same path, :meth:`SpectralLens._everywhere`).

Before: the probe's ``compute`` recomputes its non-resident chunks in forwards and backwards that are collectives over
the ranks, with no round between them (tpbounded added rounds for a group of one rank of each mesh only). A failure of
rank 1 between its recomputations (replaying a chunk's RNG state; the Gram blocks out of memory) sent it into the
lens's agreement (an ``all_reduce`` of the failure flags) while rank 0 was in its recomputation's collective: gloo
aborted rank 1's process (``Received data size doesn't match expected size``; NCCL: mixed buffers or a hang). Now a
round of the ranks precedes each recomputation and one follows ``compute`` (``PeerRounds`` over the group): rank 1
raises its error, rank 0 a ``RuntimeError`` naming global rank 1 and quoting it, at once; both measure in step again.
Collectives: one ``all_reduce`` more per recomputation and one after ``compute``, in bounded-memory mode with every
rank running the protocol only (counted in ``test_review30_tpbounded.py``). A failure after the recomputations (the
eigendecomposition) was agreed before and still is (a guard).

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_revtpbounded.py``
"""

from __future__ import annotations

import functools

import pytest
from reliability.test_review30_tpbounded import EIGH, RNG, _lens, again_after_a_failure, compute_fails
from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 300.0
WHAT = ("the gradient protocol's compute in bounded-memory mode (between its recomputations, collectives over the "
        "ranks)")


def _replica(rank: int):
    return _lens(rank, own=False)  # one tensor-parallel replica: every rank runs the gradient protocol


def _replica_rng(rank: int) -> dict:
    return compute_fails(_replica(rank), "rng", rank == 1)


def _replica_eigh(rank: int) -> dict:
    return compute_fails(_replica(rank), "eigh", rank == 1)


def _replica_again(rank: int) -> dict:
    return again_after_a_failure(_replica(rank), rank == 1, functools.partial(_replica, rank))


CASES = {"replica_eigh": _replica_eigh, "replica_again": _replica_again, "replica_rng": _replica_rng}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtpbounded"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [("replica_rng", RNG), ("replica_eigh", EIGH)], ids=["rng", "eigh"])
def test_a_compute_failure_of_one_rank_of_a_replica_raises_on_every_rank_at_once(results, case, own):
    r0, r1 = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert r1 == own, r1
    if case == "replica_eigh":  # (a guard: agreed before too, by the lens's agreement after the protocol, unquoted)
        assert r0.startswith("RuntimeError: SpectralLens: the gradient protocol") and "on global rank(s) [1]" in r0, r0
    else:
        assert r0.startswith(f"RuntimeError: SpectralLens: {WHAT} failed on global rank(s) [1] (global rank 1: {own})"), r0


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_of_a_replica_measures_in_step_again_after_an_agreed_compute_failure(results):
    got = checked_case(results, "replica_again", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    r0, r1 = (r["value"] for r in got)
    assert r1["first"] == RNG and r0["first"].startswith(f"RuntimeError: SpectralLens: {WHAT} failed"), (r0, r1)
    assert r0["same"] and r1["same"], (r0, r1)
