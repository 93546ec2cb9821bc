"""Diagnostics for the covariance hot path on CUDA: time each piece of a chunk update.

python benchmarks/diag_fast_path.py
Prints one JSON line per piece (ms and "useful" TFLOP/s = 2 N d^2 / time). These numbers chose the
implementation recorded in benchmarks/RESULTS.md (e.g. one GEMM rather than symmetric blocks for
bf16; native bf16 subtraction; column sums as a GEMV).
"""

from __future__ import annotations

import json

import torch

from bench_covariance import _timer  # same directory: run as `python benchmarks/diag_fast_path.py`
from spectral_lens.spectra.moments import chunk_moments, representable_shift, symmetric_product


def bench(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    return _timer(torch.device("cuda"))(fn, reps)


def main() -> None:
    for d in (768, 1280, 1600):
        n = 65536
        x = torch.randn(n, d, device="cuda").add_(5.0).bfloat16()
        x32 = x.float()
        shift = representable_shift(x[:1024].double().mean(0), "fast", torch.bfloat16)
        y = x - shift.bfloat16()
        y32 = x32 - shift.float()
        ones = torch.ones(1, n, dtype=torch.bfloat16, device="cuda")
        flops = 2.0 * n * d * d
        pieces = {
            "gemm_bf16_out_fp32": lambda: torch.mm(x.t(), x, out_dtype=torch.float32),
            "sub_native_bf16": lambda: x - shift.bfloat16(),
            "sub_mixed_into_bf16": lambda: torch.sub(x, shift.float(), out=torch.empty_like(x)),
            "colsum_reduce": lambda: y.sum(0, dtype=torch.float32),
            "colsum_gemv": lambda: torch.mm(ones, y, out_dtype=torch.float32),
            "chunk_moments_fast": lambda: chunk_moments(x, shift, "fast"),
            "gemm_fp32": lambda: y32.t() @ y32,
            "symmetric_fp32": lambda: symmetric_product(y32),
            "chunk_moments_exact": lambda: chunk_moments(x32, shift, "exact"),
        }
        torch.backends.cuda.matmul.allow_tf32 = False
        for name, fn in pieces.items():
            t = bench(fn)
            print(json.dumps({"d": d, "piece": name, "ms": round(t * 1e3, 4), "useful_tflops": round(flops / t / 1e12, 1)}), flush=True)


if __name__ == "__main__":
    main()
