"""Triton kernels for one (chunk, V) block of logits in :func:`~spectral_lens.gradients.linear_cross_entropy`
(imported only when Triton is installed; used on CUDA).

The plain-PyTorch chunk body makes about a dozen float32 passes over the block (upcast, log-sum-exp,
exp, scale, two scatters, row sum, downcast). These kernels make one read of the logits in their
own dtype for the forward and one read plus one write for the backward, with every step in fp32
registers, one program per token:

* :func:`row_lse`: online max and log-sum-exp of each row, as ``(m, log s)`` with ``s = sum exp(z - m)``,
  and the loss ``log s - (z_t - m)``: ``z_t - m`` rounds only relative to itself (it is exact when
  ``z_t`` is within a factor 2 of ``m``), so a large common offset of the logits costs no rounding
  (``m + log s`` formed first would round at ``2^-24 |m|``).
* :func:`softmax_grad`: ``g = exp((z - m) - log s) * w`` written in the logits' dtype, the target entry
  set to minus the fp32 sum of the row's other entries (as the torch path does: no ``p_t - 1``
  cancellation).
"""
# no `from __future__ import annotations` here: Triton 3.0's interpreter (torch 2.4's Triton) reads the
# string annotation "tl.constexpr" as no constexpr, and its kernels then fail (tools/check_floors.sh)

import torch
import triton
import triton.language as tl

BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _row_lse(zb, V, BLOCK_V: tl.constexpr):
    """``(m, log s)`` of one row of ``V`` logits at ``zb`` in fp32: its max and the log of
    ``sum exp(z - m)`` (online: the max is updated block by block)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(zb + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m, tl.log(s)


@triton.jit
def _grad_row(zb, gb, t, m, ls, w, V, BLOCK_V: tl.constexpr):
    """``g = exp((z - m) - log s) * w`` of one row into ``gb`` in its dtype, the target entry ``t`` set to
    minus the fp32 sum of the other entries."""
    cols = tl.arange(0, BLOCK_V)
    others = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        inside = idx < V
        x = tl.load(zb + idx, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.where(idx == t, 0.0, tl.exp((x - m) - ls) * w)
        others += tl.sum(tl.where(inside, p, 0.0), axis=0)
        tl.store(gb + idx, p.to(gb.dtype.element_ty), mask=inside)
    tl.store(gb + t, (-others).to(gb.dtype.element_ty))


@triton.jit
def _row_lse_kernel(z_ptr, t_ptr, m_ptr, ls_ptr, loss_ptr, V, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m, ls = _row_lse(base, V, BLOCK_V)
    tl.store(m_ptr + row, m)
    tl.store(ls_ptr + row, ls)
    t = tl.load(t_ptr + row)
    tl.store(loss_ptr + row, ls - (tl.load(base + t).to(tl.float32) - m))


@triton.jit
def _softmax_grad_kernel(z_ptr, t_ptr, m_ptr, ls_ptr, w_ptr, g_ptr, V, stride_z, stride_g, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _grad_row(z_ptr + row * stride_z, g_ptr + row * stride_g, tl.load(t_ptr + row), tl.load(m_ptr + row),
              tl.load(ls_ptr + row), tl.load(w_ptr + row), V, BLOCK_V)


@triton.jit
def _lse_and_grad_kernel(z_ptr, t_ptr, w_ptr, m_ptr, ls_ptr, loss_ptr, g_ptr, V, stride_z, stride_g,
                         BLOCK_V: tl.constexpr):
    """Both of the above for one row in one program: the second sweep re-reads the row while it is
    still in L2 (one DRAM read of the block instead of two)."""
    row = tl.program_id(0).to(tl.int64)
    zb = z_ptr + row * stride_z
    m, ls = _row_lse(zb, V, BLOCK_V)
    t = tl.load(t_ptr + row)
    tl.store(m_ptr + row, m)
    tl.store(ls_ptr + row, ls)
    tl.store(loss_ptr + row, ls - (tl.load(zb + t).to(tl.float32) - m))
    _grad_row(zb, g_ptr + row * stride_g, t, m, ls, tl.load(w_ptr + row), V, BLOCK_V)


def _rows(c: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(c, dtype=torch.float32, device=device) for _ in range(3))


def lse_and_grad(z: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    """``(m, log s, loss, g)``: :func:`row_lse` and :func:`softmax_grad` of one block in one launch."""
    c, v = z.shape
    m, ls, loss = _rows(c, z.device)
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _lse_and_grad_kernel[(c,)](z, targets, weight, m, ls, loss, g, v, z.stride(0), g.stride(0),
                                   BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return m, ls, loss, g


def row_lse(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, log s, loss)`` in float32 for logits ``z`` (C, V) (unit column stride) and ``targets`` (C,)
    int64 in ``[0, V)``: each row's max ``m``, ``log s`` with ``s = sum exp(z - m)`` (the log-sum-exp
    is ``m + log s``) and the cross-entropy ``log s - (z_t - m)``."""
    c, v = z.shape
    m, ls, loss = _rows(c, z.device)
    if c:
        _row_lse_kernel[(c,)](z, targets, m, ls, loss, v, z.stride(0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return m, ls, loss


def softmax_grad(z: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, ls: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """``g`` (C, V) in ``z``'s dtype: ``exp((z - m) - log s) * weight`` per row, target entry minus the
    sum of the others; ``m``, ``ls`` (from :func:`row_lse`) and ``weight`` (C,) float32, ``targets``
    (C,) int64 in ``[0, V)``."""
    c, v = z.shape
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _softmax_grad_kernel[(c,)](z, targets, m, ls, weight, g, v, z.stride(0), g.stride(0),
                                   BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return g
