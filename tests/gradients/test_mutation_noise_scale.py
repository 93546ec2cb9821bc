"""Gap found by mutation testing of ``noise_scale``: a float32 Gram matrix is summed in float64."""

from __future__ import annotations

import pytest
import torch

from spectral_lens.gradients import noise_scale_from_gram


def test_float32_gram_is_summed_in_float64():
    """``tr(Sigma)`` is a difference of two uncentred sums: summed in float32 it loses every digit
    when the mean gradient dominates; the result must equal that of the same entries in float64."""
    g = torch.Generator().manual_seed(0)
    rows = 100.0 + 1e-2 * torch.randn(64, 40, generator=g, dtype=torch.float64)  # |mean| / |noise| ~ 1e4
    k32 = (rows @ rows.T).to(torch.float32)
    got, ref = noise_scale_from_gram(k32), noise_scale_from_gram(k32.double())
    assert got.trace_sigma == pytest.approx(ref.trace_sigma, rel=1e-12)
    assert got.grad_norm_sq == pytest.approx(ref.grad_norm_sq, rel=1e-12)
    assert got.b_simple == pytest.approx(ref.b_simple, rel=1e-12)
