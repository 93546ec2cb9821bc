"""Review 30 (analysis30): the analyses against protocol.md sections 2, 3, 5, 6 and 7, with float64
references written from the protocol's text, on the corners earlier reviews left: the taxonomy's
Jensen-Shannon divergence on bad and extreme input, the sign of a flat window's alpha, the early
statistic's interpolation and jitter, ``p_best`` against its closed form, and the synthetic sweep's
formulas (protocol sec. 10) against the crossover estimator.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from spectral_lens import BandAlphaFitter, Spectrum
from spectral_lens.analysis import js_divergence
from spectral_lens.analysis.ranking import rank_tiers
from spectral_lens.analysis.spearman import spearman
from spectral_lens.spectra import band_alpha


def ref_jsd(p, q):
    """JS divergence (natural log) of two nonnegative vectors, each scaled by its own largest entry first
    (exact in float64 for any finite input), zero-padded to one length."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    n = max(p.size, q.size)
    p, q = np.pad(p / p.max(), (0, n - p.size)), np.pad(q / q.max(), (0, n - q.size))
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    kl = lambda a: float(np.sum(a[a > 0] * np.log(a[a > 0] / m[a > 0])))  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


# ----------------------------------------------------------------------------- js_divergence: bad input


def test_js_divergence_of_spectra_whose_sum_overflows_is_not_zero():
    """[1e308, 1e308] against [1e308, 1e300]: the sum overflowed to inf, every share became 0 and the
    divergence read 0.0 (no displacement); the same shapes at scale 1 give 0.2158."""
    got = js_divergence([1e308, 1e308], [1e308, 1e300])
    assert got == pytest.approx(js_divergence([1.0, 1.0], [1.0, 1e-8]), rel=1e-6)
    assert got == pytest.approx(ref_jsd([1.0, 1.0], [1.0, 1e-8]), rel=1e-9)


@pytest.mark.parametrize("bad", [[np.inf, 1.0], [1.0, np.nan], [np.nan, np.nan]])
def test_js_divergence_refuses_nan_and_inf(bad):
    """An Inf eigenvalue gave 0.0 (a RuntimeWarning, then 'identical spectra'); a NaN was called 'all zero'."""
    with pytest.raises(ValueError, match=r"first spectrum.*NaN/Inf"):
        js_divergence(bad, [1.0, 0.5])
    with pytest.raises(ValueError, match=r"second spectrum.*NaN/Inf"):
        js_divergence([1.0, 0.5], bad)


def test_js_divergence_refuses_a_negative_eigenvalue_beyond_round_off():
    """-0.9 was clipped to 0 without a word (divergence 0.130); round-off negatives still count as 0."""
    with pytest.raises(ValueError, match=r"negative eigenvalue -0\.9"):
        js_divergence([1.0, -0.9, 0.5], [1.0, 0.5, 0.2])
    assert js_divergence([1.0, -1e-13], [1.0, 0.0]) == 0.0


def test_js_divergence_refuses_a_matrix_with_a_named_shape():
    """A 2-D array failed deep in NumPy ('operands could not be broadcast together')."""
    with pytest.raises(ValueError, match=r"1-D.*\(3, 3\)"):
        js_divergence(np.ones((3, 3)), [1.0, 0.5, 0.2])


def test_js_divergence_empty_is_refused_like_all_zero():
    with pytest.raises(ValueError, match="all zero"):
        js_divergence([], [1.0, 0.5])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=40),
    st.lists(st.floats(0, 1), min_size=1, max_size=40),
    st.integers(-320, 307),
    st.integers(-320, 307),
)
def test_js_divergence_matches_the_reference_at_any_scale(p, q, ep, eq):
    """Shares are scale-free: the divergence of ``c_p p`` and ``c_q q`` is that of ``p`` and ``q`` for any
    finite scales, down to subnormals and up to 1e307 (checked against the float64 reference)."""
    p, q = np.asarray(p), np.asarray(q)
    if p.max() == 0 or q.max() == 0:
        return
    sp, sq = p * 10.0**ep, q * 10.0**eq
    if not (np.isfinite(sp).all() and np.isfinite(sq).all()) or sp.max() == 0 or sq.max() == 0:
        return
    if sp.max() < 1e-300 or sq.max() < 1e-300:  # subnormal scaling rounds the shares themselves
        return
    assert js_divergence(sp, sq) == pytest.approx(ref_jsd(p, q), rel=1e-7, abs=1e-12)


