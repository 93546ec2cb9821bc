"""The fast mode's chunk sums on CUDA: bf16 centred rows, fp32 accumulation on the tensor cores.

Two levers over the plain ``(x - s)^T (x - s)`` GEMM plus separate passes:

* **One pass over the chunk** (:func:`center_cast`): a Triton kernel centres, zeroes masked rows,
  rounds to bf16 and forms the column sums of the rounded rows in the same read
  (``spectral_lens/spectra/_center_kernel.py``). Without Triton the torch ops do it in three passes
  (subtract, masked fill, column-sum GEMV); both give bit-identical ``y``.
* **Only the lower block triangle** (:func:`lower_gram`): split the columns into ``k`` equal blocks
  and form the ``k (k + 1) / 2`` blocks on and below the diagonal, one batched GEMM per block
  diagonal (``k`` launches, ``(k + 1) / (2 k)`` of the multiply-adds).

Accuracy is that of the plain fast mode by construction: the same bf16 rounding of ``x - s``
(fp32 subtraction of a bf16-representable shift, one rounding), products exact in fp32 and fp32
accumulation; only the summation order inside the GEMM differs. Pure functions, no host syncs.
"""

from __future__ import annotations

import os

import torch

__all__ = ["fast_chunk_moments", "center_cast", "lower_gram", "valid_blocks", "default_blocks", "triton_available"]

_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether the Triton centring kernel can be used (Triton importable; ``SPECTRAL_LENS_NO_TRITON``
    unset). Checked once."""
    global _TRITON
    if _TRITON is None:
        if os.environ.get("SPECTRAL_LENS_NO_TRITON"):
            _TRITON = False
        else:
            try:
                from . import _center_kernel  # noqa: F401
                _TRITON = True
            except Exception:  # not installed, or no usable backend
                _TRITON = False
    return _TRITON


def valid_blocks(d: int, k: int) -> int:
    """The largest ``k' <= k`` that splits ``d`` into ``k'`` equal blocks of a multiple of 8 columns
    (16-byte aligned bf16 operands), or 1."""
    for kk in range(max(1, k), 1, -1):
        if d % (8 * kk) == 0:
            return kk
    return 1


def default_blocks(d: int) -> int:
    """Column blocks for ``d``: one GEMM below 1024 columns, else the lower triangle of a 2 x 2 split."""
    return valid_blocks(d, 1 if d < 1024 else 2)


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.mm(a, b, out_dtype=out_dtype) if a.dtype != out_dtype else a @ b


def _bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.bmm(a, b, out_dtype=out_dtype) if a.dtype != out_dtype else torch.bmm(a, b)


def lower_gram(y: torch.Tensor, blocks: int = 1, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y^T y`` (d, d) in ``out_dtype`` (fp32 for bf16 ``y``, else ``y``'s dtype), valid in its lower
    triangle; the strict upper block triangle is zero when ``blocks > 1``.

    ``blocks`` must split ``d`` into equal blocks (see :func:`valid_blocks`). Block diagonal ``j``
    (blocks ``(i + j, i)``) is one ``bmm`` over strided views of ``y``: no copy of the operands.
    """
    n, d = y.shape
    out_dtype = out_dtype or (torch.float32 if y.dtype in (torch.bfloat16, torch.float16) else y.dtype)
    k = int(blocks)
    if k <= 1:
        return _mm(y.t(), y, out_dtype)
    if d % k:
        raise ValueError(f"lower_gram: {k} blocks do not split d = {d} evenly")
    h = d // k
    ys = y.stride(0)
    out = torch.zeros(d, d, dtype=out_dtype, device=y.device)
    for j in range(k):
        count = k - j
        left = y.as_strided((count, h, n), (h, 1, ys), y.storage_offset() + j * h)  # (y_{i+j})^T
        right = y.as_strided((count, n, h), (h, ys, 1), y.storage_offset())  # y_i
        band = _bmm(left, right, out_dtype)
        out.as_strided((count, h, h), (h * (d + 1), d, 1), j * h * d).copy_(band)
    return out


def center_cast(
    x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None, *, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, colsum)``: ``y = bf16(x - s)`` (n, d) with rows where ``valid`` is False set to 0, and the
    float64 column sums of ``y`` as rounded. ``shift`` is float64, bf16-representable for bf16 ``x``
    (:func:`~spectral_lens.spectra.moments.representable_shift`).

    ``use_triton=None`` uses the one-pass Triton kernel on CUDA when available; the torch fallback
    gives the same ``y`` bit for bit and column sums equal up to fp32 summation order.
    """
    n, d = x.shape
    if use_triton is None:
        use_triton = x.is_cuda and triton_available()
    if use_triton:
        from . import _center_kernel as kernel

        if x.stride(1) != 1:
            x = x.contiguous()
        y = torch.empty(n, d, dtype=torch.bfloat16, device=x.device)
        part = torch.empty(max(1, -(-n // kernel.BLOCK_R)), d, dtype=torch.float32, device=x.device)
        v = None if valid is None else valid.contiguous().view(torch.uint8)
        kernel.center_cast(x, shift.to(torch.float32), v, y, part)
        return y, part.sum(0, dtype=torch.float64)
    if x.dtype == torch.bfloat16:  # the shift is bf16-representable: native subtraction rounds once
        y = x - shift.to(torch.bfloat16)
    else:
        y = (x - shift.to(torch.float32)).to(torch.bfloat16)
    if valid is not None:
        y.masked_fill_(~valid.unsqueeze(-1), 0)
    if y.is_cuda:  # column sums on the tensor cores (fp32 accumulation)
        ones = torch.ones(1, n, dtype=torch.bfloat16, device=y.device)
        colsum = torch.mm(ones, y, out_dtype=torch.float32).squeeze(0)
    else:
        colsum = y.float().sum(0)
    return y, colsum.to(torch.float64)


def fast_chunk_moments(
    x: torch.Tensor,
    shift: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    lower_only: bool = False,
    blocks: int | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, S)`` of one chunk in the fast mode: ``m`` float64 (d,), ``S`` fp32 (d, d).

    ``S`` is symmetric unless ``lower_only`` (then only its lower triangle is meaningful).
    ``blocks=None`` picks :func:`default_blocks`; other values are rounded down to a valid split.
    """
    y, m = center_cast(x, shift, valid, use_triton=use_triton)
    d = y.shape[1]
    k = valid_blocks(d, default_blocks(d) if blocks is None else blocks)
    if y.is_cuda:
        s = lower_gram(y, k)
    else:  # CPU (tests): no bf16 -> fp32 GEMM kernel there; the fp32 product of the bf16 values is exact per term
        s = lower_gram(y.float(), k)
    if k > 1 and not lower_only:
        low = s.tril()
        s = low + low.tril(-1).t()
    return m, s
