"""Review 29 (revtppeers), 4 gloo ranks: two data-parallel replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``:
meshes [0, 1] and [2, 3]), measured with ``group=`` the data-parallel group ([0, 2] and [1, 3]).

Regression guards (they passed before this review): failures on two ranks at once in other meshes and other
places (rank 0's pool's ``len``, a bad argument on rank 3): all four raise at once, each failed rank its own error;
then the lenses measure in step again (the spectra of a fresh lens on every rank). Before the fix of
``_agree.error_text`` (process-group timeout 20 s; the last case): an error whose ``__str__`` raises in rank 1's
activation ``compute`` left its mesh peer, rank 0, waiting in the round after it until the timeout (and rank 2,
through rank 0, in the data-parallel agreement); now rank 0 quotes its type and all four raise at once.
"""

from __future__ import annotations

import pytest
from reliability.test_review29_revtppeers import UNREAD, Unprintable, _readable
from reliability.test_review29_tppeers import BEFORE
from reliability.test_tensor_parallel import LAYERS, _mesh_2d, _plain, _pool, _tp, _values
from support.lens_faults import compute_raises
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _lens(rank: int) -> SpectralLens:
    mesh = _mesh_2d()
    return SpectralLens(_tp(_plain(), mesh["tp"]), _pool(2), layers=LAYERS, precision="float64",
                        mask_fn=None, progress=False, group=mesh["dp"].get_group(), params="lm_head.weight")


def _two_failures_then_again(rank: int) -> dict:
    from reliability.test_review29_tppeers import _LenFails

    lens, out = _lens(rank), {}
    pool = lens.pool
    lens.pool = _LenFails(_pool(2))
    lens.pool.broken = rank == 0
    try:
        lens.measure(1, 1.5 if rank == 3 else 1)
    except (OSError, RuntimeError, TypeError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    lens.pool = pool
    out["same"] = _values(lens.measure(2, 2)) == _values(_lens(rank).measure(2, 2))
    return out


def _unprintable_compute_on_rank1(rank: int) -> None:
    lens = _lens(rank)
    with compute_raises(rank, {1: Unprintable()}), _readable():
        lens.measure(1, 1)


CASES = {"two_failures_then_again": _two_failures_then_again,
         "unprintable_compute_on_rank1": _unprintable_compute_on_rank1}  # the old code: by the timeout, last


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtppeers_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_failures_on_two_ranks_of_other_meshes_at_once_then_a_measurement_in_step(results):
    got = [r["value"] for r in checked_case(results, "two_failures_then_again", None)]
    r0, r1, r2, r3 = [g["error"] for g in got]
    assert r0 == "OSError: the pool's index could not be read", r0
    assert r1.startswith("RuntimeError: SpectralLens: checking measure()'s arguments and the lens failed on global "
                         "rank(s) [3]"), r1
    assert r2.startswith(f"RuntimeError: SpectralLens: {BEFORE} failed on global rank(s) [3]"), r2
    assert r3.startswith("TypeError: SpectralLens.measure: step and tokens must be integers"), r3
    assert [g["same"] for g in got] == [True] * WORLD, got


@pytest.mark.slow
@pytest.mark.distributed
def test_an_unreadable_compute_error_on_one_rank_stops_all_four_at_once(results):
    r0, r1, r2, r3 = [r["error"] or "" for r in checked_case(results, "unprintable_compute_on_rank1", DEADLINE_S)]
    assert r1 == "OSError: Unprintable raised here", r1
    assert r0.startswith("RuntimeError: SpectralLens: computing the activation spectra of a tensor-parallel rank "
                         f"failed on global rank(s) [1] (global rank 1: Unprintable: {UNREAD})"), r0
    assert r2.startswith("RuntimeError: SpectralLens: computing the activation spectra failed on global rank(s) [0]"), r2
    assert r3.startswith("RuntimeError: SpectralLens: computing the activation spectra failed on global rank(s) [1]"), r3
