"""Review 27 (fit): the summaries against protocol.md sections 2, 3, 5 and 6, with references written from
the protocol text (float64 numpy/scipy, mpmath for the entropy), not from the code, on adversarial inputs.

Compared: band alpha (``-slope`` of OLS of ``(log j, log p_j)``, 1-based inclusive ranks, unweighted; log
base irrelevant), its intercept / r2 / stderr (``scipy.stats.linregress``); RankMe ``exp(-sum p log p)``
with zeros contributing 0 and no epsilon (protocol sec. 3), its singular-value variant, participation
ratio and stable rank; the tail-window scale rule; Spearman rho and its two-sided p-value (own average
ranks, all n! pairings); ``TailPredictor``'s early ``alpha_tail`` (interpolated at 20% of progress), its
per-family min-max normalization and its scores.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from spectral_lens import BandAlphaFitter, RankMe, Spectrum, participation_ratio, stable_rank, tail_window
from spectral_lens.analysis import TailPredictor
from spectral_lens.analysis.spearman import spearman
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import open_runs
from spectral_lens.spectra import band_alpha
from spectral_lens.spectra.ranks import rankme

mpmath = pytest.importorskip("mpmath")


# ----------------------------------------------------------------------------- references (protocol text)

def ref_fit(lam, lo, hi):
    """Protocol sec. 2: alpha(I) = -slope of least squares of (log j, log p_j), j in I = [lo, hi], 1-based,
    p_j = lambda_j / sum_k lambda_k. Base-10 logs on purpose: the slope is base-free, the intercept not."""
    lam = np.asarray(lam, np.float64)
    p = lam / math.fsum(lam.tolist())
    j = np.arange(lo, hi + 1, dtype=np.float64)
    res = stats.linregress(np.log10(j), np.log10(p[lo - 1 : hi]))
    return -res.slope, res.intercept * math.log(10), res.rvalue**2, res.stderr


def ref_rankme(lam, singular=False):
    """Protocol sec. 3: exp(-sum p log p), p = lambda / sum lambda, zeros contribute 0; in 60-digit mpmath."""
    with mpmath.workdps(60):
        w = [mpmath.mpf(float(v)) for v in lam]
        w = [mpmath.sqrt(v) for v in w] if singular else w
        total = mpmath.fsum(w)
        h = -mpmath.fsum((v / total) * mpmath.log(v / total) for v in w if v > 0)
        return float(mpmath.exp(h))


def ref_ranks(values):
    """Average ranks (1-based), ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        k = i
        while k + 1 < len(order) and values[order[k + 1]] == values[order[i]]:
            k += 1
        for m in range(i, k + 1):
            out[order[m]] = (i + k) / 2 + 1
        i = k + 1
    return np.array(out)


