"""The ``transformers`` ``Conv1D`` fast path: registered by class name (no import at import time),
exact against the loop engine in float64, weight layout (in, out) respected."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spectral_lens.gradients import FAST_PATHS_BY_NAME, PerSampleGradientProbe, conv1d_per_sample_grad, fast_path_for

transformers = pytest.importorskip("transformers")


@pytest.mark.slow  # the fast tier checks this in tests/core/test_packaging.py::test_import_loads_no_optional_or_heavy_package
def test_importing_spectral_lens_does_not_import_transformers():
    code = "import sys, spectral_lens, spectral_lens.gradients; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_conv1d_is_found_by_name_and_subclasses_are_not():
    from transformers.pytorch_utils import Conv1D

    assert ("transformers.pytorch_utils", "Conv1D") in FAST_PATHS_BY_NAME
    conv = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs: weight (3, 5)
    assert conv.weight.shape == (3, 5)
    assert fast_path_for(conv, "weight").per_sample_grad is conv1d_per_sample_grad
    assert fast_path_for(conv, "bias") is not None

    class Custom(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2

    assert fast_path_for(Custom(5, 3), "weight") is None


def test_conv1d_rows_equal_autograd_per_sample():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 3).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64) + 100.0  # large offset: no cancellation in the contraction
    y = conv(x)
    dy = torch.randn_like(y)
    got_w = conv1d_per_sample_grad(conv, "weight", x, dy)
    got_b = conv1d_per_sample_grad(conv, "bias", x, dy)
    for m in range(4):
        gw, gb = torch.autograd.grad((conv(x[m : m + 1]) * dy[m : m + 1]).sum(), [conv.weight, conv.bias])
        torch.testing.assert_close(got_w[m], gw, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(got_b[m], gb, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("param", ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.bias",
                                   "transformer.h.0.attn.c_proj.weight"])
def test_gpt2_fast_path_rows_equal_loop_engine(param):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 40, (5, 10))
    batch = {"input_ids": ids, "labels": ids}
    fast = PerSampleGradientProbe(model, param, keep_matrix=True, chunk_size=3).update(batch)
    loop = PerSampleGradientProbe(model, param, engine="loop", keep_matrix=True).update(batch)
    assert fast.engines_[param] == "fast" and loop.engines_[param] == "loop"
    g_fast, g_loop = fast.matrix(), loop.matrix()
    assert g_fast.shape == (5, model.get_parameter(param).numel())
    torch.testing.assert_close(g_fast, g_loop, rtol=1e-10, atol=1e-12 * float(g_loop.abs().max()))
