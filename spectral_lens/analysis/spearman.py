"""Spearman rank correlation with a p-value that is exact where it matters (few runs).

A batch sweep has few tiers per family (the paper's have 4-6), where the t-approximation of
``scipy.stats.spearmanr`` is poor (it reports p = 0 for a perfect ordering of 4 points). Up to
``exact_max`` points the p-value is the exact permutation test of ``scipy.stats.permutation_test``
over all ``n!`` pairings; above, ``scipy.stats.spearmanr``'s. ``exact_max`` is at most :data:`EXACT_LIMIT`
(10: 10! = 3,628,800 pairings, seconds; 11 points are 40 million, all held at once by ``permutation_test``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

__all__ = ["spearman", "EXACT_MAX", "EXACT_LIMIT"]

#: Largest number of points with an exact permutation p-value (8! = 40320 pairings).
EXACT_MAX = 8

#: Largest ``exact_max`` taken: the exact test enumerates ``n!`` pairings (10! = 3,628,800 took 9-16 s and 2.1 GB
#: peak memory on a busy 2-core CPU; each further point multiplies time and memory by ``n``). scipy's ``permutation_test`` goes exact only while ``n!`` is within ``n_resamples`` (9999 by
#: default), and otherwise samples; ``n_resamples=np.inf`` here asked it to enumerate whatever ``n`` is.
EXACT_LIMIT = 10


def spearman(x: Sequence[float], y: Sequence[float], exact_max: int = EXACT_MAX) -> tuple[float, float]:
    """Spearman ``(rho, two-sided p-value)``.

    ``exact_max`` (an integer, at most :data:`EXACT_LIMIT`, else ``ValueError``): the most points given the
    exact permutation p-value. Pairs with a NaN are dropped; fewer than 3 points or a constant input give ``(nan, nan)``.
    ``inf`` values are ranked (a run that never reached the target ranks last). Two-sided is scipy's
    definition: twice the smaller one-sided p-value, capped at 1. Without ties the null distribution
    is symmetric and this equals the share of pairings with ``|rho| >= |rho_observed|``; with ties it
    can be up to twice that share.
    """
    from scipy import stats

    if isinstance(exact_max, bool) or not isinstance(exact_max, numbers.Integral):
        raise TypeError(f"spearman: exact_max must be an integer <= EXACT_LIMIT ({EXACT_LIMIT}), got {exact_max!r}")
    if exact_max > EXACT_LIMIT:  # n! pairings: 11 points are 40 million, held at once
        raise ValueError(f"spearman: exact_max={exact_max} exceeds EXACT_LIMIT ({EXACT_LIMIT}): the exact p-value "
                         f"enumerates n! pairings ({EXACT_LIMIT}! = {math.factorial(EXACT_LIMIT):,}); more points use "
                         "scipy.stats.spearmanr's p-value")
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
