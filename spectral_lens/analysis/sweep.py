"""``SweepController``: stop / continue decisions for a batch sweep that is still running.

At the decision fraction the early statistic of each tier (from a :class:`TailPredictor` or
:class:`NoiseScalePredictor`) is compared with the best tier's; tiers clearly worse are stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..records import open_runs
from ..spectra.fit import window_ranks
from .early import FractionNotReachedError, NoEarlyStatisticError
from .efficiency import NO_FAMILY, divergence, failure, group_by_family, percent, pick_learning_rates
from .ranking import TierRanking, rank_tiers
from .tail import TailPredictor
from .tier_predictor import TierPredictor, _is_int

__all__ = ["TierDecision", "SweepDecision", "SweepController"]


@dataclass(frozen=True)
class TierDecision:
    """What to do with one tier of a running sweep.

    Attributes:
        tier: the batch tier.
        action: ``"continue"``, ``"stop"`` or ``"wait"`` (not yet at the decision fraction).
        run_ids: every run of the tier, also those still short of the fraction when the tier is
            decided on its other runs (``wait_for_all=False``): stopping a tier stops all of them.
        value, sigma, p_best: the tier's early statistic, its uncertainty and probability of being
            the best (NaN while waiting).
        reason: a sentence with the numbers behind the action.
    """

    tier: float
    action: str
    run_ids: tuple[str, ...]
    value: float
    sigma: float
    p_best: float
    reason: str


@dataclass(frozen=True)
class SweepDecision:
    """The controller's decisions for one family.

    Attributes:
        family: the family.
        fraction: the decision fraction.
        ready: ``True`` when the decision was made (no tier left waiting under ``wait_for_all``).
        decisions: one :class:`TierDecision` per tier, best first (then the tiers stopped because
            every run of theirs diverged, the tiers continued unjudged because none of their runs has
            a usable statistic at the fraction, waiting tiers last).
    """

    family: str
    fraction: float
    ready: bool
    decisions: tuple[TierDecision, ...]

    @property
    def continue_tiers(self) -> list[float]:
        """Tiers to keep training."""
        return [d.tier for d in self.decisions if d.action == "continue"]

    @property
    def stop_tiers(self) -> list[float]:
        """Tiers to stop now."""
        return [d.tier for d in self.decisions if d.action == "stop"]

    @property
    def waiting_tiers(self) -> list[float]:
        """Tiers that have not reached the decision fraction."""
        return [d.tier for d in self.decisions if d.action == "wait"]


def _fmt_tier(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


class SweepController:
    """Stop / continue decisions for a batch sweep in progress, from the early tail statistic.

    At the decision fraction (the predictor's, default 0.2) a tier is **continued** if any rule holds:

    1. it is among the ``keep`` best tiers (always at least the best);
    2. its statistic is within ``margin + n_sigma * sqrt(sigma^2 + sigma_best^2)`` of the best
       tier's (statistically indistinguishable from the best);
    3. its probability of being the best, ``p_best``, is at least ``min_probability``.

    Otherwise it is **stopped**. A tier whose every run diverged (its logged losses end NaN or infinite,
    :func:`~spectral_lens.analysis.divergence`) is stopped at once, with that as the reason, instead of
    being waited for; a diverged run of a tier with other runs is left out. A tier with runs at several
    learning rates is decided on its best rate's runs
    (:func:`~spectral_lens.analysis.pick_learning_rates`; it waits while no rate can be picked), and
    stopping or continuing it applies to all its runs. A run that failed before the fraction
    (:func:`~spectral_lens.analysis.failure`) keeps its tier waiting (it may be resumed), the reason
    naming it (before the progress of the tier's other runs). A tier none of whose runs can have a
    usable statistic at the fraction (measured only after it, a spectrum there that cannot be fitted:
    :class:`~spectral_lens.analysis.NoEarlyStatisticError`) is continued unjudged, with that as the
    reason, and the other tiers are decided (when no run of a family can be judged,
    :class:`~spectral_lens.analysis.NoEarlyStatisticError` names every run's reason). When sigmas are
    NaN (too few measurements), only rules 1 and the ``margin`` part of 2 apply, and the reason says so.

    Args:
        predictor: a fitted-or-not :class:`TailPredictor` (default ``TailPredictor(window=window)``)
            or :class:`NoiseScalePredictor`; only its configuration is used.
        window: rank window of ``alpha_tail`` for the default predictor; ``None`` (default): each
            run's recorded window (the runs of a family must agree). Give either this or ``predictor``.
            A window that is not a pair of integer ranks ``1 <= lo < hi`` raises ``ValueError`` here.
        keep: number of best tiers always continued (>= 1).
        n_sigma, min_probability, margin: rules 2 and 3 (``margin`` in units of the statistic).
        wait_for_all: decide only when every tier of a family reached the fraction (default); with
            ``False``, tiers that have reached it are decided among themselves.
    """

    def __init__(
        self,
        predictor: TierPredictor | None = None,
        *,
        window: tuple[int, int] | None = None,
        keep: int = 1,
        n_sigma: float = 2.0,
        min_probability: float = 0.05,
        margin: float = 0.0,
        wait_for_all: bool = True,
    ):
        # NaN passed every comparison below as False: keep=nan stopped even the best tier, n_sigma, margin or
        # min_probability of nan silently turned rules 2 and 3 off (tiers stopped that the rules keep)
        if not _is_int(keep) or keep < 1:
            raise ValueError(f"SweepController: keep must be >= 1, an integer (best tiers always continued), got {keep!r}")
        for name, v in (("n_sigma", n_sigma), ("margin", margin)):
            if not (isinstance(v, (int, float, np.integer, np.floating)) and v >= 0):
                raise ValueError(f"SweepController: {name} must be a number >= 0, got {v!r}")
        if not (isinstance(min_probability, (int, float, np.integer, np.floating)) and 0 <= min_probability <= 1):
            raise ValueError(f"SweepController: min_probability must be in [0, 1] (a P(best)), got {min_probability!r}")
        if predictor is not None and window is not None:
            raise ValueError("SweepController: pass window= or a configured predictor=, not both")
        if window is not None:  # checked here, so the error names the class the caller built
            window = window_ranks(window, "SweepController: window")
        self.predictor = predictor if predictor is not None else TailPredictor(window=window)
        self.window = window
        self.keep = keep
        self.n_sigma = n_sigma
        self.min_probability = min_probability
        self.margin = margin
        self.wait_for_all = wait_for_all

    def decide(self, runs) -> dict[str, SweepDecision]:
        """Read the runs' records as they are now and return family -> :class:`SweepDecision`."""
        pred = self.predictor
        frac = pred.fraction
        out = {}
        runs = open_runs(runs)
        pred._check_runs(runs)
        for r in runs:  # checked up front: a waiting run would otherwise never reach early_value's check
            if r.info.batch_tier is None:
                raise ValueError(f"run {r.run_id!r}: RunInfo.batch_tier is not set; the controller decides per tier")
        _, other_lr = pick_learning_rates(runs)  # a tier with runs at several rates is judged on its best rate's
        for family, members in group_by_family(runs).items():
            tier_ids = _tier_ids((r.info.batch_tier, r.run_id) for r in members)  # every run of each tier
            reached, waiting, diverged, unjudged, failed = [], {}, {}, {}, set()
            for r in members:
                if r.run_id in other_lr and divergence(r) is None:
                    continue  # another rate of its tier is better (or none can be picked yet: see below)
                why = divergence(r)
                if why is not None:  # it will not reach the fraction (or its value there means nothing): stop it
                    diverged.setdefault(r.info.batch_tier, []).append(why)
                    continue
                try:
                    s = pred._early(r)
                except FractionNotReachedError as exc:  # a failed run logs nothing more until it is resumed: said
                    why = failure(r)
                    if why:  # named first in its tier's reason: the one thing to act on
                        failed.add(r.run_id)
                    why = f"{exc}; it {why}: resume it, or leave it out of the runs" if why else str(exc)
                    waiting.setdefault(r.info.batch_tier, []).append((r.run_id, why))
                    continue
                except NoEarlyStatisticError as exc:  # measured only after the fraction, or not fittable there
                    unjudged.setdefault(r.info.batch_tier, []).append(str(exc))
                    continue
                reached.append((s.tier, s.run_id, *pred._badness(s, r)))
            seen = {e[0] for e in reached} | set(waiting) | set(unjudged)  # a diverged run does not decide its tier
            for r in members:  # a tier none of whose rates can be picked yet (no validation loss) waits for one
                if r.run_id in other_lr and r.info.batch_tier not in seen:
                    waiting.setdefault(r.info.batch_tier, []).append((r.run_id, other_lr[r.run_id]))
            if unjudged and not (reached or waiting or diverged):  # no run can be judged: a setup error
                where = "" if family == NO_FAMILY else f" of family {family!r}"
                raise NoEarlyStatisticError(f"{type(self).__name__}: no run{where} has a usable {pred.statistic} at "
                                            f"{percent(frac)}: " + "; ".join(w for ws in unjudged.values() for w in ws))
            if not self.wait_for_all:  # a tier with some runs past the fraction is decided on those
                waiting = {t: rows for t, rows in waiting.items() if t not in {e[0] for e in reached}}
            # a tier whose every run diverged is stopped; one with a healthy run is decided on that run
            live = {e[0] for e in reached} | set(waiting)
            aside = tuple(TierDecision(t, "stop", tier_ids[t], math.nan, math.nan, math.nan, "; ".join(whys))
                         for t, whys in sorted(diverged.items()) if t not in live)
            # a tier with no usable statistic that will not get one is not judged: it is not stopped on no evidence
            aside += tuple(TierDecision(t, "continue", tier_ids[t], math.nan, math.nan, math.nan,
                                       f"not judged (no usable {pred.statistic} at {percent(frac)}): " + "; ".join(whys))
                          for t, whys in sorted(unjudged.items()) if t not in live and t not in diverged)
            if aside and not reached and not waiting:
                out[family] = SweepDecision(family, frac, True, aside)
                continue
            wait = {  # the reason of a failed run of the tier, else of its first run
                t: TierDecision(t, "wait", tier_ids[t], math.nan, math.nan, math.nan, "not yet at "
                                f"{percent(frac)} progress ({next((w for i, w in rows if i in failed), rows[0][1])})")
                for t, rows in sorted(waiting.items())
            }
            if not reached or (wait and self.wait_for_all):
                note = f"reached {percent(frac)}; waiting for tier(s) {', '.join(_fmt_tier(t) for t in wait)}"
                held = {t: TierDecision(t, "wait", tier_ids[t], math.nan, math.nan, math.nan, note)
                        for t in _tier_ids(reached) if t not in wait}
                out[family] = SweepDecision(family, frac, False, tuple(held.values()) + aside + tuple(wait.values()))
                continue
            ranking = rank_tiers(family, reached, statistic=pred.statistic, n_draws=pred.n_draws,
                                 random_state=pred.random_state)
            out[family] = SweepDecision(family, frac, True, self._decide(ranking, tier_ids) + aside + tuple(wait.values()))
        return out

    def _decide(self, rk: TierRanking, tier_ids: dict[float, tuple[str, ...]]) -> tuple[TierDecision, ...]:
        best = rk.tiers[0]
        v0, s0 = rk.values[best], rk.sigmas[best]
        stat = rk.statistic
        decisions = []
        for i, t in enumerate(rk.tiers):
            v, s, p = rk.values[t], rk.sigmas[t], rk.p_best[t]
            gap = v - v0
            desc = f"{stat}={v:.4g}" + (f"±{s:.2g}" if math.isfinite(s) else " (sigma unknown)")
            reasons = []
            if i < self.keep:
                reasons.append("best" if i == 0 else f"among the {self.keep} best")
            allowed = self.margin + (self.n_sigma * math.hypot(s, s0) if math.isfinite(s) and math.isfinite(s0) else 0.0)
            if i > 0 and gap <= allowed:
                reasons.append(f"within {allowed:.3g} of the best (gap {gap:.3g})")
            if i > 0 and math.isfinite(p) and p >= self.min_probability:
                reasons.append(f"p_best={p:.3f} >= {self.min_probability}")
            if reasons:
                action, why = "continue", "; ".join(reasons)
            else:
                z = gap / math.hypot(s, s0) if math.isfinite(s) and math.isfinite(s0) and math.hypot(s, s0) > 0 else math.inf
                ptxt = f", p_best={p:.3f} < {self.min_probability}" if math.isfinite(p) else ", no uncertainty estimate"
                action = "stop"
                why = (
                    f"{gap:.3g} above the best (tier {_fmt_tier(best)}, {v0:.4g})"
                    + (f", {z:.1f} sigma" if math.isfinite(z) else "")
                    + ptxt
                )
            decisions.append(TierDecision(t, action, tier_ids[t], v, s, p, f"{desc}: {why}"))
        return tuple(decisions)

    def __repr__(self) -> str:
        return (
            f"SweepController({self.predictor!r}, keep={self.keep}, n_sigma={self.n_sigma}, "
            f"min_probability={self.min_probability}, margin={self.margin})"
        )


def _tier_ids(entries) -> dict[float, tuple[str, ...]]:
    out: dict[float, list[str]] = {}
    for e in entries:
        out.setdefault(e[0], []).append(e[1])
    return {t: tuple(v) for t, v in sorted(out.items())}
