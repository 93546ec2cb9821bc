"""Review 28: the toy theory's closed forms against independent high-precision references.

Each function of ``examples/toy/theory.py`` is checked against the paper's formula (App. F.4)
evaluated in 50-digit mpmath (or an ODE solution) on the edge cases where a float64 form can lose
accuracy: near-equal rates, small ``beta_r``, ``delta`` near 1, tiny times, extreme ranks. Every test
here has a case that failed on the code before review 28 (the docstrings give the old symptom);
the other cases are controls in the regime where the old forms were already accurate.
"""
import math

import mpmath as mp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from examples.toy import theory as th

mp.mp.dps = 50


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


# ---------------------------------------------------------------- Prop. 10: crossover time


def test_crossover_time_near_equal_rates_matches_mpmath():
    """Old: ``log(kappa_i / kappa_j)`` rounded the ratio first, up to 9e-4 relative error."""
    rng = np.random.default_rng(28)
    worst = 0.0
    for _ in range(300):
        kj = rng.uniform(0.1, 10.0)
        ki = kj * (1.0 + 10 ** rng.uniform(-13, 1))
        ref = mp.log(mp.mpf(ki) / mp.mpf(kj)) / (mp.mpf(ki) - mp.mpf(kj))
        worst = max(worst, _rel(th.gradient_crossover_time(ki, kj), ref))
    assert worst < 1e-14, worst
    # a ratio that overflows float64 still has a finite crossover time
    ref = mp.log(mp.mpf(1e300) / mp.mpf(1e-10)) / (mp.mpf(1e300) - mp.mpf(1e-10))
    assert _rel(th.gradient_crossover_time(1e300, 1e-10), ref) < 1e-14
    # and the energies do cross there (Prop. 10 (ii)), for a near-equal pair too
    ki, kj = 1.0 + 3e-9, 1.0
    t = th.gradient_crossover_time(ki, kj)
    Gi, Gj = (mp.mpf(k) ** 2 * mp.exp(-2 * mp.mpf(k) * mp.mpf(t)) for k in (ki, kj))
    assert abs(Gi - Gj) / Gj < 1e-22  # a 1e-7 relative time error would leave ~6e-16


# ---------------------------------------------------------------- Thm. 11(c): factor masses


@pytest.mark.parametrize("beta", [0.0, 1e-15, 1e-12, 1e-9, 1e-6, 0.3, 2.0])
@pytest.mark.parametrize("m0", [1e-3, 0.5, 4.0])
def test_factor_masses_match_mpmath_for_small_targets(beta, m0):
    """Old: ``1 + (beta/m0 - 1) e^{-2 beta t}`` cancelled for small ``beta t`` (2e-5 at 1e-12)."""
    ts = [0.0, 1e-3, 0.7, 5.0, 300.0]
    got = [th.factor_masses(t, [m0], [beta])[0] for t in ts]
    B, M = mp.mpf(beta), mp.mpf(m0)
    for t, g in zip(ts, got):
        T = mp.mpf(t)
        ref = M / (1 + 2 * M * T) if beta == 0 else B / (1 + (B / M - 1) * mp.exp(-2 * B * T))
        assert _rel(g, ref) < 1e-14, (t, g, ref)


def test_factor_masses_solve_the_ode_near_beta_zero():
    # independent of the closed form: integrate m' = 2 m (beta - m) with tight tolerances
    beta, m0 = np.array([1e-12, 1e-9, 0.0, 1.5]), np.array([0.5, 0.5, 0.5, 0.01])
    ts = np.linspace(0.0, 10.0, 11)
    sol = solve_ivp(lambda _t, m: 2 * m * (beta - m), (0, 10), m0, t_eval=ts, method="DOP853",
                    rtol=1e-13, atol=1e-16)
    closed = np.stack([th.factor_masses(t, m0, beta) for t in ts], axis=1)
    assert np.max(np.abs(sol.y - closed) / closed) < 1e-10


# ---------------------------------------------------------------- Thm. 7 / Cor. 8: log(1/delta)


