"""Mutation audit of ``spectral_lens.weights``: every field of a weight spectrum and of a power-law fit
against a float64 reference computed here from its documented definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_lens.weights import powerlaw_fit, weight_spectrum


def _reference_fit(x: np.ndarray, xmin: float) -> tuple[float, int, float, float]:
    """alpha, n_tail, KS distance and stderr of the Hill/Clauset MLE above ``xmin``, term by term."""
    tail = np.sort(x[x >= xmin])
    n = tail.size
    alpha = 1.0 + n / sum(math.log(t / xmin) for t in tail)
    cdf = [1.0 - (t / xmin) ** (1.0 - alpha) for t in tail]
    ks = max(max((i + 1) / n - c, c - i / n) for i, c in enumerate(cdf))  # both sides of each step
    return alpha, n, ks, (alpha - 1.0) / math.sqrt(n)


def test_a_tall_weight_has_min_of_its_sides_eigenvalues():
    w = torch.randn(30, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = weight_spectrum(w, "tall")
    ref = np.linalg.svd(w.numpy(), compute_uv=False) ** 2
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=1e-12)
    assert spec.dim == 7 == spec.values.numel() and spec.n_rows == 30


def test_fit_at_a_given_xmin_equal_to_an_eigenvalue_matches_the_reference():
    rng = np.random.default_rng(1)
    x = np.sort(rng.pareto(1.7, 400) + 1.0)
    xmin = float(x[150])  # an eigenvalue itself: ">= xmin" keeps it
    fit = powerlaw_fit(x, xmin=xmin)
    alpha, n, ks, stderr = _reference_fit(x, xmin)
    assert fit.n_tail == n == 250 and fit.n_total == 400
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.ks_distance == pytest.approx(ks, rel=1e-12)
    assert fit.stderr == pytest.approx(stderr, rel=1e-12)


def test_chosen_xmin_fit_matches_the_reference_and_the_ks_minimum():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.pareto(1.5, 300) + 1.0, rng.uniform(0.1, 1.0, 200)])
    fit = powerlaw_fit(x, min_tail=10)
    alpha, n, ks, stderr = _reference_fit(x, fit.xmin)
    assert (fit.alpha, fit.n_tail) == (pytest.approx(alpha, rel=1e-12), n)
    assert fit.ks_distance == pytest.approx(ks, rel=1e-12) and fit.stderr == pytest.approx(stderr, rel=1e-12)
    xs = np.sort(x)
    best = min(_reference_fit(x, float(v))[2] for v in xs[: xs.size - 10 + 1])
    assert fit.ks_distance == pytest.approx(best, rel=1e-12)  # every candidate tried (500 <= 512)


def test_tied_eigenvalues_stay_in_the_tail_they_start():
    # a spectrum with ties (a low-rank weight's repeated values): a tail starting at a tied value must
    # hold all of its copies, as n_tail = #{x >= xmin} says
    for seed in (0, 1):
        x = np.round(np.random.default_rng(seed).pareto(1.5, 300) + 1.0, 1)  # values to 0.1: many ties
        fit = powerlaw_fit(x)
        assert fit.n_tail == int((x >= fit.xmin).sum())
        alpha, _, ks, _ = _reference_fit(x, fit.xmin)
        assert fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.ks_distance == pytest.approx(ks, rel=1e-12)


def test_zero_and_negative_eigenvalues_are_left_out():
    rng = np.random.default_rng(3)
    x = rng.pareto(2.0, 200) + 1.0
    with_junk = np.concatenate([x, np.zeros(30), -x[:50]])  # roundoff-negative eigenvalues of a PSD matrix
    a, b = powerlaw_fit(x), powerlaw_fit(with_junk)
    assert (a.alpha, a.xmin, a.n_tail, a.n_total) == (b.alpha, b.xmin, b.n_tail, b.n_total) and b.n_total == 200
