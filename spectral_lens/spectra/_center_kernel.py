"""Triton kernel for the fast mode's one pass over a chunk: centre, zero masked rows, round to bf16,
and per-block column sums of the rounded values (imported only when Triton is installed).

Each program reads ``TILES`` consecutive ``(BLOCK_R, BLOCK_C)`` tiles of ``x`` once, writes the bf16
tiles of ``y = x - s`` (rows where ``valid`` is False become 0, whatever they held, NaN included) and
one row of fp32 partial column sums of the *rounded* ``y`` (exactly what the product will see). The
partials, ``(cdiv(n, BLOCK_R * TILES), d)``, are reduced in float64 by the caller: deterministic, no
atomics. ``y`` is the same bit for bit whatever the launch shape; only the partials' grouping moves.
Replaces three passes of the torch path (subtract, masked fill, column-sum GEMV).
"""
# no `from __future__ import annotations` here: Triton 3.0's interpreter (torch 2.4's Triton) reads the
# string annotation "tl.constexpr" as no constexpr, and its kernels then fail (tools/check_floors.sh)

import triton
import triton.language as tl

BLOCK_R = 128
BLOCK_C = 128
NUM_WARPS = 8
TILES = 1  # row tiles per program (a loop); 1: one tile, as measured on the H200 and H100


@triton.jit
def _center_cast_kernel(
    x_ptr, shift_ptr, valid_ptr, y_ptr, part_ptr,
    n, d, stride_x, stride_y,
    HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):
    # each program covers TILES consecutive (BLOCK_R, BLOCK_C) tiles of one column block; the column
    # sums are accumulated elementwise across the tiles and reduced across rows once, at the end
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < d
    s = tl.load(shift_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # exact: the shift is fp32-representable
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for t in range(TILES):
        rows = (pid_r * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        inside = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
        y = x.to(tl.float32) - s[None, :]
        keep = inside
        if HAS_VALID:
            v = tl.load(valid_ptr + rows, mask=rmask, other=0)
            keep = keep & (v != 0)[:, None]
        y = tl.where(keep, y, 0.0).to(tl.bfloat16, fp_downcast_rounding="rtne")
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y, mask=inside)
        acc += y.to(tl.float32)
    part = tl.sum(acc, axis=0)
    tl.store(part_ptr + pid_r * d + cols, part, mask=cmask)


def partial_rows(n: int, block_r: int | None = None, tiles: int | None = None) -> int:
    """Rows of the partial column sums a launch over ``n`` rows writes (at least 1); ``None``: the
    module's launch constants, read at call time (a benchmark may set them)."""
    return max(1, triton.cdiv(n, (block_r or BLOCK_R) * (tiles or TILES)))


def center_cast(x, shift, valid, y, part, block_r: int | None = None, block_c: int | None = None,
                num_warps: int | None = None, tiles: int | None = None) -> None:
    """Launch over ``x`` (n, d) (row stride arbitrary, unit column stride) into ``y`` (n, d) bf16 and
    ``part`` (:func:`partial_rows`, d) fp32; ``shift`` (d,) float64, fp32 or bf16, fp32-representable; ``valid``
    (n,) uint8 or None. ``None`` launch settings take the module's constants at call time. Launch
    configuration: one 128 x 128 tile per program, 8 warps, measured on an H200 (0.81-0.94 of a
    bf16 copy of the chunk at d = 768-1600, 1-3% ahead of 64 x 128 with 4 warps in all six cases of one
    run; four other shapes 6-30% behind; benchmarks/RESULTS.md). On an H100 64 x 128 / 4 warps ran at
    0.80 of a copy with five other shapes within 5%."""
    n, d = x.shape
    block_r, block_c, num_warps, tiles = block_r or BLOCK_R, block_c or BLOCK_C, num_warps or NUM_WARPS, tiles or TILES
    grid = (partial_rows(n, block_r, tiles), triton.cdiv(d, block_c))
    _center_cast_kernel[grid](
        x, shift, valid if valid is not None else x, y, part,
        n, d, x.stride(0), y.stride(0),
        HAS_VALID=valid is not None, BLOCK_R=block_r, BLOCK_C=block_c, TILES=tiles, num_warps=num_warps,
    )