def test_js_divergence_of_spectra_and_tensors_is_unchanged():
    p = Spectrum(np.array([3.0, 1.0, 0.5]), n_rows=10, dim=3)
    q = Spectrum(np.array([2.0, 2.0, 0.1]), n_rows=10, dim=3)
    assert js_divergence(p, q) == pytest.approx(ref_jsd([3, 1, 0.5], [2, 2, 0.1]), rel=1e-12)
    assert js_divergence(torch.tensor([3.0, 1.0, 0.5]), q) == pytest.approx(ref_jsd([3, 1, 0.5], [2, 2, 0.1]),
                                                                           rel=1e-6)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))  # rank by rank, as given


# ----------------------------------------------------------------------------- effective ranks of NumPy views


@pytest.mark.parametrize("name", ["RankMe", "participation_ratio", "stable_rank"])
def test_effective_ranks_take_numpys_descending_view(name):
    """``np.sort(x)[::-1]`` (negative strides, the usual way to sort eigenvalues largest first in NumPy)
    was refused with 'needs a Spectrum or a 1-D tensor of eigenvalues, got ndarray'."""
    import spectral_lens as sl

    fn = sl.RankMe() if name == "RankMe" else getattr(sl, name)
    lam = np.sort(np.random.default_rng(0).random(12) ** 4)[::-1]
    p = lam / lam.sum()
    ref = {"RankMe": math.exp(-float(np.sum(p * np.log(p)))), "participation_ratio": lam.sum() ** 2 / np.sum(lam**2),
           "stable_rank": lam.sum() / lam.max()}[name]
    assert fn(lam) == pytest.approx(ref, rel=1e-12)
    frozen = np.array(lam)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned on a read-only array
        assert fn(frozen) == pytest.approx(ref, rel=1e-12)


def test_js_divergence_takes_numpys_descending_view():
    p, q = np.sort(np.arange(1.0, 6.0))[::-1], np.array([5.0, 3.0, 3.0, 1.0, 0.5])
    assert js_divergence(p, q) == pytest.approx(ref_jsd(p, q), rel=1e-12)


# ----------------------------------------------------------------------------- band alpha of a flat window


@pytest.mark.parametrize("value", [1.0, 1 / 300, 1e-300, 7.5e12])
def test_flat_window_alpha_is_plus_zero(value):
    """A flat spectrum (equal eigenvalues: white noise, a collapsed tail) has alpha 0; it came back as -0.0,
    printed '-0.000' in summaries and reports and stored as -0.0 in run.json."""
    fit = band_alpha(np.full(300, value), (100, 200))
    assert fit.alpha == 0.0 and math.copysign(1.0, fit.alpha) == 1.0
    assert f"{fit.alpha:.3f}" == "0.000" and fit.r2 == 1.0
    spec = Spectrum(np.full(300, value), n_rows=1000, dim=300)
    assert f"{BandAlphaFitter((100, 200)).fit(spec).alpha:+.3f}" == "+0.000"


# ----------------------------------------------------------------------------- crossover estimator: bad input


def _theorem6(p=1.0, eta=25.0, t=0.2, q=0.6, d=768):
    r = np.arange(1, d + 1, dtype=np.float64)
    lam = r**-p * (-np.expm1(-eta * t * r**-q)) ** 2
    return lam / lam.sum()


def test_crossover_refuses_ascending_eigenvalues():
    """eigvalsh's ascending order gave a 'crossover' with negative head and tail exponents (band_alpha
    refuses the same input); noisy energies in mode order still fit."""
    from spectral_lens.spectra import estimate_crossover

    with pytest.raises(ValueError, match=r"ranks \[1, 100\]: the spectrum rises from 0.001 at rank 1 to 1 at rank 100"):
        estimate_crossover(np.logspace(-3, 0, 100))
    with pytest.raises(ValueError, match="rises from"):
        estimate_crossover(np.logspace(-3, 0, 100), method="broken_stick")
    noisy = _theorem6() * np.exp(0.05 * np.random.default_rng(0).standard_normal(768))  # mode order: kept
    assert estimate_crossover(noisy, method="broken_stick").located


