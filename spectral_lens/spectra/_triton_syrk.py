"""Fused CUDA kernel for the fast mode: ``sum (x - s)(x - s)^T`` with bf16 tensor-core products.

One pass over the rows: each program loads a (rows x features) tile, subtracts the shift in fp32
registers, rounds to bf16 and feeds the tensor cores; only tiles on or above the diagonal are
computed (the product is symmetric), and the row range is split across programs whose fp32 partial
tiles are summed afterwards in a fixed order (deterministic). Imported lazily; any failure to import
Triton leaves the plain PyTorch path in charge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["shifted_syrk"]


@triton.jit
def _kernel(
    x_ptr, shift_ptr, valid_ptr, s_ptr, m_ptr, tile_i_ptr, tile_j_ptr,
    n_rows, dim, stride_x, rows_per_split,
    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(tile_i_ptr + tile)
    tj = tl.load(tile_j_ptr + tile)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    in_i = offs_i < dim
    in_j = offs_j < dim
    s_i = tl.load(shift_ptr + offs_i, mask=in_i, other=0.0)
    s_j = tl.load(shift_ptr + offs_j, mask=in_j, other=0.0)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    colsum = tl.zeros((BLOCK,), dtype=tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, n_rows)
    for k in range(start, stop, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        keep = offs_k < stop
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + offs_k, mask=keep, other=0) != 0)
        rows = offs_k[:, None] * stride_x
        a = tl.load(x_ptr + rows + offs_i[None, :], mask=keep[:, None] & in_i[None, :], other=0.0)
        b = tl.load(x_ptr + rows + offs_j[None, :], mask=keep[:, None] & in_j[None, :], other=0.0)
        a = tl.where(keep[:, None] & in_i[None, :], a.to(tl.float32) - s_i[None, :], 0.0).to(tl.bfloat16)
        b = tl.where(keep[:, None] & in_j[None, :], b.to(tl.float32) - s_j[None, :], 0.0).to(tl.bfloat16)
        if ti == tj:
            colsum += tl.sum(a.to(tl.float32), axis=0)
        acc = tl.dot(tl.trans(a), b, acc)
    base = split.to(tl.int64) * dim * dim
    out = s_ptr + base + offs_i[:, None].to(tl.int64) * dim + offs_j[None, :]
    tl.store(out, acc, mask=in_i[:, None] & in_j[None, :])
    if ti == tj:
        tl.store(m_ptr + split.to(tl.int64) * dim + offs_i, colsum, mask=in_i)


_TILES: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _upper_tiles(n_tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n_tiles, device.index or 0, device.type)
    if key not in _TILES:
        ij = torch.triu_indices(n_tiles, n_tiles, device=device).to(torch.int32)
        _TILES[key] = (ij[0].contiguous(), ij[1].contiguous())
    return _TILES[key]


def shifted_syrk(
    x: torch.Tensor, shift: torch.Tensor, valid: torch.Tensor | None = None, block: int = 128, block_k: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(m, S)`` of ``x - shift`` over valid rows, bf16 products; ``x`` (n, d) CUDA, any float dtype."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    n, d = x.shape
    n_tiles = triton.cdiv(d, block)
    ti, tj = _upper_tiles(n_tiles, x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = max(1, min(triton.cdiv(2 * sms, ti.numel()), triton.cdiv(n, 4 * block_k)))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_k) * block_k
    splits = triton.cdiv(n, rows_per_split)
    parts = torch.zeros(splits, d, d, dtype=torch.float32, device=x.device)
    colsums = torch.zeros(splits, d, dtype=torch.float32, device=x.device)
    shift32 = shift.to(torch.float32).contiguous()
    valid_arg = valid.contiguous() if valid is not None else shift32  # dummy pointer when unused
    _kernel[(ti.numel(), splits)](
        x, shift32, valid_arg, parts, colsums, ti, tj,
        n, d, x.stride(0), rows_per_split,
        HAS_VALID=valid is not None, BLOCK=block, BLOCK_K=block_k, num_warps=8, num_stages=3,
    )
    s = parts.sum(0)
    s = torch.triu(s) + torch.triu(s, 1).t()
    return colsums.sum(0), s
