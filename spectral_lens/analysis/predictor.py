"""Early prediction of the token-efficient batch tier (paper Sec. 3, App. E) and an online controller.

:class:`TailPredictor` measures each run's activation tail exponent ``alpha_tail`` at an early
progress fraction (default 0.2, where the paper's correlation peaks) and orders a family's batch
tiers by it: a flatter early tail (smaller ``alpha_tail``) predicts fewer tokens to the target
(Cor. 8: ``T ~ (R/r_h)^((alpha_tail - p)/2)``). :class:`NoiseScalePredictor` is the
gradient-noise-scale baseline with the same interface. :class:`SweepController` turns the early
statistic into stop / continue decisions for a sweep that is still running.

Early value. The statistic at fraction ``f`` is linearly interpolated (in progress) between the two
measurements that bracket ``f`` (the last one at or before ``f`` and the first one at or after);
a measurement exactly at ``f`` is used as is. A run whose measurements start after ``f`` is an error;
a run that has not reached ``f`` yet raises :class:`FractionNotReachedError`.

Uncertainty (one method, stated plainly). ``sigma`` is the checkpoint-to-checkpoint jitter of the
statistic: the residual standard deviation of a straight-line fit of the statistic against
progress over the ``noise_neighbors`` measurements nearest to ``f`` (default 5; needs at least 3),
propagated through the interpolation as ``sigma * sqrt((1-w)^2 + w^2)``. It captures probe-pool
sampling noise and optimization noise between nearby checkpoints; it does **not** capture
seed-to-seed variation (unless several seeds of a tier are given: then their spread is added) nor
the bias of the window choice. ``p_best`` is the Monte Carlo probability, under independent normal
errors with these sigmas, that a tier has the smallest true statistic. With fewer than 3
measurements, sigma and the probabilities are NaN rather than a made-up number.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .._warnings import SpectralLensWarning
from ..records import Measurement, RunRecord, open_runs
from ..spectra.fit import tail_window
from ..summaries import BandAlphaFitter
from .efficiency import NO_FAMILY, group_by_family, token_inefficiency

__all__ = [
    "FractionNotReachedError",
    "EarlyStatistic",
    "TierRanking",
    "FamilyScore",
    "PredictionScore",
    "TailPredictor",
    "NoiseScalePredictor",
    "TierDecision",
    "SweepDecision",
    "SweepController",
    "resolve_spectrum",
    "resolve_window",
    "alpha_trajectory",
    "early_alpha",
    "rank_tiers",
]

#: The d12 tail window, used when neither a window nor ``RunInfo.n_layer`` is known.
DEFAULT_WINDOW = (100, 200)


class FractionNotReachedError(ValueError):
    """A run has no measurement at or beyond the requested progress fraction yet."""


# --------------------------------------------------------------------------------------------------
# which spectrum, which window


def resolve_spectrum(run: RunRecord, spectrum: str | None = None) -> str:
    """The spectrum name an analysis of ``run`` uses.

    Order: ``spectrum`` if given (must exist in the run); else ``run.info.primary_spectrum``; else
    the run's only activation-covariance spectrum. Several candidates and no choice is an error
    that lists them (pass ``spectrum=`` or record ``primary_spectrum``; the paper's convention is
    the deepest activation probe).
    """
    names = run.spectrum_names()
    if spectrum is not None:
        if spectrum not in names:
            raise ValueError(f"run {run.run_id!r}: no spectrum named {spectrum!r}; available: {names}")
        return spectrum
    if run.info.primary_spectrum is not None:
        if run.info.primary_spectrum not in names:
            raise ValueError(
                f"run {run.run_id!r}: primary_spectrum {run.info.primary_spectrum!r} never measured; available: {names}"
            )
        return run.info.primary_spectrum
    acts = run.spectrum_names("activation_covariance")
    if len(acts) == 1:
        return acts[0]
    if not acts:
        raise ValueError(f"run {run.run_id!r}: no activation-covariance spectrum recorded (spectra: {names})")
    raise ValueError(
        f"run {run.run_id!r}: several activation spectra {acts}; pass spectrum=NAME "
        "(the paper uses the deepest layer) or record RunInfo.primary_spectrum"
    )


def resolve_window(run: RunRecord, window: tuple[int, int] | None = None) -> tuple[int, int]:
    """The tail window for ``run``: ``window`` if given, else the scale rule for ``info.n_layer``
    (:func:`spectral_lens.tail_window`), else the d12 window ``(100, 200)`` with a warning."""
    if window is not None:
        lo, hi = window
        return (int(lo), int(hi))
    if run.info.n_layer:
        return tail_window(int(run.info.n_layer))
    warnings.warn(  # the default warning filter shows each run's message once
        f"run {run.run_id!r}: RunInfo.n_layer unknown; using the d12 tail window {DEFAULT_WINDOW} "
        "(pass window= to choose)",
        SpectralLensWarning,
        stacklevel=3,
    )
    return DEFAULT_WINDOW


def alpha_trajectory(
    run: RunRecord, *, window: tuple[int, int] | None = None, spectrum: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(progress, alpha, step)`` arrays over the run's measurements of the chosen spectrum.

    Measurements without that spectrum or with unknown progress are left out; sorted by progress.
    """
    name = resolve_spectrum(run, spectrum)
    fitter = BandAlphaFitter(resolve_window(run, window))
    rows = []
    for m in run.measurements:
        f = run.progress(m)
        if name in m.spectra and f is not None:
            rows.append((f, _fit_alpha(fitter, m, name, run), m.step))
    rows.sort(key=lambda r: r[0])
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int64)