@pytest.mark.parametrize("n_grid", [0, 1, 2, 8, 2.5, True])
def test_crossover_refuses_a_grid_too_small_to_fit(n_grid):
    """n_grid=1 returned located=True at rank 1.25 from a single point (NaN slopes, RuntimeWarnings);
    n_grid=0 failed inside NumPy ('zero-size array to reduction operation')."""
    from spectral_lens.spectra import estimate_crossover

    with pytest.raises(ValueError, match="n_grid must be an integer >= 9"):
        estimate_crossover(_theorem6(), n_grid=n_grid)


@pytest.mark.parametrize("min_segment", [-1.0, 0.6, 1.5, math.nan])
def test_crossover_refuses_a_min_segment_outside_half_the_range(min_segment):
    """-1 searched breaks outside the ranks, 0.6 a reversed range; both 'located' a crossover."""
    from spectral_lens.spectra import estimate_crossover

    with pytest.raises(ValueError, match=r"min_segment must be in \[0, 0.5\]"):
        estimate_crossover(_theorem6(), min_segment=min_segment)


@pytest.mark.parametrize("p, eta, t, q", [(1.0, 25.0, 0.2, 0.6), (1.2, 100.0, 0.5, 0.8), (0.7, 60.0, 1.0, 0.9)])
def test_crossover_recovers_theorem6_from_the_protocol_formulas(p, eta, t, q):
    """Protocol sec. 10: r* = (eta t)^(1/q), head exponent p, tail exponent p + 2q; also at the edges of
    the arguments' ranges (n_grid 9, min_segment 0 and 0.5 still run)."""
    from spectral_lens.spectra import estimate_crossover

    fit = estimate_crossover(_theorem6(p, eta, t, q))
    assert fit.located
    assert fit.rank == pytest.approx((eta * t) ** (1 / q), rel=1e-6)
    assert fit.head_alpha == pytest.approx(p, abs=1e-6) and fit.tail_alpha == pytest.approx(p + 2 * q, abs=1e-6)
    for kw in (dict(n_grid=9), dict(min_segment=0.0), dict(min_segment=0.5), dict(n_grid=np.int64(64))):
        assert math.isfinite(estimate_crossover(_theorem6(p, eta, t, q), **kw).rank)


# ----------------------------------------------------------------------------- references on adversarial spectra


def ref_alpha(lam, lo, hi):
    """Protocol sec. 2: minus the OLS slope of (log j, log p_j), j = lo..hi (1-based, inclusive), p = lam / trace."""
    lam = np.asarray(lam, dtype=np.float64)
    p = lam / lam.max()
    p = p / p.sum()
    j = np.arange(lo, hi + 1, dtype=np.float64)
    x, y = np.log(j), np.log(p[lo - 1 : hi])
    return -float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))


@settings(max_examples=40, deadline=None)
@given(st.integers(20, 400), st.floats(0.0, 12.0), st.integers(0, 2**31 - 1), st.integers(-300, 300))
def test_band_alpha_of_a_spectrum_over_up_to_12_decades_matches_the_reference(d, decades, seed, scale):
    """Random descending spectra spanning up to 12 decades at any scale (trace normalization changes only the
    intercept), every window inside them, through ``BandAlphaFitter`` on a ``Spectrum``."""
    rng = np.random.default_rng(seed)
    lam = np.sort(10.0 ** rng.uniform(-decades, 0.0, d))[::-1] * 10.0**scale
    lo = int(rng.integers(1, d - 1))
    hi = int(rng.integers(lo + 1, d + 1))
    spec = Spectrum(lam.copy(), n_rows=10 * d, dim=d)
    got = BandAlphaFitter((lo, hi)).fit(spec).alpha
    assert got == pytest.approx(ref_alpha(lam, lo, hi), rel=1e-9, abs=1e-9)


