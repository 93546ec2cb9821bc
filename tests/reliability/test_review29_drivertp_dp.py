"""Review 29 (drivertp), 4 gloo ranks: the integrations' driver (:class:`LensDriver`) with two data-parallel replicas
of a 2-rank tensor-parallel mesh (``(dp, tp)``: meshes [0, 1] and [2, 3]) and ``group=`` the data-parallel group
([0, 2] and [1, 3]); only global rank 0 has a ``RunWriter``, so the group [1, 3]'s rank 0 (global rank 1) has none.

Before (process-group timeout 20 s; the reviewer's reproduction, the first case): with rank 0's writer closed,
``LensDriver.measure`` skipped on ranks 0 and 2 (their group's rank 0 holds the closed writer) while ranks 1 and 3
measured, and rank 1 waited in the peers' check of the measurement until the timeout; after a resume at a step rank
0's record holds a measurement at, ranks 0 and 2 kept an evaluation's loss there while ranks 1 and 3 measured alone
(by the timeout too). Now all four skip, or all four keep the loss, at once. A regression guard (it passed before): a
non-finite measurement on one rank is skipped on all four.
"""

from __future__ import annotations

import warnings

import pytest
from reliability.test_review29_drivertp import _writer, closed_writer, resumed_then_evaluated
from reliability.test_tensor_parallel import LAYERS, _mesh_2d, _plain, _pool, _tp
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens.integrations._driver import LensDriver

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _lens(rank: int, writer=None) -> SpectralLens:
    mesh = _mesh_2d()
    return SpectralLens(_tp(_plain(), mesh["tp"]), _pool(2), layers=LAYERS, precision="float64", mask_fn=None,
                        progress=False, group=mesh["dp"].get_group(), params=(), writer=writer)


def _closed_writer(rank: int) -> dict:
    """Rank 0's writer closed, then an evaluation's measurement on every rank; then, the writer taken away, all
    measure in step again (the spectra of a plain measurement)."""
    return closed_writer(_writer(rank, "closed_dp"), lambda writer: _lens(rank, writer))


def _resumed_then_evaluated(rank: int) -> dict:
    """Every rank measures at step 2 (rank 0 records it); a fresh lens and driver on each (restarted processes)
    resume at step 2, and an evaluation there measures unless the step counts as measured (the callbacks' rule)."""
    return resumed_then_evaluated(_writer(rank, "resumed_dp"), lambda writer: _lens(rank, writer))


def _nonfinite_on_rank1(rank: int) -> dict:
    """Rank 1's activation ``compute`` raises a ``NonFiniteError`` (a diverged run): ``LensDriver.measure`` skips the
    measurement on every rank alike, its mesh peer (rank 0) and rank 0's group included (a regression guard: the lens
    agrees it with the peers as a ``NonFiniteError``); then all four measure in step again."""
    from reliability.test_review29_tppeers import SOLVE

    import spectral_lens.lens as lens_mod
    from spectral_lens._warnings import NonFiniteError

    lens = _lens(rank)
    driver = LensDriver(lens, (), None)
    saved = lens_mod.ActivationCapture.compute

    def compute(*args, **kwargs):
        raise NonFiniteError(SOLVE)

    if rank == 1:
        lens_mod.ActivationCapture.compute = compute
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            skipped = driver.measure(3, 3)
    finally:
        lens_mod.ActivationCapture.compute = saved
    driver.measure(4, 4)
    return {"skipped": skipped, "warned": any("is skipped (the training goes on)" in str(w.message) for w in caught),
            "history": [m.step for m in lens.history]}


CASES = {"closed_writer": _closed_writer, "resumed_then_evaluated": _resumed_then_evaluated,
         "nonfinite_on_rank1": _nonfinite_on_rank1}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("drivertp_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_closed_writer_on_global_rank_0_skips_the_measurement_on_all_four_ranks(results):
    got = [r["value"] for r in checked_case(results, "closed_writer", DEADLINE_S)]
    assert [g["skipped"] for g in got] == [{}] * WORLD, got
    assert [g["warned"] for g in got] == [True] * WORLD, got
    assert [g["history"] for g in got] == [[4]] * WORLD, got
    assert [g["same"] for g in got] == [True] * WORLD, got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_step_rank_0_recorded_counts_as_measured_on_all_four_ranks_after_a_resume(results):
    got = [r["value"] for r in checked_case(results, "resumed_then_evaluated", DEADLINE_S)]
    assert [g["measured"] for g in got] == [True] * WORLD, got
    assert [g["history"] for g in got] == [[]] * WORLD, got
    assert got[0]["val_loss_steps"] == [2], got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_non_finite_measurement_on_one_rank_is_skipped_on_all_four(results):
    got = [r["value"] for r in checked_case(results, "nonfinite_on_rank1", DEADLINE_S)]
    assert [g["skipped"] for g in got] == [{}] * WORLD, got
    assert [g["warned"] for g in got] == [True] * WORLD, got
    assert [g["history"] for g in got] == [[4]] * WORLD, got
