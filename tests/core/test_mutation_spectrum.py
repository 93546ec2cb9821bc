"""Tests added by a hand mutation audit of ``spectral_lens/spectra/eigen.py``, ``spectrum.py`` and
``summaries.py``: each pins a result that a small change of the code altered while the suite passed."""

from __future__ import annotations

import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.spectra.eigen import trace_normalize


def test_trace_normalize_refuses_an_all_zero_spectrum():
    """A dead layer's spectrum (all zeros) has no trace to normalize by: ValueError, not NaN (killed
    mutant: only a negative trace refused, which returned 0/0 = NaN for every p_j)."""
    with pytest.raises(ValueError, match="sum to zero"):
        trace_normalize(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to zero"):
        Spectrum(torch.zeros(4, dtype=torch.float64), n_rows=10, dim=4).normalized
    p = trace_normalize(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.equal(p, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("neg", [-1e-300, -1e-13, -5e-324])
def test_spectrum_refuses_any_negative_eigenvalue(neg):
    """Construction promises values >= 0: even a tiny negative (an unclamped eigensolver round-off)
    is refused, naming the value and the remedy (killed mutant: negatives down to -1e-12 accepted)."""
    with pytest.raises(ValueError, match="negative eigenvalue.*clamp_min"):
        Spectrum(torch.tensor([1.0, 0.5, neg], dtype=torch.float64), n_rows=10, dim=3)
    ok = Spectrum(torch.tensor([1.0, 0.5, neg], dtype=torch.float64).clamp_min(0), n_rows=10, dim=3)
    assert float(ok.values[-1]) == 0.0 and ok.n_nonzero == 2


def test_trace_normalize_near_the_float64_range_and_non_finite():
    """Eigenvalues near 1e308 sum to inf; they must still normalize to their exact shares, and a
    non-finite spectrum gets an error that says so (it used to return zeros, or NaN, or blame a zero sum)."""
    from spectral_lens.spectra.eigen import trace_normalize

    v = torch.tensor([1e308, 1e308, 1.0], dtype=torch.float64)
    p = trace_normalize(v)
    assert torch.allclose(p, torch.tensor([0.5, 0.5, 5e-309], dtype=torch.float64), rtol=1e-12, atol=0)
    small = torch.tensor([3e-320, 1e-320], dtype=torch.float64)  # subnormal: the sum stays exact
    assert torch.allclose(trace_normalize(small), torch.tensor([0.75, 0.25], dtype=torch.float64), rtol=1e-3)
    for bad in ([float("inf"), 1.0], [float("nan"), 1.0], []):
        with pytest.raises(ValueError, match="non-finite or no eigenvalues"):
            trace_normalize(torch.tensor(bad, dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to zero"):
        trace_normalize(torch.zeros(3, dtype=torch.float64))
