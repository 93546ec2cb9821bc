"""Gradient noise scale B_simple against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectral_lens.gradients import PerSampleGradientProbe, noise_scale_from_gram


def numpy_noise_scale(g: np.ndarray):
    """McCandlish et al. App. A with B_small = 1, B_big = M, written from the per-sample rows."""
    m = g.shape[0]
    small = (g**2).sum(1).mean()
    big = (g.mean(0) ** 2).sum()
    trace_sigma = np.sum(np.var(g, axis=0, ddof=1))
    grad_sq = (m * big - small) / (m - 1)
    return trace_sigma, grad_sq, trace_sigma / grad_sq


def test_from_gram_matches_numpy():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((9, 50)) + 0.7  # a clear mean gradient
    ns = noise_scale_from_gram(torch.from_numpy(g @ g.T), source="w")
    ts, gs, b = numpy_noise_scale(g)
    assert ns.n_samples == 9 and ns.source == "w"
    assert ns.trace_sigma == pytest.approx(ts, rel=1e-12)
    assert ns.grad_norm_sq == pytest.approx(gs, rel=1e-12)
    assert ns.b_simple == pytest.approx(b, rel=1e-12)
    assert ns.mean_grad_norm_sq == pytest.approx((g.mean(0) ** 2).sum(), rel=1e-12)
    assert ns.grad_norm_sq == pytest.approx(ns.mean_grad_norm_sq - ns.trace_sigma / 9, rel=1e-12)


def test_noise_dominated_is_infinite():
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])
    ns = noise_scale_from_gram(torch.from_numpy(g @ g.T))
    assert math.isinf(ns.b_simple) and ns.grad_norm_sq < 0
    with pytest.raises(ValueError, match="at least 2"):
        noise_scale_from_gram(torch.ones(1, 1))


def test_probe_noise_scale(gpt, helpers):
    model, batch = gpt(), helpers.lm_batch(m=8)
    names = ["transformer.h.1.attn.c_proj.weight", "lm_head.weight"]
    out = PerSampleGradientProbe(model, names, chunk_size=3).update(batch).noise_scale()
    ref = helpers.reference_rows(model, names, batch, helpers.lm_sample_loss)
    for n in names:
        ts, gs, b = numpy_noise_scale(ref[n])
        assert out[n].trace_sigma == pytest.approx(ts, rel=1e-10)
        assert out[n].grad_norm_sq == pytest.approx(gs, rel=1e-10)
        assert out[n].b_simple == pytest.approx(b, rel=1e-9) if gs > 0 else math.isinf(out[n].b_simple)


def test_from_gram_refuses_non_square_and_non_finite_grams():
    """A NaN Gram matrix used to give b_simple=inf (read as 'noise dominates'), a (3, 5) one a negative
    trace, a 1-D one an IndexError; now a ValueError naming the source and what was expected."""
    with pytest.raises(ValueError, match=r"w: the Gram matrix holds NaN/Inf"):
        noise_scale_from_gram(torch.full((3, 3), float("nan")), source="w")
    with pytest.raises(ValueError, match=r"w: expected a square \(M, M\) Gram matrix, got shape \(3, 5\)"):
        noise_scale_from_gram(torch.ones(3, 5), source="w")
    with pytest.raises(ValueError, match=r"noise scale: expected a square .* got shape \(4,\)"):
        noise_scale_from_gram(torch.ones(4))
