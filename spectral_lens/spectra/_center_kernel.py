"""Triton kernel for the fast mode's one pass over a chunk: centre, zero masked rows, round to bf16,
and per-block column sums of the rounded values (imported only when Triton is installed).

Each program reads a ``(BLOCK_R, BLOCK_C)`` tile of ``x`` once, writes the bf16 tile of
``y = x - s`` (rows where ``valid`` is False become 0, whatever they held, NaN included) and one
row of fp32 partial column sums of the *rounded* ``y`` (exactly what the product will see). The
partials, ``(cdiv(n, BLOCK_R), d)``, are reduced in float64 by the caller: deterministic, no atomics.
Replaces three passes of the torch path (subtract, masked fill, column-sum GEMV).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_R = 128
BLOCK_C = 128
NUM_WARPS = 8


@triton.jit
def _center_cast_kernel(
    x_ptr, shift_ptr, valid_ptr, y_ptr, part_ptr,
    n, d, stride_x, stride_y,
    HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n
    cmask = cols < d
    inside = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
    s = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # exact: the shift is fp32-representable
    y = x.to(tl.float32) - s[None, :]
    keep = inside
    if HAS_VALID:
        v = tl.load(valid_ptr + rows, mask=rmask, other=0)
        keep = keep & (v != 0)[:, None]
    y = tl.where(keep, y, 0.0).to(tl.bfloat16, fp_downcast_rounding="rtne")
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y, mask=inside)
    part = tl.sum(y.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_r * d + cols, part, mask=cmask)


def center_cast(x, shift, valid, y, part, block_r: int = BLOCK_R, block_c: int = BLOCK_C, num_warps: int = NUM_WARPS) -> None:
    """Launch over ``x`` (n, d) (row stride arbitrary, unit column stride) into ``y`` (n, d) bf16 and
    ``part`` (cdiv(n, block_r), d) fp32; ``shift`` (d,) float64, fp32 or bf16, fp32-representable; ``valid``
    (n,) uint8 or None. Launch configuration: 128 x 128, 8 warps, measured on an H200 (0.81-0.94 of a
    bf16 copy of the chunk at d = 768-1600, 1-3% ahead of 64 x 128 with 4 warps in all six cases of one
    run; four other shapes 6-30% behind; benchmarks/RESULTS.md). On an H100 64 x 128 / 4 warps ran at
    0.80 of a copy with five other shapes within 5%."""
    n, d = x.shape
    grid = (triton.cdiv(n, block_r), triton.cdiv(d, block_c))
    _center_cast_kernel[grid](
        x, shift, valid if valid is not None else x, y, part,
        n, d, x.stride(0), y.stride(0),
        HAS_VALID=valid is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
