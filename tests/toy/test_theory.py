"""Toy-model theory (paper App. F.4): closed forms against simulation, ODE integration and exact formulas.

Every check is paired with a deliberately wrong variant (a wrong constant or exponent, a violated
hypothesis) that the same check must reject, so none of them can pass vacuously.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.linalg import polar
from scipy.stats import spearmanr

from examples.nanogpt.muon import NS_COEFFICIENTS, newton_schulz5
from examples.toy import theory as th
from spectral_lens.analysis.synthetic import theorem6_activation
from spectral_lens.spectra import band_alpha, estimate_crossover
from support.threads import one_intra_op_thread  # noqa: F401  (autouse)


def _rel(a, b) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------- Theorem 7

THM7_CASES = [  # (eta, q, p, R, delta)
    (2.0, 0.6, 1.0, 40, 1e-3),
    (25.0, 1.3, 0.5, 200, 0.05),
    (0.3, 0.15, 2.0, 7, 0.5),
    (1.0, 0.0, 1.0, 12, 1e-2),  # q = 0: every mode at the same rate
]
THM7_TOL = 1e-11  # DOP853 at rtol 1e-13 on the residual w = 1 - a/beta: event good to ~4e-13 relative


def _thm7_setup(eta, q, p, R):
    r = np.arange(1.0, R + 1.0)
    return np.sqrt(3.0 * r**-p), eta * r**-q  # beta_r^2 = C r^-p with C = 3


@pytest.mark.parametrize("eta,q,p,R,delta", THM7_CASES)
def test_thm7_recruitment_time_matches_simulated_dynamics(eta, q, p, R, delta):
    beta, kappa = _thm7_setup(eta, q, p, R)
    sim = th.simulated_recruitment_time(beta, kappa, R, delta)
    closed = th.recruitment_time(R, delta, eta, q)
    assert _rel(closed, sim) < THM7_TOL, (closed, sim)
    # second form of Eq. 7: q = (alpha_tail - p) / 2 with alpha_tail = p + 2q
    alpha_tail = p + 2 * q
    assert _rel(math.log(1 / delta) / eta * R ** ((alpha_tail - p) / 2), sim) < THM7_TOL
    # the exact mode dynamics agree at the closed-form time: mode R sits at residual delta
    a = th.mode_amplitudes(closed, beta, kappa)
    assert abs((1 - a[-1] / beta[-1]) - delta) < 1e-12
    assert np.all(1 - a / beta <= delta * (1 + 1e-12))


@settings(max_examples=20, deadline=None)
@given(eta=st.floats(0.05, 50.0), q=st.floats(0.0, 1.0), p=st.floats(0.0, 3.0), R=st.integers(1, 40),
       delta=st.floats(1e-6, 0.9))
def test_thm7_property(eta, q, p, R, delta):
    # q <= 1 and R <= 40 keep the explicit integrator's stiffness (kappa_1 / kappa_R <= 40) cheap.
    # The reference integrates the residual itself (relative tolerance), so no widening at small delta
    # (the old absolute-error reference needed 1e-12 / (delta log(1/delta)): 1.4e-8 at delta = 1e-6).
    beta, kappa = _thm7_setup(eta, q, p, R)
    sim = th.simulated_recruitment_time(beta, kappa, R, delta)
    assert _rel(th.recruitment_time(R, delta, eta, q), sim) < THM7_TOL


@pytest.mark.parametrize("wrong", ["exponent+0.05", "log(1/(2 delta))", "-log(1-delta)", "R-1"])
def test_thm7_wrong_constants_are_rejected(wrong):
    eta, q, p, R, delta = THM7_CASES[0]
    beta, kappa = _thm7_setup(eta, q, p, R)
    sim = th.simulated_recruitment_time(beta, kappa, R, delta)
    bad = {
        "exponent+0.05": math.log(1 / delta) * R ** (q + 0.05) / eta,
        "log(1/(2 delta))": math.log(1 / (2 * delta)) * R**q / eta,
        "-log(1-delta)": -math.log1p(-delta) * R**q / eta,
        "R-1": math.log(1 / delta) * (R - 1) ** q / eta,
    }[wrong]
    assert _rel(bad, sim) > 1e-5  # 1e6x the tolerance


def test_thm7_needs_rates_monotone_in_rank():
    # the slowest mode of the band is no longer mode R: the closed form is too early
    eta, q, p, R, delta = THM7_CASES[0]
    beta, kappa = _thm7_setup(eta, q, p, R)
    kappa = kappa.copy()
    kappa[R // 2] = 0.5 * kappa[-1]
    sim = th.simulated_recruitment_time(beta, kappa, R, delta)
    assert sim > 1.9 * th.recruitment_time(R, delta, eta, q)


def test_thm7_bad_input_is_named():
    with pytest.raises(ValueError, match="delta"):
        th.recruitment_time(10, 1.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="same length"):
        th.simulated_recruitment_time(np.ones(3), np.ones(4), 2, 0.1)


# ------------------------------------------------------------------------------------ Proposition 4

def _prop4_regimes(m, seed):
    rng = np.random.default_rng(seed)
    kappa_b = np.sort(rng.uniform(0.2, 3.0, m))[::-1]
    assert np.all(np.diff(kappa_b) < 0)
    return np.ones(m), np.full(m, 1.1), kappa_b


@pytest.mark.parametrize("m,seed", [(2, 0), (5, 1), (16, 2)])
def test_prop4_matched_loss_different_spectra(m, seed):
    beta, kappa_a, kappa_b = _prop4_regimes(m, seed)
    levels = np.linspace(0.02, 0.98, 25) * m / 2
    gaps = []
    for level in levels:
        t_a = th.matched_loss_time(level, beta, kappa_a)
        t_b = th.matched_loss_time(level, beta, kappa_b)
        # regime A has the closed form t = log(m / (2 level)) / (2 kappa)
        assert _rel(t_a, math.log(m / (2 * level)) / (2 * kappa_a[0])) < 1e-12
        assert abs(th.mode_loss(t_a, beta, kappa_a) - level) <= 1e-12 * level
        assert abs(th.mode_loss(t_b, beta, kappa_b) - level) <= 1e-12 * level
        assert abs(th.mode_mass(t_a, beta, kappa_a) - 1 / m) < 1e-14
        p_a = th.activation_energies(t_a, beta, kappa_a)
        p_b = th.activation_energies(t_b, beta, kappa_b)
        tv = 0.5 * np.abs(p_a / p_a.sum() - p_b / p_b.sum()).sum()  # a spectral distance
        gap = th.mode_mass(t_b, beta, kappa_b) - 1 / m
        assert tv >= gap - 1e-15
        gaps.append(gap)
    gaps = np.array(gaps)
    assert gaps.min() > 1e-4, gaps  # bounded away from zero on the whole grid of loss levels
    # early (level -> m/2): a_r ~ kappa_r t, so P_B -> kappa_1^2 / sum kappa_r^2
    t_early = th.matched_loss_time(m / 2 * (1 - 1e-9), beta, kappa_b)
    assert abs(th.mode_mass(t_early, beta, kappa_b) - kappa_b[0] ** 2 / np.sum(kappa_b**2)) < 1e-6


def test_prop4_check_rejects_equal_rates_and_unmatched_times():
    m = 5
    beta, kappa_a, kappa_b = _prop4_regimes(m, 1)
    # regime B with isotropic rates: no spectral gap at matched loss, so the gap check above fails
    t = th.matched_loss_time(1.0, beta, kappa_a * 0.7)
    assert abs(th.mode_mass(t, beta, kappa_a * 0.7) - 1 / m) < 1e-14
    # comparing at equal time instead of equal loss breaks the loss match by far more than 1e-12
    t_a = th.matched_loss_time(1.0, beta, kappa_a)
    assert abs(th.mode_loss(t_a, beta, kappa_b) - 1.0) > 1e-3


def test_prop4_bad_level_is_named():
    with pytest.raises(ValueError, match="level must lie in"):
        th.matched_loss_time(3.0, np.ones(4), np.ones(4))


# ------------------------------------------------------------------------------------ Proposition 5

P5 = dict(kappa_fast=2.0, k=3, m=10)


def test_prop5_concentration_and_time_to_target_both_fall_with_slow_rate():
    t0, eps = 0.2, 0.3
    ks = np.linspace(0.05, 1.95, 40)
    C = np.array([th.fast_band_concentration(t0, P5["kappa_fast"], s, P5["k"], P5["m"]) for s in ks])
    T = np.array([th.time_to_target(eps, P5["kappa_fast"], s, P5["k"], P5["m"]) for s in ks])
    assert np.all(np.diff(C) < 0) and np.all(np.diff(T) < 0)
    # C is the fast band's share of the activation energies at t0; T_eps is where the loss hits eps
    kappa = np.r_[np.full(P5["k"], P5["kappa_fast"]), np.full(P5["m"] - P5["k"], ks[5])]
    share = th.activation_energies(t0, np.ones(P5["m"]), kappa)
    assert _rel(C[5], share[: P5["k"]].sum() / share.sum()) < 1e-14
    assert _rel(th.mode_loss(T[5], np.ones(P5["m"]), kappa), eps) < 1e-12
    assert spearmanr(C, T).statistic == pytest.approx(1.0)
    for s in ks[::7]:  # implicit-differentiation slope against a central difference
        h = 1e-5
        fd = (th.time_to_target(eps, P5["kappa_fast"], s + h, P5["k"], P5["m"])
              - th.time_to_target(eps, P5["kappa_fast"], s - h, P5["k"], P5["m"])) / (2 * h)
        slope = th.time_to_target_slope(eps, P5["kappa_fast"], s, P5["k"], P5["m"])
        assert slope < 0 and _rel(slope, fd) < 1e-6, (slope, fd)
        # a wrong constant (dropping the factor m - k in the denominator) misses the difference
        T_ = th.time_to_target(eps, P5["kappa_fast"], s, P5["k"], P5["m"])
        es, ef = math.exp(-2 * s * T_), math.exp(-2 * P5["kappa_fast"] * T_)
        wrong = -(P5["m"] - P5["k"]) * T_ * es / (P5["k"] * P5["kappa_fast"] * ef + s * es)
        assert _rel(wrong, fd) > 1e-2


def test_prop5_and_prop9_bad_input_is_named():
    with pytest.raises(ValueError, match="0 < k < m"):
        th.fast_band_concentration(0.1, 2.0, 1.0, 5, 5)
    with pytest.raises(ValueError, match="t0 > 0"):
        th.fast_band_concentration(0.0, 2.0, 1.0, 2, 5)
    with pytest.raises(ValueError, match="q > 0"):
        th.local_alpha([1.0, 2.0], 1.0, p=1.0, eta=1.0, q=0.0)
    with pytest.raises(ValueError, match="lo must lie in"):
        th.quintic_band(0.0, NS_COEFFICIENTS)


def test_prop5_prediction_is_family_local():
    # varying the fast rate instead (not the proposition's family) reverses the ordering
    t0, eps = 0.2, 0.3
    kf = np.linspace(1.0, 4.0, 20)
    C = [th.fast_band_concentration(t0, f, 0.5, P5["k"], P5["m"]) for f in kf]
    T = [th.time_to_target(eps, f, 0.5, P5["k"], P5["m"]) for f in kf]
    assert spearmanr(C, T).statistic == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------ Corollary 8

def test_cor8_head_matched_time_matches_dynamics_and_orders_by_tail():
    p, r_h, R, xi, t0, delta = 1.0, 4, 60, 0.6, 0.15, 1e-2
    qs = [0.2, 0.45, 0.7, 1.1]  # one q_B per "batch"; alpha_tail = p + 2 q_B
    times = []
    for q in qs:
        eta = th.head_matched_rate(xi, t0, r_h, q)
        r = np.arange(1.0, R + 1.0)
        beta, kappa = r ** (-p / 2), eta * r**-q
        a = th.mode_amplitudes(t0, beta, kappa)
        assert abs(a[r_h - 1] - xi * beta[r_h - 1]) < 1e-14  # the head match holds for every batch
        sim = th.simulated_recruitment_time(beta, kappa, R, delta)
        closed = th.head_matched_recruitment_time(R, r_h, delta, xi, t0, q)
        assert _rel(closed, sim) < THM7_TOL
        # the wrong log (log(1/xi) for -log(1-xi)) misses by far more than the tolerance
        assert _rel(math.log(1 / delta) / math.log(1 / xi) * t0 * (R / r_h) ** q, sim) > 1e-2
        times.append(sim)
    assert np.all(np.diff(times) > 0)  # smallest tail exponent = fastest to the band
    # with R < r_h the band lies inside the matched head and the ordering reverses
    rev = [th.head_matched_recruitment_time(2, r_h, delta, xi, t0, q) for q in qs]
    assert np.all(np.diff(rev) < 0)


# ------------------------------------------------------------------------------------ Proposition 9

P9 = dict(p=1.0, eta=25.0, q=0.6)


def _spectrum(r_star: float, dim: int) -> np.ndarray:
    t = r_star ** P9["q"] / P9["eta"]  # r* = (eta t)^(1/q)
    lam = theorem6_activation(t, dim=dim, **P9)
    return lam / lam.sum()


def test_prop9_window_alpha_bounded_by_local_slopes_and_monotone():
    true_tail = P9["p"] + 2 * P9["q"]
    r_star = 20.0
    t = r_star ** P9["q"] / P9["eta"]
    starts = np.unique(np.round(np.geomspace(1, 1000 * r_star, 30)).astype(int))  # R1 / r* in [0.05, 1000]
    p = _spectrum(r_star, 2 * int(starts[-1]) + 1)
    alphas = []
    for R1 in starts:
        fit = band_alpha(p, (int(R1), 2 * int(R1))).alpha
        lo, hi = th.local_alpha(np.array([R1, 2 * R1]), t, **P9)
        assert lo - 1e-9 <= fit <= hi + 1e-9, (R1, lo, fit, hi)  # a weighted average of local slopes
        assert fit < true_tail
        alphas.append(fit)
    assert np.all(np.diff(alphas) > 0) and alphas[-1] > alphas[0] + 1.0  # monotone in R1 / r*
    # deep in the tail (R1 / r* = 1000) the window recovers p + 2q; a wrong exponent p + q does not
    assert abs(alphas[-1] - true_tail) < 0.02
    assert abs(alphas[-1] - (P9["p"] + P9["q"])) > 0.5


def test_prop9_fixed_window_flattens_as_crossover_moves_out():
    window = (100, 200)
    r_stars = np.geomspace(0.5, 2e4, 25)
    alphas = [band_alpha(_spectrum(rs, 800), window).alpha for rs in r_stars]
    assert np.all(np.diff(alphas) < 0)  # strictly shallower as r* grows into the window
    assert alphas[0] > P9["p"] + 2 * P9["q"] - 0.05 and alphas[-1] < P9["p"] + 0.1
    # the library's crossover estimate recovers r* = (eta t)^(1/q) and both asymptotic exponents
    fit = estimate_crossover(_spectrum(30.0, 3000))
    assert _rel(fit.rank, 30.0) < 1e-6
    assert abs(fit.head_alpha - P9["p"]) < 1e-6 and abs(fit.tail_alpha - (P9["p"] + 2 * P9["q"])) < 1e-6


def test_local_alpha_limits():
    r = np.array([1e-6, 1e6])
    head, tail = th.local_alpha(r, 1.0, p=1.0, eta=1.0, q=0.5)
    assert abs(head - 1.0) < 1e-6 and abs(tail - 2.0) < 1e-3


# ----------------------------------------------------------------------------------- Proposition 10

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prop10_crossover_times_and_full_reversal(seed):
    rng = np.random.default_rng(seed)
    m = 6
    kappa = np.sort(rng.uniform(0.1, 5.0, m))[::-1]
    beta = np.ones(m)
    t_star = 0.0
    for i in range(m):
        for j in range(i + 1, m):
            tij = th.gradient_crossover_time(kappa[i], kappa[j])
            t_star = max(t_star, tij)
            G = th.gradient_energies(tij, beta, kappa)
            assert _rel(G[i], G[j]) < 1e-12
            before = th.gradient_energies(tij * (1 - 1e-3), beta, kappa)
            after = th.gradient_energies(tij * (1 + 1e-3), beta, kappa)
            assert before[i] > before[j] and after[i] < after[j]
            # a wrong constant (a factor 2 in the denominator) is not where the energies meet
            bad = math.log(kappa[i] / kappa[j]) / (2 * (kappa[i] - kappa[j]))
            Gb = th.gradient_energies(bad, beta, kappa)
            assert _rel(Gb[i], Gb[j]) > 1e-3
    for t in np.geomspace(1e-3, 10 * t_star, 50):  # A_1 > ... > A_m always (ties only where float64 rounds to 1)
        A = th.activation_energies(t, beta, kappa)
        assert np.all(np.diff(A) <= 0)
        resolved = A[:-1] < 1 - 1e-9
        assert np.all(np.diff(A)[resolved] < 0)
    assert np.all(np.diff(th.gradient_energies(t_star * (1 + 1e-6), beta, kappa)) > 0)  # G_m > ... > G_1
    assert not np.all(np.diff(th.gradient_energies(t_star * (1 - 1e-3), beta, kappa)) > 0)


# ------------------------------------------------------------------------------------ Corollary 12

def _cor12_problem(seed, m=12):
    rng = np.random.default_rng(seed)
    mask = np.zeros(m, dtype=bool)
    mask[rng.choice(m, size=rng.integers(1, m), replace=False)] = True
    beta = np.where(mask, rng.uniform(0.3, 2.5, m), 0.0)
    m0 = np.where(mask, beta * rng.uniform(0.01, 0.95, m), rng.uniform(0.01, 2.0, m))
    return m0, beta, mask


def _h_along(rhs, m0, mask, t_end, n=2001):
    ts = np.linspace(0.0, t_end, n)
    sol = solve_ivp(lambda _t, y: rhs(y), (0.0, t_end), m0, t_eval=ts, method="DOP853", rtol=1e-11, atol=1e-14)
    assert sol.success
    return ts, sol.y, np.array([th.band_concentration(y, mask) for y in sol.y.T])


@pytest.mark.parametrize("seed", range(5))
def test_cor12_band_concentration_increases(seed):
    m0, beta, mask = _cor12_problem(seed)
    ts, ys, H = _h_along(lambda y: th.factor_rhs(y, beta), m0, mask, 20.0)
    closed = np.stack([th.factor_masses(t, m0, beta) for t in ts], axis=1)
    assert np.max(np.abs(ys - closed) / closed) < 1e-8  # Theorem 11(c) vs solve_ivp
    assert np.all(np.diff(H) > 0)
    rates = np.array([th.band_concentration_rate(y, beta, mask) for y in closed.T])
    assert np.all(rates > 0)
    fd = np.gradient(H, ts)  # the analytic rate is the derivative of H along the flow
    assert np.max(np.abs(fd[1:-1] - rates[1:-1])) < 1e-3 * np.max(rates)
    assert np.all(closed[mask] <= beta[mask][:, None]) and np.all(closed > 0)  # 0 < m_r <= beta_r kept


def test_cor12_wrong_dynamics_break_monotonicity():
    m0, beta, mask = _cor12_problem(0)
    # sign flip: in-band mass shrinks, off-band grows (blows up at t = 1/(2 m0), so stop early)
    _, _, H = _h_along(lambda y: -th.factor_rhs(y, beta), m0, mask, 0.2)
    assert np.all(np.diff(H) < 0)
    # an off-band target: the off-band modes are recruited too and H_S falls
    mask2 = np.array([True, True, False, False])
    beta2, m02 = np.array([1.0, 1.0, 3.0, 3.0]), np.array([0.99, 0.99, 0.01, 0.01])
    _, _, H2 = _h_along(lambda y: th.factor_rhs(y, beta2), m02, mask2, 5.0)
    assert H2[-1] < H2[0] - 0.3 and np.min(np.diff(H2)) < 0


def test_factor_masses_closed_form_cases():
    m0, beta = np.array([0.2, 3.0, 0.5]), np.array([1.0, 1.0, 0.0])
    out = th.factor_masses(0.7, m0, beta)
    assert out[0] == pytest.approx(1 / (1 + (1 / 0.2 - 1) * math.exp(-1.4)), rel=1e-15)
    assert out[1] == pytest.approx(1 / (1 + (1 / 3.0 - 1) * math.exp(-1.4)), rel=1e-15)  # from above
    assert out[2] == pytest.approx(0.5 / (1 + 0.7), rel=1e-15)
    with pytest.raises(ValueError, match="m0 must be > 0"):
        th.factor_masses(1.0, [0.0, 1.0], [1.0, 1.0])


# -------------------------------------------------------------------------------------- Theorem 17

def _matrix(shape, cond, seed, rank=None):
    rng = np.random.default_rng(seed)
    m, n = shape
    k = min(m, n) if rank is None else rank
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (U * np.geomspace(3.0, 3.0 / cond, k)) @ V.T


@pytest.mark.parametrize("shape,cond", [((40, 40), 1e3), ((60, 25), 10.0), ((25, 60), 1e6)])
def test_thm17_polar_factor_properties(shape, cond):
    G = _matrix(shape, cond, 0)
    Q = th.polar_factor(G)
    u, _ = polar(G) if shape[0] >= shape[1] else polar(G.T)  # scipy's independent polar decomposition
    assert np.abs(Q - (u if shape[0] >= shape[1] else u.T)).max() < 1e-10
    k = min(shape)
    assert np.abs(np.linalg.svd(Q, compute_uv=False) - 1).max() < 1e-12
    for c in (1e-6, 0.37, 5.0, 1e5):  # (1) scale invariance, to the conditioning of the SVD
        assert np.abs(th.polar_factor(c * G) - Q).max() < 50 * np.finfo(float).eps * cond
    nuc = th.nuclear_norm(G)
    assert _rel(nuc, np.linalg.norm(G, "nuc")) < 1e-13
    assert _rel(float(np.sum(G * Q)), nuc) < 1e-13  # (2) <G, Q(G)> = ||G||_*
    assert np.linalg.norm(Q, "fro") ** 2 == pytest.approx(k, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), log_cond=st.floats(0.0, 6.0), log_scale=st.floats(-8.0, 8.0),
       seed=st.integers(0, 2**31 - 1))
def test_thm17_property(m, n, log_cond, log_scale, seed):
    G = 10.0**log_scale * _matrix((m, n), 10.0**log_cond, seed)
    Q, nuc = th.polar_factor(G), th.nuclear_norm(G)
    assert np.abs(np.linalg.svd(Q, compute_uv=False) - 1).max() < 1e-12
    assert _rel(float(np.sum(G * Q)), nuc) < 1e-12
    assert np.abs(th.polar_factor(3.7 * G) - Q).max() < 50 * np.finfo(float).eps * 10.0**log_cond
    D = np.random.default_rng(seed).standard_normal((m, n))
    assert np.sum(G * D) / np.linalg.norm(D, 2) <= nuc * (1 + 1e-12)


@pytest.mark.parametrize("shape", [(30, 30), (50, 20)])
def test_thm17_polar_factor_maximizes_over_operator_ball(shape):
    rng = np.random.default_rng(1)
    G = _matrix(shape, 100.0, 1)
    Q, nuc = th.polar_factor(G), th.nuclear_norm(G)
    for _ in range(300):  # random feasible directions: Gaussian, partial isometries, perturbed optima
        D = rng.standard_normal(shape)
        for cand in (D, th.polar_factor(D), Q + 0.05 * D):
            cand = cand / np.linalg.norm(cand, 2)
            assert np.sum(G * cand) <= nuc * (1 + 1e-12)
            if not np.allclose(cand, Q):
                assert np.sum(G * cand) < nuc * (1 - 1e-6)
    # the normalized gradient is feasible but reaches only sum sigma^2 / sigma_1 < ||G||_*
    s = np.linalg.svd(G, compute_uv=False)
    inner = np.sum(G * (G / np.linalg.norm(G, 2)))
    assert _rel(inner, np.sum(s**2) / s[0]) < 1e-12 and inner < 0.7 * nuc
    # scaling Q up beats the bound only by leaving the ball
    assert np.linalg.norm(1.01 * Q, 2) > 1.0


def test_thm17_rank_deficient_and_descent_bound():
    G = _matrix((20, 15), 10.0, 2, rank=6)
    Q = th.polar_factor(G)
    assert np.linalg.matrix_rank(Q) == 6
    assert np.linalg.norm(Q, "fro") ** 2 == pytest.approx(6, rel=1e-12)
    assert _rel(float(np.sum(G * Q)), th.nuclear_norm(G)) < 1e-13
    # (3) on f(W) = L/2 ||W - W*||^2 (exactly L-smooth) the bound holds with equality
    L, rng = 3.0, np.random.default_rng(3)
    W, W_star = rng.standard_normal((20, 15)), rng.standard_normal((20, 15))
    grad = L * (W - W_star)
    Qg, r = th.polar_factor(grad), min(grad.shape)
    for eta in (1e-3, 0.1, 2.0):
        f_new = 0.5 * L * np.sum((W - eta * Qg - W_star) ** 2)
        bound = 0.5 * L * np.sum((W - W_star) ** 2) - eta * th.nuclear_norm(grad) + 0.5 * L * eta**2 * r
        assert abs(f_new - bound) < 1e-9 * abs(bound)
        wrong = bound - 0.5 * L * eta**2  # r - 1 instead of r
        assert f_new > wrong + 1e-6 * eta**2


def test_polar_factor_errors():
    with pytest.raises(ValueError, match="zero"):
        th.polar_factor(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="matrix"):
        th.polar_factor(np.ones(3))


# ---------------------------------------------------- Newton-Schulz (the zoo's Muon) vs the exact polar

def _ns(G, dtype):
    return newton_schulz5(torch.tensor(G, dtype=torch.float32 if dtype != torch.float64 else dtype),
                          dtype=dtype).double().numpy()


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
@pytest.mark.parametrize("cond", [10.0, 1e6])
def test_newton_schulz_is_the_quintic_map_not_the_polar_factor(shape, cond):
    G = _matrix(shape, cond, 4)
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    pred = th.quintic_map(s / (np.linalg.norm(G) + 1e-7), NS_COEFFICIENTS)  # NS5 normalizes by ||G||_F + 1e-7
    X64 = _ns(G, torch.float64)
    assert np.linalg.norm(X64 - (U * pred) @ Vt, 2) < 1e-12  # exact characterization in float64
    Q = th.polar_factor(G)
    gap = float(np.max(np.abs(pred - 1)))
    X32 = _ns(G, torch.float32)
    assert abs(np.linalg.norm(X32 - Q, 2) - gap) < 1e-4  # float32 lands where the map says
    if cond == 10.0:
        lo, hi = th.quintic_band(s.min() / np.linalg.norm(G), NS_COEFFICIENTS)
        sv32 = np.linalg.svd(X32, compute_uv=False)
        assert lo - 1e-5 <= sv32.min() and sv32.max() <= hi + 1e-5
        assert 0.30 < gap < 0.33  # deliberately unconverged: ||NS5(G) - U V^T||_op ~ 0.32
        # bfloat16 (the records' GPU precision; CPU matmul here): measured band [0.67, 1.15]
        svbf = np.linalg.svd(_ns(G, torch.bfloat16), compute_uv=False)
        assert 0.66 < svbf.min() and svbf.max() < 1.16, (svbf.min(), svbf.max())
        assert np.linalg.norm(_ns(G, torch.bfloat16) - Q, 2) < 0.34
    else:
        # singular values below ~1e-3 ||G||_F are barely lifted (phi^5(s) ~ 487 s): far from U V^T
        assert np.linalg.norm(X32 - Q, 2) > 0.99
        assert np.linalg.norm(_ns(G, torch.bfloat16) - Q, 2) > 0.9  # bf16 rounding noise fills them


def test_quintic_band_matches_published_range():
    lo, hi = th.quintic_band(0.01, NS_COEFFICIENTS)
    assert abs(lo - 0.6818) < 1e-4 and abs(hi - 1.1344) < 1e-4
    # a wrong coefficient changes the band visibly (the check can fail)
    a, b, c = NS_COEFFICIENTS
    lo2, hi2 = th.quintic_band(0.01, (a, b, c + 0.1))
    assert abs(lo2 - 0.6818) > 1e-2 or abs(hi2 - 1.1344) > 1e-2
    # more steps do not converge to 1: phi(1) = 0.701, and the band is the same after 6, 10, 20 steps
    assert abs(th.quintic_map([1.0], NS_COEFFICIENTS, steps=1)[0] - 0.701) < 1e-12
    for k in (6, 10, 20):
        lo_k, hi_k = th.quintic_band(0.01, NS_COEFFICIENTS, steps=k)
        assert abs(lo_k - lo) < 1e-6 and abs(hi_k - hi) < 1e-6
    # the classic cubic (1.5, -0.5, 0) converges toward 1 from below; it never overshoots
    assert th.quintic_band(0.5, (1.5, -0.5, 0.0))[1] <= 1.0
