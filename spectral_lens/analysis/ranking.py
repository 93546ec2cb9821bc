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


def _words(items: Sequence[str]) -> str:
    """``["4"]`` -> ``4``, ``["4", "8"]`` -> ``4 and 8``, ``["4", "8", "16"]`` -> ``4, 8 and 16``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def close_call(rk: TierRanking) -> str | None:
    """A one-line caution when the recommended tier is not clearly the likeliest best: another tier's
    ``p_best`` is larger, or smaller by less than twice the Monte Carlo error of the difference
    (``sqrt((p1 + p2 - (p1 - p2)^2) / n_draws)``, two multinomial shares). Tiers with equal or nearly
    equal values then swap P(best) by draw noise alone (0.49 vs 0.51); the recommendation stays the
    point estimate (protocol: smaller early statistic = fewer tokens), and this says it is a toss-up.
    Every such tier is named, in ranking order (three tiers at P(best) about 1/3 each are a three-way
    toss-up, not a two-way one). ``None`` for one tier, NaN ``p_best``, or a clear lead. ``n_draws < 1``
    (a ranking built by hand) is a ``ValueError``: there is no Monte Carlo error to compare with."""
    if len(rk.tiers) < 2 or any(math.isnan(p) for p in rk.p_best.values()):
        return None
    if not rk.n_draws >= 1:
        raise ValueError(f"close_call: family {rk.family!r}: TierRanking.n_draws must be >= 1 (the Monte Carlo "
                         f"draws behind p_best), got {rk.n_draws}")
    rec, p1 = rk.recommended, rk.p_recommended

    def err(p2: float) -> float:
        return math.sqrt(max(p1 + p2 - (p1 - p2) ** 2, 0.0) / rk.n_draws)

    rivals = [t for t in rk.tiers if t != rec and rk.p_best[t] >= p1 - 2 * err(rk.p_best[t])]
    if not rivals:
        return None
    where = f"family {rk.family}" if rk.family else "these runs"
    v1 = rk.values[rec]
    tie = "; equal values: the smaller tier first" if any(rk.values[t] == v1 for t in rivals) else ""
    larger = [f"{t:g}" for t in rivals if rk.p_best[t] > p1]
    margin = 2 * max(err(rk.p_best[t]) for t in rivals)
    if len(rivals) == 1:  # the two-tier wording
        (rival,) = rivals
        lead = f"tier {rival:g} has the larger P(best)" if larger else "the two are within Monte Carlo error"
        diff = f"+-{margin:.3f} on the difference"
        them = "them"
    else:
        lead = (f"tier {larger[0]} has a larger P(best)" if len(larger) == 1 else
                f"tiers {_words(larger)} have a larger P(best)" if larger else
                f"all {len(rivals) + 1} are within Monte Carlo error")
        diff = f"+-{margin:.3f} or less on each difference from tier {rec:g}"
        them = f"these {len(rivals) + 1}"
    p_rivals = ", ".join(f"{rk.p_best[t]:.3f}" for t in rivals)
    v_rivals = ", ".join(f"{rk.values[t]:.6g}" for t in rivals)
    return (f"{where}: tiers {_words([f'{t:g}' for t in (rec, *rivals)])} are too close to call: P(best) {p1:.3f} "
            f"vs {p_rivals} ({lead}: {diff}, {rk.n_draws} draws); tier {rec:g} is recommended by the point "
            f"estimate of the early {rk.statistic} ({v1:.6g} vs {v_rivals}{tie}), not by evidence that it is the "
            f"better tier: treat {them} as equal, or measure more seeds.")
