"""Tests added by a hand mutation audit of ``spectral_lens/spectra/fit.py``, ``ranks.py`` and the summaries:
each pins a result that a small change of the code altered while the rest of the suite still passed."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

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
