"""Review of review 29's powerlaw_fit search (branch and bound) and round-off floor, adversarially.

The reference is the exhaustive loop as main had it before the merge (``max_candidates`` >= n): ``_mle_at``
over every distinct candidate rank in ascending order, the first of equal KS distances winning, written out
here on its own (not through ``_ks_search``). Spectra are drawn by hypothesis: raw lists of floats over
1e-300..1e300 with runs of equal values, and generated families built to make the bounds tight (alpha near 1,
alpha ~1e9 clusters near 1e30, spans of 600 decades, plateaus, geometric ladders whose tails' KS distances
differ by little, min_tail = 2 whose 2-point tails all have KS distance exactly 1/2).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spectral_lens import Spectrum
from spectral_lens import weights as W
from spectral_lens.weights import _ks_bound, _ks_search, _mle_at, _roundoff_floor, _tail_alphas, powerlaw_fit

EPS = float(np.finfo(np.float64).eps)


def _prepare(v, min_tail):
    """``(x, candidate ranks, tol)`` exactly as powerlaw_fit forms them for a bare array (no floor)."""
    v = np.asarray(v, float)
    x = np.sort(v[v > 0])
    tol = 4.0 * x.size * EPS * x[-1]
    ranks = np.arange(0, x.size - min_tail + 1)
    keep = [k for k in ranks if k == 0 or x[k] != x[k - 1]]
    return x, np.asarray(keep, dtype=np.int64), tol


def _exhaustive(x, ranks, tol):
    """The loop before review 29 (every candidate): ``(ks, alpha, k)``, ``k = -1`` if every tail is degenerate."""
    best = (math.inf, math.nan, -1)
    for k in ranks:
        alpha, ks = _mle_at(x, float(x[k]), int(k), tol)
        if ks < best[0]:
            best = (ks, alpha, int(k))
    return best


def _family(kind, seed, n):
    """``n`` positive finite values of one family (overflows to inf are left out)."""
    with np.errstate(over="ignore"):
        v = _draw(kind, np.random.default_rng(seed), n)
    return v[np.isfinite(v)]


def _draw(kind, rng, n):
    if kind == "pareto":  # alpha 1.03..11: a finite sample's largest value is at most ~1e300
        a = 1 + 10 ** rng.uniform(-1.5, 1)
        return (1 - rng.random(n)) ** (-1 / (a - 1))
    if kind == "alpha_near_1":  # tails spanning hundreds of decades, alpha - 1 ~ 1e-3
        return 10.0 ** rng.uniform(-300, 300, n)
    if kind == "cluster":  # alpha ~ 1e6..1e10: a tail of spread 1e-10..1e-6 near 1e30
        return 1e30 * (1 + 10 ** rng.uniform(-10, -6) * rng.random(n))
    if kind == "edges":  # both float64 ends: ratios that overflow float64
        return np.concatenate([10.0 ** rng.uniform(-320, -300, n // 2), 10.0 ** rng.uniform(300, 308, n - n // 2)])
    if kind == "plateaus":
        return np.repeat((1 - rng.random(n // 4 + 1)) ** -1.0, 4)[:n]
    if kind == "few_values":  # runs of equal values everywhere: many ties at the sampled points
        return rng.integers(1, 5, n).astype(float)
    if kind == "ladder":  # geometric: a tail's KS distance depends on its length only, slowly
        return float(10 ** rng.uniform(1e-3, min(0.5, 300 / n))) ** np.arange(n)
    if kind == "quantiles":  # an exact power law: every tail's KS distance ~1/(2m), nearly equal
        return (1 - np.arange(n) / n) ** (-1 / rng.uniform(0.2, 3))
    if kind == "bulk_tail":
        return np.concatenate([rng.uniform(0.05, 1, n - n // 4), 1 + (1 - rng.random(n // 4)) ** -0.8])
    raise AssertionError(kind)


KINDS = ["pareto", "alpha_near_1", "cluster", "edges", "plateaus", "few_values", "ladder", "quantiles", "bulk_tail"]

_raw = st.lists(st.one_of(st.floats(1e-300, 1e300), st.sampled_from([1.0, 2.0, 1e-300, 1e300, 1.0 + 2 * EPS])),
                min_size=2, max_size=80)


def _check_search(v, min_tail):
    v = np.asarray(v, float)
    if np.count_nonzero(v > 0) < min_tail:
        return
    x, ranks, tol = _prepare(v, min_tail)
    if ranks.size == 0:
        return
    with np.errstate(over="ignore"):
        got, ref = _ks_search(x, ranks, tol), _exhaustive(x, ranks, tol)
    assert got[2] == ref[2], (got, ref)
    assert got[0] == ref[0] and (got[1] == ref[1] or (math.isnan(got[1]) and math.isnan(ref[1])))


def _check_bounds(v, min_tail):
    """Every level's bound is below what _mle_at computes for the same candidate, within the pruning margin."""
    x, ranks, tol = _prepare(v, min_tail)
    alphas, denom = _tail_alphas(x, ranks)
    live = (denom > 0) & (x[-1] - x[ranks] > tol)
    ranks, alphas = ranks[live], alphas[live]
    if ranks.size == 0:
        return
    with np.errstate(over="ignore"):
        loop = np.array([_mle_at(x, float(x[k]), int(k), tol)[1] for k in ranks])
    for points in W._KS_LEVELS:
        bound = _ks_bound(x, ranks, alphas, points)
        slack = loop + W._KS_MARGIN + (alphas - 1) * EPS - bound
        assert slack.min() >= 0, (points, ranks[slack.argmin()], slack.min())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_raw, st.sampled_from([2, 3, 10]))
