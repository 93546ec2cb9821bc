"""Numerical audit on adversarial inputs (2026-11-27): the accumulator, spectra and fits against float64
references; every case here either failed on the code before its fix or pins a boundary the audit checked."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_lens.spectra import estimate_crossover


def test_crossover_bend_fit_on_a_cliff_returns_a_fit_not_a_scipy_error():
    """A drop steeper than the sharpness bound allows (tail - head > 2 * 50; a rank-deficient spectrum
    falling to round-off does this) started the bend fit outside its search range, and SciPy raised
    'Initial guess is outside of provided bounds'. Now the fit runs; the sharpness stops at its bound,
    which ``located=False`` reports."""
    r = np.arange(1, 101.0)
    p = np.where(r <= 50, r**-1.0, 50.0**-1.0 * (r / 50) ** -150)
    fit = estimate_crossover(p / p.sum())
    assert fit.located is False
    assert np.isfinite([fit.rank, fit.head_alpha, fit.tail_alpha]).all()
    stick = estimate_crossover(p / p.sum(), method="broken_stick")
    assert stick.located and stick.rank == pytest.approx(50, rel=0.05)
    assert stick.tail_alpha == pytest.approx(150, rel=0.05)
