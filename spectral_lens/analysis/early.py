"""A run's statistic at an early progress fraction, with its uncertainty (paper Sec. 3, App. E.1).

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
the bias of the window choice. With fewer than 3 measurements, sigma is NaN rather than a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..records import Measurement, RunRecord
from ..records.schema import _LazySpectra
from ..spectra.fit import window_that_fits
from ..summaries import BandAlphaFitter
from .efficiency import NO_FAMILY
from .windows import resolve_spectrum, resolve_window

__all__ = ["NoEarlyStatisticError", "FractionNotReachedError", "EarlyStatistic", "alpha_trajectory", "early_alpha", "early_value",
           "require_known_progress"]


class NoEarlyStatisticError(ValueError):
    """One run has no usable early statistic: it has not reached the fraction (cut short, or still
    running: :class:`FractionNotReachedError`), its measurements start after it, or its spectrum there
    cannot be fitted (a degenerate spectrum of a collapsed or diverged run). The predictors leave such
    a run out of the ranking with a note and rank the others."""


class FractionNotReachedError(NoEarlyStatisticError):
    """A run has no measurement at or beyond the requested progress fraction yet."""


def require_known_progress(run: RunRecord) -> None:
    """Check that some measurement of ``run`` has a known progress (its stored ``progress``, else
    ``tokens / RunInfo.total_tokens``).

    Raises :class:`FractionNotReachedError` for a run with no measurement yet (a tier just launched:
    :class:`~spectral_lens.analysis.SweepController` waits for it), and a plain ``ValueError`` for a run
    whose measurements can never have one (``RunInfo.total_tokens`` unset and no stored progress),
    which waiting would not cure.
    """
    if any(run.progress(m) is not None for m in run.measurements):
        return
    if run.measurements and not run.info.total_tokens:
        raise ValueError(
            f"run {run.run_id!r}: the training progress of its {len(run.measurements)} measurement(s) is unknown: "
            f"RunInfo.total_tokens (the run's token budget) is {run.info.total_tokens!r} and no measurement "
            "records a progress; record the run with RunInfo(total_tokens=...), or pass progress= to "
            "RunWriter.log_measurement"
        )
    raise FractionNotReachedError(f"run {run.run_id!r}: no measurement with a known progress yet")


def alpha_trajectory(
    run: RunRecord, *, window: tuple[int, int] | None = None, spectrum: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(progress, alpha, step)`` arrays over the run's measurements of the chosen spectrum.

    Measurements without that spectrum or with unknown progress are left out; sorted by progress. A
    measurement whose spectrum the window cannot be fitted on (a collapsed spectrum of a diverged run,
    too few nonzero eigenvalues) has ``alpha`` NaN: the trajectory is a description of the whole run, where
    :func:`early_alpha` refuses such a point (``NoEarlyStatisticError``).
    """
    name = resolve_spectrum(run, spectrum)
    fitter = BandAlphaFitter(resolve_window(run, window))
    rows = []
    for m in run.measurements:
        f = run.progress(m)
        if name in m.spectra and f is not None:
            try:
                alpha = _fit_alpha(fitter, m, name, run, keep=False)
            except NoEarlyStatisticError:
                alpha = math.nan
            rows.append((f, alpha, m.step))
    rows.sort(key=lambda r: r[0])
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int64)


def _steps_as_tokens_hint(run: RunRecord) -> str:
    """Why a finished run may read as barely started: every measurement's tokens equal its step (a
    framework callback without a token count records optimizer steps), so the progress against
    ``RunInfo.total_tokens`` is steps over tokens. Empty otherwise."""
    ms = run.measurements
    if not ms or not all(m.tokens == m.step for m in ms) or max(m.step for m in ms) < 2:
        return ""
    return ("; its tokens equal its steps (recorded without a token count?): give the callback tokens_per_step=, "
            "or TrainingArguments(include_num_input_tokens_seen=True) to the Hugging Face Trainer")


