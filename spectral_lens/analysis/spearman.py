"""Spearman rank correlation with a p-value that is exact where it matters (few runs).

A batch sweep has few tiers per family (the paper's have 4-6), where the t-approximation of
``scipy.stats.spearmanr`` is poor (it reports p = 0 for a perfect ordering of 4 points). Up to
``exact_max`` points the p-value is the exact permutation test of ``scipy.stats.permutation_test``
over all ``n!`` pairings; above, ``scipy.stats.spearmanr``'s.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

__all__ = ["spearman", "EXACT_MAX"]

#: Largest number of points with an exact permutation p-value (8! = 40320 pairings).
EXACT_MAX = 8


def spearman(x: Sequence[float], y: Sequence[float], exact_max: int = EXACT_MAX) -> tuple[float, float]:
    """Spearman ``(rho, two-sided p-value)``.

    Pairs with a NaN are dropped; fewer than 3 points or a constant input give ``(nan, nan)``.
    ``inf`` values are ranked (a run that never reached the target ranks last). Two-sided is scipy's
    definition: twice the smaller one-sided p-value, capped at 1. Without ties the null distribution
    is symmetric and this equals the share of pairings with ``|rho| >= |rho_observed|``; with ties it
    can be up to twice that share.
    """
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(rx, ry)
    rho = float(res.statistic)
    if x.size > exact_max:
        return rho, float(res.pvalue)
    ryc = ry - ry.mean()

    def pearson_with_y(r, axis=-1):  # r: permuted copies of rx; ranks are fixed, so Pearson = Spearman
        rc = r - r.mean(axis=axis, keepdims=True)
        return (rc * ryc).sum(axis=axis) / np.sqrt((rc**2).sum(axis=axis) * (ryc**2).sum())

    perm = stats.permutation_test(
        (rx,), pearson_with_y, permutation_type="pairings", n_resamples=np.inf, vectorized=True,
        alternative="two-sided",
    )
    return rho, float(min(1.0, perm.pvalue))
