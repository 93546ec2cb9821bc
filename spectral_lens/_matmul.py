"""Matrix products with a float32 result, whatever the operands' precision and the autocast state.

For bf16/fp16 operands on CUDA, cuBLAS forms the products on the tensor cores and accumulates them in
float32. ``torch.mm``/``torch.bmm`` with ``out_dtype=torch.float32`` (torch >= 2.8) return that
float32 result without rounding it to the operands' dtype. Elsewhere (CPU, older torch, mixed or
float32 operands) the operands are converted to float32 first. That conversion is exact for half
types, so the products are exact either way and only the summation order differs.
"""

from __future__ import annotations

import torch

__all__ = ["mm_fp32", "bmm_fp32"]

#: torch has the ``out_dtype`` overloads of ``mm`` and ``bmm`` (their kernels are CUDA-only).
HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and "dtype" in torch.ops.aten.bmm.overloads()

_HALF = (torch.bfloat16, torch.float16)


def _half_on_cuda(a: torch.Tensor, b: torch.Tensor) -> bool:
    return HAS_OUT_DTYPE and a.is_cuda and a.dtype == b.dtype and a.dtype in _HALF


def _product_fp32(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``op(a, b)`` (``torch.mm`` or ``torch.bmm``) in float32, float64 if an operand is float64."""
    if torch.is_autocast_enabled(a.device.type):  # entering the context costs ~7 us: only when needed
        with torch.autocast(a.device.type, enabled=False):
            return _product_fp32(op, a, b)
    if _half_on_cuda(a, b):
        return op(a, b, out_dtype=torch.float32)
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return op(a.to(dt), b.to(dt))


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) in float32 (float64 if either operand is float64), autocast off."""
    return _product_fp32(torch.mm, a, b)


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` (3-D) in float32 (float64 if either operand is float64), autocast off."""
    return _product_fp32(torch.bmm, a, b)
