"""powerlaw_fit, the alpha converters and weight_spectrum against independent float64 references.

Reference: Clauset, Shalizi & Newman (2009), SIAM Review 51(4): continuous MLE
``alpha = 1 + n / sum ln(x_i / xmin)`` (not the ``(n-1)/n`` variant; as WeightWatcher's ``powerlaw``
package), ``D = sup_x |S(x) - P(x)|`` with ``P(x) = 1 - (x/xmin)^(1-alpha)`` taken on both sides of
every step of S (ties as one step), ``xmin`` the distinct value with at least ``min_tail`` values
above it minimizing D, ``stderr = (alpha - 1)/sqrt(n)``.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens.weights import (
    esd_alpha_from_rank_alpha,
    powerlaw_fit,
    rank_alpha_from_esd_alpha,
    weight_spectra,
    weight_spectrum,
)


def _ref_at(x, xmin):
    t = x[x >= xmin]
    n = t.size
    s = math.fsum(np.log(t / xmin))
    a = 1 + n / s
    u, cnt = np.unique(t, return_counts=True)
    hi = np.cumsum(cnt) / n
    p = 1 - (u / xmin) ** (1 - a)
    return a, max(np.max(np.abs(hi - p)), np.max(np.abs(hi - cnt / n - p))), n


def _ref_fit(v, min_tail=10):
    x = np.sort(np.asarray(v, float))
    x = x[x > 0]
    best = None
    for xm in np.unique(x):
        if (x >= xm).sum() < min_tail:
            continue
        a, d, n = _ref_at(x, xm)
        if (best is None or d < best[3]):
            best = (a, xm, n, d)
    a, xm, n, d = best
    return a, xm, n, d, (a - 1) / math.sqrt(n)


@pytest.mark.parametrize("alpha", [1.5, 3.0, 6.0])
@pytest.mark.parametrize("n", [10, 50, 400])
@pytest.mark.parametrize("bulk", [False, True])
def test_full_scan_matches_the_clauset_reference(alpha, n, bulk):
    rng = np.random.default_rng(int(alpha * 100) + n + bulk)
    x = (1 - rng.random(n)) ** (-1 / (alpha - 1))  # inverse-CDF Pareto draws, xmin = 1
    if bulk:
        x = np.concatenate([x, rng.uniform(0.05, 1, n)])
    fit = powerlaw_fit(x, max_candidates=10**9)
    a, xm, nt, d, se = _ref_fit(x)
    assert (fit.xmin, fit.n_tail) == (xm, nt)
    assert fit.alpha == pytest.approx(a, rel=1e-12)
    assert fit.ks_distance == pytest.approx(d, abs=1e-12)
    assert fit.stderr == pytest.approx(se, rel=1e-12)
    given = powerlaw_fit(x, xmin=xm)
    assert given.alpha == pytest.approx(a, rel=1e-12) and given.ks_distance == pytest.approx(d, abs=1e-12)


def test_ties_and_tiny_inputs_match_the_reference():
    rng = np.random.default_rng(3)
    x = np.concatenate([np.repeat([1.0, 2.0, 3.0], 5), 3 * (1 - rng.random(40)) ** -1.0, [3.0] * 4])
    fit, ref = powerlaw_fit(x, max_candidates=10**9), _ref_fit(x)
    assert (fit.xmin, fit.n_tail) == (ref[1], ref[2])
    assert fit.alpha == pytest.approx(ref[0], rel=1e-12) and fit.ks_distance == pytest.approx(ref[3], abs=1e-12)
    for n in (2, 3):
        v = (1 - rng.random(n)) ** -1.0
        fit, ref = powerlaw_fit(v, min_tail=2), _ref_fit(v, min_tail=2)
        assert fit.alpha == pytest.approx(ref[0], rel=1e-12) and fit.ks_distance == pytest.approx(ref[3], abs=1e-12)
    with pytest.raises(ValueError, match="min_tail=2 positive eigenvalues, got 1"):
        powerlaw_fit(np.array([0.0, 2.0]), min_tail=2)  # zeros are left out


def test_huge_dynamic_range_matches_the_reference():
    v = 10.0 ** np.random.default_rng(4).uniform(-30, 30, 300)
    fit, ref = powerlaw_fit(v, max_candidates=10**9), _ref_fit(v)
    assert fit.xmin == ref[1] and fit.alpha == pytest.approx(ref[0], rel=1e-12)


def test_a_tight_tail_far_from_one_has_no_cancellation():
    # before: sum log x_i - n log xmin from running sums; rel. error 1.5e-4 at 1e30, 4.7e-4 at 1e300
    rng = np.random.default_rng(5)
    for scale in (1e30, 1e300):
        v = scale * (1 + 1e-9 * ((1 - rng.random(1000)) ** -1.0 - 1))
        xmin = float(v.min())
        assert powerlaw_fit(v, xmin=xmin).alpha == pytest.approx(_ref_at(np.sort(v), xmin)[0], rel=1e-10)


def test_an_orthogonal_weight_is_degenerate_not_alpha_1e15():
    # before: float64 SVD round-off (~1e-16) around 1 was fitted: alpha ~ 2e15 (eye(64) raised "degenerate")
    q = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    for w in (q, 3.0 * q):
        with pytest.raises(ValueError, match="degenerate"):
            powerlaw_fit(weight_spectrum(w))
        with pytest.raises(ValueError, match="degenerate"):
            powerlaw_fit(weight_spectrum(w), xmin=float(weight_spectrum(w).values.min()))


def test_rank_and_esd_alpha_converters_refuse_what_the_other_refuses():
    for a in (0.25, 0.5, 1.0, 2.0):  # lambda_r = r^-a: N(>l) = l^(-1/a), density ~ l^-(1 + 1/a)
        assert esd_alpha_from_rank_alpha(a) == 1 + 1 / a
        assert rank_alpha_from_esd_alpha(esd_alpha_from_rank_alpha(a)) == pytest.approx(a, rel=1e-15)
    # before: esd_alpha_from_rank_alpha(inf) = 1.0 and rank_alpha_from_esd_alpha(inf) = 0.0, values the other
    # function refuses; 1e-320 gave inf and 1e300 gave 1.0
    for bad in (math.inf, -math.inf, math.nan, 0.0, -1.0, 1e-320, 1e300):
        with pytest.raises(ValueError, match="esd_alpha_from_rank_alpha: rank_alpha"):
            esd_alpha_from_rank_alpha(bad)
    for bad in (math.inf, math.nan, 1.0, 0.5):
        with pytest.raises(ValueError, match="rank_alpha_from_esd_alpha: esd_alpha must be > 1"):
            rank_alpha_from_esd_alpha(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_weight_spectrum_is_the_float64_svd_of_the_stored_weight(dtype):
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = torch.linalg.svdvals(w.to(torch.float64)) ** 2
    assert torch.equal(weight_spectrum(w, "p").values, ref)
    for shape in ((1, 50), (50, 1)):
        v = torch.randn(shape, dtype=torch.float64)
        assert weight_spectrum(v).values.tolist() == pytest.approx([float((v * v).sum())], rel=1e-14)


def test_empty_and_non_finite_weights_are_value_errors_naming_the_parameter():
    # before: (0, 5) was a bare reshape RuntimeError; (5, 0) an empty spectrum
    for shape in ((0, 5), (5, 0), (2, 0, 3)):
        with pytest.raises(ValueError, match=r"blocks\.0\.w: shape .* is empty"):
            weight_spectrum(torch.zeros(shape), "blocks.0.w")
    w = torch.randn(4, 6)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"blocks\.0\.w: shape \(4, 6\) contains NaN or Inf"):
        weight_spectrum(w.bfloat16(), "blocks.0.w")


def test_conv_reshape_and_expert_slices_against_svdvals():
    conv = nn.Conv2d(3, 8, (3, 5))
    s = weight_spectrum(conv.weight, "c")
    assert s.metadata["matrix_shape"] == [8, 45]
    assert torch.equal(s.values, torch.linalg.svdvals(conv.weight.detach().double().reshape(8, 45)) ** 2)

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 6, 10))

    m = nn.Module()
    m.experts = Experts()
    spectra = weight_spectra(m)
    assert list(spectra) == ["experts.w[0]", "experts.w[1]", "experts.w[2]"]
    for e in range(3):
        assert torch.equal(spectra[f"experts.w[{e}]"].values,
                           torch.linalg.svdvals(m.experts.w[e].detach().double()) ** 2)
