"""Tests added by a hand mutation audit of ``spectral_lens/spectra/fit.py``, ``ranks.py`` and the summaries:
each pins a result that a small change of the code altered while the rest of the suite still passed."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from spectral_lens.spectra.fit import band_alpha, estimate_crossover, tail_window


def _tier_steps(n_layer: int) -> int:
    """Smallest k >= 0 with 48 * (4/3)^k >= n_layer, in exact rational arithmetic."""
    k = 0
    while Fraction(48) * Fraction(4, 3) ** k < n_layer:
        k += 1
    return k


def test_tail_window_beyond_d48_doubles_per_factor_four_thirds_exactly():
    """Depths beyond 48 take the window of the first tier 48 * (4/3)^k at or above them; 64 = 48 * 4/3
    exactly is still [800, 1600] (killed mutant: ceil without the 1e-9 guard, which put 64 layers a
    tier further out if log(64/48)/log(48/36) rounds above 1)."""
    for n_layer in range(49, 400):
        k = _tier_steps(n_layer)
        assert tail_window(n_layer) == (400 * 2**k, 800 * 2**k), n_layer
    assert tail_window(64) == (800, 1600)


@pytest.mark.parametrize("value", [0.01, 0.002, 1 / 3, 1 / 7, 1 / 300])
def test_flat_window_is_a_perfect_zero_slope_fit(value):
    """Equal eigenvalues over the window (a flat, e.g. isotropic, spectrum): slope 0 fitted exactly, so
    alpha = 0, r2 = 1 and stderr = 0, whatever the value. Before the fix the rounded mean of the logs left
    ~1e-16 residues, and r2 came out 0.0 for 0.002, 1/3, 1/7 (1.0 for 0.01); it also kills the mutant
    r2 = 0 for a window without spread."""
    p = np.concatenate([np.full(50, value), np.full(50, value / 5)])
    fit = band_alpha(p, (5, 40))
    assert fit.alpha == 0.0 and fit.r2 == 1.0 and fit.stderr == 0.0 and fit.n_points == 36


def test_crossover_needs_nine_ranks_exactly():
    """``estimate_crossover`` locates a bend from 9 ranks on and refuses 8 (killed mutant: 8 accepted)."""
    p = np.arange(1, 30, dtype=np.float64) ** -1.0
    with pytest.raises(ValueError, match=r"ranks \[1, 8\]: need at least 9 ranks"):
        estimate_crossover(p, ranks=(1, 8), method="broken_stick")
    fit = estimate_crossover(p, ranks=(1, 9), method="broken_stick")
    assert fit.ranks == (1, 9)


def test_crossover_says_when_it_located_none():
    """A fit whose r* lies outside the fitted ranks, or whose sharpness q stopped at a bound of its search,
    located no crossover: ``located`` is False (``spectral-lens inspect`` printed such a fit's artefacts,
    e.g. 'tail alpha 101' or r* = 93 of 31 ranks, as a crossover). An analytic Theorem-6 spectrum is
    located exactly."""
    from spectral_lens import Spectrum, crossover_rank
    from spectral_lens.analysis.synthetic import theorem6_activation

    v = torch.tensor(theorem6_activation(0.5, dim=768, eta=25.0, q=0.6).copy())
    fit = crossover_rank(Spectrum(v, n_rows=10_000, dim=768))
    assert fit.located and fit.rank == pytest.approx((25.0 * 0.5) ** (1 / 0.6), rel=1e-6)
    assert (fit.head_alpha, fit.tail_alpha) == pytest.approx((1.0, 2.2), rel=1e-6)
    # isotropic rows normalized per row (a post-LayerNorm output): no bend; q runs to its upper bound
    # (tail alpha = head alpha + 100) or r* beyond the nonzero ranks, depending on the last eigenvalue's round-off
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, dtype=torch.float64, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    fit = crossover_rank(Spectrum(torch.linalg.eigvalsh(x.T @ x / 2000).flip(0).clamp_min(0), n_rows=2000, dim=32))
    assert not fit.located
    # a cliff: the bend's sharpness runs to a bound of its search
    r = np.arange(1, 201, dtype=np.float64)
    cliff = np.where(r <= 20, r**-0.5, 1e-6 * r**-0.5)
    fit = crossover_rank(Spectrum(torch.tensor(cliff), n_rows=1000, dim=200))
    assert not fit.located and fit.ranks[0] <= fit.rank <= fit.ranks[1]
    # the broken stick's break is always inside the ranks
    assert crossover_rank(Spectrum(v, n_rows=10_000, dim=768), method="broken_stick").located
