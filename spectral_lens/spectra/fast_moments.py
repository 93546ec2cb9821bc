"""The fast mode's chunk sums on CUDA: bf16 centred rows, fp32 accumulation on the tensor cores.

The product is one cuBLAS GEMM ``y^T y`` (bf16 operands, fp32 output); the lever is the pass
before it. :func:`center_cast` does it in one read of the chunk: a Triton kernel centres, zeroes
masked rows, rounds to bf16 and forms the column sums of the rounded rows
(``spectral_lens/spectra/_center_kernel.py``). Without Triton the torch ops do it in three passes
(subtract, masked fill, column-sum GEMV); both give bit-identical ``y``.

Measured (benchmarks/RESULTS.md): the kernel runs at 0.80 (H100) and 0.81-0.94 (H200) of a bf16
copy of the chunk, the torch passes at 0.38-0.39 (H100); on an H200 the two passes together run at
0.65-0.80 of the bare GEMM's rate (d = 768-1600), near this design's ceiling GEMM / (GEMM + copy).
Also measured and not used: forming only the lower block triangle of the product with batched GEMMs
(slower than the one GEMM at d = 768, 1280, 1600), and two one-kernel designs that centre in the
operand loads of a lower-triangle Triton product (0.21-0.22 and at best 0.32-0.40 of cuBLAS on an
H200; their code is in the history at 46487b6 and d66d186). Not available: Inductor's prologue
fusion. In torch 2.13 ``tuned_mm`` offers only the ATen (cuBLAS) choice when ``out_dtype`` is float32,
a bf16-output template would round ``S`` to bf16, and float32 operands run as TF32 at half the bf16
rate (benchmarks/RESULTS.md, eighth session).

Accuracy is that of the plain fast mode by construction: the same bf16 rounding of ``x - s``
(fp32 subtraction of a bf16-representable shift, one rounding), products exact in fp32 and fp32
accumulation; only the summation order inside the GEMM differs. Pure functions, no host syncs.
"""

from __future__ import annotations

import torch

from .._matmul import mm_fp32
from .._triton import triton_available

__all__ = ["fast_chunk_moments", "center_cast"]


def center_cast(
    x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None, *, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, colsum)``: ``y = bf16(x - s)`` (n, d) with rows where ``valid`` is False set to 0, and the
    float64 column sums of ``y`` as rounded. ``shift`` is float64, bf16-representable for bf16 ``x``
    (:func:`~spectral_lens.spectra.moments.representable_shift`), or the same values in bf16/fp32
    (:func:`~spectral_lens.spectra.moments.shift_dtype`; the accumulator passes these).

    ``use_triton=None`` uses the one-pass Triton kernel on CUDA when available; the torch fallback
    gives the same ``y`` bit for bit and column sums equal up to fp32 summation order.
    """
    n, d = x.shape
    if use_triton is None:
        use_triton = x.is_cuda and triton_available()
    if use_triton:
        try:
            from . import _center_kernel as kernel
        except ImportError as exc:  # asked for explicitly: name the extra, not a bare "No module named 'triton'"
            raise ImportError(
                f"center_cast(use_triton=True) needs Triton ({exc}): pip install 'spectral-lens[kernels]', "
                "or pass use_triton=None (the torch path where Triton is missing)"
            ) from exc

        if x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
        part = torch.empty(kernel.partial_rows(n), d, dtype=torch.float32, device=x.device)
        v = None if valid is None else valid.contiguous().view(torch.uint8)
        kernel.center_cast(x, shift, v, y, part)
        return y, part.sum(0, dtype=torch.float64)
    if x.dtype == torch.bfloat16:  # the shift is bf16-representable: native subtraction rounds once
        y = x - shift.to(torch.bfloat16)
    else:
        y = (x - shift.to(torch.float32)).to(torch.bfloat16)
    if valid is not None:
        y.masked_fill_(~valid.unsqueeze(-1), 0)
    if y.is_cuda:  # column sums on the tensor cores (fp32 accumulation)
        ones = torch.ones(1, n, dtype=torch.bfloat16, device=y.device)
        colsum = mm_fp32(ones, y).squeeze(0)
    else:
        colsum = y.float().sum(0)
    return y, colsum.to(torch.float64)


def fast_chunk_moments(
    x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None, *, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, S)`` of one chunk in the fast mode: ``m`` float64 (d,), ``S`` fp32 (d, d) symmetric (one
    GEMM forms all of it: forming only a triangle was measured slower, see the module docstring)."""
    if use_triton is None:
        use_triton = x.is_cuda and triton_available()
    y, m = center_cast(x, shift, valid, use_triton=use_triton)
    if not y.is_cuda:  # CPU (tests): no bf16 -> fp32 GEMM there; one exact fp32 copy of y, not one per operand
        y = y.float()
    return m, mm_fp32(y.t(), y)
