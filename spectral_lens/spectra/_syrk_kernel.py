"""Experimental Triton kernel: the fast mode's chunk sums in one pass, the centring fused into the
operand loads of a lower-triangle product (imported only when Triton is installed).

Not used by the accumulator yet. ``benchmarks/bench_covariance.py --fast-variants`` measures it as
``acc_fused`` / ``gram_fused`` beside the current path: a separate centring kernel, then one cuBLAS
GEMM. That path reached 0.55-0.61 of the bare bf16 GEMM at d = 1280 / 1600 on an H100, against a
ceiling of 0.57-0.71. This kernel should replace it only where it measures faster.

Each program owns one ``(BLOCK, BLOCK)`` tile ``(i, j)``, ``i >= j``, of the lower block triangle of
``S = y^T y`` and one slice of the rows ("split-K": the output is only d x d, so the rows are split
to fill the GPU). For each ``BLOCK_K`` rows it loads the two column blocks of ``x``, centres them in
fp32, zeroes masked rows (whatever they hold, NaN included) and rounds them to bf16 (round to
nearest even). That is exactly the ``y`` the two-pass path forms. Then it adds their product on the
tensor cores with fp32 accumulation. The diagonal tiles also sum their rounded columns into ``m``.
Each split writes its own partial tiles, and the caller reduces them: the result is deterministic,
with no atomics. It forms about half of the GEMM's multiply-adds: the tiles above the diagonal are
never computed. The accuracy is that of the two-pass path: the same bf16 ``y``, exact products and
fp32 sums, in another summation order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3

_TILES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # lower tile indices
_PROGRAMS: dict[torch.device, int] = {}  # programs that fill the device (2 per SM)


@triton.jit
def _syrk_center_kernel(
    x_ptr, shift_ptr, valid_ptr, ti_ptr, tj_ptr, out_ptr, colsum_ptr,
    n, d, stride_x, rows_per_split,
    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(ti_ptr + tile)
    tj = tl.load(tj_ptr + tile)
    ci = ti * BLOCK + tl.arange(0, BLOCK)
    cj = tj * BLOCK + tl.arange(0, BLOCK)
    mi = ci < d
    mj = cj < d
    si = tl.load(shift_ptr + ci, mask=mi, other=0.0).to(tl.float32)  # exact: fp32-representable
    sj = tl.load(shift_ptr + cj, mask=mj, other=0.0).to(tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, n)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    colsum = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(start, stop, BLOCK_K):
        rows = k + tl.arange(0, BLOCK_K)
        keep = rows < stop
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + rows, mask=keep, other=0) != 0)
        base = x_ptr + rows[:, None].to(tl.int64) * stride_x
        ka = keep[:, None] & mi[None, :]
        kb = keep[:, None] & mj[None, :]
        a = tl.load(base + ci[None, :], mask=ka, other=0.0).to(tl.float32)
        b = tl.load(base + cj[None, :], mask=kb, other=0.0).to(tl.float32)
        a = tl.where(ka, a - si[None, :], 0.0).to(tl.bfloat16, fp_downcast_rounding="rtne")
        b = tl.where(kb, b - sj[None, :], 0.0).to(tl.bfloat16, fp_downcast_rounding="rtne")
        if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
        if ti == tj:
            colsum += tl.sum(a.to(tl.float32), axis=0)
    part = out_ptr + split.to(tl.int64) * d * d
    tl.store(part + ci[:, None].to(tl.int64) * d + cj[None, :], acc, mask=mi[:, None] & mj[None, :])
    if ti == tj:
        tl.store(colsum_ptr + split * d + ci, colsum, mask=mi)


def _lower_tiles(blocks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (blocks, device)
    if key not in _TILES:
        ij = torch.tril_indices(blocks, blocks, device=device).to(torch.int32)
        _TILES[key] = (ij[0].contiguous(), ij[1].contiguous())
    return _TILES[key]


def _programs(device: torch.device) -> int:
    if device not in _PROGRAMS:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _PROGRAMS[device] = 2 * sms
    return _PROGRAMS[device]


def syrk_center(
    x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, S)`` of one chunk: ``m`` float64 (d,), the column sums of ``y = bf16(x - s)`` (masked rows
    0), and ``S`` fp32 (d, d) with ``y^T y`` in its lower triangle (diagonal included) and zeros above
    the diagonal blocks (the strict upper triangle is not the product: use it as ``lower_only``).
    ``x`` (n, d) any float dtype with unit column stride; ``shift`` (d,) fp32-representable (float64,
    fp32 or bf16); ``valid`` (n,) bool or None. Tile sizes and launch settings: the module's
    ``BLOCK``, ``BLOCK_K``, ``NUM_WARPS``, ``NUM_STAGES`` (read at each call)."""
    block, block_k = BLOCK, BLOCK_K
    n, d = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    blocks = triton.cdiv(d, block)
    ti, tj = _lower_tiles(blocks, x.device)
    splits = max(1, min(triton.cdiv(_programs(x.device), ti.numel()), triton.cdiv(max(n, 1), block_k)))
    rows_per_split = triton.cdiv(triton.cdiv(max(n, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(n, 1), rows_per_split)
    out = torch.zeros(splits, d, d, dtype=torch.float32, device=x.device)
    colsum = torch.zeros(splits, d, dtype=torch.float32, device=x.device)
    v = None if valid is None else valid.contiguous().view(torch.uint8)
    _syrk_center_kernel[(ti.numel(), splits)](
        x, shift, v if v is not None else x, ti, tj, out, colsum,
        n, d, x.stride(0), rows_per_split,
        HAS_VALID=v is not None, BLOCK=block, BLOCK_K=block_k, DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    s = out[0] if splits == 1 else out.sum(0)
    return colsum.sum(0, dtype=torch.float64), s
