"""rank_tiers tie order and the Spearman exact/approximate boundary (found by hand mutation testing).

* "Ties in value keep the smaller tier first" (``rank_tiers`` docstring): sorting ties by the
  larger tier first passed the suite.
* "Up to ``exact_max`` points the p-value is the exact permutation test" (``spearman`` docstring):
  using the t-approximation already at ``n == exact_max`` passed the suite (it checked n <= 7 and
  n = 12 only; the default ``EXACT_MAX`` is 8).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from spectral_lens.analysis import rank_tiers
from spectral_lens.analysis.spearman import EXACT_MAX, spearman


def test_tied_values_keep_the_smaller_tier_first():
    entries = [(16, "b16", 1.0, 0.1), (4, "b4", 1.0, 0.1), (8, "b8", 0.5, 0.1), (2, "b2", 1.0, 0.1)]
    rk = rank_tiers("f", entries, n_draws=200)
    assert rk.tiers == (8, 2, 4, 16)
    rk = rank_tiers("f", [(16, "b16", 1.0, 0.0), (4, "b4", 1.0, 0.0)], n_draws=200)
    assert rk.tiers == (4, 16) and rk.recommended == 4
    assert rk.p_best == {4: 0.5, 16: 0.5}  # a tie shares the win


def _exact_p(x, y):
    """Two-sided exact permutation p-value (no ties: share of pairings with |rho| >= |rho_0|), numpy."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perms = np.array(list(itertools.permutations(range(len(x)))))
    a = rx[perms] - rx.mean()
    b = ry - ry.mean()
    rhos = (a @ b) / np.sqrt((a**2).sum(axis=1) * (b @ b))
    r0 = float(np.corrcoef(rx, ry)[0, 1])
    return r0, float(np.mean(np.abs(rhos) >= abs(r0) - 1e-12))


def test_exact_p_value_up_to_and_including_exact_max():
    rng = np.random.default_rng(3)
    x = np.arange(EXACT_MAX, dtype=float)
    y = x + rng.normal(0, 2.5, EXACT_MAX)
    rho, p = spearman(x, y)
    r0, p0 = _exact_p(x, y)
    assert rho == pytest.approx(r0, abs=1e-12) and p == pytest.approx(p0, abs=1e-9)
    assert p != pytest.approx(stats.spearmanr(x, y).pvalue, abs=1e-6)  # the boundary is observable


@pytest.mark.parametrize("exact_max", [4, 5, 6])
def test_exact_max_parameter_is_inclusive(exact_max):
    rng = np.random.default_rng(exact_max)
    n = exact_max
    x = rng.normal(size=n + 1)
    y = x + rng.normal(0, 0.8, n + 1)
    # n == exact_max points: exact
    assert spearman(x[:n], y[:n], exact_max=exact_max)[1] == pytest.approx(_exact_p(x[:n], y[:n])[1], abs=1e-9)
    # n == exact_max + 1 points: scipy's t-approximation
    rho, p = spearman(x, y, exact_max=exact_max)
    ref = stats.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_nan_in_either_input_drops_the_pair():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, math.nan]
    y = [2.0, 1.0, math.nan, 4.0, 3.0, 6.0]
    keep = [0, 1, 3, 4]
    rho, p = spearman(x, y)
    r0, p0 = _exact_p(np.array(x)[keep], np.array(y)[keep])
    assert rho == pytest.approx(r0, abs=1e-12) and p == pytest.approx(p0, abs=1e-9)
    assert all(math.isnan(v) for v in spearman([1.0, 2.0, math.nan], [1.0, math.nan, 3.0]))