@pytest.mark.parametrize("delta", [1 - 1e-10, 1 - 1e-7, 0.7])
def test_recruitment_times_accurate_for_delta_near_one(delta):
    """Old: ``log(1 / delta)`` rounded ``1/delta`` first, 1e-9 relative error at ``1 - 1e-10``."""
    D = mp.mpf(delta)
    ref = -mp.log(D) * mp.mpf(40) ** mp.mpf(0.6) / mp.mpf(2.0)
    assert _rel(th.recruitment_time(40, delta, 2.0, 0.6), ref) < 1e-14
    ref8 = -mp.log(D) / -mp.log1p(-mp.mpf(0.3)) * mp.mpf(1.5) * (mp.mpf(40) / 3) ** mp.mpf(0.6)
    assert _rel(th.head_matched_recruitment_time(40, 3, delta, 0.3, 1.5, 0.6), ref8) < 1e-14


def test_simulated_recruitment_time_resolves_small_targets():
    """Old: absolute tolerance scaled by ``max |beta|``, so a mode with ``beta = 1e-12`` was off by 2e-7."""
    delta = 1e-6
    sim = th.simulated_recruitment_time([1.0, 1e-12], [2.0, 1.0], 2, delta)
    assert _rel(sim, -math.log(delta) / 1.0) < 1e-11
    with pytest.raises(ValueError, match="integer"):
        th.simulated_recruitment_time([1.0, 1.0, 1.0], [3.0, 2.0, 1.0], 2.5, 0.1)


# ---------------------------------------------------------------- Prop. 4 / Prop. 5: tiny times


def _mass_ref(t, beta, kappa, r):
    e = [(mp.mpf(b) * -mp.expm1(-mp.mpf(k) * mp.mpf(t))) ** 2 for b, k in zip(beta, kappa)]
    return e[r] / sum(e)


@pytest.mark.parametrize("t", [1e-200, 1e-160, 1e-3, 1.0, 40.0])
def test_mode_mass_matches_mpmath_down_to_tiny_times(t):
    """Old: ``|a_r|^2`` underflowed below t ~ 1e-160 and ``mode_mass`` raised 'no activation energy'."""
    beta, kappa = [1.0, 0.5, 2.0, 1.0], [3.0, 2.0, 1.0, 0.25]
    for r in range(4):
        assert _rel(th.mode_mass(t, beta, kappa, r), _mass_ref(t, beta, kappa, r)) < 1e-14


@pytest.mark.parametrize("t0", [1e-200, 1e-170, 1e-3, 0.5, 30.0])
def test_fast_band_concentration_matches_mpmath_down_to_tiny_times(t0):
    """Old: ``A_f`` and ``A_s`` underflowed to 0 and the quotient raised ZeroDivisionError."""
    kf, ks, k, m = 2.0, 0.3, 2, 7
    T = mp.mpf(t0)
    af, as_ = (-mp.expm1(-mp.mpf(kf) * T)) ** 2, (-mp.expm1(-mp.mpf(ks) * T)) ** 2
    ref = k * af / (k * af + (m - k) * as_)
    assert _rel(th.fast_band_concentration(t0, kf, ks, k, m), ref) < 1e-14


# ---------------------------------------------------------------- Prop. 9: local slope limits


def test_local_alpha_matches_mpmath_including_extreme_ranks():
    """Old: ``x = eta t r^-q`` underflowing to 0 (or overflowing to inf) gave nan, not ``p + 2q`` (``p``)."""
    p, eta, t, q = 1.0, 3.0, 2.0, 2.0
    r = np.array([1e-300, 1e-3, 0.5, 1.0, 2.45, 10.0, 1e4, 1e160, 1e300])
    got = th.local_alpha(r, t, p, eta, q)
    for ri, g in zip(r, got):
        x = mp.mpf(eta) * mp.mpf(t) * mp.mpf(ri) ** -q
        ref = p + 2 * q * x / mp.expm1(x)  # -d log lambda / d log r of C r^-p (1 - e^-x)^2
        assert abs(g - float(ref)) <= 1e-14 * float(ref), (ri, g, ref)
    assert got[-1] == p + 2 * q and got[0] == p


