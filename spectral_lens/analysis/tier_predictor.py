"""Shared fit / predict / score machinery of the tier predictors, and their score types.

A tier predictor computes one early statistic per run (:mod:`.early`), ranks each family's batch
tiers by it (:mod:`.ranking`) and scores the ranking against realized token inefficiency with a
Spearman correlation (:mod:`.spearman`, paper Fig. 2).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..records import RunRecord, open_runs
from .early import EarlyStatistic, FractionNotReachedError, NoEarlyStatisticError
from .efficiency import (LABEL_GRID, NO_FAMILY, SweepWarning, divergence, failure, group_by_family, percent,
                         pick_learning_rates, token_inefficiency)
from .ranking import TierRanking, rank_tiers
from .spearman import spearman

__all__ = ["FamilyScore", "PredictionScore", "TierPredictor"]


@dataclass(frozen=True)
class FamilyScore:
    """Spearman correlation of one family's early statistic with its realized ``eps_tok``; ``n`` is the
    number of runs it was computed on (runs with an unknown, NaN ``eps_tok`` are not counted)."""

    rho: float
    pvalue: float
    n: int


@dataclass(frozen=True)
class PredictionScore:
    """How well an early statistic orders realized token inefficiency (paper Fig. 2).

    Attributes:
        statistic: the statistic scored.
        rho, pvalue, n: Spearman correlation (``scipy.stats.spearmanr``) between the per-family
            min-max normalized statistic and ``eps_tok``, pooled over all runs (for one family this
            equals the within-family value: min-max scaling keeps ranks). The two-sided p-value is
            exact (all rank permutations) for n <= 8, scipy's t-approximation above. ``n`` counts the
            runs the rho was computed on: a run whose ``eps_tok`` is NaN (cut short before the target,
            or a family where no run reached it) is in ``points`` but not in ``n``.
        within: per family, :class:`FamilyScore` (rho is NaN with fewer than 3 runs, or constant input).
        mean_within_rho: mean of the finite within-family rhos (the paper's "within-family mean").
        points: ``(run_id, family, tier, normalized statistic, eps_tok)`` for plotting.
    """

    statistic: str
    rho: float
    pvalue: float
    n: int
    within: dict[str, FamilyScore]
    mean_within_rho: float
    points: tuple[tuple[str, str, float, float, float], ...] = field(repr=False)


class TierPredictor:
    """Shared fit / predict / score machinery: subclasses define the per-run early statistic
    (``_early``), optionally its ordering value (``_badness``) and a check across runs (``_check_runs``)."""

    statistic = "statistic"

    def __init__(self, fraction: float = 0.2, *, noise_neighbors: int = 5, n_draws: int = 4000, random_state: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        # the jitter is the residual of a line through them: 3 points at least; 3.5 and NaN passed here and
        # failed in NumPy's slicing at fit time, n_draws=2.5 in the Monte Carlo draws
        if not _is_int(noise_neighbors) or noise_neighbors < 3:
            raise ValueError(f"{type(self).__name__}: noise_neighbors must be >= 3, an integer (the jitter is a "
                             f"line fit's residual), got {noise_neighbors!r}")
        if not _is_int(n_draws) or n_draws < 1:
            raise ValueError(f"{type(self).__name__}: n_draws must be >= 1, an integer (Monte Carlo draws for "
                             f"p_best), got {n_draws!r}")
        self.fraction = fraction
        self.noise_neighbors = noise_neighbors
        self.n_draws = n_draws
        self.random_state = random_state

    # subclass hooks
    def _early(self, run: RunRecord) -> EarlyStatistic:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_runs(self, runs: list[RunRecord]) -> None:
        """Validate a set of runs before their statistics are compared (default: nothing)."""

    def _flags(self, runs: list[RunRecord], stats: list[EarlyStatistic]) -> list[str]:
        """One-line cautions about runs of a family that are compared although they differ: their
        token budgets (``RunInfo.total_tokens``: the early fraction is then a different token count)."""
        out = []
        stat_ids = {s.run_id for s in stats}
        for family, members in group_by_family(r for r in runs if r.run_id in stat_ids).items():
            out += _differ(family, {r.run_id: r.info.total_tokens for r in members if r.info.total_tokens},
                           "token budgets (RunInfo.total_tokens)",
                           f"the early checkpoint at {percent(self.fraction, LABEL_GRID)} of the budget is a different token count in "
                           "each, and eps_tok compares runs of different schedules")
        return out

    def _usable(self, runs: list[RunRecord]) -> tuple[list[EarlyStatistic], list[RunRecord], dict[str, str]]:
        """The early statistic of every run that has one; the others (diverged, at a learning rate
        other than its tier's best (:func:`~spectral_lens.analysis.pick_learning_rates`), or no usable
        early statistic: :class:`NoEarlyStatisticError`) are left out with a one-line reason each, and
        a :class:`SweepWarning` per run. No run left raises the first run's error (all their reasons; one
        run: its own error, with the note that it failed when it did, as a left-out run's reason has)."""
        stats, kept, excluded, errors, diverged = [], [], {}, [], set()
        _, other_lr = pick_learning_rates(runs)
        for r in runs:
            why = divergence(r) or other_lr.get(r.run_id)
            if why is not None:
                diverged.add(r.run_id)
            else:
                try:
                    stats.append(self._early(r))
                    kept.append(r)
                    continue
                except NoEarlyStatisticError as exc:  # short of the fraction because it failed: said
                    failed = failure(r) if isinstance(exc, FractionNotReachedError) else None
                    why = f"{exc}; it {failed}" if failed else str(exc)
                    errors.append(exc)
            excluded[r.run_id] = why
        if not stats:
            if len(runs) == 1 and errors:  # its own error, with the same "; it failed (...)" note as a left-out run's
                exc, why = errors[0], excluded[runs[0].run_id]
                if why == str(exc):
                    raise exc
                raise type(exc)(why) from None
            kind = FractionNotReachedError if errors and len(errors) == len(runs) and all(
                isinstance(e, FractionNotReachedError) for e in errors) else NoEarlyStatisticError
            raise kind(f"{type(self).__name__}: no run has a usable {self.statistic} at {percent(self.fraction, LABEL_GRID)}: "
                       + "; ".join(excluded.values()))
        for rid, why in excluded.items():  # a divergence or a rate is the same line from every predictor (shown once)
            what = "the rankings and scores" if rid in diverged else f"the {self.statistic} ranking and score"
            warnings.warn(f"{why}; left out of {what}", SweepWarning, stacklevel=3)
        return stats, kept, excluded

    def _badness(self, stat: EarlyStatistic, run: RunRecord) -> tuple[float, float]:
        """(value, sigma) of the ordering statistic: smaller = predicted more token-efficient."""
        return stat.value, stat.sigma

    def fit(self, runs) -> "TierPredictor":
        """Measure every run's early statistic and learn per-family min/max for normalization.

        Learned attributes: ``runs_``, ``statistics_`` (list of :class:`EarlyStatistic`),
        ``values_`` (run id -> (value, sigma) of the ordering statistic), ``family_range_``
        (family -> (min, max) of the statistic), ``rankings_`` (family -> :class:`TierRanking`),
        ``excluded_`` (run id -> one line: why the run is left out of the ranking and the score: it
        diverged (:func:`~spectral_lens.analysis.divergence`), its tier has runs at several learning
        rates and its rate is not the best (:func:`~spectral_lens.analysis.pick_learning_rates`: the
        line names the rates, their losses and the one used), or has no usable statistic at the
        fraction (:class:`~spectral_lens.analysis.NoEarlyStatisticError`: cut short before it,
        measured only after it, a spectrum that cannot be fitted there)), ``flags_`` (one-line
        cautions about runs compared although they differ, e.g. in token budget). Each excluded
        run and each flag is also a :class:`~spectral_lens.analysis.SweepWarning`. Returns ``self``.
        """
        self.runs_ = open_runs(runs)
        if not self.runs_:
            raise ValueError(f"{type(self).__name__}.fit: no runs given")
        self._check_runs(self.runs_)
        self.statistics_, kept, self.excluded_ = self._usable(self.runs_)
        self.flags_ = self._flags(kept, self.statistics_)
        for f in self.flags_:
            warnings.warn(f, SweepWarning, stacklevel=2)
        self.values_ = {s.run_id: self._badness(s, r) for s, r in zip(self.statistics_, kept)}
        self.family_range_ = _family_ranges(self.statistics_, self.values_)
        self.rankings_ = self._rank(self.statistics_, self.values_)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "statistics_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(runs) first")

    def _measure(self, runs):
        if runs is None:
            self._check_fitted()
            return self.runs_, self.statistics_, self.values_
        runs = open_runs(runs)
        self._check_runs(runs)
        stats, kept, _ = self._usable(runs)
        return runs, stats, {s.run_id: self._badness(s, r) for s, r in zip(stats, kept)}

    def predict(self, runs=None) -> dict[str, TierRanking]:
        """Order each family's tiers by the early statistic (best first), with ``p_best``.

        ``runs=None`` uses the runs given to :meth:`fit`. Returns family -> :class:`TierRanking`.
        """
        _, stats, values = self._measure(runs)
        return self._rank(stats, values)

    def _rank(self, stats: list[EarlyStatistic], values: dict[str, tuple[float, float]]) -> dict[str, TierRanking]:
        out = {}
        by_family: dict[str, list[EarlyStatistic]] = {}
        for s in stats:
            by_family.setdefault(s.family, []).append(s)
        for family, members in by_family.items():
            out[family] = rank_tiers(
                family, [(s.tier, s.run_id, *values[s.run_id]) for s in members],
                statistic=self.statistic, n_draws=self.n_draws, random_state=self.random_state,
            )
        return out

    def normalized(self, runs=None) -> dict[str, float]:
        """Per-family min-max normalized statistic per run id (0 = best of its family, 1 = worst).

        ``runs=None``: the fitted runs with the learned ``family_range_``. Otherwise the range of each
        family is taken from the runs given. A family whose values are all equal maps to 0.
        """
        _, stats, values = self._measure(runs)
        return _normalize(stats, values, self.family_range_ if runs is None else None)

    def score(self, runs=None, targets: float | Mapping[str, float] | None = None) -> PredictionScore:
        """Spearman rho between the early statistic and realized ``eps_tok`` (paper Fig. 2).

        Args:
            runs: runs to score (default: the fitted runs); they must have run past the target.
            targets: the target validation loss (``eps_tok`` is computed from the records with
                :func:`~spectral_lens.analysis.token_inefficiency`), or a mapping run id -> eps_tok.

        Within-family rhos use the raw statistic; the pooled rho uses per-family min-max
        normalized values (paper: "across-family rho"). Runs that never reached the target have
        ``eps_tok = inf`` and rank last; runs cut short before it have ``eps_tok = NaN`` and are left
        out of the rhos and of their ``n``. Each run counts once (seeds are not averaged here).
        """
        if targets is None:
            raise ValueError("score needs targets: a target validation loss, or a mapping run id -> eps_tok")
        run_list, stats, values = self._measure(runs)
        if isinstance(targets, Mapping):
            eps = {k: float(v) for k, v in targets.items()}
            missing = [s.run_id for s in stats if s.run_id not in eps]
            if missing:
                raise ValueError(f"score: targets has no eps_tok for runs {missing}")
        else:  # normalized among the runs scored: a tier's other learning rates are not in its family's min T
            eps = token_inefficiency(pick_learning_rates(run_list)[0], float(targets))
        norm = _normalize(stats, values, self.family_range_ if runs is None else None)
        within = {}
        by_family: dict[str, list[EarlyStatistic]] = {}
        for s in stats:
            by_family.setdefault(s.family, []).append(s)
        for family, members in by_family.items():
            x, y = [values[s.run_id][0] for s in members], [eps[s.run_id] for s in members]
            rho, p = spearman(x, y)
            within[family] = FamilyScore(rho, p, _pairs(x, y))
        x, y = [norm[s.run_id] for s in stats], [eps[s.run_id] for s in stats]
        rho, p = spearman(x, y)
        finite = [w.rho for w in within.values() if math.isfinite(w.rho)]
        points = tuple((s.run_id, s.family, s.tier, norm[s.run_id], eps[s.run_id]) for s in stats)
        return PredictionScore(
            statistic=self.statistic,
            rho=rho,
            pvalue=p,
            n=_pairs(x, y),
            within=within,
            mean_within_rho=float(np.mean(finite)) if finite else math.nan,
            points=points,
        )


