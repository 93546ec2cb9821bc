"""The Spearman p-value and the Jensen-Shannon divergence come from scipy; ours only patches the
case where scipy returns NaN (near-equal spectra), shown here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from spectral_lens.analysis import js_divergence, spearman


def _brute_force(x, y):
    """Reference: rho and the two-sided p-value over all n! pairings (a Python loop), float64 numpy."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)

    def rho(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float(a @ b / math.sqrt((a @ a) * (b @ b)))

    r0 = rho(rx, ry)
    rhos = np.array([rho(rx[list(p)], ry) for p in itertools.permutations(range(len(x)))])
    # two-sided as scipy defines it: twice the smaller one-sided p, capped at 1 (with ties the null
    # distribution is not symmetric, and this differs from counting |rho| >= |rho_0|)
    greater, less = np.mean(rhos >= r0 - 1e-12), np.mean(rhos <= r0 + 1e-12)
    return r0, float(min(1.0, 2 * min(greater, less)))


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 7).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n), st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n))))
def test_spearman_exact_pvalue_equals_enumeration(data):
    x, y = np.array(data[0], float), np.array(data[1], float)
    if np.all(x == x[0]) or np.all(y == y[0]):
        assert all(math.isnan(v) for v in spearman(x, y))
        return
    rho, p = spearman(x, y)
    r0, p0 = _brute_force(x, y)
    assert rho == pytest.approx(r0, abs=1e-12)
    assert p == pytest.approx(p0, abs=1e-9)


def test_spearman_small_sample_is_not_the_t_approximation():
    from scipy.stats import spearmanr

    x = [1, 2, 3, 4]
    assert spearmanr(x, x).pvalue == pytest.approx(0.0)  # what the t-approximation says
    assert spearman(x, x) == (pytest.approx(1.0), pytest.approx(2 / 24))  # exact: 2 of 24 orderings
    rho, p = spearman(np.arange(12.0), np.arange(12.0) ** 3)
    assert rho == pytest.approx(1.0) and p == pytest.approx(spearmanr(np.arange(12.0), np.arange(12.0)).pvalue)
    assert all(math.isnan(v) for v in spearman([1, 2], [2, 1]))
    assert spearman([1, 2, 3, math.nan], [1, 2, 3, 4])[0] == pytest.approx(1.0)  # NaN pair dropped
    assert spearman([1, 2, 3], [1, math.inf, 2])[0] == pytest.approx(0.5)  # inf ranks last


def _jsd_reference(p, q):
    p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
    m = 0.5 * (p + q)
    kl = lambda a: float(np.sum(a[a > 0] * np.log(a[a > 0] / m[a > 0])))  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_js_divergence_matches_reference_on_adversarial_spectra():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 300))
        p = rng.random(n) ** rng.uniform(1, 30)  # ill-conditioned: many eigenvalues near 0
        q = np.sort(rng.random(n) ** rng.uniform(1, 30))[::-1]
        assert js_divergence(p, q) == pytest.approx(_jsd_reference(p, q), rel=1e-9, abs=1e-15)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))  # disjoint: the maximum
    assert js_divergence([3, 1], [3, 1, 0, 0]) == 0.0  # zero padding
    with pytest.raises(ValueError, match="all zero"):
        js_divergence([0, 0], [1, 1])


def test_scipy_returns_nan_for_near_equal_spectra_and_we_return_zero():
    rng = np.random.default_rng(0)
    nan_seen = 0
    for _ in range(200):
        p = rng.random(50) ** 8
        p /= p.sum()
        q = p * (1 + 1e-15 * rng.standard_normal(50))
        q /= q.sum()
        with np.errstate(invalid="ignore"):
            nan_seen += math.isnan(jensenshannon(p, q))
        d = js_divergence(p, q)
        assert 0.0 <= d < 1e-15
    assert nan_seen > 20  # scipy: sqrt of a tiny negative rounding residue