def test_band_alpha_on_spectra_shorter_than_the_window_zeros_and_ties():
    """Shorter than the window, exact zeros inside it: a ValueError that names the window and the count;
    ties are fine; a single tier of equal values is alpha 0."""
    short = Spectrum(np.logspace(0, -3, 150), n_rows=10_000, dim=150)
    with pytest.raises(ValueError, match=r"window \[100, 200\] exceeds the spectrum: only 150 eigenvalues"):
        BandAlphaFitter.tail(12).fit(short)
    lam = np.logspace(0, -3, 300)
    lam[180:] = 0.0
    with pytest.raises(ValueError, match=r"window \[100, 200\] reaches zero eigenvalues: only 180 are nonzero"):
        BandAlphaFitter.tail(12).fit(Spectrum(lam, n_rows=10_000, dim=300))
    ties = np.repeat(np.logspace(0, -3, 150), 2)  # every eigenvalue twice
    assert BandAlphaFitter((100, 200)).fit(Spectrum(ties, n_rows=10_000, dim=300)).alpha == pytest.approx(
        ref_alpha(ties, 100, 200), rel=1e-12)


def ref_spearman_exact(x, y):
    """Average ranks, Pearson of the ranks, two-sided p = 2 min(P(r >= obs), P(r <= obs)) over all n! pairings."""
    import itertools

    rx, ry = stats.rankdata(x), stats.rankdata(y)
    perms = np.array(list(itertools.permutations(range(len(x)))), dtype=np.int8)
    a = rx[perms]
    a = a - a.mean(axis=1, keepdims=True)
    b = ry - ry.mean()
    r = (a @ b) / np.sqrt((a * a).sum(axis=1) * (b @ b))
    a0 = rx - rx.mean()
    obs = float(a0 @ b / math.sqrt((a0 @ a0) * (b @ b)))
    return obs, min(1.0, 2 * min(float(np.mean(r >= obs - 1e-12)), float(np.mean(r <= obs + 1e-12))))


@pytest.mark.parametrize("seed", range(3))
def test_spearman_exact_at_nine_points_with_ties_matches_enumeration(seed):
    """``exact_max=9``: the p-value over all 9! pairings, with ties in x (a sweep's repeated tiers)."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 5, 9).astype(float), rng.normal(size=9)
    rho, p = ref_spearman_exact(x, y)
    got = spearman(x, y, exact_max=9)
    assert got[0] == pytest.approx(rho, abs=1e-12) and got[1] == pytest.approx(p, abs=1e-12)
    assert got[0] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_p_best_of_two_tiers_is_the_normal_cdf():
    """Two tiers with values mu_1 < mu_2 and sigmas s_1, s_2: P(tier 1 best) = Phi((mu_2 - mu_1) / hypot(s_1, s_2))."""
    rk = rank_tiers("f", [(8, "a", 0.0, 0.1), (16, "b", 0.1, 0.1)], n_draws=200_000)
    ref = stats.norm.cdf(0.1 / math.hypot(0.1, 0.1))
    assert rk.p_best[8] == pytest.approx(ref, abs=5 * math.sqrt(ref * (1 - ref) / 200_000))
    assert rk.recommended == 8 and rk.p_best[8] + rk.p_best[16] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- controller and predictor arguments


@pytest.mark.parametrize("kw, match", [
    (dict(keep=math.nan), r"keep must be >= 1, an integer .* got nan"),
    (dict(keep=1.5), r"keep must be >= 1, an integer .* got 1.5"),
    (dict(keep=True), r"keep must be >= 1, an integer .* got True"),
    (dict(n_sigma=math.nan), r"n_sigma must be a number >= 0, got nan"),
    (dict(n_sigma=-1.0), r"n_sigma must be a number >= 0, got -1.0"),
    (dict(margin=math.nan), r"margin must be a number >= 0, got nan"),
    (dict(margin=-0.1), r"margin must be a number >= 0, got -0.1"),
    (dict(min_probability=math.nan), r"min_probability must be in \[0, 1\] .* got nan"),
    (dict(min_probability=1.5), r"min_probability must be in \[0, 1\] .* got 1.5"),
])
def test_sweep_controller_refuses_rules_that_cannot_be_applied(kw, match):
    """NaN fails every comparison: keep=nan stopped the best tier itself (rule 1 never held), a NaN n_sigma,
    margin or min_probability switched rules 2 and 3 off without a word."""
    from spectral_lens.analysis import SweepController

    with pytest.raises(ValueError, match=match):
        SweepController(**kw)


def test_sweep_controller_keeps_the_best_tier_with_valid_rules(tmp_path):
    """Regression guard on a 3-tier Theorem-6 sweep: the best tier (4, by construction) continues."""
    from spectral_lens.analysis import SweepController
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import open_runs

    write_theorem6_sweep(tmp_path, (2, 4, 8), dim=256, grad_dim=64, n_eval=20, n_measure=10)
    runs = open_runs(sorted(tmp_path.iterdir()))
    for kw in (dict(), dict(keep=np.int64(1), n_sigma=np.float32(0.0), margin=0, min_probability=1)):
        dec = SweepController(**kw).decide(runs)["toy"]
        assert dec.ready and dec.decisions[0].tier == 4 and dec.decisions[0].action == "continue"


@pytest.mark.parametrize("kw, match", [
    (dict(noise_neighbors=3.5), r"noise_neighbors must be >= 3, an integer .* got 3.5"),
    (dict(noise_neighbors=math.nan), r"noise_neighbors must be >= 3, an integer .* got nan"),
    (dict(n_draws=0), r"n_draws must be >= 1, an integer .* got 0"),
    (dict(n_draws=2.5), r"n_draws must be >= 1, an integer .* got 2.5"),
])
@pytest.mark.parametrize("cls", ["TailPredictor", "NoiseScalePredictor"])
def test_predictors_refuse_non_integer_neighbors_and_draws_when_built(cls, kw, match):
    """noise_neighbors=3.5 or NaN passed and failed in NumPy's slicing at fit time; n_draws=2.5 in the draws."""
    import spectral_lens.analysis as an

    with pytest.raises(ValueError, match=f"{cls}: {match}"):
        getattr(an, cls)(**kw)
    getattr(an, cls)(noise_neighbors=np.int64(4), n_draws=np.int32(10))  # NumPy integers are integers


