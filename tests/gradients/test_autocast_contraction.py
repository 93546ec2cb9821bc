"""The per-sample contraction has a float32 result under autocast (it used to be rounded to bf16)."""

from __future__ import annotations

import pytest
import torch

from spectral_lens._matmul import bmm_fp32, mm_fp32
from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients.linear import linear_per_sample_grad
from support.models import TinyGPT, lm_batch


def _bf16(*shape, scale=1.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(torch.bfloat16)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_linear_contraction_under_autocast_matches_float64(offset):
    x, dy = _bf16(3, 40, 8, offset=offset), _bf16(3, 40, 5, scale=1e-3, seed=1)
    ref = torch.einsum("mto,mti->moi", dy.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = linear_per_sample_grad(torch.nn.Linear(8, 5), "weight", x, dy)
        b = linear_per_sample_grad(torch.nn.Linear(8, 5), "bias", x, dy)
    assert g.dtype == b.dtype == torch.float32
    assert float((g.double() - ref).abs().max() / ref.abs().max()) < 1e-6  # a bf16 result: ~4e-3
    assert float((b.double() - dy.double().sum(1)).abs().max()) < 1e-6 * float(dy.double().abs().sum(1).max())


def test_probe_rows_under_autocast_are_not_rounded_to_bf16():
    torch.manual_seed(0)
    model = TinyGPT()
    probe = PerSampleGradientProbe(model, "transformer.h.1.attn.c_proj.weight", autocast_dtype=torch.bfloat16,
                                   keep_matrix=True)
    g = probe.update(lm_batch(m=4)).matrix()
    assert g.dtype == torch.float32
    assert bool((g != g.to(torch.bfloat16).float()).any())


@pytest.mark.parametrize("fn, shape_a, shape_b", [(mm_fp32, (6, 7), (7, 3)), (bmm_fp32, (2, 6, 7), (2, 7, 3))])
def test_fp32_products_of_half_operands(fn, shape_a, shape_b):
    a, b = _bf16(*shape_a), _bf16(*shape_b, seed=1)
    mm = torch.mm if fn is mm_fp32 else torch.bmm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, mm(a.float(), b.float()))
    assert fn(a, b.double()).dtype == torch.float64
