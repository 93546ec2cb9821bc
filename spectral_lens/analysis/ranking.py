"""A family's batch tiers ranked by an early statistic, with the probability each is the best."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["TierRanking", "rank_tiers"]


@dataclass(frozen=True)
class TierRanking:
    """A family's batch tiers ordered by the predictor, best first.

    Attributes:
        family: the family.
        statistic: the ordering statistic (smaller = predicted more token-efficient).
        tiers: tiers, best first.
        values: per tier, the statistic (mean over the tier's runs, e.g. seeds).
        sigmas: per tier, its uncertainty (NaN if not estimable).
        p_best: per tier, Monte Carlo probability that it has the smallest true statistic.
        recommended: the predicted most token-efficient tier (``tiers[0]``).
        p_recommended: ``p_best[recommended]``.
        run_ids: per tier, the run ids behind it.
    """

    family: str
    statistic: str
    tiers: tuple[float, ...]
    values: dict[float, float]
    sigmas: dict[float, float]
    p_best: dict[float, float]
    recommended: float
    p_recommended: float
    run_ids: dict[float, tuple[str, ...]]


def rank_tiers(
    family: str,
    entries: Sequence[tuple[float, str, float, float]],
    *,
    statistic: str = "statistic",
    n_draws: int = 4000,
    random_state: int = 0,
) -> TierRanking:
    """Aggregate ``(tier, run_id, value, sigma)`` entries per tier and rank the tiers (smaller first).

    Several runs of a tier (seeds) are averaged: ``value = mean``, ``sigma^2 = (mean(sigma_i^2) +
    var_between) / n`` with the sample variance between the runs. ``p_best`` is estimated from
    ``n_draws`` normal draws per tier; NaN if any sigma is NaN. Ties in value keep the smaller tier first.
    """
    if not entries:
        raise ValueError(f"rank_tiers: family {family!r} has no (tier, run_id, value, sigma) entries to rank")
    if not n_draws >= 1:
        raise ValueError(f"rank_tiers: n_draws must be >= 1 (Monte Carlo draws for p_best), got {n_draws}")
    grouped: dict[float, list[tuple[str, float, float]]] = {}
    for tier, run_id, v, s in entries:
        if not math.isfinite(v):  # it would sort anywhere and take P(best) = 1 by accident
            raise ValueError(f"{family}: {statistic} of run {run_id!r} (tier {tier}) is {v}; cannot rank tiers by it")
        grouped.setdefault(tier, []).append((run_id, v, s))
    values, sigmas, run_ids = {}, {}, {}
    for tier, rows in grouped.items():
        vs = np.array([r[1] for r in rows])
        ss = np.array([r[2] for r in rows])
        n = len(rows)
        values[tier] = float(vs.mean())
        between = float(vs.var(ddof=1)) if n > 1 else 0.0
        sigmas[tier] = float(math.sqrt((np.mean(ss**2) + between) / n))
        run_ids[tier] = tuple(r[0] for r in rows)
    tiers = tuple(sorted(values, key=lambda t: (values[t], t)))
    if any(math.isnan(s) for s in sigmas.values()):
        p_best = {t: math.nan for t in tiers}
    else:
        rng = np.random.default_rng(random_state)
        mu = np.array([values[t] for t in tiers])
        sd = np.array([sigmas[t] for t in tiers])
        draws = mu + sd * rng.standard_normal((n_draws, len(tiers)))
        # a draw's win is shared among the tiers tied at its minimum (zero sigmas and equal values
        # give each tied tier an equal share, not all of it to the first one)
        is_min = draws == draws.min(axis=1, keepdims=True)
        wins = (is_min / is_min.sum(axis=1, keepdims=True)).mean(axis=0)
        p_best = {t: float(w) for t, w in zip(tiers, wins)}
    return TierRanking(
        family=family,
        statistic=statistic,
        tiers=tiers,
        values=values,
        sigmas=sigmas,
        p_best=p_best,
        recommended=tiers[0],
        p_recommended=p_best[tiers[0]],
        run_ids=run_ids,
    )