@example([1e-300, 1e300, 1.0, 1.0, 2.0], 2)  # a tail whose ratio overflows float64; ties
@example([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], 2)  # every 2-point tail has KS distance 1/2
def test_search_equals_the_exhaustive_loop_on_raw_lists(values, min_tail):
    _check_search(values, min_tail)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.integers(17, 400), st.sampled_from([2, 3, 10]))
def test_search_equals_the_exhaustive_loop_on_adversarial_families(kind, seed, n, min_tail):
    _check_search(_family(kind, seed, n), min_tail)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.integers(17, 600), st.sampled_from([2, 10]))
def test_each_bound_is_below_the_loops_distance_within_the_margin(kind, seed, n, min_tail):
    _check_bounds(_family(kind, seed, n), min_tail)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.integers(400, 3000), st.sampled_from([2, 3, 10]))
def test_search_and_bounds_on_larger_adversarial_spectra(kind, seed, n, min_tail):
    _check_search(_family(kind, seed, n), min_tail)
    _check_bounds(_family(kind, seed, n), min_tail)


@pytest.mark.parametrize("kind", KINDS)
def test_powerlaw_fit_gives_the_exhaustive_loops_fit(kind):
    v = _family(kind, 7, 300)
    x, ranks, tol = _prepare(v, 10)
    ks, alpha, k = _exhaustive(x, ranks, tol)
    fit = powerlaw_fit(v)
    assert (fit.xmin, fit.alpha, fit.ks_distance, fit.n_tail, fit.n_total) == (x[k], alpha, ks, x.size - k, x.size)


# ---- the round-off floor ---------------------------------------------------------------------------------------

def test_the_weight_floor_uses_the_reshaped_matrix_of_conv_stacked_and_bf16_weights():
    torch.manual_seed(0)
    for w, big in [(torch.randn(32, 16, 3, 3), 144), (torch.randn(8, 64, 32), 2048), (torch.randn(40, 96).bfloat16(), 96)]:
        sp = W.weight_spectrum(w)
        v = sp.values.numpy()
        assert _roundoff_floor(sp, v) == (big * EPS) ** 2 * v.max()


def test_a_well_conditioned_weight_at_any_scale_keeps_every_value():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64))[0]
    for scale in (1e-150, 1e-8, 1.0, 1e100):
        w = scale * q * torch.logspace(0, -6, 256, dtype=torch.float64)  # condition number 1e6
        assert powerlaw_fit(W.weight_spectrum(w)).n_total == 256


def test_a_bare_array_and_a_spectrum_of_the_same_values_differ_only_by_the_floor():
    torch.manual_seed(0)
    a = torch.randn(300, 40, dtype=torch.float64) @ torch.randn(40, 300, dtype=torch.float64)  # rank 40
    sp = W.weight_spectrum(a)
    bare, fit = powerlaw_fit(sp.values), powerlaw_fit(sp)
    assert fit.n_total == 40 and bare.n_total == 300  # the bare array keeps the 260 values of ~1e-31
    assert (fit.xmin, fit.alpha) == (bare.xmin, bare.alpha)  # here the tail is the same
    same = Spectrum(values=sp.values, n_rows=sp.n_rows, dim=sp.dim, kind="activation_covariance")
    assert powerlaw_fit(same).n_total == 40  # other kinds: sqrt(N) eps lambda_max
