"""Rows at the ends of the floating-point range: a right answer or a clear error, never a wrong one.

Found by an audit against float64 references (2026-11-27): float64 rows beyond float32's range, or
float32 rows near its limit under ``precision="float64"``, gave an infinite shift and were reported
as NaN/Inf rows; float32 rows of scale 1e-22 underflowed their float32 products and returned a
wrong spectrum (RankMe 3.0 instead of 6.8) without a word.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens._warnings import NonFiniteError

from support.data import reference_eigenvalues, rows_with_spectrum

EIGS = np.linspace(1.0, 0.1, 6)


def _rows(scale: float, n: int = 600, seed: int = 0) -> np.ndarray:
    return rows_with_spectrum(n, EIGS, 10.0, np.random.default_rng(seed)) * scale


def _rel_err(acc: ActivationCovarianceAccumulator, ref_rows: np.ndarray) -> float:
    ours = acc.compute().values.double().numpy()
    ref = reference_eigenvalues(ref_rows)
    return float(np.abs(ours - ref).max() / ref[0])


@pytest.mark.parametrize("max_chunk_rows", [131072, 250])  # the CPU one-chunk path; the generic path
@pytest.mark.parametrize("precision", ["exact", "fast", "float64"])
def test_float64_rows_beyond_float32_range(precision, max_chunk_rows):
    """float64 rows form float64 products in every precision, so their shift stays float64 too."""
    x = _rows(1e40)
    acc = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=max_chunk_rows)
    acc.update(torch.from_numpy(x))
    assert _rel_err(acc, x) < 1e-12
    assert acc.state_dict()["low_precision_products"] is False


@pytest.mark.parametrize("max_chunk_rows", [131072, 250])
def test_float32_rows_near_their_limit_in_float64_precision(max_chunk_rows):
    """|x| ~ 1e36: an fp32 sum of the shift's sample overflows; the float64 precision the overflow
    message recommends must then work."""
    x32 = torch.from_numpy(_rows(1e35, n=2000)).float()
    assert torch.isfinite(x32).all() and float(x32.abs().max()) > 1e36
    acc = ActivationCovarianceAccumulator(precision="float64", max_chunk_rows=max_chunk_rows)
    acc.update(x32)
    assert _rel_err(acc, x32.double().numpy()) < 1e-12


def test_float32_rows_near_their_limit_in_exact_precision_name_the_remedy():
    """float32 products of such rows overflow whatever the shift: the error names precision='float64'."""
    x32 = torch.from_numpy(_rows(1e35, n=2000)).float()
    for max_chunk_rows in (131072, 250):
        acc = ActivationCovarianceAccumulator(precision="exact", max_chunk_rows=max_chunk_rows, name="blocks.0")
        acc.update(x32)
        with pytest.raises(NonFiniteError, match=r"blocks\.0: .*precision='float64'"):
            acc.compute()


@pytest.mark.parametrize("max_chunk_rows", [131072, 250])
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_low_precision_rows_are_refused(precision, dtype, max_chunk_rows):
    x = torch.from_numpy(_rows(1e-22)).to(dtype)
    acc = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=max_chunk_rows, name="blocks.5")
    acc.update(x)
    with pytest.raises(NonFiniteError, match=r"blocks\.5: the rows are too small for float32 products.*"
                                             r"precision='float64'"):
        acc.compute()
    with pytest.raises(NonFiniteError, match="too small"):
        acc.compute_async().result()
    # the remedies named: float64 precision, or rows rescaled (the spectrum's shape is the same)
    wide = ActivationCovarianceAccumulator(precision="float64", max_chunk_rows=max_chunk_rows)
    wide.update(x)
    assert _rel_err(wide, x.double().numpy()) < 1e-12
    scaled = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=max_chunk_rows)
    scaled.update(x.double().mul(1e22).to(dtype))
    got = scaled.compute().values.double().numpy()
    ref = wide.compute().values.double().numpy() * 1e44
    assert np.abs(got - ref).max() / ref[0] < 1e-2  # the rescaled bf16/fp32 rows, not the same values


def test_the_floor_leaves_ordinary_and_degenerate_rows_alone():
    """Scale 1e-12 (variance 1e-24, far above 2^-100) is accurate in float32 products; rows of zero
    variance give an all-zero spectrum without this error; float64 rows as small as 1e-22 are exact."""
    x = _rows(1e-12)
    acc = ActivationCovarianceAccumulator(precision="exact")
    acc.update(torch.from_numpy(x).float())
    assert _rel_err(acc, x.astype(np.float32).astype(np.float64)) < 1e-5
    const = ActivationCovarianceAccumulator(precision="exact")
    const.update(torch.full((50, 4), 3.25))
    assert float(const.compute().values.abs().max()) == 0.0
    tiny64 = ActivationCovarianceAccumulator(precision="exact")
    tiny64.update(torch.from_numpy(_rows(1e-22)))
    assert _rel_err(tiny64, _rows(1e-22)) < 1e-12


def test_low_precision_products_flag_travels_with_the_state(tmp_path):
    """The flag behind the floor survives merge, state_dict and save/load; a file written before the
    flag existed assumes what its precision allows."""
    tiny = torch.from_numpy(_rows(1e-22)).float()
    low = ActivationCovarianceAccumulator(precision="exact")
    low.update(tiny)
    high = ActivationCovarianceAccumulator(precision="exact")
    high.update(tiny.double())
    assert low.state_dict()["low_precision_products"] and not high.state_dict()["low_precision_products"]
    merged = ActivationCovarianceAccumulator(precision="exact").merge(high).merge(low)
    assert merged.state_dict()["low_precision_products"]
    loaded = ActivationCovarianceAccumulator.load(low.save(tmp_path / "low"))
    with pytest.raises(NonFiniteError, match="too small"):
        loaded.compute()
    old = {k: v for k, v in high.state_dict().items() if k != "low_precision_products"}
    restored = ActivationCovarianceAccumulator(precision="exact")
    restored.load_state_dict(old)  # a file from before the flag: its products are unknown, not checked
    assert restored.state_dict()["low_precision_products"] is False
    assert _rel_err(restored, tiny.double().numpy()) < 1e-12
    bad = {**high.state_dict(), "low_precision_products": "yes"}
    from spectral_lens._warnings import StateFormatError

    with pytest.raises(StateFormatError, match="low_precision_products must be true or false"):
        restored.load_state_dict(bad)


def test_tiny_rows_are_refused_also_when_nan_rows_were_skipped():
    x = torch.from_numpy(_rows(1e-22)).float()
    x[7, 2] = float("nan")
    acc = ActivationCovarianceAccumulator(precision="exact", nonfinite="skip", name="blocks.5")
    acc.update(x)
    with pytest.raises(NonFiniteError, match="too small"):
        acc.compute()