# ---------------------------------------------------------------- Thm. 2 / Prop. 3: complex beta


def test_complex_fourier_coefficients_use_their_modulus():
    """Old: a complex ``beta`` array was cast to float64, dropping the imaginary part (a warning only)."""
    beta = np.array([1.0 + 2.0j, -0.5j, 3.0])
    kappa = np.array([2.0, 0.7, 0.1])
    t = 0.9
    a = th.mode_amplitudes(t, beta, kappa)
    assert np.allclose(a, beta * (1 - np.exp(-kappa * t)), rtol=1e-15, atol=0)
    ref_act = np.abs(beta) ** 2 * (1 - np.exp(-kappa * t)) ** 2
    ref_grad = kappa**2 * np.abs(beta - a) ** 2
    assert np.allclose(th.activation_energies(t, beta, kappa), ref_act, rtol=1e-14, atol=0)
    assert np.allclose(th.gradient_energies(t, beta, kappa), ref_grad, rtol=1e-13, atol=0)
    assert _rel(th.mode_loss(t, beta, kappa), 0.5 * np.sum(np.abs(beta - a) ** 2)) < 1e-13
    # the loss matches the ODE a' = kappa (beta - a) integrated in complex arithmetic
    sol = solve_ivp(lambda _t, y: kappa * (beta - y), (0, t), np.zeros(3, complex), method="DOP853",
                    rtol=1e-13, atol=1e-15)
    assert np.allclose(sol.y[:, -1], a, rtol=1e-11, atol=0)
    level = th.mode_loss(t, beta, kappa)
    assert _rel(th.matched_loss_time(level, beta, kappa), t) < 1e-12
    with pytest.raises(ValueError, match="kappa must be real"):
        th.activation_energies(t, [1.0], np.array([1.0 + 1.0j]))


def test_gradient_energies_do_not_overflow_to_nan():
    """Old: ``kappa**2`` overflowed to inf and ``inf * exp(-2 kappa t) = inf * 0`` gave nan."""
    assert th.gradient_energies(1.0, [1.0], [1e160])[0] == 0.0


# ---------------------------------------------------------------- named errors for bad input

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call,match", [
    (lambda: th.mode_amplitudes(NAN, [1.0], [1.0]), "mode_amplitudes: t must be finite"),
    (lambda: th.mode_amplitudes(-50.0, [1.0], [30.0]), "mode_amplitudes: need t >= 0"),
    (lambda: th.gradient_energies(INF, [1.0], [0.0]), "gradient_energies: t must be finite"),
    (lambda: th.mode_loss(-1.0, [1.0], [1.0]), "mode_loss: need t >= 0"),
    (lambda: th.recruitment_time(10, 0.1, NAN, 0.5), "recruitment_time: eta must be finite"),
    (lambda: th.recruitment_time(10, 0.1, 1.0, NAN), "recruitment_time: q must be finite"),
    (lambda: th.head_matched_rate(0.5, NAN, 1, 0.5), "head_matched_rate: t0 must be finite"),
    (lambda: th.head_matched_recruitment_time(20, 2, 0.1, 0.5, 1.0, NAN), "q must be finite"),
    (lambda: th.local_alpha([1.0, 2.0], NAN, 1.0, 1.0, 0.5), "local_alpha: t must be finite"),
    (lambda: th.local_alpha([1.0, NAN], 1.0, 1.0, 1.0, 0.5), "local_alpha: need finite r > 0"),
    (lambda: th.fast_band_concentration(NAN, 2.0, 1.0, 2, 5), "fast_band_concentration: t0 must be finite"),
    (lambda: th.fast_band_concentration(1.0, 2.0, 1.0, 2.5, 5), "integers 0 < k < m"),
    (lambda: th.time_to_target(0.5, INF, 1.0, 2, 5), "finite positive rates"),
    (lambda: th.matched_loss_time(NAN, [1.0], [1.0]), "matched_loss_time: level must be finite"),
    (lambda: th.factor_masses(-1.0, [1.0], [10.0]), "factor_masses: need t >= 0"),
    (lambda: th.factor_rhs([1.0, 2.0, 3.0], [1.0]), "factor_rhs: m has shape"),
    (lambda: th.band_concentration([0.0, 0.0], [True, False]), "total mass must be > 0"),
    (lambda: th.mode_mass(1.0, [1.0, 1.0], [1.0, 2.0], r=-1), "0-based mode index"),
    (lambda: th.mode_mass(1.0, [1.0, 1.0], [1.0, 2.0], r=2), "0-based mode index"),
    (lambda: th.mode_mass(1.0, [0.0, 0.0], [1.0, 2.0]), "no activation energy"),
    (lambda: th.polar_factor(np.eye(3), rtol=NAN), "polar_factor: rtol must be finite"),
    (lambda: th.polar_factor([[1.0, NAN], [0.0, 1.0]]), "polar_factor: G has non-finite"),
    (lambda: th.nuclear_norm([1.0, 2.0]), "nuclear_norm: expected a non-empty matrix"),
    (lambda: th.quintic_map([0.5], (3.4445, -4.7750)), "coefficients must be"),
    (lambda: th.quintic_map([0.5], (3.4445, -4.7750, 2.0315), steps=-1), "steps must be an integer"),
])
def test_bad_input_raises_a_named_error(call, match):
    """Old: NaN/inf/negative times came back as nan or inf, a short beta broadcast, r=-1 indexed from the end."""
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- Cor. 12: amplitude vs energy share


