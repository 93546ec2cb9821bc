"""powerlaw_fit's xmin search against the exhaustive search, and round-off eigenvalues (review 29).

References, float64: the exhaustive loop (every distinct candidate, as WeightWatcher's ``powerlaw`` tries every
one) computed with Clauset, Shalizi & Newman's (2009) formulas written out independently (``math.fsum`` of
``log(x_i / xmin)``, KS on both sides of each step of the empirical CDF, ties as one step); for rank-deficient
weights the exact rank of the constructed product.
"""
import math
import time

import numpy as np
import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.weights import _mle_at, powerlaw_fit, weight_spectrum


def _ref_all(x, min_tail=10):
    """``[(ks, alpha, xmin, n_tail)]`` of every candidate, ascending xmin (the exhaustive search)."""
    x = np.sort(np.asarray(x, float))
    out = []
    for xm in np.unique(x):
        t = x[x >= xm]
        n = t.size
        if n < min_tail:
            break
        s = math.fsum(np.log(t / xm))
        if not (s > 0 and t[-1] - xm > 4 * x.size * np.finfo(float).eps * x[-1]):
            continue
        a = 1 + n / s
        u, cnt = np.unique(t, return_counts=True)
        hi = np.cumsum(cnt) / n
        p = 1 - (u / xm) ** (1 - a)
        out.append((max(np.max(hi - p), np.max(p - (hi - cnt / n))), a, xm, n))
    return out


def _ref_fit(x, min_tail=10):
    """The exhaustive search's fit and the gap between its KS distance and the next best one's."""
    rows = _ref_all(x, min_tail)
    best = min(rows, key=lambda r: r[0])  # the first of equal distances, as the library's loop
    others = [r[0] for r in rows if r is not best]
    return best, (min(others) - best[0]) if others else math.inf


