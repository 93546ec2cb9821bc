"""Review 29 (revtppeers), 3 gloo ranks: a 1-D tensor-parallel mesh of three peers (a model of width 24, its MLPs
split evenly in three), the lens's ``group`` each rank's own group. Regression guards of review 29's agreement with
the mesh peers beyond two (they passed before this review): two peers' activation ``compute`` failing at once with
other causes (each raises its own, the third a ``RuntimeError`` naming both and quoting each, not a
``NonFiniteError``: one cause is not one), a bad argument on one peer then a measurement in step on all three, and
``params=`` on one peer of three only in ``gradient_spectra()`` (each rank's value named)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from reliability.test_review29_tppeers import BEFORE, SOLVE
from reliability.test_tensor_parallel import _LM, LAYERS, _pool, _tp, _values
from support.lens_faults import compute_raises
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens._warnings import NonFiniteError

WORLD = 3
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _lens(rank: int, **kwargs) -> SpectralLens:
    from torch.distributed.device_mesh import init_device_mesh

    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    torch.manual_seed(0)
    model = _tp(_LM(d=24).double(), init_device_mesh("cpu", (WORLD,)))
    kwargs.setdefault("params", ())
    return SpectralLens(model, _pool(2), layers=LAYERS, precision="float64", mask_fn=None, progress=False,
                        group=groups[rank], **kwargs)


def _compute_fails_on_two(rank: int) -> None:
    with compute_raises(rank, {1: OSError("out of memory on rank 1"), 2: NonFiniteError(SOLVE)}):
        _lens(rank, params="lm_head.weight").measure(1, 1)


def _bad_tokens_on_rank2_then_again(rank: int) -> dict:
    lens, out = _lens(rank, params="lm_head.weight"), {}
    try:
        lens.measure(1, 1.5 if rank == 2 else 1)
    except (RuntimeError, TypeError) as exc:
        out["first"] = f"{type(exc).__name__}: {exc}"
    out["again"] = _values(lens.measure(2, 2))
    return out


def _params_on_rank1_only(rank: int) -> None:
    _lens(rank, params="lm_head.weight" if rank == 1 else ()).gradient_spectra()


CASES = {"compute_fails_on_two": _compute_fails_on_two, "bad_tokens_on_rank2_then_again": _bad_tokens_on_rank2_then_again,
         "params_on_rank1_only": _params_on_rank1_only}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtppeers3"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_of_three_peers_failing_at_once(results):
    r0, r1, r2 = [r["error"] or "" for r in checked_case(results, "compute_fails_on_two", DEADLINE_S)]
    assert r1 == "OSError: out of memory on rank 1" and r2.startswith(f"NonFiniteError: {SOLVE}"), (r1, r2)
    assert r0.startswith("RuntimeError: SpectralLens: computing the activation spectra of a tensor-parallel rank failed "
                         "on global rank(s) [1, 2] (global rank 1: OSError: out of memory on rank 1) (global rank 2: "
                         f"NonFiniteError: {SOLVE}"), r0


@pytest.mark.slow
@pytest.mark.distributed
def test_a_bad_argument_on_one_of_three_peers_then_a_measurement_in_step(results):
    got = [r["value"] for r in checked_case(results, "bad_tokens_on_rank2_then_again", DEADLINE_S)]
    assert [g["first"].split(" (")[0] for g in got] == [
        f"RuntimeError: SpectralLens: {BEFORE.split(' (')[0]}"] * 2 + [
        "TypeError: SpectralLens.measure: step and tokens must be integers and val_loss a number or None; got step=1, "
        "tokens=1.5, val_loss=None"], got
    assert got[0]["again"] == got[1]["again"] == got[2]["again"] and len(got[0]["again"]) == 3, got


@pytest.mark.slow
@pytest.mark.distributed
def test_params_on_one_of_three_peers_only_is_refused_on_each_naming_every_ranks_value(results):
    errors = [r["error"] or "" for r in checked_case(results, "params_on_rank1_only", DEADLINE_S)]
    assert errors == [errors[0]] * WORLD and errors[0].startswith(
        "ValueError: SpectralLens: the tensor-parallel ranks [0, 1, 2] run the gradient protocol with other settings "
        "(params=() (no gradient protocol) on global rank 0, params=<probed matrices> on global rank 1, params=() (no "
        "gradient protocol) on global rank 2)"), errors
