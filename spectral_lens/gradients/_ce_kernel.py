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

Label smoothing ``eps`` (``F.cross_entropy``'s ``label_smoothing``; a ``SMOOTH`` constexpr, so the
plain kernels are unchanged): the forward also accumulates ``sum_j (z_j - m)`` online (moved to the new
max block by block: every term is <= 0, so nothing cancels; within ``(V / BLOCK_V + log2 BLOCK_V + 2)
2^-24`` of itself) and the loss is ``(1 - eps) (log s - (z_t - m)) + eps (log s - mean(z - m))``, two
nonnegative terms; the gradient is ``(p_j - eps / V) w`` off the target and ``w eps (V - 1) / V - S`` at
it, ``S`` the fp32 sum of the other entries' ``p_j w`` (positive terms).

``-inf`` logits (a vocabulary masked by a ``-inf`` bias) count 0, also when they fill the leading blocks (the
running max is then ``-inf``; it is not subtracted while it is, which gave NaN). The target entry of ``g`` is
stored once, after the row sum (a store of it in the block loop would race that one).
"""
# no `from __future__ import annotations` here: Triton 3.0's interpreter (torch 2.4's Triton) reads the
# string annotation "tl.constexpr" as no constexpr, and its kernels then fail (tools/check_floors.sh)

import torch
import triton
import triton.language as tl

BLOCK_V = 2048
NUM_WARPS = 8


@triton.jit
def _row_lse(zb, V, BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    """``(m, log s, se)`` of one row of ``V`` logits at ``zb`` in fp32: its max, the log of
    ``sum exp(z - m)`` (online: the max is updated block by block) and, with ``SMOOTH``, ``se = sum (z - m)``
    (else 0): the running sum is moved to each new max by ``- n (m_new - m)``, a term of its own sign.
    ``-inf`` logits (a vocabulary masked by a ``-inf`` bias) count 0 in ``s`` and make ``se`` ``-inf``, also
    when whole leading blocks are ``-inf`` (the max still ``-inf``: subtracting it would give NaN)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    se = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        inside = v0 + cols < V
        x = tl.load(zb + v0 + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # the max to subtract: 0 while every logit so far is -inf (exp(-inf - 0) = 0, not exp(-inf - -inf) = NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub), axis=0)
        if SMOOTH:  # no entries before the first block; after -inf ones only, se is -inf and stays so
            shift = tl.where(m == float("-inf"), 0.0, m_new - m)
            se = (se - v0 * shift) + tl.sum(tl.where(inside, x - m_sub, 0.0), axis=0)
        m = m_new
    return m, tl.log(s), se


@triton.jit
def _token_loss(ls, zt_m, se, eps, V, SMOOTH: tl.constexpr):
    """``log s - (z_t - m)``; with ``SMOOTH``, ``(1 - eps)`` of it plus ``eps (log s - se / V)``."""
    loss = ls - zt_m
    if SMOOTH:
        loss = (1.0 - eps) * loss + eps * (ls - se / V)
    return loss


@triton.jit
def _grad_row(zb, gb, t, m, ls, w, eps, V, BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    """``g = exp((z - m) - log s) * w`` of one row into ``gb`` in its dtype, the target entry ``t`` set to
    minus the fp32 sum of the other entries; with ``SMOOTH``, ``w eps / V`` off every other entry and the
    target entry ``w eps (V - 1) / V`` minus that sum."""
    cols = tl.arange(0, BLOCK_V)
    others = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        inside = idx < V
        x = tl.load(zb + idx, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.where(idx == t, 0.0, tl.exp((x - m) - ls) * w)
        others += tl.sum(tl.where(inside, p, 0.0), axis=0)
        if SMOOTH:
            p = p - w * eps / V
        # the target entry is written once, below: a store of it here too would race that one (another warp's,
        # both after the row sum's last barrier when t is in the last block)
        tl.store(gb + idx, p.to(gb.dtype.element_ty), mask=inside & (idx != t))
    if SMOOTH:
        tl.store(gb + t, (w * eps * (V - 1) / V - others).to(gb.dtype.element_ty))
    else:
        tl.store(gb + t, (-others).to(gb.dtype.element_ty))


@triton.jit
def _row_lse_kernel(z_ptr, t_ptr, m_ptr, ls_ptr, loss_ptr, V, stride, eps, BLOCK_V: tl.constexpr,
                    SMOOTH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    m, ls, se = _row_lse(base, V, BLOCK_V, SMOOTH)
    tl.store(m_ptr + row, m)
    tl.store(ls_ptr + row, ls)
    t = tl.load(t_ptr + row)
    tl.store(loss_ptr + row, _token_loss(ls, tl.load(base + t).to(tl.float32) - m, se, eps, V, SMOOTH))


@triton.jit
def _softmax_grad_kernel(z_ptr, t_ptr, m_ptr, ls_ptr, w_ptr, g_ptr, V, stride_z, stride_g, eps,
                         BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _grad_row(z_ptr + row * stride_z, g_ptr + row * stride_g, tl.load(t_ptr + row), tl.load(m_ptr + row),
              tl.load(ls_ptr + row), tl.load(w_ptr + row), eps, V, BLOCK_V, SMOOTH)


@triton.jit
def _lse_and_grad_kernel(z_ptr, t_ptr, w_ptr, m_ptr, ls_ptr, loss_ptr, g_ptr, V, stride_z, stride_g, eps,
                         BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    """Both of the above for one row in one program: the second sweep re-reads the row while it is
    still in L2 (one DRAM read of the block instead of two)."""
    row = tl.program_id(0).to(tl.int64)
    zb = z_ptr + row * stride_z
    m, ls, se = _row_lse(zb, V, BLOCK_V, SMOOTH)
    t = tl.load(t_ptr + row)
    tl.store(m_ptr + row, m)
    tl.store(ls_ptr + row, ls)
    tl.store(loss_ptr + row, _token_loss(ls, tl.load(zb + t).to(tl.float32) - m, se, eps, V, SMOOTH))
    _grad_row(zb, g_ptr + row * stride_g, t, m, ls, tl.load(w_ptr + row), eps, V, BLOCK_V, SMOOTH)


def _rows(c: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.empty(c, dtype=torch.float32, device=device) for _ in range(3))


def lse_and_grad(z: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, eps: float = 0.0):
    """``(m, log s, loss, g)``: :func:`row_lse` and :func:`softmax_grad` of one block in one launch."""
    c, v = z.shape
    m, ls, loss = _rows(c, z.device)
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _lse_and_grad_kernel[(c,)](z, targets, weight, m, ls, loss, g, v, z.stride(0), g.stride(0), float(eps),
                                   BLOCK_V=BLOCK_V, SMOOTH=bool(eps), num_warps=NUM_WARPS)
    return m, ls, loss, g


def row_lse(z: torch.Tensor, targets: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, log s, loss)`` in float32 for logits ``z`` (C, V) (unit column stride) and ``targets`` (C,)
    int64 in ``[0, V)``: each row's max ``m``, ``log s`` with ``s = sum exp(z - m)`` (the log-sum-exp
    is ``m + log s``) and the cross-entropy ``log s - (z_t - m)``, label-smoothed by ``eps``
    (``(1 - eps)`` of it plus ``eps (log s - mean(z - m))``)."""
    c, v = z.shape
    m, ls, loss = _rows(c, z.device)
    if c:
        _row_lse_kernel[(c,)](z, targets, m, ls, loss, v, z.stride(0), float(eps), BLOCK_V=BLOCK_V,
                              SMOOTH=bool(eps), num_warps=NUM_WARPS)
    return m, ls, loss


def softmax_grad(z: torch.Tensor, targets: torch.Tensor, m: torch.Tensor, ls: torch.Tensor,
                 weight: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``g`` (C, V) in ``z``'s dtype: ``exp((z - m) - log s) * weight`` per row, target entry minus the
    sum of the others; ``m``, ``ls`` (from :func:`row_lse`) and ``weight`` (C,) float32, ``targets``
    (C,) int64 in ``[0, V)``. With label smoothing ``eps``: ``(softmax - (1 - eps) onehot - eps / V) weight``."""
    c, v = z.shape
    g = torch.empty((c, v), dtype=z.dtype, device=z.device)
    if c:
        _softmax_grad_kernel[(c,)](z, targets, m, ls, weight, g, v, z.stride(0), g.stride(0), float(eps),
                                   BLOCK_V=BLOCK_V, SMOOTH=bool(eps), num_warps=NUM_WARPS)
    return g