# ----------------------------------------------------------------------------- alignment targets


def _curve_run(tmp_path):
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    with RunWriter(tmp_path / "r", RunInfo(run_id="r", total_tokens=1000)) as w:
        for k, loss in enumerate((4.0, 3.5, 3.0, 3.2), start=1):
            w.log_measurement(k, 100 * k, {"act": Spectrum(np.array([2.0, 1.0]), n_rows=10, dim=2)}, val_loss=loss)
    return RunRecord.open(tmp_path / "r")


@pytest.mark.parametrize("by", ["loss", "tokens", "progress"])
@pytest.mark.parametrize("rule", [None, "nearest"])
def test_align_refuses_a_nan_target(tmp_path, by, rule):
    """align(runs, 'loss', nan, rule='nearest') returned each run's first measurement with gap NaN."""
    from spectral_lens.analysis.efficiency import align

    run = _curve_run(tmp_path)
    with pytest.raises(ValueError, match=f"align: target {by} must be a finite number, got nan"):
        align([run], by, math.nan, rule=rule)


def test_align_refuses_a_nan_or_negative_tolerance(tmp_path):
    """A NaN tolerance let every match through (|gap| > nan is False)."""
    from spectral_lens.analysis.efficiency import align, matched_loss

    run = _curve_run(tmp_path)
    for tol in (math.nan, -0.1):
        with pytest.raises(ValueError, match="align: tolerance must be >= 0"):
            matched_loss([run], 3.1, tolerance=tol)
    m = align([run], "loss", 3.1, rule="nearest", tolerance=0.2)["r"]
    assert m.measurement.step == 3 and m.gap == pytest.approx(-0.1)  # nearest: 3.0 (gap -0.1) before 3.2 (+0.1)
    assert align([run], "loss", 3.1, tolerance=0.05)["r"] is None  # first_below: 3.0 is 0.1 away


@pytest.mark.parametrize("method", ["bend", "broken_stick"])
@pytest.mark.parametrize("shape", ["power_law", "flat"])
def test_crossover_of_a_spectrum_without_a_bend_is_not_located(method, shape):
    """A pure power law (p_j ~ j^-1.3) or a flat spectrum: the broken stick put a 'break' at rank 3.5 (41 when
    flat) with equal head and tail slopes, improvement 0, and said located=True."""
    from spectral_lens.spectra import estimate_crossover

    lam = np.arange(1, 500.0) ** -1.3 if shape == "power_law" else np.full(499, 1.0)
    fit = estimate_crossover(lam / lam.sum(), method=method)
    assert fit.improvement == 0.0 and not fit.located
    bent = estimate_crossover(_theorem6(), method=method)  # a Theorem-6 spectrum still has its crossover
    assert bent.located and bent.improvement > 0.5