def _fit_alpha(fitter: BandAlphaFitter, m: Measurement, name: str, run: RunRecord, keep: bool = True,
               given: bool = False) -> float:
    """``keep=False``: a spectrum read from disk is not kept in ``m.spectra`` (a trajectory visits every
    measurement of the run once; kept, they all stayed in memory). ``given``: the window was passed
    (``window=``), not read from the record; only the hint for a too-wide window says which."""
    spectra = m.spectra
    spectrum = None
    try:
        spectrum = spectra[name] if keep or not isinstance(spectra, _LazySpectra) else spectra.load(name)
        return float(fitter.fit(spectrum).alpha)
    except ValueError as exc:
        hi_rank = max(w[1] for w in fitter.windows)
        hint = "" if spectrum is None else _too_wide_hint(hi_rank, spectrum.values.numel(), given)
        raise NoEarlyStatisticError(f"run {run.run_id!r}, step {m.step}: {exc}{hint}") from None


def _too_wide_hint(hi_rank: int, size: int, given: bool) -> str:
    """What to do when the tail window reaches past the spectrum (a small model recorded with the d12
    window (100, 200), the default up to 12 layers): a window that fits, on the command line and in
    Python. Empty when the window fits (the fit failed for another reason: zeros, NaN)."""
    if hi_rank <= size:
        return ""
    lo, hi = window_that_fits(size)
    where = "the window you passed" if given else "the tail window recorded in run.json"
    return f" ({where}); use one with HI <= {size}: --window {lo} {hi} (window=({lo}, {hi}) in Python)"


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
        n_rows: the distinct ``Spectrum.n_rows`` (probe rows: tokens of the held-out pool) of the
            spectra the estimate used (alpha statistics), else ``()``; runs compared with each other
            should have been measured on the same pool, so the same rows.
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
    n_rows: tuple[int, ...] = ()


def early_value(
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
        raise NoEarlyStatisticError(
            f"run {run.run_id!r}: no measurement with known progress carries {statistic} "
            "(record progress, or RunInfo.total_tokens)"
        )
    f_all = np.array([p[0] for p in pts])
    if f_all[-1] < fraction:
        raise FractionNotReachedError(
            f"run {run.run_id!r}: latest measurement is at progress {f_all[-1]:.3f} < {fraction}"
        )
    if f_all[0] > fraction:
        raise NoEarlyStatisticError(
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
    Raises :class:`FractionNotReachedError` if the run has not reached ``fraction`` yet (also when it
    has no measurement with a known progress yet: a tier just launched), and a ``ValueError`` when its
    measurements can never have a progress (:func:`require_known_progress`).
    """
    require_known_progress(run)
    name = resolve_spectrum(run, spectrum)
    win = resolve_window(run, window)
    fitter = BandAlphaFitter(win)
    cands = [(run.progress(m), m) for m in run.measurements if name in m.spectra and run.progress(m) is not None]
    cands.sort(key=lambda c: c[0])
    if cands and cands[-1][0] < fraction:
        raise FractionNotReachedError(
            f"run {run.run_id!r}: latest measurement is at progress {cands[-1][0]:.3f} < {fraction}"
            + _steps_as_tokens_hint(run)
        )
    # only the measurements the estimate needs are fitted (and their spectra loaded)
    f_all = np.array([c[0] for c in cands])
    need = set(np.argsort(np.abs(f_all - fraction), kind="stable")[: max(noise_neighbors, 2)].tolist())
    hi = int(np.searchsorted(f_all, fraction, side="left")) if cands else 0
    need |= {i for i in (hi - 1, hi) if 0 <= i < len(cands)}
    points = [(cands[i][0], _fit_alpha(fitter, cands[i][1], name, run, given=window is not None), cands[i][1].step)
              for i in sorted(need)]
    rows = tuple(sorted({int(cands[i][1].spectra[name].n_rows) for i in need}))  # loaded and kept by _fit_alpha
    return early_value(run, fraction, points, "alpha_tail", noise_neighbors, window=win, spectrum=name, n_rows=rows)