def ref_spearman(x, y):
    """Pearson of average ranks after dropping NaN pairs; two-sided p over all n! pairings as scipy defines
    it (twice the smaller one-sided share, capped at 1); (nan, nan) below 3 points or for constant input."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3 or len({a for a, _ in pairs}) == 1 or len({b for _, b in pairs}) == 1:
        return math.nan, math.nan
    rx, ry = ref_ranks([a for a, _ in pairs]), ref_ranks([b for _, b in pairs])

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))

    r0 = pearson(rx, ry)
    null = np.array([pearson(rx[list(p)], ry) for p in itertools.permutations(range(len(pairs)))])
    ge, le = np.mean(null >= r0 - 1e-12), np.mean(null <= r0 + 1e-12)
    return r0, float(min(1.0, 2 * min(ge, le)))


# ----------------------------------------------------------------------------- band alpha

@settings(max_examples=60, deadline=None)
@given(a=st.one_of(st.floats(0, 3), st.floats(0, 30)), d=st.integers(2, 5000), data=st.data(),
       scale_exp=st.floats(-80, 80))
def test_exact_power_law_alpha_comes_back_to_1e_12(a, d, data, scale_exp):
    lo = data.draw(st.integers(1, d - 1))
    hi = data.draw(st.integers(lo + 1, d))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -a * 10.0**scale_exp
    span = math.log(hi / lo)
    fit = band_alpha(lam / lam.sum(), (lo, hi))
    # float64 conditioning: log p carries ~eps * |log p| of round-off, the slope that over the log-rank span
    # (measured: 5.3e-14 at span >= 0.1; |err| * span / max(1, a) <= 1.6e-15 everywhere, 3,000 draws)
    bound = 1e-12 if span >= 0.1 else 1e-14 * max(1.0, a) / span
    assert abs(fit.alpha - a) <= bound, (fit.alpha, a, lo, hi)
    assert fit.window == (lo, hi) and fit.n_points == hi - lo + 1
    spectrum = Spectrum(torch.from_numpy(lam), n_rows=10**9, dim=d)  # raw scale: trace normalization is the fitter's
    via_fitter = BandAlphaFitter((lo, hi)).fit(spectrum)
    assert abs(via_fitter.alpha - a) <= bound
    assert via_fitter.intercept == pytest.approx(-math.log(math.fsum((np.arange(1, d + 1.0) ** -a).tolist())),
                                                 rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(a=st.floats(0.05, 4), d=st.integers(3, 1200), noise=st.floats(0, 0.5), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_noisy_power_law_matches_linregress(a, d, noise, seed, data):
    rng = np.random.default_rng(seed)
    lam = np.sort(np.arange(1, d + 1.0) ** -a * np.exp(noise * rng.standard_normal(d)))[::-1]
    lo = data.draw(st.integers(1, d - 2))
    hi = data.draw(st.integers(lo + 2, d))
    fit = band_alpha(lam / lam.sum(), (lo, hi))
    alpha, intercept, r2, se = ref_fit(lam, lo, hi)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10, abs=1e-12)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10, abs=1e-10)
    if noise > 1e-3:  # linregress forms stderr from 1 - r^2: near a perfect fit that is its own round-off
        assert fit.stderr == pytest.approx(se, rel=1e-8)
        assert fit.r2 == pytest.approx(r2, abs=1e-9)
    else:  # the direct formulas on float64 residuals (a noise of 1e-6 gives a stderr of ~1e-6, not <= 1e-7)
        j, y = np.log(np.arange(lo, hi + 1.0)), np.log(lam[lo - 1 : hi] / math.fsum(lam.tolist()))
        nat = stats.linregress(j, y)  # natural logs: base 10's intercept, converted, carries ~1e-14 of its own
        sse = float(((y - (nat.intercept + nat.slope * j)) ** 2).sum())
        assert fit.stderr == pytest.approx(math.sqrt(sse / (j.size - 2) / ((j - j.mean()) ** 2).sum()),
                                           rel=1e-6, abs=1e-12)
        assert fit.r2 == pytest.approx(1.0 - sse / ((y - y.mean()) ** 2).sum(), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([1.0, 0.5, 1e-300, 5e-324, 2.5e-320, 1e300, 1e-310]),
                          st.floats(1e-320, 1e300)), min_size=3, max_size=60),
       st.data())
def test_ties_denormals_and_extreme_scales_match_the_reference(values, data):
    lam = np.sort(np.array(values))[::-1]
    assume(np.isfinite(lam.sum()))
    lo = data.draw(st.integers(1, lam.size - 2))
    hi = data.draw(st.integers(lo + 2, lam.size))
    p = lam / lam.sum()
    assume(np.all(p[lo - 1 : hi] > 0))  # a denormal can round to 0 once divided by a huge trace
    fit = band_alpha(p, (lo, hi))
    j = np.arange(lo, hi + 1, dtype=np.float64)
    ref = stats.linregress(np.log(j), np.log(p[lo - 1 : hi]))
    assert fit.alpha == pytest.approx(-ref.slope, rel=1e-9, abs=1e-9)
    if np.ptp(p[lo - 1 : hi]) == 0:  # a tied window is flat: alpha 0 and a perfect fit
        assert fit.alpha == 0 and fit.r2 == 1.0


def test_the_window_alone_is_fitted_and_bad_windows_are_named():
    lam = np.arange(1, 301.0) ** -1.3
    p = lam / lam.sum()
    q = p.copy()
    q[:9] = [np.inf, np.nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # outside the window: not read
    q[250:] = 0.0
    assert band_alpha(q, (100, 200)).alpha == pytest.approx(1.3, abs=1e-12)
    cases = [
        ((250, 301), r"window \[250, 301\] exceeds the spectrum: only 300 eigenvalues"),
        ((200, 260), r"window \[200, 260\] reaches zero eigenvalues: only 249 are nonzero"),  # NaN is not > 0
        ((2, 20), r"window \[2, 20\] holds a NaN/Inf eigenvalue \(first at rank 2\)"),
        ((0.1, 0.5), r"window \(0\.1, 0\.5\): ranks must be integers.*fractions of the spectrum"),
        ((100.0, 200), r"window \(100\.0, 200\): ranks must be integers"),
        ((0, 10), r"window \(0, 10\): need 1 <= lo < hi \(ranks are 1-based and inclusive\)"),
        ((5, 5), r"window \(5, 5\): need 1 <= lo < hi"),
    ]
    for window, match in cases:
        with pytest.raises(ValueError, match=match):
            band_alpha(q, window)
    with pytest.raises(ValueError, match=r"rank 3 \(0\.5\) exceeds rank 2 \(0\.25\)"):
        band_alpha([1.0, 0.25, 0.5], (1, 3))
    with pytest.raises(ValueError, match=r"exceeds the spectrum: only 1 eigenvalues"):
        band_alpha([1.0], (1, 2))
    two = band_alpha([0.8, 0.2], (1, 2))  # the shortest fit: exact through two points, no stderr
    assert two.alpha == pytest.approx(2.0, abs=1e-15) and math.isnan(two.stderr) and two.r2 == 1.0


def test_tail_window_scale_rule_table():
    want = {1: (100, 200), 12: (100, 200), 13: (200, 400), 36: (200, 400), 37: (400, 800), 48: (400, 800),
            49: (800, 1600), 64: (800, 1600), 65: (1600, 3200), 85: (1600, 3200), 86: (3200, 6400)}
    assert {n: tail_window(n) for n in want} == want


# ----------------------------------------------------------------------------- effective ranks

spectra = st.lists(st.one_of(st.just(0.0), st.sampled_from([1.0, 5e-324, 1e-310, 1e300]), st.floats(0, 1e300)),
                   min_size=1, max_size=80)


@settings(max_examples=80, deadline=None)
@given(spectra, st.randoms(use_true_random=False))
def test_effective_ranks_match_the_protocol_definitions(values, random):
    lam = np.array(values)
    assume(lam.max() > 0)
    random.shuffle(values)  # the ranks are functions of the multiset: order does not matter
    t = torch.tensor(values, dtype=torch.float64)
    assert RankMe()(t) == pytest.approx(ref_rankme(lam), rel=1e-12)
    assert RankMe("singular_values")(t) == pytest.approx(ref_rankme(lam, singular=True), rel=1e-12)
    with mpmath.workdps(60):
        w = [mpmath.mpf(float(v)) for v in lam]
        pr = float(mpmath.fsum(w) ** 2 / mpmath.fsum(v * v for v in w))
        sr = float(mpmath.fsum(w) / max(w))
    assert participation_ratio(t) == pytest.approx(pr, rel=1e-12)
    assert stable_rank(t) == pytest.approx(sr, rel=1e-12)
    n = int(np.count_nonzero(lam))
    assert 1.0 - 1e-12 <= RankMe()(t) <= n * (1 + 1e-12)  # 1 for one direction, n for n equal ones


def test_rankme_has_no_epsilon_and_zeros_contribute_nothing():
    """Protocol sec. 3: zero eigenvalues contribute 0 (no ``p + eps`` as in Garrido et al.'s code): padding a
    spectrum with zeros leaves RankMe exactly unchanged, and k equal eigenvalues give k."""
    base = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    padded = torch.cat([base, torch.zeros(4093, dtype=torch.float64)])
    assert RankMe()(padded) == RankMe()(base)
    assert float(rankme(torch.full((7,), 0.3, dtype=torch.float64))) == pytest.approx(7.0, rel=1e-15)


# ----------------------------------------------------------------------------- Spearman

values_with_ties = st.one_of(st.integers(-2, 2).map(float), st.sampled_from([math.inf, -math.inf, math.nan]),
                             st.floats(-1e6, 1e6))


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 7).flatmap(lambda n: st.tuples(st.lists(values_with_ties, min_size=n, max_size=n),
                                                     st.lists(values_with_ties, min_size=n, max_size=n))))
def test_spearman_with_ties_infinities_and_nans_equals_enumeration(xy):
    x, y = xy
    rho, p = spearman(x, y)
    r0, p0 = ref_spearman(x, y)
    if math.isnan(r0):
        assert math.isnan(rho) and math.isnan(p)
        return
    assert rho == pytest.approx(r0, abs=1e-12)
    assert p == pytest.approx(p0, abs=1e-9)


def test_spearman_at_eight_points_is_exact_and_above_it_is_scipys():
    x = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0, math.inf, 8.0]
    y = [0.5, 0.7, 0.6, 0.6, 0.9, 1.1, 2.0, 1.0]
    assert spearman(x, y) == pytest.approx(ref_spearman(x, y), abs=1e-12)
    assert spearman(range(8), range(8))[1] == pytest.approx(2 / math.factorial(8), rel=1e-12)
    rng = np.random.default_rng(27)
    for n in (9, 15, 40):
        a, b = np.round(rng.normal(size=n) * 2), rng.normal(size=n)
        a[0] = math.inf
        ra, rb = ref_ranks(list(a)), ref_ranks(list(b))
        rho = float(np.corrcoef(ra, rb)[0, 1])
        res = stats.spearmanr(ra, rb)
        assert spearman(a, b) == (pytest.approx(rho, abs=1e-14), pytest.approx(res.pvalue, rel=1e-12))


# ----------------------------------------------------------------------------- TailPredictor end to end

def _raw_records(run_dir):
    """(run.json, log.jsonl rows, measurements.jsonl rows) read as plain JSON."""
    def read(name):
        return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]

    return json.loads((run_dir / "run.json").read_text()), read("log.jsonl"), read("measurements.jsonl")


def test_tail_predictor_statistic_normalization_and_score_against_references(tmp_path):
    """From the raw files: early alpha_tail at 20% of progress = linear interpolation (in progress) of the band
    alpha of the two bracketing measurements (protocol sec. 6); T = tokens of the first checkpoint with
    val_loss <= target, eps_tok = T / min T within the family (sec. 5); per-family min-max normalization; the
    within-family and pooled Spearman scores. Two families, different windows, noisy spectra, tied T."""
    write_theorem6_sweep(tmp_path, (1, 2, 4, 8, 16), family="a", dim=256, grad_dim=16, n_measure=11, n_eval=40,
                         tail_window=(20, 80), noise=0.05, seed=3)
    write_theorem6_sweep(tmp_path, (2, 4, 8, 32), family="b", dim=192, grad_dim=16, n_measure=9, n_eval=30,
                         tail_window=(30, 90), noise=0.02, seed=4, eta=40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = TailPredictor(0.2).fit(open_runs([tmp_path]))
        score = pred.score(targets=3.2)
    assert pred.windows_ == {"a": (20, 80), "b": (30, 90)}
    alpha, family, T = {}, {}, {}
    for run_dir in sorted(tmp_path.iterdir()):
        info, log, meas = _raw_records(run_dir)
        rid, (lo, hi) = run_dir.name, info["summary_windows"]["tail"]
        family[rid] = info["family"]
        pts = sorted((m["progress"], ref_fit(np.load(run_dir / next(iter(m["spectra"].values()))["file"])["values"],
                                             lo, hi)[0]) for m in meas if "act:blocks.11" in m["spectra"])
        alpha[rid] = float(np.interp(0.2, [f for f, _ in pts], [v for _, v in pts]))
        curve = sorted((r["tokens"], r["val_loss"]) for r in log + meas if "val_loss" in r)
        T[rid] = next((t for t, v in curve if v <= 3.2), math.inf)
    assert {st.run_id: st.value for st in pred.statistics_} == pytest.approx(alpha, rel=1e-12, abs=1e-12)
    eps = {r: T[r] / min(T[o] for o in T if family[o] == family[r]) for r in T}
    assert {pt[0]: pt[4] for pt in score.points} == pytest.approx(eps, rel=1e-15)
    norm = pred.normalized()
    for fam in ("a", "b"):
        ids = [r for r in alpha if family[r] == fam]
        lo, hi = min(alpha[i] for i in ids), max(alpha[i] for i in ids)
        assert {i: norm[i] for i in ids} == pytest.approx({i: (alpha[i] - lo) / (hi - lo) for i in ids}, abs=1e-12)
        rho, p = ref_spearman([alpha[i] for i in ids], [eps[i] for i in ids])
        assert score.within[fam].rho == pytest.approx(rho, abs=1e-12)
        assert score.within[fam].pvalue == pytest.approx(p, abs=1e-12)
    ids = sorted(alpha)
    ra, re = ref_ranks([norm[i] for i in ids]), ref_ranks([eps[i] for i in ids])
    pooled = stats.spearmanr(ra, re)  # 9 runs: scipy's t-approximation, as documented above 8
    assert score.n == 9 and score.rho == pytest.approx(float(np.corrcoef(ra, re)[0, 1]), abs=1e-12)
    assert score.pvalue == pytest.approx(pooled.pvalue, rel=1e-12)
