"""Weight spectra against numpy SVD in float64; the Hill/Clauset MLE on synthetic power laws."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens import BandAlphaFitter
from spectral_lens.weights import (
    esd_alpha_from_rank_alpha,
    powerlaw_fit,
    rank_alpha_from_esd_alpha,
    select_parameters,
    stable_rank,
    weight_spectra,
    weight_spectrum,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(16, 24), "mlp": nn.Linear(24, 16)}) for _ in range(2)])
        self.conv = nn.Conv2d(3, 8, kernel_size=3)
        self.norm = nn.LayerNorm(16)


def test_weight_spectrum_matches_numpy_svd():
    torch.manual_seed(0)
    w = torch.randn(40, 70, dtype=torch.float32)
    spec = weight_spectrum(w, "w")
    ref = np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert spec.kind == "weight" and spec.dim == 40 and spec.n_rows == 40
    assert spec.metadata == {"shape": [40, 70], "matrix_shape": [40, 70]}
    # stable rank = ||W||_F^2 / ||W||_2^2
    fro2 = float((w.double() ** 2).sum())
    assert stable_rank(spec) == pytest.approx(fro2 / ref[0], rel=1e-12)


def test_conv_is_reshaped_and_vectors_are_rejected():
    conv = torch.randn(8, 3, 3, 3)
    spec = weight_spectrum(conv, "conv")
    ref = np.linalg.svd(conv.double().reshape(8, 27).numpy(), compute_uv=False) ** 2
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=1e-12)
    assert spec.metadata["matrix_shape"] == [8, 27]
    with pytest.raises(ValueError, match=r"bias: shape \(5,\) is not a matrix"):
        weight_spectrum(torch.ones(5), "bias")
    with pytest.raises(ValueError, match="NaN or Inf"):
        weight_spectrum(torch.full((3, 3), float("nan")), "bad")


def test_selection_by_name_glob_regex_callable():
    net = _Net()
    every = weight_spectra(net)
    assert list(every) == ["emb.weight", "blocks.0.attn.weight", "blocks.0.mlp.weight", "blocks.1.attn.weight",
                           "blocks.1.mlp.weight", "conv.weight"]  # 1-D params (biases, norm) skipped
    assert list(weight_spectra(net, "blocks.*.mlp.weight")) == ["blocks.0.mlp.weight", "blocks.1.mlp.weight"]
    assert list(weight_spectra(net, re.compile(r"blocks\.1\..*"))) == ["blocks.1.attn.weight", "blocks.1.mlp.weight"]
    assert list(weight_spectra(net, lambda n, p: p.shape[0] == 8)) == ["conv.weight"]
    assert list(weight_spectra(net, ["emb.weight", "conv.*"])) == ["emb.weight", "conv.weight"]
    with pytest.raises(ValueError, match="closest names.*blocks.0.attn.weight"):
        select_parameters(net, "blocks.0.atn.weight")
    with pytest.raises(ValueError, match="only parameters with < 2 dims"):
        select_parameters(net, "norm.*")


def test_mle_recovers_pareto_exponent_and_xmin():
    rng = np.random.default_rng(0)
    alpha, xmin = 2.5, 1.0
    tail = xmin * (1 - rng.random(4000)) ** (-1 / (alpha - 1))
    bulk = rng.uniform(0.05, xmin, 3000)  # not a power law: xmin selection must cut it off
    fit = powerlaw_fit(np.concatenate([tail, bulk]))
    assert fit.alpha == pytest.approx(alpha, abs=3 * fit.stderr + 0.02)
    assert 0.8 < fit.xmin < 1.5
    assert fit.n_total == 7000 and fit.ks_distance < 0.03
    fixed = powerlaw_fit(tail, xmin=1.0)
    assert fixed.xmin == 1.0 and fixed.n_tail == 4000
    assert fixed.alpha == pytest.approx(1 + 4000 / np.log(tail).sum())


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_esd_alpha_of_a_rank_power_law(a):
    lam = np.arange(1, 20001, dtype=np.float64) ** -a
    fit = powerlaw_fit(lam, xmin=lam[1999])  # the top 2000 eigenvalues
    assert fit.alpha == pytest.approx(esd_alpha_from_rank_alpha(a), rel=0.01)
    assert rank_alpha_from_esd_alpha(fit.alpha) == pytest.approx(a, rel=0.03)
    # and the band alpha of the same spectrum is a itself
    from spectral_lens import Spectrum

    band = BandAlphaFitter((100, 200)).fit(Spectrum(lam, n_rows=20000, dim=20000, kind="weight"))
    assert band.alpha == pytest.approx(a, rel=1e-9)


def test_powerlaw_fit_errors():
    with pytest.raises(ValueError, match="at least min_tail=10"):
        powerlaw_fit(np.ones(5))
    with pytest.raises(ValueError, match="degenerate"):
        powerlaw_fit(np.ones(50))
    with pytest.raises(ValueError, match="esd_alpha must be > 1"):
        rank_alpha_from_esd_alpha(0.9)