def _fit_alpha(fitter: BandAlphaFitter, m: Measurement, name: str, run: RunRecord) -> float:
    try:
        return float(fitter.fit(m.spectra[name]).alpha)
    except ValueError as exc:
        raise ValueError(f"run {run.run_id!r}, step {m.step}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# early value with uncertainty


@dataclass(frozen=True)
class EarlyStatistic:
    """A run's statistic at an early progress fraction.

    Attributes:
        run_id, family, tier: the run (``tier`` is ``RunInfo.batch_tier``).
        statistic: what ``value`` is (``"alpha_tail"``, ``"log_noise_scale"``).
        fraction: the progress fraction it was evaluated at.
        value: the statistic, interpolated between the bracketing measurements.
        sigma: its uncertainty (see the module docstring); NaN if not estimable.
        steps: optimizer steps of the two bracketing measurements (equal if one sits at ``fraction``).
        weight: interpolation weight of the later measurement, in [0, 1].
        n_noise: number of measurements the jitter estimate used.
        window: the rank window (alpha statistics) or ``None``.
        spectrum: the spectrum name (alpha statistics) or ``None``.
    """

    run_id: str
    family: str
    tier: float
    statistic: str
    fraction: float
    value: float
    sigma: float
    steps: tuple[int, int]
    weight: float
    n_noise: int
    window: tuple[int, int] | None = None
    spectrum: str | None = None


def _early_value(
    run: RunRecord,
    fraction: float,
    points: Sequence[tuple[float, float, int]],
    statistic: str,
    noise_neighbors: int,
    **extra,
) -> EarlyStatistic:
    """Interpolate ``points`` = [(progress, value, step)] at ``fraction`` and estimate the jitter."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if run.info.batch_tier is None:
        raise ValueError(f"run {run.run_id!r}: RunInfo.batch_tier is not set; the predictor orders tiers by it")
    pts = sorted(points, key=lambda p: p[0])
    if not pts:
        raise ValueError(
            f"run {run.run_id!r}: no measurement with known progress carries {statistic} "
            "(record progress, or RunInfo.total_tokens)"
        )
    f_all = np.array([p[0] for p in pts])
    if f_all[-1] < fraction:
        raise FractionNotReachedError(
            f"run {run.run_id!r}: latest measurement is at progress {f_all[-1]:.3f} < {fraction}"
        )
    if f_all[0] > fraction:
        raise ValueError(
            f"run {run.run_id!r}: first measurement is at progress {f_all[0]:.3f} > {fraction}; "
            "cannot interpolate (measure earlier, or choose a later fraction)"
        )
    hi = int(np.searchsorted(f_all, fraction, side="left"))
    if f_all[hi] == fraction:
        lo = hi
        w = 0.0
    else:
        lo = hi - 1
        w = float((fraction - f_all[lo]) / (f_all[hi] - f_all[lo]))
    value = (1.0 - w) * pts[lo][1] + w * pts[hi][1]
    k = min(noise_neighbors, len(pts))
    near = np.argsort(np.abs(f_all - fraction), kind="stable")[:k]
    sigma = math.nan
    if k >= 3:
        x = f_all[near]
        y = np.array([pts[i][1] for i in near])
        if np.ptp(x) > 0:
            coef = np.polyfit(x, y, 1)
            resid = y - np.polyval(coef, x)
            sigma = float(math.sqrt((resid**2).sum() / (k - 2)))
        sigma *= math.sqrt((1.0 - w) ** 2 + w**2) if lo != hi else 1.0
    family = run.info.family if run.info.family is not None else NO_FAMILY
    return EarlyStatistic(
        run_id=run.run_id,
        family=family,
        tier=run.info.batch_tier,
        statistic=statistic,
        fraction=float(fraction),
        value=float(value),
        sigma=sigma,
        steps=(int(pts[lo][2]), int(pts[hi][2])),
        weight=w,
        n_noise=k,
        **extra,
    )


def early_alpha(
    run: RunRecord,
    fraction: float = 0.2,
    *,
    window: tuple[int, int] | None = None,
    spectrum: str | None = None,
    noise_neighbors: int = 5,
) -> EarlyStatistic:
    """``alpha_tail`` of ``run`` at progress ``fraction`` with its jitter uncertainty.

    Window and spectrum are resolved by :func:`resolve_window` and :func:`resolve_spectrum`.
    Raises :class:`FractionNotReachedError` if the run has not reached ``fraction`` yet.
    """
    name = resolve_spectrum(run, spectrum)
    win = resolve_window(run, window)
    fitter = BandAlphaFitter(win)
    cands = [(run.progress(m), m) for m in run.measurements if name in m.spectra and run.progress(m) is not None]
    cands.sort(key=lambda c: c[0])
    if cands and cands[-1][0] < fraction:
        raise FractionNotReachedError(
            f"run {run.run_id!r}: latest measurement is at progress {cands[-1][0]:.3f} < {fraction}"
        )
    # only the measurements the estimate needs are fitted (and their spectra loaded)
    f_all = np.array([c[0] for c in cands])
    need = set(np.argsort(np.abs(f_all - fraction), kind="stable")[: max(noise_neighbors, 2)].tolist())
    hi = int(np.searchsorted(f_all, fraction, side="left")) if cands else 0
    need |= {i for i in (hi - 1, hi) if 0 <= i < len(cands)}
    points = [(cands[i][0], _fit_alpha(fitter, cands[i][1], name, run), cands[i][1].step) for i in sorted(need)]
    return _early_value(run, fraction, points, "alpha_tail", noise_neighbors, window=win, spectrum=name)


# --------------------------------------------------------------------------------------------------
# results


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


@dataclass(frozen=True)
class FamilyScore:
    """Spearman correlation of one family's early statistic with its realized ``eps_tok``."""

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
            exact (all rank permutations) for n <= 8, scipy's t-approximation above.
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


def _spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rho and two-sided p-value; NaN pairs dropped; NaN for < 3 points or constant input.

    The p-value is exact (all permutations of the ranks) for n <= 8, where the t-approximation of
    ``scipy.stats.spearmanr`` is poor (it gives 0 for a perfect ordering); otherwise scipy's.
    """
    import itertools

    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.all(y == y[0]):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(x, y)
    rho = float(res.statistic)
    if x.size > 8:
        return rho, float(res.pvalue)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perms = ry[np.array(list(itertools.permutations(range(x.size))))]
    rxc = rx - rx.mean()
    pc = perms - perms.mean(axis=1, keepdims=True)
    rhos = pc @ rxc / (np.linalg.norm(pc, axis=1) * np.linalg.norm(rxc))
    return rho, float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))


# --------------------------------------------------------------------------------------------------
# predictors


class _TierPredictor:
    """Shared fit / predict / score machinery: subclasses define the per-run early statistic."""

    statistic = "statistic"

    def __init__(self, fraction: float = 0.2, *, noise_neighbors: int = 5, n_draws: int = 4000, random_state: int = 0):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if noise_neighbors < 2:
            raise ValueError(f"noise_neighbors must be >= 2, got {noise_neighbors}")
        self.fraction = fraction
        self.noise_neighbors = noise_neighbors
        self.n_draws = n_draws
        self.random_state = random_state

    # subclass hooks
    def _early(self, run: RunRecord) -> EarlyStatistic:  # pragma: no cover - abstract
        raise NotImplementedError

    def _badness(self, stat: EarlyStatistic, run: RunRecord) -> tuple[float, float]:
        """(value, sigma) of the ordering statistic: smaller = predicted more token-efficient."""
        return stat.value, stat.sigma

    def fit(self, runs) -> "_TierPredictor":
        """Measure every run's early statistic and learn per-family min/max for normalization.

        Learned attributes: ``runs_``, ``statistics_`` (list of :class:`EarlyStatistic`),
        ``values_`` (run id -> (value, sigma) of the ordering statistic), ``family_range_``
        (family -> (min, max) of the statistic), ``rankings_`` (family -> :class:`TierRanking`).
        Returns ``self``.
        """
        self.runs_ = open_runs(runs)
        if not self.runs_:
            raise ValueError(f"{type(self).__name__}.fit: no runs given")
        self.statistics_ = [self._early(r) for r in self.runs_]
        self.values_ = {s.run_id: self._badness(s, r) for s, r in zip(self.statistics_, self.runs_)}
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
        stats = [self._early(r) for r in runs]
        return runs, stats, {s.run_id: self._badness(s, r) for s, r in zip(stats, runs)}

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
        ``eps_tok = inf`` and rank last. Each run counts once (seeds are not averaged here).
        """
        if targets is None:
            raise ValueError("score needs targets: a target validation loss, or a mapping run id -> eps_tok")
        run_list, stats, values = self._measure(runs)
        if isinstance(targets, Mapping):
            eps = {k: float(v) for k, v in targets.items()}
            missing = [s.run_id for s in stats if s.run_id not in eps]
            if missing:
                raise ValueError(f"score: targets has no eps_tok for runs {missing}")
        else:
            eps = token_inefficiency(run_list, float(targets))
        norm = _normalize(stats, values, self.family_range_ if runs is None else None)
        within = {}
        by_family: dict[str, list[EarlyStatistic]] = {}
        for s in stats:
            by_family.setdefault(s.family, []).append(s)
        for family, members in by_family.items():
            rho, p = _spearman([values[s.run_id][0] for s in members], [eps[s.run_id] for s in members])
            within[family] = FamilyScore(rho, p, len(members))
        rho, p = _spearman([norm[s.run_id] for s in stats], [eps[s.run_id] for s in stats])
        finite = [w.rho for w in within.values() if math.isfinite(w.rho)]
        points = tuple((s.run_id, s.family, s.tier, norm[s.run_id], eps[s.run_id]) for s in stats)
        return PredictionScore(
            statistic=self.statistic,
            rho=rho,
            pvalue=p,
            n=len(stats),
            within=within,
            mean_within_rho=float(np.mean(finite)) if finite else math.nan,
            points=points,
        )


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
    grouped: dict[float, list[tuple[str, float, float]]] = {}
    for tier, run_id, v, s in entries:
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
        wins = np.bincount(np.argmin(draws, axis=1), minlength=len(tiers)) / n_draws
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


class TailPredictor(_TierPredictor):
    """Predicts the token-efficient batch tier from the early activation tail (paper Sec. 3, Cor. 8).

    Args:
        fraction: progress fraction of the early measurement (paper: 0.2, App. E.1).
        window: rank window of ``alpha_tail``; default per run: the scale rule for
            ``RunInfo.n_layer`` (d12 -> [100, 200], d36 -> [200, 400], d48 -> [400, 800]).
        spectrum: spectrum name; default :func:`resolve_spectrum` (the run's primary / only
            activation spectrum).
        noise_neighbors: measurements nearest to ``fraction`` used for the jitter ``sigma``.
        n_draws, random_state: Monte Carlo draws for ``p_best`` and their seed.

    A smaller early ``alpha_tail`` (flatter tail) predicts fewer tokens to target. ``fit(runs)``
    returns ``self`` with ``statistics_``, ``family_range_``, ``rankings_``; ``predict(runs)``
    returns family -> :class:`TierRanking`; ``score(runs, target_loss)`` returns
    :class:`PredictionScore`.

    Example::

        pred = TailPredictor().fit(open_runs(["runs/sweep"]))
        ranking = pred.predict()["FlexWin"]
        ranking.recommended, ranking.p_recommended
        pred.score(targets=3.2).rho
    """

    statistic = "alpha_tail"

    def __init__(
        self,
        fraction: float = 0.2,
        *,
        window: tuple[int, int] | None = None,
        spectrum: str | None = None,
        noise_neighbors: int = 5,
        n_draws: int = 4000,
        random_state: int = 0,
    ):
        super().__init__(fraction, noise_neighbors=noise_neighbors, n_draws=n_draws, random_state=random_state)
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.spectrum = spectrum

    def _early(self, run: RunRecord) -> EarlyStatistic:
        return early_alpha(
            run, self.fraction, window=self.window, spectrum=self.spectrum, noise_neighbors=self.noise_neighbors
        )

    def __repr__(self) -> str:
        return f"TailPredictor(fraction={self.fraction}, window={self.window}, spectrum={self.spectrum!r})"


class NoiseScalePredictor(_TierPredictor):
    """Baseline: the tier whose batch is closest to the gradient noise scale measured early.

    McCandlish et al.'s ``B_simple = tr(Sigma) / |G|^2`` approximates the critical batch; this
    baseline predicts that tiers whose batch is closer (in log) to it are more token-efficient.
    Statistic per run: ``|log(batch / B_simple)|`` with ``B_simple`` interpolated at ``fraction``
    in log space from ``Measurement.scalars[key]``.

    Args:
        fraction: progress fraction of the early measurement.
        key: the measurement scalar holding ``B_simple`` (the per-sample gradient probe's
            convention: ``"noise_scale"``, in samples per step).
        unit: ``"samples"``: compare with ``RunInfo.batch_size``; ``"tokens"``: with
            ``RunInfo.tokens_per_step`` (then ``key`` must hold tokens).
        noise_neighbors, n_draws, random_state: as in :class:`TailPredictor`.
    """

    statistic = "noise_scale_distance"

    def __init__(
        self,
        fraction: float = 0.2,
        *,
        key: str = "noise_scale",
        unit: str = "samples",
        noise_neighbors: int = 5,
        n_draws: int = 4000,
        random_state: int = 0,
    ):
        super().__init__(fraction, noise_neighbors=noise_neighbors, n_draws=n_draws, random_state=random_state)
        if unit not in ("samples", "tokens"):
            raise ValueError(f"unit must be 'samples' or 'tokens', got {unit!r}")
        self.key = key
        self.unit = unit

    def _batch(self, run: RunRecord) -> float:
        b = run.info.batch_size if self.unit == "samples" else run.info.tokens_per_step
        if not b:
            attr = "batch_size" if self.unit == "samples" else "tokens_per_step"
            raise ValueError(f"run {run.run_id!r}: RunInfo.{attr} is needed to compare with the noise scale")
        return float(b)

    def _early(self, run: RunRecord) -> EarlyStatistic:
        pts = []
        for m in run.measurements:
            f, v = run.progress(m), m.scalars.get(self.key)
            if f is not None and v is not None and v > 0 and math.isfinite(v):
                pts.append((f, math.log(v), m.step))
        if not pts:
            raise ValueError(f"run {run.run_id!r}: no measurement has a positive scalar {self.key!r}")
        return _early_value(run, self.fraction, pts, "log_noise_scale", self.noise_neighbors)

    def _badness(self, stat: EarlyStatistic, run: RunRecord) -> tuple[float, float]:
        return abs(math.log(self._batch(run)) - stat.value), stat.sigma

    def __repr__(self) -> str:
        return f"NoiseScalePredictor(fraction={self.fraction}, key={self.key!r}, unit={self.unit!r})"


# --------------------------------------------------------------------------------------------------
# online controller


@dataclass(frozen=True)
class TierDecision:
    """What to do with one tier of a running sweep.

    Attributes:
        tier: the batch tier.
        action: ``"continue"``, ``"stop"`` or ``"wait"`` (not yet at the decision fraction).
        run_ids: the runs of the tier.
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
        decisions: one :class:`TierDecision` per tier, best first (waiting tiers last).
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

    Otherwise it is **stopped**. When sigmas are NaN (too few measurements), only rules 1 and the
    ``margin`` part of 2 apply, and the reason says so.

    Args:
        predictor: a fitted-or-not :class:`TailPredictor` (default ``TailPredictor()``) or
            :class:`NoiseScalePredictor`; only its configuration is used.
        keep: number of best tiers always continued (>= 1).
        n_sigma, min_probability, margin: rules 2 and 3 (``margin`` in units of the statistic).
        wait_for_all: decide only when every tier of a family reached the fraction (default); with
            ``False``, tiers that have reached it are decided among themselves.
    """

    def __init__(
        self,
        predictor: _TierPredictor | None = None,
        *,
        keep: int = 1,
        n_sigma: float = 2.0,
        min_probability: float = 0.05,
        margin: float = 0.0,
        wait_for_all: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.predictor = predictor if predictor is not None else TailPredictor()
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
        for family, members in group_by_family(open_runs(runs)).items():
            reached, waiting = [], {}
            for r in members:
                try:
                    s = pred._early(r)
                except FractionNotReachedError as exc:
                    waiting.setdefault(r.info.batch_tier, []).append((r.run_id, str(exc)))
                    continue
                reached.append((s.tier, s.run_id, *pred._badness(s, r)))
            if not self.wait_for_all:  # a tier with some runs past the fraction is decided on those
                waiting = {t: rows for t, rows in waiting.items() if t not in {e[0] for e in reached}}
            wait = {
                t: TierDecision(t, "wait", tuple(r[0] for r in rows), math.nan, math.nan, math.nan,
                                f"not yet at {frac:.0%} progress ({rows[0][1]})")
                for t, rows in sorted(waiting.items())
            }
            if not reached or (wait and self.wait_for_all):
                note = f"reached {frac:.0%}; waiting for tier(s) {', '.join(_fmt_tier(t) for t in wait)}"
                held = {t: TierDecision(t, "wait", ids, math.nan, math.nan, math.nan, note)
                        for t, ids in _tier_ids(reached).items() if t not in wait}
                out[family] = SweepDecision(family, frac, False, tuple(held.values()) + tuple(wait.values()))
                continue
            ranking = rank_tiers(family, reached, statistic=pred.statistic, n_draws=pred.n_draws,
                                 random_state=pred.random_state)
            out[family] = SweepDecision(family, frac, True, self._decide(ranking) + tuple(wait.values()))
        return out

    def _decide(self, rk: TierRanking) -> tuple[TierDecision, ...]:
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
            decisions.append(TierDecision(t, action, rk.run_ids[t], v, s, p, f"{desc}: {why}"))
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
