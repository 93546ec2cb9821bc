"""Power-law fits on trace-normalized spectra: band-restricted alpha and the head/tail crossover rank.

Ranks are 1-based, windows are inclusive ``[lo, hi]`` as in the paper (Sec. 2). These functions work
on small host arrays (one value per eigenvalue); they are not on any hot path.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PAPER_WINDOWS",
    "AlphaFit",
    "CrossoverFit",
    "band_alpha",
    "tail_window",
    "estimate_crossover",
]

PAPER_WINDOWS: tuple[tuple[int, int], ...] = ((100, 200), (200, 400), (400, 800))
"""The paper's pre-registered window bank (Sec. 2)."""


@dataclass(frozen=True)
class AlphaFit:
    """Least-squares fit of ``log p_j = intercept - alpha * log j`` over ranks ``window``.

    Attributes:
        window: inclusive 1-based rank window ``(lo, hi)``.
        alpha: minus the slope (larger = steeper decay).
        intercept: fitted ``log p`` at ``j = 1``.
        r2: coefficient of determination of the log-log fit.
        stderr: ordinary-least-squares standard error of ``alpha``.
        n_points: number of ranks used (``hi - lo + 1``).
    """

    window: tuple[int, int]
    alpha: float
    intercept: float
    r2: float
    stderr: float
    n_points: int


@dataclass(frozen=True)
class CrossoverFit:
    """Two-segment (broken-stick) fit of the log-log spectrum.

    Attributes:
        rank: estimated crossover rank ``r*`` between the learned head and the unresolved tail
            (where the two fitted power laws meet).
        head_alpha: exponent of the segment below ``rank``.
        tail_alpha: exponent of the segment above ``rank``.
        ranks: inclusive range of ranks the fit used.
        improvement: fraction of the single-line residual sum of squares removed by the break, in
            [0, 1] (0 = no evidence of a bend, also where a line fits to round-off; near 1 = a clean
            two-regime spectrum).
        located: ``False`` when the fit did not locate a crossover inside ``ranks``: ``rank`` lies
            outside them, the bend's sharpness ``q`` stopped at a bound of its search (then
            ``tail_alpha`` is that bound's artefact, e.g. ``head_alpha + 100``), or ``improvement`` is 0
            (one line fits: a pure power law or a flat spectrum has no bend to locate). Read ``rank``,
            ``head_alpha`` and ``tail_alpha`` only when it is ``True``.
    """

    rank: float
    head_alpha: float
    tail_alpha: float
    ranks: tuple[int, int]
    improvement: float
    located: bool = True


def _as_numpy(p) -> np.ndarray:
    if isinstance(p, torch.Tensor):
        p = p.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:  # a matrix broadcast against the ranks (an error about shapes deep in the fit)
        raise ValueError(f"p must be a 1-D array of eigenvalues (largest first), got shape {tuple(arr.shape)}")
    return arr


def _numerical_rank(p) -> int:
    """Number of eigenvalues above round-off: ``p_j > sqrt(p.size) * eps * max(p)``, with ``eps`` the
    machine epsilon of ``p``'s floating dtype (float64 for integers and lists; float32 for fp16/bf16,
    which only store eigenvalues: no eigensolver computes in them). A covariance of ``N`` rows has at
    most ``N - 1`` eigenvalues above it, the rest are an eigensolver's round-off: measured at most
    ~5e-8 of the largest for float32 ``eigvalsh`` and ~1e-16 in float64 at d = 512-4,096 with
    N = d / 4, 20x and more below the tolerance. NumPy's ``matrix_rank`` tolerance (``size * eps``)
    would also cut genuine float32 values: 4.9e-4 of the largest at d = 4,096, inside a typical tail."""
    dtype = p.dtype if isinstance(p, (torch.Tensor, np.ndarray)) else None
    if isinstance(dtype, torch.dtype):
        eps = (torch.finfo(torch.promote_types(dtype, torch.float32)).eps if dtype.is_floating_point
               else np.finfo(np.float64).eps)
    elif dtype is not None and np.issubdtype(dtype, np.floating):
        eps = np.finfo(np.promote_types(dtype, np.float32)).eps
    else:
        eps = np.finfo(np.float64).eps
    arr = _as_numpy(p)
    finite = arr[np.isfinite(arr)]
    top = float(finite.max()) if finite.size else 0.0
    return int(np.count_nonzero(arr > max(np.sqrt(arr.size) * float(eps) * top, 0.0)))


