"""The crossover fit's default ranks stop at the numerical rank (a spectrum of N < d rows).

A covariance of N rows has at most N - 1 nonzero eigenvalues; an eigensolver returns the other d - N + 1
as round-off, ~1e-16 of the largest. ``estimate_crossover``'s default ranks ran to every positive
eigenvalue, so the fit saw a cliff at rank N and reported it as the crossover (``located=True``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import Spectrum, crossover_rank
from spectral_lens.spectra import estimate_crossover
from support.data import theorem6_spectrum

P, Q, ETA_T = 1.0, 0.75, 40.0  # head exponent 1, tail exponent 2.5, r* = 40^(4/3) ~ 137


def _rank_deficient(n_rows: int, dim: int) -> np.ndarray:
    """A Theorem-6 spectrum on the first n_rows - 1 ranks, then the round-off a float64 eigensolver leaves
    (descending, 1e-17 to 1e-18 of the largest)."""
    head = theorem6_spectrum(n_rows - 1, P, Q, ETA_T)
    noise = np.geomspace(1e-17, 1e-18, dim - n_rows + 1) * head[0]
    return np.concatenate([head, noise])


@pytest.mark.parametrize("method", ["bend", "broken_stick"])
def test_default_ranks_stop_at_the_numerical_rank(method):
    n_rows, dim = 600, 1024
    values = _rank_deficient(n_rows, dim)
    p = values / values.sum()
    fit = estimate_crossover(p, method=method)
    assert fit.ranks == (1, n_rows - 1)
    reference = estimate_crossover(p, ranks=(1, n_rows - 1), method=method)  # the resolved ranks, by hand
    assert fit == reference
    if method == "bend":  # the float64 reference: the analytic spectrum's r*, p and p + 2q
        assert fit.located and fit.rank == pytest.approx(ETA_T ** (1 / Q), rel=1e-6)
        assert (fit.head_alpha, fit.tail_alpha) == pytest.approx((P, P + 2 * Q), rel=1e-6)
    # the same through a Spectrum, which also knows its row count
    spectrum = Spectrum(torch.from_numpy(values), n_rows=n_rows, dim=dim)
    via = crossover_rank(spectrum, method=method)
    assert via.ranks == (1, n_rows - 1)
    assert via.rank == pytest.approx(fit.rank, rel=1e-9)


def test_sample_covariance_of_few_rows():
    """Gaussian rows with a power-law covariance (alpha = 1), N = 200 < d = 512, eigenvalues in float64:
    the default fit uses the N - 1 resolved ranks; it reported r* ~ 147 with a tail exponent of ~54 (the
    cliff to round-off)."""
    rng = np.random.default_rng(0)
    n_rows, dim = 200, 512
    x = rng.standard_normal((n_rows, dim)) * np.arange(1, dim + 1.0) ** -0.5
    x -= x.mean(0)
    values = np.clip(np.linalg.eigvalsh(x.T @ x / (n_rows - 1))[::-1], 0, None)
    assert np.count_nonzero(values > 0) > n_rows  # the round-off the old default fitted
    p = values / values.sum()
    fit = estimate_crossover(p)
    assert fit.ranks == (1, n_rows - 1)
    assert fit.tail_alpha < 10  # not the cliff
    via = crossover_rank(Spectrum(torch.from_numpy(values.copy()), n_rows=n_rows, dim=dim))
    assert via.ranks == (1, n_rows - 1)
    # float32 eigenvalues: the round-off is ~1e-7 of the largest, the tolerance follows the dtype
    values32 = torch.linalg.eigvalsh(torch.from_numpy(x.T @ x / (n_rows - 1)).float()).flip(0).clamp_min(0)
    assert estimate_crossover(values32 / values32.sum()).ranks[1] <= n_rows - 1


def test_spectrum_row_count_caps_the_default_ranks():
    """A Spectrum whose values carry no visible round-off (e.g. written by hand or smoothed) still stops at
    its sample rank: n_rows - 1 for an activation covariance, n_rows for a gradient."""
    values = torch.from_numpy(theorem6_spectrum(300, P, Q, ETA_T))
    assert crossover_rank(Spectrum(values, n_rows=201, dim=300)).ranks == (1, 200)
    assert crossover_rank(Spectrum(values, n_rows=200, dim=300, kind="gradient")).ranks == (1, 200)
    assert crossover_rank(Spectrum(values, n_rows=10_000, dim=300)).ranks == (1, 300)
    with pytest.raises(ValueError, match=r"n_rows=5\).*only 4 are resolved"):
        crossover_rank(Spectrum(values, n_rows=5, dim=300, source="blocks.0"))
    with pytest.raises(ValueError, match="only 3 of 50 eigenvalues lie above round-off"):
        estimate_crossover(np.concatenate([[1.0, 0.5, 0.25], np.full(47, 1e-20)]))


def test_float32_copy_of_an_exact_spectrum_keeps_its_whole_window():
    """A float32 copy of a full-rank power law spanning ~1e-4 of its top value (d = 4,096): every eigenvalue
    is genuine. NumPy's matrix_rank tolerance (size * eps32 * max = 4.9e-4 of the top) cut the default
    window to ranks 1-1,386 and moved the fitted tail; sqrt(size) * eps keeps all 4,096."""
    d = 4096
    p = (np.arange(1, d + 1, dtype=np.float64) ** -1.15)
    p /= p.sum()
    assert p[-1] / p[0] < 1e-3
    fit32 = estimate_crossover(p.astype(np.float32))
    assert fit32.ranks == (1, d)
    assert fit32.ranks == estimate_crossover(p).ranks
