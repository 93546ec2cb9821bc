"""The Triton kernels of the chunked head + loss (`spectral_lens/gradients/_ce_kernel.py`): on the
CPU through Triton's interpreter against float64 references and against the plain-PyTorch chunk
body; on a GPU against the plain-PyTorch body at GPT-2 sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_ce_interp_script.py")


def test_kernels_in_interpreter():
    """Logits offset by 300 (fp32, bf16) and by 1e4 (fp32): the row max exact, the log-sum-exp
    ``m + log s`` within 1e-7 of (|z|max + log V) of float64, the loss within 2^-21 of (|loss| + log V)
    whatever the offset (it is ``log s - (z_t - m)``, never rounded at the scale of ``m``), the softmax
    gradient within fp32 rounding of the exp argument (fp32) or one bf16 ulp (the interpreter truncates
    where the GPU rounds to nearest); the whole chunked loss with the kernels equals the plain-PyTorch
    body (ignored tokens give 0)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SPECTRAL_LENS_NO_TRITON", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    out, fused = json.loads(lines[-2]), json.loads(lines[-1])
    assert fused == {"torch.float32": True, "torch.bfloat16": True}  # one-launch forward == the two kernels
    assert len(out) == 13
    for key, r in out.items():
        if key.startswith("loss-"):
            assert r["ignored_zero"], key
            assert r["loss_err"] < 1e-5, (key, r)
            assert r["grad_err"] < (1e-5 if "float32" in key else 2.0**-6), (key, r)
            continue
        assert r["lse_err"] < 1e-7 and r["max_exact"], (key, r)
        assert r["loss_err"] < 2.0**-21, (key, r)
        # exp of an fp32 argument (z - m) - log s, up to ~50 in size: 50 * 2^-24 relative; bf16: one ulp (2^-7)
        assert r["g_err"] < (1e-5 if "float32" in key else 2.0**-7), (key, r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_grad", [False, True])  # input gradient formed in the forward / recomputed
@pytest.mark.parametrize("eps", [0.0, 0.1])  # label smoothing (the kernels' SMOOTH variant)
def test_kernels_match_torch_body_on_gpu(dtype, head_grad, eps, monkeypatch):
    from spectral_lens._triton import triton_available
    from spectral_lens.gradients import fused_head as fh
    from spectral_lens.gradients import linear_cross_entropy

    if not triton_available():
        pytest.skip("Triton not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 768, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(50304, 768, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_(head_grad)
    t = torch.randint(0, 50304, (3000,), device="cuda", generator=g)
    t[::7] = -100
    scale = torch.rand(3000, device="cuda", generator=g)
    res = {}
    for name in ("kernel", "torch"):
        if name == "torch":
            monkeypatch.setattr(fh, "_kernels", lambda hh, dt: None)
        loss = linear_cross_entropy(h, w, t, chunk_rows=700, label_smoothing=eps)
        gh = torch.autograd.grad((loss * scale).sum(), h)[0]
        res[name] = loss.detach().double(), gh.double()
    (l1, g1), (l2, g2) = res["kernel"], res["torch"]
    assert torch.all(l1[::7] == 0)
    assert (l1 - l2).abs().max() <= 1e-5 * (l2.abs().max() + 1)
    # bf16: the same fp32 math rounded once to bf16 by both (summation order inside the row may differ)
    assert (g1 - g2).abs().max() <= (2.0**-7 if dtype == torch.bfloat16 else 1e-5) * g2.abs().max()