def window_ranks(window, name: str = "window") -> tuple[int, int]:
    """``window`` as Python ints ``(lo, hi)`` with ``1 <= lo < hi``: a pair (tuple, list, array) of
    integers, Python or NumPy; a bool, a float (even ``100.0``) or a string is refused with a
    ``ValueError`` naming ``name``."""
    try:
        lo, hi = window
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of 1-based ranks (lo, hi), got {window!r}") from None
    try:
        if isinstance(lo, (bool, np.bool_)) or isinstance(hi, (bool, np.bool_)):
            raise TypeError
        lo, hi = operator.index(lo), operator.index(hi)
    except TypeError:
        fractions = all(isinstance(v, (float, np.floating)) and 0 < v <= 1 for v in (lo, hi))
        hint = "; these look like fractions of the spectrum: give ranks, e.g. (100, 200)" if fractions else ""
        raise ValueError(f"{name} {window!r}: ranks must be integers (Python or NumPy ints, not bools){hint}") from None
    if lo < 1 or hi <= lo:
        raise ValueError(f"{name} {window!r}: need 1 <= lo < hi (ranks are 1-based and inclusive)")
    return lo, hi


def _check_window(p: np.ndarray, window: tuple[int, int], name: str = "window") -> tuple[int, int]:
    lo, hi = window_ranks(window, name)
    if hi > p.size:
        raise ValueError(
            f"window [{lo}, {hi}] exceeds the spectrum: only {p.size} eigenvalues are available"
        )
    finite = np.isfinite(p[lo - 1 : hi])
    if not finite.all():
        raise ValueError(
            f"window [{lo}, {hi}] holds a NaN/Inf eigenvalue (first at rank {lo + int(np.argmin(finite))})"
        )
    negative = np.flatnonzero(p[lo - 1 : hi] < 0)
    if negative.size:  # round-off of an unclamped solve: not a zero, and its log is undefined
        r = lo + int(negative[0])
        raise ValueError(
            f"window [{lo}, {hi}] holds a negative eigenvalue {p[r - 1]:.6g} at rank {r}; eigenvalues must be "
            "> 0 inside the window (clamp an eigensolver's round-off with values.clamp_min(0), or fit fewer ranks)"
        )
    nonzero = int(np.count_nonzero(p > 0))
    if np.any(p[lo - 1 : hi] <= 0):
        raise ValueError(
            f"window [{lo}, {hi}] reaches zero eigenvalues: only {nonzero} are nonzero "
            "(too few samples or a rank-deficient representation)"
        )
    return lo, hi


