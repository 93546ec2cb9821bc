"""Triton kernels for one (chunk, V) block of logits in :func:`~spectral_lens.gradients.linear_cross_entropy`
(imported only when Triton is installed; used on CUDA).

The plain-PyTorch chunk body makes about a dozen float32 passes over the block (upcast, log-sum-exp,
exp, scale, two scatters, row sum, downcast). These kernels make one read of the logits in their
own dtype for the forward and one read plus one write for the backward, with every step in fp32
registers, one program per token:

* :func:`row_lse`: online max-shifted log-sum-exp of each row and the target logit.
* :func:`softmax_grad`: ``g = softmax(z) * w`` written in the logits' dtype, the target entry set to
  minus the fp32 sum of the row's other entries (as the torch path does: no ``p_t - 1`` cancellation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _row_lse(zb, V, BLOCK_V: tl.constexpr):
    """Online max-shifted log-sum-exp of one row of ``V`` logits at ``zb``, in fp32."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(zb + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _grad_row(zb, gb, t, lse, w, V, BLOCK_V: tl.constexpr):
    """``g = exp(z - lse) * w`` of one row into ``gb`` in its dtype, the target entry ``t`` set to minus
    the fp32 sum of the other entries."""
    cols = tl.arange(0, BLOCK_V)
    others = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        inside = idx < V
        x = tl.load(zb + idx, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.where(idx == t, 0.0, tl.exp(x - lse) * w)
        others += tl.sum(tl.where(inside, p, 0.0), axis=0)
        tl.store(gb + idx, p.to(gb.dtype.element_ty), mask=inside)
    tl.store(gb + t, (-others).to(gb.dtype.element_ty))


@triton.jit
def _row_lse_kernel(z_ptr, t_ptr, lse_ptr, zt_ptr, V, stride, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    tl.store(lse_ptr + row, _row_lse(base, V, BLOCK_V))
    t = tl.load(t_ptr + row)
    tl.store(zt_ptr + row, tl.load(base + t).to(tl.float32))


@triton.jit
def _softmax_grad_kernel(z_ptr, t_ptr, lse_ptr, w_ptr, g_ptr, V, stride_z, stride_g, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _grad_row(z_ptr + row * stride_z, g_ptr + row * stride_g, tl.load(t_ptr + row), tl.load(lse_ptr + row),
              tl.load(w_ptr + row), V, BLOCK_V)


@triton.jit
def _lse_and_grad_kernel(z_ptr, t_ptr, w_ptr, lse_ptr, zt_ptr, g_ptr, V, stride_z, stride_g, BLOCK_V: tl.constexpr):
    """Both of the above for one row in one program: the second sweep re-reads the row while it is
    still in L2 (one DRAM read of the block instead of two)."""
    row = tl.program_id(0).to(tl.int64)
    zb = z_ptr + row * stride_z
    lse = _row_lse(zb, V, BLOCK_V)
    t = tl.load(t_ptr + row)
    tl.store(lse_ptr + row, lse)
    tl.store(zt_ptr + row, tl.load(zb + t).to(tl.float32))
    _grad_row(zb, g_ptr + row * stride_g, t, lse, tl.load(w_ptr + row), V, BLOCK_V)


def lse_and_grad(z: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    """``(lse, z_t, g)``: :func:`row_lse` and :func:`softmax_grad` of one block in one launch."""
    c, v = z.shape
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    zt = torch.empty(c, dtype=torch.float32, device=z.device)
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _lse_and_grad_kernel[(c,)](z, targets, weight, lse, zt, g, v, z.stride(0), g.stride(0),
                                   BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return lse, zt, g


def row_lse(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, z_t)`` in float32 for logits ``z`` (C, V) (unit column stride) and ``targets`` (C,)
    int64 in ``[0, V)``."""
    c, v = z.shape
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    zt = torch.empty(c, dtype=torch.float32, device=z.device)
    if c:
        _row_lse_kernel[(c,)](z, targets, lse, zt, v, z.stride(0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return lse, zt


def softmax_grad(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g`` (C, V) in ``z``'s dtype: ``exp(z - lse) * weight`` per row, target entry minus the sum of
    the others; ``lse`` and ``weight`` (C,) float32, ``targets`` (C,) int64 in ``[0, V)``."""
    c, v = z.shape
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _softmax_grad_kernel[(c,)](z, targets, lse, weight, g, v, z.stride(0), g.stride(0),
                                   BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return g
