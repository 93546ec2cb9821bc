"""Closed forms of the toy-model results (paper Sec. 5 / App. F.4), as pure float64 functions.

Setting (Thm. 2): under zero initialization, Fourier mode ``r`` of the linearized kernel flow moves as
``a_r(t) = beta_r (1 - exp(-kappa_r t))``; activation covariance eigenvalues are ``|a_r|^2``, gradient
ones ``kappa_r^2 |beta_r - a_r|^2`` (Prop. 3, the DC mode excluded). The two-layer factor model
(Thm. 11) moves each mode mass as ``m_r' = 2 m_r (beta_r - m_r)``. Idealized Muon (Thm. 17) replaces
a gradient ``G = U S V^T`` by its polar factor ``U V^T``.

Every function here is numpy/scipy on float64 arrays, holds no state and has no side effects. The
checks against simulation (``scipy.integrate.solve_ivp``) and exact formulas live in
``tests/toy/test_theory.py``; ``docs/toy-theory.md`` explains each one. The Theorem-6 spectra come
from :mod:`spectral_lens.analysis.synthetic` and the band fits from :mod:`spectral_lens.spectra`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "mode_amplitudes",
    "activation_energies",
    "gradient_energies",
    "mode_loss",
    "recruitment_time",
    "simulated_recruitment_time",
    "matched_loss_time",
    "mode_mass",
    "fast_band_concentration",
    "time_to_target",
    "time_to_target_slope",
    "head_matched_rate",
    "head_matched_recruitment_time",
    "local_alpha",
    "gradient_crossover_time",
    "factor_masses",
    "factor_rhs",
    "band_concentration",
    "band_concentration_rate",
    "polar_factor",
    "nuclear_norm",
    "quintic_map",
    "quintic_band",
]

_LOG_MAX = math.log(np.finfo(np.float64).max)  # log of the largest float64, ~709.78


# --------------------------------------------------------------------------------------------------
# helpers


def _vec(name: str, x, *, positive: bool = False, nonnegative: bool = False,
         complex_ok: bool = False) -> np.ndarray:
    """``x`` as a non-empty finite 1-D float64 array (complex128 where ``complex_ok``: Thm. 2's ``beta_r``)."""
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        if not complex_ok:  # a float64 cast would silently drop the imaginary part
            raise ValueError(f"examples.toy.theory: {name} must be real, got dtype {arr.dtype}")
        arr = arr.astype(np.complex128)
    else:
        arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"examples.toy.theory: {name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"examples.toy.theory: {name} has non-finite entries")
    if positive and np.any(arr <= 0):
        raise ValueError(f"examples.toy.theory: {name} must be > 0, got min {arr.min()!r}")
    if nonnegative and np.any(arr < 0):
        raise ValueError(f"examples.toy.theory: {name} must be >= 0, got min {arr.min()!r}")
    return arr


def _same_size(**arrays: np.ndarray) -> None:
    sizes = {k: v.size for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"examples.toy.theory: arrays must have the same length, got {sizes}")


def _real(fn: str, name: str, x, *, low: float | None = None, strict: bool = False) -> float:
    """``x`` as a finite float, ``> low`` (``strict``) or ``>= low``; the error names ``fn`` and ``name``.

    A complex ``x`` is refused: ``float(np.complex128(...))`` would drop the imaginary part with a warning.
    """
    if isinstance(x, complex) or np.iscomplexobj(x):
        raise ValueError(f"{fn}: {name} must be real, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: {name} must be a real number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be finite, got {x!r}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"{fn}: need {name} {'>' if strict else '>='} {low:g}, got {x!r}")
    return v


def _real_array(fn: str, name: str, x) -> np.ndarray:
    """``x`` as a float64 array; complex input is refused (a float64 cast would drop the imaginary part)."""
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise ValueError(f"{fn}: {name} must be real, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _decayed(c: np.ndarray, log_c: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """``c e^{-kt}`` for ``c >= 0`` given with its ``log_c``, without a spurious 0, inf or nan.

    The direct product is exact to rounding while ``e^{-kt}`` and ``c`` are normal floats; where
    ``e^{-kt}`` underflows or ``c`` overflows (``c = kappa |beta|`` with large factors) the value is
    ``exp(log_c - kt)`` instead (relative error ~ ``eps |log_c|``, only in that range).
    """
    tiny = np.finfo(np.float64).tiny
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(-kt)
        out = c * e
        bad = ~np.isfinite(c) | ((e < tiny) & (c > 1.0))
        if np.any(bad):
            out = np.where(bad, np.exp(log_c - kt), out)
    return out


def _rel_rise(x: np.ndarray) -> np.ndarray:
    """``(1 - e^{-x}) / x`` for ``x >= 0``, with its limit 1 at ``x = 0`` (no 0/0, no underflow of the ratio)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.ones_like(x)
    on = x > 0
    out[on] = -np.expm1(-x[on]) / x[on]
    return out


def _unit_interval(name: str, x: float) -> float:
    x = float(x)
    if not 0.0 < x < 1.0:
        raise ValueError(f"examples.toy.theory: {name} must lie in (0, 1), got {x!r}")
    return x


def _bisect_decreasing(f, target: float, lo: float, hi: float) -> float:
    """Root of ``f(t) = target`` for ``f`` strictly decreasing on ``[lo, inf)``, with ``f(lo) > target``."""
    from scipy.optimize import brentq

    while f(hi) > target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            raise ValueError(f"examples.toy.theory: no time reaches the target {target!r}")
    return float(brentq(lambda t: f(t) - target, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500))


# --------------------------------------------------------------------------------------------------
# Theorem 2 / Proposition 3: modewise dynamics and the observable energies


def _modes(fn: str, t, beta, kappa) -> tuple[float, np.ndarray, np.ndarray]:
    """Validated ``(t, beta, kappa)`` of Thm. 2: finite ``t >= 0``, ``beta`` real or complex, ``kappa >= 0``."""
    t = _real(fn, "t", t, low=0.0)
    beta, kappa = _vec("beta", beta, complex_ok=True), _vec("kappa", kappa, nonnegative=True)
    _same_size(beta=beta, kappa=kappa)
    return t, beta, kappa


def mode_amplitudes(t: float, beta, kappa) -> np.ndarray:
    """Thm. 2(b): mode amplitudes ``a_r(t) = beta_r (1 - exp(-kappa_r t))`` from zero initialization.

    ``beta`` may be complex (the paper's Fourier coefficients); the result then is too. ``t >= 0``.
    """
    t, beta, kappa = _modes("mode_amplitudes", t, beta, kappa)
    return beta * -np.expm1(-kappa * t)


def activation_energies(t: float, beta, kappa) -> np.ndarray:
    """Prop. 3: activation covariance eigenvalues ``|a_r(t)|^2`` (one per mode, in input order)."""
    return np.abs(mode_amplitudes(t, beta, kappa)) ** 2


def gradient_energies(t: float, beta, kappa) -> np.ndarray:
    """Prop. 3: gradient covariance eigenvalues ``kappa_r^2 |beta_r - a_r(t)|^2 = kappa_r^2 |beta_r|^2 e^{-2 kappa_r t}``.

    Squared after the product, and the product ``kappa_r |beta_r| e^{-kappa_r t}`` taken in logs where
    ``kappa_r |beta_r|`` overflows or ``e^{-kappa_r t}`` underflows, so a large ``kappa_r |beta_r|`` gives
    neither ``inf * 0 = nan`` nor a spurious 0 (:func:`_decayed`).
    """
    t, beta, kappa = _modes("gradient_energies", t, beta, kappa)
    b = np.abs(beta)
    with np.errstate(over="ignore", divide="ignore"):
        c, log_c = kappa * b, np.log(kappa) + np.log(b)
    return _decayed(c, log_c, kappa * t) ** 2


def mode_loss(t: float, beta, kappa) -> float:
    """``L(t) = 1/2 sum_r |beta_r - a_r(t)|^2 = 1/2 sum_r |beta_r|^2 e^{-2 kappa_r t}``.

    Thm. 2(c) is Parseval without the 1/2 (``||f_t - f*||^2 = sum_r |a_r - beta_r|^2``); the 1/2 is
    the loss of Props. 4 and 5 (``L_A = m/2 e^{-2 kappa t}``), which is what the toy checks use.
    """
    t, beta, kappa = _modes("mode_loss", t, beta, kappa)
    b = np.abs(beta)
    with np.errstate(divide="ignore"):
        log_b = np.log(b)
    return float(0.5 * np.sum(_decayed(b, log_b, kappa * t) ** 2))


# --------------------------------------------------------------------------------------------------
# Theorem 7: band-recruitment law


def recruitment_time(R: float, delta: float, eta: float, q: float) -> float:
    """Thm. 7 (Eq. 7): time for ranks ``1..R`` to reach ``a_r >= (1 - delta) beta_r``.

    Under ``kappa_r = eta r^-q`` (rates non-increasing in rank, ``q >= 0``) the slowest mode of the
    band is ``R``, so ``T_{R,delta} = log(1/delta) R^q / eta``. With ``alpha_tail = p + 2q``
    (Thm. 6) the exponent ``q`` equals ``(alpha_tail - p) / 2``. A time beyond the float64 range is
    ``inf`` (``R**q`` alone raised ``OverflowError``); one whose ``R**q`` or ``log(1/delta) R**q`` overflows
    but which is in range is computed in log space (review 29: it was ``inf``, or ``OverflowError`` at
    ``q log R == log(max)``).
    """
    delta = _unit_interval("delta", delta)
    fn = "recruitment_time"
    R, eta, q = _real(fn, "R", R, low=1.0), _real(fn, "eta", eta, low=0.0, strict=True), _real(fn, "q", q, low=0.0)
    lg = -math.log(delta)
    try:
        t = lg * R**q / eta
    except OverflowError:  # R**q past float64 (also at q log R == log(max), where the test on it missed)
        t = math.inf
    if math.isinf(t):  # R**q or lg R**q overflowed: the time may still be in range (a tiny lg, a huge eta)
        log_t = math.log(lg) + q * math.log(R) - math.log(eta)
        return math.exp(log_t) if log_t < _LOG_MAX else math.inf
    return t


def simulated_recruitment_time(beta, kappa, R: int, delta: float) -> float:
    """First time at which modes ``1..R`` all have relative residual ``1 - a_r/beta_r <= delta``.

    Integrates ``a_r' = kappa_r (beta_r - a_r)`` from zero with ``scipy.integrate.solve_ivp``
    (DOP853, rtol 1e-13) and a terminal event on ``max_r (1 - a_r/beta_r) - delta``; makes no
    assumption about which mode is slowest. The reference for :func:`recruitment_time`. It
    integrates the same ODE in the scale-free residual ``w_r = 1 - a_r / beta_r`` (``w_r' = -kappa_r
    w_r``, ``w_r(0) = 1``), so the relative tolerance holds for the residual itself and a mode with a
    small ``|beta_r|`` is resolved as well as a large one (``beta_r`` only has to be nonzero). A time
    error is about the residual's relative error over ``kappa t = log(1/delta)``, so at rtol 1e-12 it
    reached 8e-12 for ``delta = 0.9``; at 1e-13 it is <= 4e-13 for ``delta <= 0.9`` (5.6e-11 at
    ``delta = 1 - 1e-6``, where the event falls in the first step).
    """
    from scipy.integrate import solve_ivp

    beta, kappa = _vec("beta", beta), _vec("kappa", kappa, positive=True)
    _same_size(beta=beta, kappa=kappa)
    delta = _unit_interval("delta", delta)
    if isinstance(R, bool) or int(R) != R or not 1 <= int(R) <= beta.size:
        raise ValueError(f"simulated_recruitment_time: R must be an integer in [1, {beta.size}], got {R!r}")
    R = int(R)
    if np.any(beta[:R] == 0):
        raise ValueError("simulated_recruitment_time: beta_r must be nonzero for r <= R (relative residual)")
    k_min = float(kappa[:R].min())
    k = kappa[:R] / k_min  # in the time unit 1 / k_min: scipy's step control sees rates >= 1 (no overflow
    # of its first-step estimate at kappa ~ 1e300, no 4e-5 error at kappa ~ 1e-300)

    def rhs(_t, w):
        return -k * w

    def event(_t, w):
        return float(np.max(w)) - delta

    event.terminal, event.direction = True, -1
    t_end = 2.0 * -math.log(delta)
    sol = solve_ivp(rhs, (0.0, t_end), np.ones(R), method="DOP853", events=event, rtol=1e-13,
                    atol=1e-15 * delta)  # w >= delta up to the event: the relative tolerance governs
    if sol.t_events[0].size == 0:
        raise RuntimeError("simulated_recruitment_time: the event was not reached (integration failed)")
    return float(sol.t_events[0][0]) / k_min


# --------------------------------------------------------------------------------------------------
# Proposition 4: matched loss, different spectra


def matched_loss_time(level: float, beta, kappa) -> float:
    """Prop. 4: the unique ``t > 0`` with ``mode_loss(t) = level``, for ``0 < level < 1/2 sum beta_r^2``.

    The loss falls strictly from ``1/2 sum beta^2`` to 0 (all ``kappa_r > 0``), so Brent's method on
    a bracketing interval finds it to machine precision.
    """
    beta, kappa = _vec("beta", beta, complex_ok=True), _vec("kappa", kappa, positive=True)
    _same_size(beta=beta, kappa=kappa)
    top = 0.5 * float(np.sum(np.abs(beta) ** 2))
    level = _real("matched_loss_time", "level", level)
    if not 0.0 < level < top:
        raise ValueError(f"matched_loss_time: level must lie in (0, {top!r}) (the loss at t=0), got {level!r}")
    return _bisect_decreasing(lambda t: mode_loss(t, beta, kappa), float(level), 0.0, 1.0 / float(kappa.max()))


def mode_mass(t: float, beta, kappa, r: int = 0) -> float:
    """Prop. 4: normalized activation mass ``P(t) = |a_r|^2 / sum_s |a_s|^2`` of mode ``r`` (0-based).

    Each amplitude ``|a_s| = |beta_s| (1 - e^{-x_s})``, ``x_s = kappa_s t``, is kept as a mantissa and a
    binary exponent (``np.frexp`` of its factors; ``1 - e^{-x} = kappa t g(x)`` with ``g(x) = (1 - e^{-x})
    / x`` where ``x < 1``) and rescaled by the largest before squaring, so neither a tiny ``t`` (where
    ``|a_s|^2`` underflows) nor factors of very different size (a product that went subnormal lost
    digits) cost accuracy; as ``t -> 0`` it tends to ``|beta_r kappa_r|^2 / sum_s |beta_s kappa_s|^2``.
    """
    t, beta, kappa = _modes("mode_mass", t, beta, kappa)
    if isinstance(r, bool) or int(r) != r or not 0 <= int(r) < beta.size:
        raise ValueError(f"mode_mass: r must be a 0-based mode index in [0, {beta.size}), got {r!r}")
    if t <= 0:
        raise ValueError(f"mode_mass: t must be > 0 (no activation energy at t=0), got {t!r}")
    b = np.abs(beta)
    if not np.any((b > 0) & (kappa > 0)):
        raise ValueError("mode_mass: no activation energy (every mode has beta_r = 0 or kappa_r = 0)")
    with np.errstate(over="ignore", under="ignore"):  # kappa t = inf is fine: 1 - e^{-inf} = 1
        x = kappa * t
    small = x < 1.0
    mb, eb = np.frexp(b)
    mk, ek = np.frexp(np.where(small, kappa, 1.0))
    mt, et = np.frexp(np.where(small, t, 1.0))
    mg, eg = np.frexp(np.where(small, _rel_rise(np.where(small, x, 0.0)), -np.expm1(-x)))
    mant, expo = mb * mk * mt * mg, eb + ek + et + eg  # |a_s| = mant 2^expo, mant in [1/16, 1) or 0
    amp = np.ldexp(mant, expo - int(expo[mant > 0].max()))
    e = amp**2
    return float(e[int(r)] / e.sum())


# --------------------------------------------------------------------------------------------------
# Proposition 5: early band concentration predicts time-to-target


def fast_band_concentration(t0: float, kappa_fast: float, kappa_slow: float, k: int, m: int) -> float:
    """Prop. 5: ``C(t0) = k A_f / (k A_f + (m - k) A_s)`` with ``A = (1 - e^{-kappa t0})^2``.

    ``k`` fast modes at rate ``kappa_fast``, ``m - k`` slow ones at ``kappa_slow``, all ``beta_r = 1``.
    """
    _two_band(kappa_fast, kappa_slow, k, m)
    t0 = _real("fast_band_concentration", "t0", t0)
    if t0 <= 0:
        raise ValueError(f"fast_band_concentration: need t0 > 0, got {t0!r}")
    # C = k / (k + (m - k) rho^2) with rho = (A_s / A_f)^(1/2); at small times rho from
    # kappa g(kappa t0), g(x) = (1 - e^{-x}) / x, so there is no 0/0 when A underflows at tiny t0
    x = np.array([kappa_fast * t0, kappa_slow * t0])
    if x.max() < 1.0:
        g = _rel_rise(x)
        rho = (kappa_slow / kappa_fast) * float(g[1] / g[0])
    else:
        a = -np.expm1(-x)
        rho = float(a[1] / a[0]) if a[0] > 0 else math.inf
    if rho <= 1.0:
        return k / (k + (m - k) * rho**2)
    s = 1.0 / rho  # rho**2 raised OverflowError for rho > 1.3e154 (a slow band faster than the fast one)
    return k * s * s / (k * s * s + (m - k))


def _two_band(kappa_fast: float, kappa_slow: float, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    if any(isinstance(v, complex) or np.iscomplexobj(v) for v in (kappa_fast, kappa_slow)):
        raise ValueError(f"two-band model: rates must be real, got {kappa_fast!r}, {kappa_slow!r}")
    if (not 0 < k < m or int(k) != k or int(m) != m or not kappa_fast > 0 or not kappa_slow > 0
            or not math.isfinite(kappa_fast) or not math.isfinite(kappa_slow)):
        raise ValueError(f"two-band model: need integers 0 < k < m and finite positive rates, got k={k!r}, m={m!r}, "
                         f"kappa_fast={kappa_fast!r}, kappa_slow={kappa_slow!r}")
    k, m = int(k), int(m)
    return np.ones(m), np.r_[np.full(k, float(kappa_fast)), np.full(m - k, float(kappa_slow))]


def time_to_target(eps: float, kappa_fast: float, kappa_slow: float, k: int, m: int) -> float:
    """Prop. 5: the unique ``T`` with ``1/2 (k e^{-2 kappa_fast T} + (m - k) e^{-2 kappa_slow T}) = eps``."""
    beta, kappa = _two_band(kappa_fast, kappa_slow, k, m)
    return matched_loss_time(eps, beta, kappa)


def time_to_target_slope(eps: float, kappa_fast: float, kappa_slow: float, k: int, m: int) -> float:
    """Prop. 5: ``dT_eps / d kappa_slow`` by implicit differentiation (negative).

    ``dT/dks = -(m-k) T e^{-2 ks T} / (k kf e^{-2 kf T} + (m-k) ks e^{-2 ks T})``.
    """
    T = time_to_target(eps, kappa_fast, kappa_slow, k, m)
    # divided through by the larger of e^{-2 ks T}, e^{-2 kf T}: no 0/0 when both underflow (tiny eps)
    if kappa_fast >= kappa_slow:
        es, ef = 1.0, math.exp(-2 * (kappa_fast - kappa_slow) * T)
    else:
        es, ef = math.exp(-2 * (kappa_slow - kappa_fast) * T), 1.0
    return -(m - k) * T * es / (k * kappa_fast * ef + (m - k) * kappa_slow * es)


# --------------------------------------------------------------------------------------------------
# Corollary 8: head-matched early measurement


def head_matched_rate(xi: float, t0: float, r_h: float, q: float) -> float:
    """Cor. 8: the ``eta_B`` for which mode ``r_h`` has reached ``a = xi beta`` at ``t0``: ``-log(1-xi) r_h^q / t0``."""
    xi = _unit_interval("xi", xi)
    fn = "head_matched_rate"
    t0, r_h, q = _real(fn, "t0", t0, low=0.0, strict=True), _real(fn, "r_h", r_h, low=1.0), _real(fn, "q", q, low=0.0)
    return -math.log1p(-xi) * r_h**q / t0


def head_matched_recruitment_time(R: float, r_h: float, delta: float, xi: float, t0: float, q: float) -> float:
    """Cor. 8 (Eq. 8): ``T_{R,delta} = log(1/delta) / (-log(1 - xi)) * t0 * (R / r_h)^q``.

    At a fixed head match ``(xi, t0, r_h)`` this grows with ``q_B = (alpha_tail - p)/2`` whenever
    ``R > r_h``: the batch with the smallest tail exponent reaches the band first.
    """
    delta, xi = _unit_interval("delta", delta), _unit_interval("xi", xi)
    fn = "head_matched_recruitment_time"
    t0, q = _real(fn, "t0", t0, low=0.0, strict=True), _real(fn, "q", q, low=0.0)
    R, r_h = _real(fn, "R", R, low=1.0), _real(fn, "r_h", r_h, low=1.0)
    return -math.log(delta) / -math.log1p(-xi) * t0 * (R / r_h) ** q


# --------------------------------------------------------------------------------------------------
# Proposition 9: local slope of the Theorem-6 spectrum


def local_alpha(r, t: float, p: float, eta: float, q: float) -> np.ndarray:
    """Prop. 9: local exponent ``-d log lambda_r / d log r`` of ``lambda_r = C r^-p (1 - e^{-x})^2``.

    With ``x = eta t r^-q = (r*/r)^q`` it equals ``p + 2q x / (e^x - 1)``: ``p`` deep in the head
    (``x -> inf``), ``p + 2q`` deep in the tail (``x -> 0``), strictly between and increasing in
    ``r`` otherwise. A least-squares band fit over ``[R1, R2]`` is a positively weighted average of
    secant slopes, so it lies between ``local_alpha(R1)`` and ``local_alpha(R2)``.
    """
    r = _real_array("local_alpha", "r", r)
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise ValueError(f"local_alpha: need finite r > 0, got {r!r}")
    fn = "local_alpha"
    p = _real(fn, "p", p)
    t, eta, q = (_real(fn, name, v, low=0.0, strict=True) for name, v in (("t", t), ("eta", eta), ("q", q)))
    with np.errstate(over="ignore", under="ignore"):  # r^-q -> inf / 0 handled below
        x = np.asarray(eta * t * r**-q, dtype=np.float64)
    # x / (e^x - 1) = x e^{-x} / (1 - e^{-x}), without overflow; its limits are 1 at x = 0 (r^-q
    # underflows deep in the tail) and 0 at x = inf (r^-q overflows deep in the head)
    with np.errstate(invalid="ignore", over="ignore"):
        h = np.where(x == 0, 1.0, np.where(np.isinf(x), 0.0, x * np.exp(-x) / -np.expm1(-x)))
    return p + 2.0 * q * h


# --------------------------------------------------------------------------------------------------
# Proposition 10: activation-gradient complementarity


def gradient_crossover_time(kappa_i: float, kappa_j: float) -> float:
    """Prop. 10: the unique ``t_ij`` at which ``G_i = kappa_i^2 e^{-2 kappa_i t}`` equals ``G_j``.

    ``t_ij = log(kappa_i / kappa_j) / (kappa_i - kappa_j)`` for ``kappa_i > kappa_j > 0``; before it the
    faster mode has more gradient energy, after it less (while its activation energy stays larger).
    """
    fn = "gradient_crossover_time"
    kappa_i, kappa_j = _real(fn, "kappa_i", kappa_i), _real(fn, "kappa_j", kappa_j)
    if not kappa_i > kappa_j > 0:
        raise ValueError(f"gradient_crossover_time: need kappa_i > kappa_j > 0, got {kappa_i!r}, {kappa_j!r}")
    d = kappa_i - kappa_j  # exact when the rates are within a factor 2 (Sterbenz)
    if d < kappa_j:
        # log(kappa_i / kappa_j) would round the ratio first: a relative error eps / (ratio - 1)
        return math.log1p(d / kappa_j) / d
    ratio = kappa_i / kappa_j
    return (math.log(ratio) if math.isfinite(ratio) else math.log(kappa_i) - math.log(kappa_j)) / d


# --------------------------------------------------------------------------------------------------
# Theorem 11 / Corollary 12: two-layer factor model


def factor_masses(t: float, m0, beta) -> np.ndarray:
    """Thm. 11(c): closed-form ``m_r(t)`` of ``m_r' = 2 m_r (beta_r - m_r)`` from ``m_r(0) > 0``.

    ``beta_r > 0``: ``beta_r / (1 + (beta_r/m_r(0) - 1) e^{-2 beta_r t})`` (logistic);
    ``beta_r = 0``: ``m_r(0) / (1 + 2 m_r(0) t)``.

    Where ``beta_r < m_r(0)`` (decay from above, ``beta_r = 0`` included) it is evaluated as
    ``1 / (e^{-2 beta_r t} / m_r(0) + (1 - e^{-2 beta_r t}) / beta_r)``: the same value as a sum of
    two nonnegative terms, so there is no cancellation in ``1 + (beta_r/m_r(0) - 1) e^{...}`` at small
    ``beta_r t`` (it lost ``eps / (beta_r t)`` relative: 2e-5 at ``beta_r = 1e-12``), and
    ``(1 - e^{-x}) / beta_r -> 2 t`` joins the ``beta_r = 0`` case continuously. Where
    ``beta_r >= m_r(0)`` the logistic form has no cancellation and keeps ``m_r <= beta_r`` exactly.
    ``t >= 0``. Each form is scaled so that no intermediate overflows where the result does not (review
    28: ``2 beta_r t = inf`` gave inf, ``beta_r / m_r(0) = inf`` gave nan or 0; see :func:`_factor_up`).
    """
    t = _real("factor_masses", "t", t, low=0.0)
    m0, beta = _vec("m0", m0, positive=True), _vec("beta", beta, nonnegative=True)
    _same_size(m0=m0, beta=beta)
    with np.errstate(over="ignore"):
        x = 2.0 * beta * t  # may be inf: e^{-x} = 0 and 1 - e^{-x} = 1 below
    out = np.empty_like(m0)
    up = beta >= m0  # growth from below: (beta/m0 - 1) >= 0
    out[up] = _factor_up(x[up], m0[up], beta[up])
    # decay from above: 1 / (e^{-x}/m0 + (1 - e^{-x})/beta), written per range of x so nothing overflows
    far = ~up & (x >= 1.0)  # beta > 0: multiply through by beta (beta/m0 < 1, denominator >= 1 - 1/e)
    out[far] = beta[far] / (beta[far] / m0[far] * np.exp(-x[far]) - np.expm1(-x[far]))
    near = ~up & (x < 1.0)  # (1 - e^{-x})/beta = 2 t g(x), continuous into beta = 0; multiply through by m0
    e, d = np.exp(-x[near]), (2.0 * t) * _rel_rise(x[near])
    with np.errstate(over="ignore"):  # np.where evaluates both forms; each is used where it is finite
        y = m0[near] * d
        ok = np.isfinite(y)  # else m0 d is huge and m ~ 1/d (no 1/m0 overflow for a subnormal m0 either)
        out[near] = np.where(ok, m0[near] / (e + np.where(ok, y, 0.0)), 1.0 / (d + e / m0[near]))
    return out


def _factor_up(x: np.ndarray, m0: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Logistic ``beta / (1 + (beta/m0 - 1) e^{-x})`` for ``beta >= m0``, also where ``beta/m0`` overflows.

    There ``c = (beta/m0 - 1) e^{-x}`` is taken in logs (``inf * 0`` was nan at large ``x``, ``beta / inf``
    was 0 at small ``x``); for ``c > 1e300`` the value is ``beta / c = m0 e^{x}`` to within ``1e-300``.
    """
    with np.errstate(over="ignore"):
        u = beta / m0 - 1.0
    out = beta / (1.0 + np.where(np.isfinite(u), u, 0.0) * np.exp(-x))
    big = ~np.isfinite(u)
    if np.any(big):
        b, m, xb = beta[big], m0[big], x[big]
        log_c = np.log(b) - np.log(m) - xb  # log1p(-m0/beta) < 1e-308 is dropped
        with np.errstate(over="ignore", under="ignore"):
            huge = log_c > 690.0
            grow = np.where(xb < 700.0, m * np.exp(np.minimum(xb, 700.0)), np.exp(np.log(m) + xb))
            out[big] = np.where(huge, grow, b / (1.0 + np.exp(np.minimum(log_c, 690.0))))
    return out


def factor_rhs(m, beta) -> np.ndarray:
    """Thm. 11(b): the vector field ``m_r' = 2 m_r (beta_r - m_r)``."""
    m, beta = _real_array("factor_rhs", "m", m), _real_array("factor_rhs", "beta", beta)
    if m.shape != beta.shape:  # no silent broadcasting of a short beta
        raise ValueError(f"factor_rhs: m has shape {m.shape}, beta {beta.shape}; expected the same")
    return 2.0 * m * (beta - m)


def band_concentration(m, in_band) -> float:
    """Cor. 12: ``H_S = sum_{r in S} m_r / sum_r m_r`` (``in_band``: boolean mask of ``S``)."""
    m, mask = _real_array("band_concentration", "m", m), np.asarray(in_band, dtype=bool)
    if m.shape != mask.shape:
        raise ValueError(f"band_concentration: m has shape {m.shape}, in_band {mask.shape}")
    if not m.sum() > 0:
        raise ValueError(f"band_concentration: total mass must be > 0, got {m.sum()!r}")
    return float(m[mask].sum() / m.sum())


def band_concentration_rate(m, beta, in_band) -> float:
    """Cor. 12: ``dH_S/dt = (A' B - A B') / (A + B)^2`` along ``m' = 2 m (beta - m)``.

    ``A``/``B`` are the in-band/off-band masses. Positive when ``beta`` vanishes off band,
    ``0 < m_r < beta_r`` in band and both masses are nonzero.
    """
    m, mask = _real_array("band_concentration_rate", "m", m), np.asarray(in_band, dtype=bool)
    if m.shape != mask.shape or not m.sum() > 0:
        raise ValueError(f"band_concentration_rate: need m and in_band of one shape and total mass > 0, "
                         f"got shapes {m.shape}, {mask.shape} and mass {m.sum()!r}")
    dm = factor_rhs(m, beta)
    A, B = m[mask].sum(), m[~mask].sum()
    dA, dB = dm[mask].sum(), dm[~mask].sum()
    return float((dA * B - A * dB) / (A + B) ** 2)


# --------------------------------------------------------------------------------------------------
# Theorem 17: idealized Muon and the quintic Newton-Schulz map


def polar_factor(G, rtol: float | None = None) -> np.ndarray:
    """Thm. 17: ``Q(G) = U V^T`` from the compact SVD ``G = U S V^T`` (float64).

    Singular values at or below ``rtol * sigma_max`` (default ``max(m, n) * eps``) count as zero,
    so for rank-deficient ``G`` only the rank-``r`` part enters, as in the theorem.
    """
    G = _matrix("polar_factor", G)
    if rtol is not None:  # a NaN rtol kept no singular value and returned a zero matrix
        rtol = _real("polar_factor", "rtol", rtol, low=0.0)
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        raise ValueError("polar_factor: G is zero; the polar factor is undefined")
    tol = (max(G.shape) * np.finfo(np.float64).eps if rtol is None else rtol) * s[0]
    k = int(np.count_nonzero(s > tol))
    return U[:, :k] @ Vt[:k]


def nuclear_norm(G) -> float:
    """Thm. 17(2): ``||G||_* = sum of singular values``, the dual norm of the operator norm."""
    return float(np.linalg.svd(_matrix("nuclear_norm", G), compute_uv=False).sum())


def _matrix(fn: str, G) -> np.ndarray:
    G = np.asarray(G)
    if np.iscomplexobj(G):
        raise ValueError(f"{fn}: G must be real, got dtype {G.dtype}")
    G = G.astype(np.float64)
    if G.ndim != 2 or G.size == 0:
        raise ValueError(f"{fn}: expected a non-empty matrix, got shape {G.shape}")
    if not np.all(np.isfinite(G)):
        raise ValueError(f"{fn}: G has non-finite entries")
    return G


def quintic_map(s, coefficients: Sequence[float], steps: int = 5) -> np.ndarray:
    """What ``steps`` quintic Newton-Schulz iterations do to each normalized singular value.

    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` keeps the singular vectors and maps every
    singular value by ``phi(s) = a s + b s^3 + c s^5``; this returns ``phi`` applied ``steps`` times.
    Feed it ``sigma / ||G||_F`` to predict the iteration's output exactly (in exact arithmetic).
    """
    coefficients = tuple(coefficients)
    if len(coefficients) != 3:
        raise ValueError(f"quintic_map: coefficients must be (a, b, c), got {coefficients!r}")
    a, b, c = (float(v) for v in coefficients)
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"quintic_map: steps must be an integer >= 0, got {steps!r}")
    s = _real_array("quintic_map", "s", s)  # astype: a copy
    for _ in range(int(steps)):
        s2 = s * s
        s = s * (a + s2 * (b + c * s2))
    return s


def quintic_band(lo: float, coefficients: Sequence[float], steps: int = 5, n: int = 200_001) -> tuple[float, float]:
    """Range ``(min, max)`` of :func:`quintic_map` over normalized singular values ``s in [lo, 1]``.

    Evaluated on ``n`` log-spaced points (the map is smooth and the grid is dense, so the range is
    accurate to well below 1e-4). This is the accuracy band the iteration reaches on matrices whose
    singular values all lie within a factor ``1/lo`` of ``||G||_F``.
    """
    if not 0 < lo <= 1:
        raise ValueError(f"quintic_band: lo must lie in (0, 1], got {lo!r}")
    if int(n) != n or n < 2:
        raise ValueError(f"quintic_band: n must be an integer >= 2, got {n!r}")
    v = quintic_map(np.geomspace(lo, 1.0, n), coefficients, steps)
    return float(v.min()), float(v.max())