def _check_descending(arr: np.ndarray, lo: int, hi: int, name: str) -> None:
    """``ValueError`` when ranks ``lo..hi`` of ``arr`` are not sorted descending (ties are fine)."""
    rises = np.flatnonzero(arr[lo:hi] > arr[lo - 1 : hi - 1])
    if rises.size:  # e.g. torch.linalg.eigvalsh's ascending output: alpha came out negative, without a word
        r = lo + int(rises[0])
        raise ValueError(
            f"{name} [{lo}, {hi}] is not sorted descending: rank {r + 1} ({arr[r]:.6g}) exceeds rank {r} "
            f"({arr[r - 1]:.6g}); pass the eigenvalues largest first (torch.linalg.eigvalsh returns them "
            "ascending: flip them)"
        )


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """OLS of y on x: (slope, intercept, r2, stderr of slope)."""
    # a window of equal values (a flat spectrum) has no spread: centre it on that value itself, since the
    # rounded mean leaves ~1e-16 residues whose ratio sse/sst made r2 0 or 1 depending on the value
    xm, ym = x.mean(), (y.mean() if np.ptp(y) > 0 else y[0])
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sse = float((resid**2).sum())
    sst = float(((y - ym) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    dof = x.size - 2
    stderr = math.sqrt(sse / dof / sxx) if dof > 0 else float("nan")
    return slope, intercept, r2, stderr


def band_alpha(p, window: tuple[int, int]) -> AlphaFit:
    """Band-restricted exponent ``alpha(I)`` of a (trace-normalized) spectrum ``p`` over ``window``.

    ``p`` must be sorted descending; normalization does not change ``alpha`` (only the intercept).
    Raises ``ValueError`` if ``p`` is not 1-D, if the window is not a pair of integer ranks
    ``1 <= lo < hi`` (bools and floats are refused), exceeds the spectrum, reaches zero eigenvalues,
    holds NaN/Inf or is not sorted descending (ties are fine).
    """
    arr = _as_numpy(p)
    lo, hi = _check_window(arr, window)
    _check_descending(arr, lo, hi, "window")
    ranks = np.arange(lo, hi + 1, dtype=np.float64)
    slope, intercept, r2, stderr = _line_fit(np.log(ranks), np.log(arr[lo - 1 : hi]))
    # + 0.0: a flat window's slope is 0.0 and its negation -0.0, printed '-0.000' and stored as -0.0
    return AlphaFit((lo, hi), -slope + 0.0, intercept, r2, stderr, hi - lo + 1)


def window_that_fits(size: int) -> tuple[int, int]:
    """An example rank window for a spectrum of ``size`` usable eigenvalues, for messages about a window
    that does not fit: the head window ``(10, 40)`` where it fits, else the upper three quarters of the
    ranks, ``(max(1, size // 4), size)``. Not a protocol rule: on a spectrum this small the window may
    start inside the learned head (see :func:`estimate_crossover`)."""
    return (10, 40) if size >= 40 else (max(1, size // 4), max(1, size))


def tail_window(n_layer: int) -> tuple[int, int]:
    """The paper's scale rule for the tail window (Sec. 2).

    d12 (and shallower) -> [100, 200]; d36 -> [200, 400]; d48 -> [400, 800]. Depths between tiers take
    the next tier's window; deeper models continue outward by doubling per further 1.33x in depth
    (the ratio 48/36), i.e. 64 layers -> [800, 1600]. The extrapolation beyond d48 is ours, not the
    paper's: check it against :func:`estimate_crossover` on your own spectra. ``n_layer`` must be an integer
    (Python or NumPy, not a bool): ``ValueError`` otherwise.
    """
    try:  # a depth: 12.5 took the d36 window and True the d12 one, without a word
        if isinstance(n_layer, (bool, np.bool_)):
            raise TypeError
        n = operator.index(n_layer)
    except TypeError:
        raise ValueError(
            f"n_layer must be an integer number of blocks (Python or NumPy int), got {n_layer!r}"
        ) from None
    if n < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    n_layer = n
    if n_layer <= 12:
        return (100, 200)
    if n_layer <= 36:
        return (200, 400)
    if n_layer <= 48:
        return (400, 800)
    steps = math.ceil(math.log(n_layer / 48) / math.log(48 / 36) - 1e-9)
    return (400 * 2**steps, 800 * 2**steps)


def _broken_stick(x: np.ndarray, y: np.ndarray, min_segment: float) -> tuple[float, float, float, float]:
    """Continuous two-segment least squares in (x, y): (break, slope below, slope above, sse)."""
    span = x[-1] - x[0]
    best = (np.inf, 0.0, 0.0, 0.0)
    for b in np.linspace(x[0] + min_segment * span, x[-1] - min_segment * span, 4 * x.size):
        design = np.stack([np.ones_like(x), np.minimum(x - b, 0.0), np.maximum(x - b, 0.0)], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(((design @ coef - y) ** 2).sum())
        if sse < best[0]:
            best = (sse, float(b), float(coef[1]), float(coef[2]))
    return best[1], best[2], best[3], best[0]


def _bend_model(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log p`` of the Theorem-6 spectrum ``C r^-a (1 - exp(-(r*/r)^q))^2`` at ``x = log r``."""
    c, a, q, log_rstar = theta
    z = np.exp(q * (log_rstar - x))
    return c - a * x + 2.0 * np.log(-np.expm1(-z))


_Q_BOUNDS = (1e-3, 50.0)  # the bend fit's search range of the sharpness q


def estimate_crossover(
    p,
    ranks: tuple[int, int] | None = None,
    method: str = "bend",
    n_grid: int = 256,
    min_segment: float = 0.15,
) -> CrossoverFit:
    """Estimate the crossover rank ``r*`` between the learned head and the unresolved tail.

    The spectrum is resampled on ``n_grid`` log-spaced ranks inside ``ranks``, so every decade weighs
    the same. The default ranks run from 1 to the numerical rank: the eigenvalues above round-off,
    ``p_j > sqrt(p.size) * eps * max(p)`` with ``eps`` of ``p``'s floating dtype, float32's for fp16/bf16
    (see :func:`_numerical_rank`). A covariance of ``N < d`` rows has ``d - N + 1`` round-off
    eigenvalues (~1e-16 of the largest in float64); fitted, their cliff was reported as a crossover near ``N``. Two estimators:

    * ``method="broken_stick"``: continuous two-segment least squares in log-log; ``r*`` is where the
      two fitted lines meet. Model-free but biased toward the middle of a smooth bend.
    * ``method="bend"`` (default): nonlinear least squares of the paper's Theorem-6 shape
      ``log p = c - a log r + 2 log(1 - exp(-(r*/r)^q))``, started from the broken stick. Its
      asymptotes are a head of exponent ``a`` and a tail of exponent ``a + 2q`` meeting at ``r*``, so
      on analytic spectra ``lambda_r = C r^-p (1 - exp(-eta t r^-q))^2`` it returns
      ``r* = (eta t)^(1/q)``, ``head_alpha = p`` and ``tail_alpha = p + 2q``.

    ``min_segment`` is the smallest fraction of the log-rank range either broken-stick segment covers, in
    ``[0, 0.5]``; ``n_grid`` an integer >= 9. ``p`` must not be ascending over ``ranks`` (rising and never
    falling, an eigensolver's ascending order: ``ValueError``, which names that order also where a window
    check fails first, on the round-off eigvalsh puts at rank 1); any other order is fitted as given (noisy
    energies in mode order, which may end higher than they start where the noise outweighs the trend).
    Use the estimate to check that a tail window lies beyond the bend (``window[0] > rank``).
    """
    from scipy.optimize import least_squares

    arr = _as_numpy(p)
    if ranks is None:
        resolved = _numerical_rank(p)
        if resolved < 9:
            raise ValueError(
                f"need at least 9 ranks to locate a crossover; only {resolved} of {arr.size} eigenvalues lie above "
                "round-off (a covariance of N rows has at most N - 1)"
            )
        ranks = (1, resolved)
    try:
        lo, hi = _check_window(arr, ranks, "ranks")
    except ValueError as e:
        # eigvalsh's ascending output of a covariance of N < d rows starts with its round-off: the window
        # check named a negative (or, clamped, a zero) eigenvalue at rank 1 and never reached the order
        if arr.size > 1 and arr[-1] > arr[0] and bool(np.all(arr[1:] >= arr[:-1])):
            raise ValueError(
                f"the spectrum rises from {arr[0]:.6g} at rank 1 to {arr[-1]:.6g} at rank {arr.size} and never falls "
                f"({e}); pass the eigenvalues largest first (torch.linalg.eigvalsh returns them ascending: flip them)"
            ) from None
        raise
    if hi - lo < 8:
        raise ValueError(f"ranks [{lo}, {hi}]: need at least 9 ranks to locate a crossover")
    # ascending input (eigvalsh's order) gave a 'crossover' with negative exponents: a window that rises and
    # never falls is refused. Any other order is fitted as given: noisy energies in mode order (as Theorem 6
    # indexes them) end higher than they start where the trend is weaker than the noise, and comparing the
    # two endpoints refused 10-40% of such windows (a noise floor, a shallow spectrum at 5% noise)
    w = arr[lo - 1 : hi]
    if w[-1] > w[0] and bool(np.all(w[1:] >= w[:-1])):
        raise ValueError(
            f"ranks [{lo}, {hi}]: the spectrum rises from {arr[lo - 1]:.6g} at rank {lo} to {arr[hi - 1]:.6g} at rank "
            f"{hi} and never falls; pass the eigenvalues largest first (torch.linalg.eigvalsh returns them "
            "ascending: flip them)"
        )
    if method not in ("bend", "broken_stick"):
        raise ValueError(f"method must be 'bend' or 'broken_stick', got {method!r}")
    # n_grid = 1 returned a 'located' crossover from one point (NaN slopes); a min_segment above 0.5
    # (the two segments cannot both cover more than half) or below 0 searched breaks outside the ranks
    if isinstance(n_grid, (bool, np.bool_)) or not isinstance(n_grid, (int, np.integer)) or n_grid < 9:
        raise ValueError(f"estimate_crossover: n_grid must be an integer >= 9 (log-spaced ranks to fit), got {n_grid!r}")
    if not 0 <= min_segment <= 0.5:
        raise ValueError(f"estimate_crossover: min_segment must be in [0, 0.5] (the smallest share of the log-rank "
                         f"range either segment covers), got {min_segment!r}")
    grid = np.unique(np.round(np.geomspace(lo, hi, n_grid)).astype(np.int64))
    x = np.log(grid.astype(np.float64))
    y = np.log(arr[grid - 1])
    sst = float(((y - y.mean()) ** 2).sum())
    _, _, r2_line, _ = _line_fit(x, y)
    sse_line = (1.0 - r2_line) * sst
    b, s_head, s_tail, sse = _broken_stick(x, y, min_segment)
    log_rstar, head, tail = b, -s_head, -s_tail
    q_free = True  # the broken stick's break lies inside the ranks by construction (min_segment)
    if method == "bend":
        # started inside the search range: a cliff (tail - head > 100, e.g. a rank-deficient spectrum's drop
        # to round-off) put q0 beyond it, and SciPy refused with 'Initial guess is outside of provided bounds'
        q0 = min(max((tail - head) / 2.0, 0.05), _Q_BOUNDS[1])
        theta0 = np.array([y[0] + head * x[0], head, q0, b])
        fit = least_squares(
            lambda t: _bend_model(t, x) - y,
            theta0,
            bounds=([-np.inf, -np.inf, _Q_BOUNDS[0], x[0] - 5.0], [np.inf, np.inf, _Q_BOUNDS[1], x[-1] + 5.0]),
        )
        if fit.success and np.all(np.isfinite(fit.x)):
            _, head, q, log_rstar = (float(v) for v in fit.x)
            tail = head + 2.0 * q
            sse = float((fit.fun**2).sum())
            q_free = _Q_BOUNDS[0] * 1.01 < q < _Q_BOUNDS[1] * 0.99
    # 0 where the single line already fits to round-off (a flat or pure power-law spectrum: the ratio
    # of two round-off sums means nothing), and at most 1; a bend fit worse than the line removes nothing
    tiny = 1e-24 * y.size * max(1.0, float(np.abs(y).max())) ** 2
    improvement = min(1.0, max(0.0, 1.0 - sse / sse_line)) if sse_line > tiny else 0.0
    rank = float(np.exp(log_rstar))
    # improvement 0: a line fits (a pure power law, a flat spectrum); the broken stick still placed a 'break'
    # inside the ranks, with equal slopes, and called it located
    located = bool(q_free and lo <= rank <= hi and improvement > 0)
    return CrossoverFit(rank, float(head), float(tail), (lo, hi), float(improvement), located)
