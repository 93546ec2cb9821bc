"""Triton kernel: the fast mode's chunk sums in one pass, centring fused into the operand loads of a
lower-block-triangle product (imported only when Triton is installed).

Not used by the accumulator unless ``fast_moments.FUSED`` is on: it replaces the two-pass path (one
centring kernel, then one cuBLAS GEMM) only where a GPU measures it faster
(``benchmarks/bench_fused_gram.py``).

Each program owns one ``(BLOCK, BLOCK)`` tile ``(i, j)``, ``i >= j``, of the lower block triangle of
``S = y^T y`` and one slice of the rows ("split-K": the output is only d x d, so rows are split to
fill the GPU). Per ``BLOCK_K`` rows it loads the two column blocks of ``x``, centres them in fp32,
zeroes masked rows (whatever they hold, NaN included) and rounds to bf16 (round to nearest even):
exactly the ``y`` of the two-pass path. The product goes to the tensor cores with fp32 accumulation.
Diagonal tiles run as their own launch (one operand load, plus the column sums of the rounded rows);
the main loop has no branch and no row mask, so the compiler can pipeline it; the ragged last block
of rows runs once, masked, after the loop. Partial tiles, ``(splits, tiles, BLOCK, BLOCK)``, are
summed in a fixed order by a second small kernel that scatters them into ``S``: deterministic, no
atomics. About half of the GEMM's multiply-adds (tiles above the diagonal are never formed).

Accuracy is that of the two-pass path by construction: the same bf16 ``y``, exact products, fp32
sums in another order.

The previous fused kernel (removed at 6f9c662, 0.21 of cuBLAS on an H200) had a branch and row masks
inside its main loop; this one is built to avoid both. ``TRANS_A`` picks how the left operand reaches
the dot: 0 transposes the loaded (rows, cols) tile, 1 loads it transposed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: launch settings (module-level so a benchmark can sweep them; read at each call)
BLOCK = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3
TRANS_A = 0
PREFETCH = False  # pointer loads one block of rows ahead (register double buffering)
USE_TMA = False  # operand tiles through TMA descriptors (Hopper and later) instead of pointer loads
WAVES = 1  # programs per launch are aimed at this many waves over the device's SMs

_TILES: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}
_SMS: dict[torch.device, int] = {}
_LAST: dict[str, object] = {}  # the last launches' compiled kernels (a benchmark reads their registers and PTX)


@triton.jit
def _centred(src, r0, c0, rows, cols, s, stride_x, keep_rows, col_ok, HAS_VALID: tl.constexpr,
             MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, LOAD_T: tl.constexpr, USE_TMA: tl.constexpr):
    """bf16(x - s) of the tile (rows, cols), or its transpose when LOAD_T; rows outside ``keep_rows``
    (the ragged tail or masked rows) and columns past d are 0. ``src`` is ``x``'s pointer, or a TMA
    descriptor of (BLOCK_K, BLOCK) tiles when USE_TMA (out-of-range reads are 0, the shift there too)."""
    if USE_TMA:
        v = src.load([r0, c0]).to(tl.float32) - s[None, :]
        if MASK_ROWS or HAS_VALID:
            v = tl.where(keep_rows[:, None], v, 0.0)
        if LOAD_T:
            v = tl.trans(v)
    elif LOAD_T:
        ptrs = src + rows[None, :].to(tl.int64) * stride_x + cols[:, None]
        if MASK_ROWS:
            v = tl.load(ptrs, mask=keep_rows[None, :] & col_ok[:, None], other=0.0).to(tl.float32) - s[:, None]
        elif EVEN_D:
            v = tl.load(ptrs).to(tl.float32) - s[:, None]
        else:
            v = tl.load(ptrs, mask=col_ok[:, None], other=0.0).to(tl.float32) - s[:, None]
        if MASK_ROWS or HAS_VALID:
            v = tl.where(keep_rows[None, :], v, 0.0)
    else:
        ptrs = src + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
        if MASK_ROWS:
            v = tl.load(ptrs, mask=keep_rows[:, None] & col_ok[None, :], other=0.0).to(tl.float32) - s[None, :]
        elif EVEN_D:
            v = tl.load(ptrs).to(tl.float32) - s[None, :]
        else:
            v = tl.load(ptrs, mask=col_ok[None, :], other=0.0).to(tl.float32) - s[None, :]
        if MASK_ROWS or HAS_VALID:
            v = tl.where(keep_rows[:, None], v, 0.0)
    return v.to(tl.bfloat16, fp_downcast_rounding="rtne")


@triton.jit
def _raw(src, rows, cols, stride_x, col_ok, EVEN_D: tl.constexpr):
    """The (rows, cols) tile of x as stored (rows must be in range)."""
    ptrs = src + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=col_ok[None, :], other=0.0)


@triton.jit
def _centre(raw, s, keep_rows, MASK: tl.constexpr):
    v = raw.to(tl.float32) - s[None, :]
    if MASK:
        v = tl.where(keep_rows[:, None], v, 0.0)
    return v.to(tl.bfloat16, fp_downcast_rounding="rtne")


@triton.jit
def _step(acc, colsum, src, valid_ptr, k, stop, c0i, c0j, ci, cj, si, sj, mi, mj, stride_x,
          HAS_VALID: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, DIAG: tl.constexpr,
          TRANS_A: tl.constexpr, USE_TMA: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
          DOT_FP32: tl.constexpr):
    rows = k + tl.arange(0, BLOCK_K)
    keep = rows < stop
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + rows, mask=keep, other=0) != 0)
    b = _centred(src, k, c0j, rows, cj, sj, stride_x, keep, mj, HAS_VALID, MASK_ROWS, EVEN_D, False, USE_TMA)
    if TRANS_A == 1:
        at = _centred(src, k, c0i, rows, ci, si, stride_x, keep, mi, HAS_VALID, MASK_ROWS, EVEN_D, True, USE_TMA)
    elif DIAG:
        at = tl.trans(b)
    else:
        at = tl.trans(_centred(src, k, c0i, rows, ci, si, stride_x, keep, mi, HAS_VALID, MASK_ROWS, EVEN_D, False, USE_TMA))
    if DOT_FP32:  # Triton's CPU interpreter multiplies bf16 tiles as raw 16-bit integers
        acc = tl.dot(at.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(at, b, acc)
    if DIAG:
        colsum += tl.sum(b.to(tl.float32), axis=0)
    return acc, colsum


@triton.jit
def _gram_kernel(
    src, shift_ptr, valid_ptr, ti_ptr, tj_ptr, part_ptr, colsum_ptr,
    n, d, stride_x, rows_per_split, tiles,
    HAS_VALID: tl.constexpr, EVEN_D: tl.constexpr, DIAG: tl.constexpr, TRANS_A: tl.constexpr,
    USE_TMA: tl.constexpr, PREFETCH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
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
    full = start + ((stop - start) // BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    colsum = tl.zeros((BLOCK,), dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    if PREFETCH:  # pointer loads one block ahead into registers, so their latency hides behind the dot
        nb = _raw(src, tl.minimum(start + kk, n - 1), cj, stride_x, mj, EVEN_D)
        if DIAG:
            na = nb
        else:
            na = _raw(src, tl.minimum(start + kk, n - 1), ci, stride_x, mi, EVEN_D)
        for k in range(start, full, BLOCK_K):
            rb = nb
            ra = na
            ahead = tl.minimum(k + BLOCK_K + kk, n - 1)  # in range: the block after the last is never used
            nb = _raw(src, ahead, cj, stride_x, mj, EVEN_D)
            if DIAG:
                na = nb
            else:
                na = _raw(src, ahead, ci, stride_x, mi, EVEN_D)
            keep = kk < BLOCK_K
            if HAS_VALID:
                keep = tl.load(valid_ptr + k + kk) != 0
            b = _centre(rb, sj, keep, HAS_VALID)
            if DIAG:
                at = tl.trans(b)
            else:
                at = tl.trans(_centre(ra, si, keep, HAS_VALID))
            if DOT_FP32:
                acc = tl.dot(at.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(at, b, acc)
            if DIAG:
                colsum += tl.sum(b.to(tl.float32), axis=0)
    else:
        for k in range(start, full, BLOCK_K):
                    acc, colsum = _step(acc, colsum, src, valid_ptr, k, stop, ti * BLOCK, tj * BLOCK, ci, cj, si, sj, mi, mj,
                                    stride_x, HAS_VALID, False, EVEN_D, DIAG, TRANS_A, USE_TMA, BLOCK, BLOCK_K, DOT_FP32)
    if full < stop:  # the ragged last block of rows, masked
        acc, colsum = _step(acc, colsum, src, valid_ptr, full, stop, ti * BLOCK, tj * BLOCK, ci, cj, si, sj, mi, mj, stride_x,
                            HAS_VALID, True, EVEN_D, DIAG, TRANS_A, USE_TMA, BLOCK, BLOCK_K, DOT_FP32)
    r = tl.arange(0, BLOCK)
    out = part_ptr + (split.to(tl.int64) * tiles + tile) * BLOCK * BLOCK
    tl.store(out + r[:, None] * BLOCK + r[None, :], acc)
    if DIAG:
        tl.store(colsum_ptr + split.to(tl.int64) * d + cj, colsum, mask=mj)


@triton.jit
def _reduce_kernel(part_ptr, ti_ptr, tj_ptr, s_ptr, d, splits, tiles, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """S[tile] = sum over splits of the partial tiles, in split order; ROWS rows of a tile per program."""
    tile = tl.program_id(0)
    piece = tl.program_id(1)
    ti = tl.load(ti_ptr + tile)
    tj = tl.load(tj_ptr + tile)
    r = piece * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    offs = r[:, None] * BLOCK + c[None, :]
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    ptrs = part_ptr + tile.to(tl.int64) * BLOCK * BLOCK + offs
    for _ in range(0, splits):
        acc += tl.load(ptrs)
        ptrs += tiles * BLOCK * BLOCK
    gi = ti * BLOCK + r
    gj = tj * BLOCK + c
    tl.store(s_ptr + gi[:, None].to(tl.int64) * d + gj[None, :], acc, mask=(gi < d)[:, None] & (gj < d)[None, :])


def _tile_lists(blocks: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(di, dj, li, lj, ai, aj)``: the (i, j) block indices (int32, on ``device``) of the diagonal
    tiles, of the strictly lower ones, and of all tiles in partial-buffer order (diagonal first)."""
    key = (blocks, device)
    if key not in _TILES:
        low = torch.tril_indices(blocks, blocks, offset=-1).to(torch.int32)
        diag = torch.arange(blocks, dtype=torch.int32)
        ai, aj = torch.cat([diag, low[0]]), torch.cat([diag, low[1]])
        _TILES[key] = tuple(t.contiguous().to(device) for t in (diag, diag, low[0], low[1], ai, aj))
    return _TILES[key]


