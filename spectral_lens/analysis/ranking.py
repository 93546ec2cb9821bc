"""A family's batch tiers ranked by an early statistic, with the probability each is the best."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["TierRanking", "rank_tiers", "close_call"]


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
        n_draws: the Monte Carlo draws behind ``p_best`` (its error is about ``sqrt(p (1 - p) / n_draws)``).
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
    n_draws: int = 4000


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
        n_draws=n_draws,
    )


def close_call(rk: TierRanking) -> str | None:
    """A one-line caution when the recommended tier is not clearly the likeliest best: another tier's
    ``p_best`` is larger, or smaller by less than twice the Monte Carlo error of the difference
    (``sqrt((p1 + p2 - (p1 - p2)^2) / n_draws)``, two multinomial shares). Tiers with equal or nearly
    equal values then swap P(best) by draw noise alone (0.49 vs 0.51); the recommendation stays the
    point estimate (protocol: smaller early statistic = fewer tokens), and this says it is a toss-up.
    ``None`` for one tier, NaN ``p_best``, or a clear lead. ``n_draws < 1`` (a ranking built by hand)
    is a ``ValueError``: there is no Monte Carlo error to compare with."""
    if len(rk.tiers) < 2 or any(math.isnan(p) for p in rk.p_best.values()):
        return None
    if not rk.n_draws >= 1:
        raise ValueError(f"close_call: family {rk.family!r}: TierRanking.n_draws must be >= 1 (the Monte Carlo "
                         f"draws behind p_best), got {rk.n_draws}")
    rec, p1 = rk.recommended, rk.p_recommended
    rival = max(rk.tiers[1:], key=lambda t: (rk.p_best[t], -rk.values[t]))
    p2 = rk.p_best[rival]
    err = math.sqrt(max(p1 + p2 - (p1 - p2) ** 2, 0.0) / rk.n_draws)
    if p2 < p1 - 2 * err:
        return None
    where = f"family {rk.family}" if rk.family else "these runs"
    v1, v2 = rk.values[rec], rk.values[rival]
    tie = "; equal values: the smaller tier first" if v1 == v2 else ""
    lead = f"tier {rival:g} has the larger P(best)" if p2 > p1 else "the two are within Monte Carlo error"
    return (f"{where}: tiers {rec:g} and {rival:g} are too close to call: P(best) {p1:.3f} vs {p2:.3f} ({lead}: "
            f"+-{2 * err:.3f} on the difference, {rk.n_draws} draws); tier {rec:g} is recommended by the point "
            f"estimate of the early {rk.statistic} ({v1:.6g} vs {v2:.6g}{tie}), not by evidence that it is the "
            f"better tier: treat them as equal, or measure more seeds.")