def _spectra(seed, n):
    """Random and adversarial positive spectra of about ``n`` values."""
    rng = np.random.default_rng(seed)
    pareto = lambda a, k: (1 - rng.random(k)) ** (-1 / (a - 1))  # noqa: E731
    a = rng.choice([1.3, 2.0, 3.0, 4.5, 7.0])
    b = min(n, 500)  # Marchenko-Pastur bulks of b x 2b blocks (one SVD of n x 2n would take minutes at 10^4)
    mp = np.concatenate([np.linalg.svd(rng.standard_normal((b, 2 * b)) / math.sqrt(2 * b), compute_uv=False) ** 2
                         for _ in range(-(-n // b))])[:n]
    return {
        "pareto": pareto(a, n),
        "bulk+tail": np.concatenate([rng.uniform(0.05, 1, n - n // 4), pareto(a, n // 4)]),
        "mp+spikes": np.concatenate([mp[: n - 8], 4 + 20 * rng.random(8)]),
        "mp+heavy": np.concatenate([mp[: n - n // 10], 3 * pareto(a, n // 10)]),
        "plateaus": np.repeat(pareto(a, n // 8), 8),  # every value 8 times
        "rounded": np.round(pareto(a, n), 1),  # heavy ties
        "duplicated": np.tile(pareto(a, n // 2), 2),
        "integers": np.floor(pareto(a, n)),
        "dynamic": 10.0 ** rng.uniform(-30, 30, n),
        "rank-law": np.arange(1, n + 1) ** -rng.uniform(0.3, 2.0),
        "lognormal": rng.lognormal(0, rng.uniform(0.5, 3), n),
        "tight@1e30": 1e30 * (1 + 1e-9 * pareto(a, n)),
        "two-laws": np.concatenate([pareto(1.5, n // 2), 50 * pareto(5.0, n // 2)]),
    }


def _check(x, min_tail=10):
    fit = powerlaw_fit(x, min_tail=min_tail)
    (ks, a, xm, nt), gap = _ref_fit(x, min_tail)
    if gap > 1e-12:  # a distinct optimum (always so here): the same xmin
        assert (fit.xmin, fit.n_tail) == (xm, nt)
        assert fit.alpha == pytest.approx(a, rel=1e-11) and fit.ks_distance == pytest.approx(ks, abs=1e-12)
    else:  # a tie within round-off: an xmin of the same distance
        assert fit.ks_distance == pytest.approx(ks, abs=1e-12)
    return gap


@pytest.mark.parametrize("seed", range(2))
def test_the_search_finds_the_exhaustive_optimum(seed):
    # before: with more than max_candidates=512 candidates an evenly spaced subset was tried, which missed the
    # KS-best xmin in 16 of 70 spectra (a different alpha than WeightWatcher's exhaustive search)
    for name, x in _spectra(seed, 560).items():  # 551 candidate ranks: more than the old default 512
        _check(x)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_the_search_finds_the_exhaustive_optimum_on_many_spectra(seed):
    # 8 x 13 = 104 spectra of 400 to 3,000 values, and one of 12,000 per seed
    n = (400, 700, 1200, 2000, 3000, 1500, 600, 2500)[seed]
    for name, x in _spectra(100 + seed, n).items():
        _check(x, min_tail=(10, 2, 50)[seed % 3])
    big = _spectra(200 + seed, 12000)  # against the library's old loop over all candidates (the fsum one: minutes)
    x = big[list(big)[seed]]
    fit = powerlaw_fit(x)
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.n_tail) == _old_loop(x)


def _old_loop(x, min_tail=10):
    """The loop before review 29 with every candidate (``max_candidates=10**9``): ``_mle_at`` at each."""
    x = np.sort(x[x > 0])
    tol = 4.0 * x.size * np.finfo(np.float64).eps * x[-1]
    best = (math.inf, math.nan, -1)
    for k in range(x.size - min_tail + 1):
        if k > 0 and x[k] == x[k - 1]:
            continue
        alpha, ks = _mle_at(x, float(x[k]), k, tol)
        if ks < best[0]:
            best = (ks, alpha, k)
    return best[0], best[1], float(x[best[2]]), x.size - best[2]


@pytest.mark.parametrize("n", [10000, 4096])
def test_large_spectra_give_the_old_loop_over_every_candidate_bit_for_bit(n):
    # the same fit, to the last bit, as the old loop over all candidates (the review-28 reference at 1e-12)
    rng = np.random.default_rng(n)
    x = np.concatenate([rng.uniform(0.05, 1, n - n // 4), (1 - rng.random(n // 4)) ** (-1 / 2.5)])
    fit = powerlaw_fit(x)
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.n_tail) == _old_loop(x)


@pytest.mark.parametrize("seed,n", [(100, 400), (103, 2000)])
def test_a_tight_tail_near_1e30_is_not_pruned_by_the_loops_own_round_off(seed, n):
    # log(x_i / xmin) of ratios within 1e-9 of 1 puts the exhaustive loop's alpha ~1.8e9 off by ~1e-7 and its
    # KS distances by ~1e-8: a fixed pruning margin of 1e-9 pruned its optimum ("every candidate tail is
    # degenerate"); the margin grows with (alpha - 1) eps
    x = _spectra(seed, n)["tight@1e30"]
    fit = powerlaw_fit(x)
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.n_tail) == _old_loop(x)


def test_gaps_wider_than_float64_search_as_the_loop():
    # x_{k+1} / x_k can overflow (1e-300 to 1e300): the gap is then log(x_{k+1}) - log(x_k)
    rng = np.random.default_rng(11)
    x = np.concatenate([10.0 ** rng.uniform(-300, -290, 100), 10.0 ** rng.uniform(290, 300, 100)])
    fit = powerlaw_fit(x, min_tail=2)
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.n_tail) == _old_loop(x, min_tail=2)


def test_max_candidates_still_bounds_the_search_to_the_old_subset():
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.uniform(0.05, 1, 1500), (1 - rng.random(500)) ** (-1 / 5.0)])
    rows = _ref_all(x)
    last = x.size - 10
    ranks = np.unique(np.linspace(0, last, 64).round().astype(int))
    allowed = set(np.sort(x)[ranks])
    ks, a, xm, nt = min((r for r in rows if r[2] in allowed), key=lambda r: r[0])
    fit = powerlaw_fit(x, max_candidates=64)
    assert (fit.xmin, fit.n_tail) == (xm, nt) and fit.alpha == pytest.approx(a, rel=1e-11)
    assert powerlaw_fit(x).ks_distance <= fit.ks_distance
    with pytest.raises(ValueError, match="max_candidates must be >= 1, got 0"):
        powerlaw_fit(x, max_candidates=0)


@pytest.mark.slow
def test_the_search_stays_fast_at_16384_eigenvalues():
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.uniform(0.05, 1, 12288), (1 - rng.random(4096)) ** (-1 / 2.5)])
    t = time.perf_counter()
    powerlaw_fit(x)
    # measured 0.05 s (the old subset of 512: 0.05 s, the old loop over all 16,375 candidates: 1.2 s)
    assert time.perf_counter() - t < 1.0


def _low_rank(m, r, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype))


@pytest.mark.parametrize("m,r,n", [(256, 16, 256), (256, 40, 300), (300, 50, 900), (80, 30, 64)])
def test_round_off_of_a_rank_deficient_weight_is_left_out(m, r, n):
    # before: the min(m, n) - r squared singular values that are round-off of exact zeros (~1e-31 of the
    # largest) counted in n_total and were tried as xmin
    s = weight_spectrum(_low_rank(m, r, n, m + r))
    assert float(s.values.min()) > 0  # round-off, not zeros: not left out as zeros were
    fit = powerlaw_fit(s, min_tail=5)
    assert fit.n_total == r
    top = np.sort(s.values.numpy())[-r:]  # the rank is known: the float64 SVD's r nonzero values
    assert fit == powerlaw_fit(top, min_tail=5)
    (ks, a, xm, nt), _ = _ref_fit(top, 5)
    assert (fit.xmin, fit.n_tail) == (xm, nt) and fit.alpha == pytest.approx(a, rel=1e-11)
    assert powerlaw_fit(s, xmin=float(top[0]), min_tail=5).n_total == r


def test_the_round_off_floor_is_scale_free_and_keeps_genuine_small_values():
    # a full-rank 64 x 256 weight has 64 squared singular values, all genuine; so has a scaled copy (WeightWatcher's
    # fixed EVALS_THRESH = 1e-5 would drop those of 1e-3 * W), and a well-conditioned weight whose smallest
    # singular value is 1e-7 of the largest (eigenvalue 1e-14 of the largest, far above (256 eps)^2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64)
    for scale in (1.0, 1e-3, 1e-12):
        assert powerlaw_fit(weight_spectrum(scale * w)).n_total == 64
    u = torch.linalg.qr(torch.randn(256, 64, generator=g, dtype=torch.float64))[0]
    q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    sv = torch.logspace(0, -7, 64, dtype=torch.float64)
    assert powerlaw_fit(weight_spectrum(u @ torch.diag(sv) @ q.T)).n_total == 64


def test_eigenvalues_of_an_eigensolver_use_its_round_off():
    # eigenvalues of a rank-deficient float64 covariance from eigvalsh: round-off of zeros up to ~1e-16 of the
    # largest, positive and negative; as a Spectrum, sqrt(N) eps lambda_max (the library's numerical rank) leaves
    # them out. A bare tensor says nothing of where it came from: only zeros and negatives are left out
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 300, generator=g, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(x.T @ x)
    positive = int((ev > 0).sum())
    assert positive > 40  # positive round-off values exist: they counted before
    for kind in ("activation_covariance", "gradient"):
        spec = Spectrum(values=ev.clamp_min(0).flip(0), n_rows=200, dim=300, kind=kind)
        assert powerlaw_fit(spec).n_total == 40
    assert powerlaw_fit(ev).n_total == positive
    # the same product as a weight: the SVD's floor
    assert powerlaw_fit(weight_spectrum(x)).n_total == 40


def test_bare_arrays_keep_every_positive_value():
    # a synthetic sample over 60 decades is data, not round-off (the floor applies to a Spectrum only)
    v = 10.0 ** np.random.default_rng(4).uniform(-30, 30, 300)
    assert powerlaw_fit(v).n_total == 300 and powerlaw_fit(torch.from_numpy(v)).n_total == 300


def test_too_few_eigenvalues_above_round_off_names_the_floor():
    s = weight_spectrum(_low_rank(64, 6, 64, 1))
    with pytest.raises(ValueError, match=r"min_tail=10 positive eigenvalues, got 6 \(of 64; .*round-off of zeros \(<= "):
        powerlaw_fit(s)
    with pytest.raises(ValueError, match=r"got 6 \(of 64; zeros and negatives are left out\)"):
        powerlaw_fit(np.r_[np.zeros(58), np.arange(1.0, 7.0)])
