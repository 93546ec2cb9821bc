"""Review 28 (cpufix2): below 3,072 rows with fp32 products the CPU one-chunk update takes the shift and the
centred rows' column sums ``m`` from one float64 column sum of the rows (``m = sum(x) - n * shift``), with no
pass over the centred rows; and the cpufix panels / small-block add over every lower triangle shape."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens import _chunk_sums
from spectral_lens.spectra import moments

EPS64 = 2.0 ** -53


def _rows(seed, n, d, offset, spread, dtype=torch.float32):
    g = np.random.default_rng(seed)
    x = offset * (1 + g.random(d)) + spread * g.standard_normal((n, d)) * np.logspace(0, -3, d)
    return torch.from_numpy(x).to(dtype)


def _m_reference(rows, shift):
    """The centred rows' column sums in float64 around the shift as subtracted (exact to ~1e-16 relative)."""
    return np.add.reduce(rows.double().numpy() - shift.astype(np.float64), 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 3071), d=st.integers(1, 6),
       offset=st.sampled_from([0.0, 5.0, 1e4, 1e5, 1e6, -1e6]), spread=st.sampled_from([1.0, 1e-1, 1e-2]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), precision=st.sampled_from(["exact", "fast"]))
def test_m_from_one_float64_sum_matches_float64_reference(seed, n, d, offset, spread, dtype, precision):
    """m within float64 rounding of the rows' sum (~2^-53 n max|x|): far below the fp32 sum of the centred
    rows it replaces (~2^-24 relative per partial sum: it fails this bound at offsets 0-5, where the centred
    fp32 rows carry 24 significant bits; at 1e4-1e6 they carry few, and both sums are exact)."""
    rows = _rows(seed, n, d, offset, spread, dtype)
    with np.errstate(all="ignore"):
        n_out, m, shift, (y, _, _) = _chunk_sums._cpu_centered(rows, None, precision)
    assert n_out == n and y.dtype == torch.float32 and shift.dtype == np.float32
    x64 = rows.double().numpy()
    # the shift is the rows' mean, rounded once to fp32
    np.testing.assert_allclose(shift, (x64.sum(0) / n).astype(np.float32), rtol=2 ** -23, atol=0)
    bound = 8 * EPS64 * n * np.abs(x64).max(0) + 1e-300
    assert (np.abs(m - _m_reference(rows, shift)) <= bound).all()
    # the centred rows are x - shift in fp32, as before
    torch.testing.assert_close(y, (rows.float() - torch.from_numpy(shift)), rtol=0, atol=0)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_offset_updates_merges_masks_and_round_trips_match_float64(offset, precision, tmp_path):
    """Ill-conditioned rows (spreads 1..1e-3) far from 0 through the one-sum path (small calls), the masked
    path, a merge and a save/load: the covariance within fp32 accuracy of a float64 reference, the mean
    to float64 rounding of the offset."""
    d = 24
    xs = [_rows(k, n, d, offset, 1.0) for k, n in enumerate([1000, 7, 2500])]
    a = ActivationCovarianceAccumulator(d, precision=precision)
    a.update(xs[0])
    a.update(xs[1])
    b = ActivationCovarianceAccumulator(d, precision=precision)
    mask = torch.ones(xs[2].shape[0], dtype=torch.bool)
    mask[::3] = False
    b.update(xs[2], mask=mask)
    b.update(xs[2][~mask])
    a.merge(b)
    a = ActivationCovarianceAccumulator.load(a.save(tmp_path / "acc"))
    x64 = torch.cat(xs).double()
    assert a.n_rows == x64.shape[0]
    ref = np.cov((x64 - x64[0]).numpy(), rowvar=False)
    got = a.covariance().numpy()
    # fp32 rows at offset o carry an ulp of ~o * 2^-24 each: the reference sees the same rounded rows
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(np.diag(ref)).max()
    np.testing.assert_allclose(a.mean.numpy(), x64.mean(0).numpy(), rtol=1e-13, atol=0)


def test_fp32_rows_whose_centring_overflows_are_reported_as_an_overflow():
    """Finite rows with x - shift beyond fp32 (|x| ~ 3e38): m is finite now, so the error says what happened
    (the product overflowed though every row is finite), not that the rows hold NaN/Inf."""
    x = torch.tensor([[3e38], [-3e38], [3e38], [3e38]], dtype=torch.float32)
    acc = ActivationCovarianceAccumulator(1)
    with pytest.raises(Exception, match="overflowed"):
        acc.update(x)
        acc.covariance()


@pytest.mark.parametrize("d", [1, 2, 127, 129, 160, 192, 255, 320, 384, 640])
def test_lower_panels_cover_odd_panel_counts(d):
    y = torch.randn(33, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    out = torch.full((d, d), float("nan"), dtype=torch.float64)
    for a, b, o in moments.lower_panels(y, out):
        torch.mm(a, b, out=o)
    low = torch.tril(torch.ones(d, d, dtype=torch.bool))
    assert not torch.isnan(out[low]).any()
    torch.testing.assert_close(out[low], (y.T @ y)[low], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 127, 129, 255, 320, 640])
def test_cpu_updates_at_odd_panel_counts_match_float64(d):
    g = torch.Generator().manual_seed(d)
    xs = [torch.randn(300, d, generator=g) * torch.linspace(3, 0.1, d) + 5.0 for _ in range(2)]
    acc = ActivationCovarianceAccumulator(d)
    for x in xs:
        acc.update(x)
    x64 = torch.cat(xs).double()
    ref = np.atleast_2d(np.cov(x64.numpy(), rowvar=False))
    got = acc.covariance().numpy()
    assert np.abs(got - ref).max() < 2e-6 * np.abs(np.diag(ref)).max()


def test_all_rows_masked_give_no_rows_and_zero_sums():
    rows = _rows(0, 100, 3, 1e4, 1.0)
    with np.errstate(all="ignore"):
        n_out, m, shift, (y, _, _) = _chunk_sums._cpu_centered(rows, np.zeros(100, dtype=bool), "exact")
    assert n_out == 0 and y.shape[0] == 0 and not m.any() and np.isfinite(shift).all()