def _sm_count(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _SMS[device]


def _tma_allocator() -> None:
    """Triton asks for a global scratch allocator before launching kernels with TMA descriptors."""
    if not _LAST.get("allocator"):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _LAST["allocator"] = True


def choose_splits(tiles: int, n: int, sms: int, block_k: int, waves: int = 1) -> int:
    """Row splits for ``tiles`` output tiles: the count whose programs best fill ``waves`` waves of
    ``sms`` programs (one per SM), with at least 4 blocks of rows per split. Pure function."""
    most = max(1, n // (4 * block_k))
    best, best_fill = 1, 0.0
    for s in range(1, min(most, max(1, waves * sms // max(1, tiles)) + 1) + 1):
        programs = tiles * s
        fill = programs / (-(-programs // sms) * sms)
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def gram_center(x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, S)`` of one chunk: ``m`` float64 (d,), the column sums of ``y = bf16(x - s)`` (masked rows
    0), and ``S`` fp32 (d, d) with ``y^T y`` in its lower block triangle (diagonal blocks complete) and
    zeros above it: read only its lower triangle. ``x`` (n, d) with unit column stride, any float
    dtype; ``shift`` (d,) fp32-representable; ``valid`` (n,) bool or None."""
    block, block_k = BLOCK, BLOCK_K
    n, d = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    blocks = triton.cdiv(d, block)
    di, dj, li, lj, ai, aj = _tile_lists(blocks, x.device)
    tiles = blocks * (blocks + 1) // 2
    splits = choose_splits(tiles, n, _sm_count(x.device), block_k, WAVES)
    rows_per_split = triton.cdiv(triton.cdiv(max(n, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(n, 1), rows_per_split)
    part = torch.empty(splits, tiles, block, block, dtype=torch.float32, device=x.device)
    colsum = torch.empty(splits, d, dtype=torch.float32, device=x.device)
    v = None if valid is None else valid.contiguous().view(torch.uint8)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    src = x
    if USE_TMA and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if not interp:
            _tma_allocator()
        src = TensorDescriptor.from_tensor(x, [block_k, block])
    common = dict(HAS_VALID=v is not None, EVEN_D=d % block == 0, TRANS_A=TRANS_A, USE_TMA=src is not x, PREFETCH=PREFETCH and src is x, BLOCK=block,
                  BLOCK_K=block_k, DOT_FP32=interp, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    # diagonal tiles first in the partial buffer (tile ids 0..blocks-1), then the strictly lower ones
    _LAST["diag"] = _gram_kernel[(blocks, splits)](src, shift, v if v is not None else x, di, dj, part, colsum,
                                   n, d, x.stride(0), rows_per_split, tiles, DIAG=True, **common)
    if blocks > 1:
        lower = part[:, blocks:]
        _LAST["lower"] = _gram_kernel[(tiles - blocks, splits)](src, shift, v if v is not None else x, li, lj, lower, colsum,
                                               n, d, x.stride(0), rows_per_split, tiles, DIAG=False, **common)
    s = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    rows = min(32, block)
    _reduce_kernel[(tiles, block // rows)](part, ai, aj, s, d, splits, tiles, BLOCK=block, ROWS=rows)
    return colsum.sum(0, dtype=torch.float64), s