def test_band_share_of_squared_masses_also_increases():
    # the toy's probe H_S uses energies (squared amplitudes); Cor. 12 is stated for m_r = u_r v_r
    beta = np.array([1.0, 2.0, 0.5, 0.0, 0.0, 0.0])
    m0 = np.array([0.1, 0.3, 0.05, 0.5, 1.0, 0.2])
    S = beta > 0
    ts = np.linspace(0.0, 20.0, 401)
    H2 = [th.band_concentration(th.factor_masses(t, m0, beta) ** 2, S) for t in ts]
    assert np.all(np.diff(H2) > 0)
    # a nonzero off-band target breaks it (the check can fail)
    beta_bad = np.where(S, beta, 3.0)
    H2_bad = [th.band_concentration(th.factor_masses(t, m0, beta_bad) ** 2, S) for t in ts]
    assert not np.all(np.diff(H2_bad) > 0)


# ---------------------------------------------------------------- Prop. 5: slope at tiny targets


@pytest.mark.parametrize("eps", [1e-320, 1e-200, 1e-3, 0.9])
@pytest.mark.parametrize("kf,ks", [(3.0, 1.0), (1.0, 3.0)])
def test_time_to_target_slope_matches_mpmath(eps, kf, ks):
    """Old: ``e^{-2 kappa T}`` of both bands underflowed to 0 at tiny ``eps`` and the slope was 0/0."""
    k, m = 2, 5
    T = th.time_to_target(eps, kf, ks, k, m)
    Tm = mp.mpf(T)
    es, ef = mp.exp(-2 * ks * Tm), mp.exp(-2 * kf * Tm)
    ref = -(m - k) * Tm * es / (k * kf * ef + (m - k) * ks * es)  # the proof's implicit derivative
    got = th.time_to_target_slope(eps, kf, ks, k, m)
    assert got < 0 or ref > -1e-300  # negative, unless the true value underflows float64
    assert abs(mp.mpf(got) - ref) <= 1e-13 * abs(ref) + mp.mpf("1e-300"), (got, ref)


def test_mass_and_concentration_when_kappa_t_overflows():
    # control for the small/large-time branches: kappa t = inf means a fully learned mode
    assert th.mode_mass(1e10, [1.0, 1.0], [1e300, 1.0]) == 0.5
    assert th.fast_band_concentration(1e10, 1e300, 1.0, 1, 2) == 0.5
    assert th.fast_band_concentration(1.0, 1e300, 1e-320, 1, 2) == 1.0  # A_s ~ 1e-640 underflows
