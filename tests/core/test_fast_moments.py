"""The CUDA fast mode's pieces, checked on the CPU against float64: the centring pass (torch path;
the Triton kernel through Triton's CPU interpreter) and the chunk sums against exact float64 sums of
the same bf16-rounded rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spectral_lens.spectra.fast_moments import center_cast, fast_chunk_moments
from spectral_lens.spectra.moments import representable_shift

from support.data import rows_with_spectrum

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_center_cast_torch_path(dtype, masked):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rows_with_spectrum(2000, np.arange(1, 97.0) ** -2, 1e3, rng)).to(dtype)
    valid = torch.from_numpy(rng.random(2000) > 0.4) if masked else None
    if masked:
        x[~valid] = float("nan")  # masked rows may hold anything
    keep = valid if masked else torch.ones(2000, dtype=torch.bool)
    shift = representable_shift(x[keep][:64].double().mean(0), "fast", dtype)
    y, colsum = center_cast(x, shift, valid, use_triton=False)
    want = (x.double() - shift).float().bfloat16()  # fp32 subtraction (exact here), one rounding
    want[~keep] = 0
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    assert colsum.dtype == torch.float64
    assert torch.allclose(colsum, y.double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_chunk_moments_against_float64(seed):
    """Large mean offset, spectrum over six decades: the fast sums equal the float64 sums of the same
    bf16-rounded centred rows up to fp32 accumulation."""
    rng = np.random.default_rng(seed)
    d = 96
    x = torch.from_numpy(rows_with_spectrum(5000, np.logspace(0, -6, d), 50.0, rng)).bfloat16()
    valid = torch.from_numpy(rng.random(5000) > 0.2)
    shift = representable_shift(x[:1024].double().mean(0), "fast", torch.bfloat16)
    m, s = fast_chunk_moments(x, shift, valid, use_triton=False)
    y = (x.double() - shift).float().bfloat16().double()
    y[~valid] = 0
    ref_s, ref_m = y.t() @ y, y.sum(0)
    assert s.dtype == torch.float32 and m.dtype == torch.float64
    assert torch.equal(s, s.t())  # lower_only=False: symmetric
    assert torch.allclose(s.double(), ref_s, rtol=0, atol=1e-6 * float(ref_s.diagonal().max()))
    assert torch.allclose(m, ref_m, rtol=0, atol=1e-6 * float(ref_m.abs().max() + 1))


_INTERPRET = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
sys.path.insert(0, sys.argv[1])
from spectral_lens.spectra.fast_moments import center_cast
out = []
g = torch.Generator().manual_seed(0)
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for masked in (False, True):
        for n, d in ((1, 8), (65, 130), (300, 200)):
            base = torch.randn(n, d + 5, generator=g) * 3 + 1e3
            x = base[:, 5:].to(dtype)  # rows strided, storage offset
            valid = (torch.rand(n, generator=g) > 0.3) if masked else None
            if masked:
                x[~valid] = float("nan")
            shift = x.double().nan_to_num().mean(0).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32).double()
            y1, c1 = center_cast(x, shift, valid, use_triton=False)
            y2, c2 = center_cast(x, shift, valid, use_triton=True)
            # the accumulator passes the shift in the dtype it is subtracted in (shift_dtype), not float64
            y3, c3 = center_cast(x, shift.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32), valid,
                                 use_triton=True)
            # the looped launch (several row tiles per program, fewer partials): the same y bit for bit
            from spectral_lens.spectra import _center_kernel as kernel
            xs = x if x.stride(1) == 1 else x.contiguous()
            y4 = torch.empty(n, d, dtype=torch.bfloat16)
            part = torch.empty(kernel.partial_rows(n, 32, 3), d)
            kernel.center_cast(xs, shift, None if valid is None else valid.view(torch.uint8), y4, part,
                               block_r=32, block_c=64, num_warps=4, tiles=3)
            c4 = part.sum(0, dtype=torch.float64)
            z = x.float() - shift.float()
            if masked:
                z[~valid] = 0
            # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: within 1 ulp
            ulp = z.abs().clamp_min(1e-30) * 2.0 ** -7
            out.append(dict(dtype=str(dtype), masked=masked, n=n, d=d,
                            bit_equal=bool(torch.equal(y1, y2)),
                            looped_same_y=bool(torch.equal(y2, y4)), partials=part.shape[0],
                            looped_colsum_err=float((c4 - y4.double().sum(0)).abs().max() / (y4.double().abs().sum(0).max() + 1)),
                            same_with_low_precision_shift=bool(torch.equal(y2, y3) and torch.equal(c2, c3)),
                            within_ulp=bool(((y2.float() - z).abs() <= ulp).all()),
                            finite=bool(torch.isfinite(y2.float()).all()),
                            colsum_err=float((c2 - y2.double().sum(0)).abs().max() / (y2.double().abs().sum(0).max() + 1))))
print(json.dumps(out))
"""


def _interpret(script: str) -> list[dict]:
    """Run ``script`` in a subprocess with Triton's CPU interpreter on; the JSON rows it prints last."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SPECTRAL_LENS_NO_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernel_in_interpreter():
    """The Triton kernel (run by Triton's CPU interpreter) against the torch path: bf16 input bit for
    bit; fp32/fp16 input within one bf16 ulp (the interpreter truncates where the GPU rounds); masked
    NaN rows zeroed; column sums of the rounded values; the looped launch (3 row tiles per program,
    32 x 64 tiles, 4 warps) writes the same ``y`` and the fewer partials sum to the same column sums. Bit-equality for every input dtype is checked
    on a GPU (tests/core/test_cuda.py)."""
    rows = _interpret(_INTERPRET)
    assert len(rows) == 18
    for r in rows:
        assert r["finite"] and r["within_ulp"] and r["same_with_low_precision_shift"], r
        assert r["colsum_err"] < 1e-6, r
        assert r["looped_same_y"] and r["looped_colsum_err"] < 1e-6, r
        assert r["partials"] == max(1, -(-r["n"] // 96)), r  # 3 tiles of 32 rows per program
        if r["dtype"] == "torch.bfloat16":
            assert r["bit_equal"], r