def _is_int(v) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _pairs(x, y) -> int:
    """The number of (statistic, eps_tok) pairs a Spearman rho is computed on: :func:`spearman` drops
    a pair with a NaN (an ``eps_tok`` unknown because the run was cut short before the target)."""
    return sum(1 for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b)))


def _differ(family: str, values: dict[str, Any], what: str, why: str) -> list[str]:
    """A one-line caution when the runs of ``family`` have different ``values`` (run id -> value),
    naming the runs of each value; none when they agree."""
    by_value: dict[Any, list[str]] = {}
    for rid, v in values.items():
        by_value.setdefault(v, []).append(rid)
    if len(by_value) < 2:
        return []
    where = "these runs" if family == NO_FAMILY else f"the runs of family {family!r}"
    parts = "; ".join(f"{', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}: {v}" for v, ids in by_value.items())
    return [f"{where} have different {what} ({parts}): {why}"]


def _family_ranges(stats: list[EarlyStatistic], values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """family -> (min, max) of the ordering statistic."""
    ranges: dict[str, tuple[float, float]] = {}
    for s in stats:
        v = values[s.run_id][0]
        lo, hi = ranges.get(s.family, (v, v))
        ranges[s.family] = (min(lo, v), max(hi, v))
    return ranges


def _normalize(stats, values, ranges=None) -> dict[str, float]:
    ranges = ranges if ranges is not None else _family_ranges(stats, values)
    out = {}
    for s in stats:
        lo, hi = ranges[s.family]
        out[s.run_id] = (values[s.run_id][0] - lo) / (hi - lo) if hi > lo else 0.0
    return out
