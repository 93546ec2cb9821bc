"""Shifted second moments: the sufficient statistics of a streaming covariance.

Every chunk ``x`` (n x d) is reduced to ``n``, ``m = sum(x - s)`` and ``S = sum (x - s)(x - s)^T``
around a fixed shift ``s``. Because ``s`` is close to the mean, the products never see the large
common offset that makes uncentered accumulation lose the tail of the spectrum in low precision.
Statistics around different shifts are merged exactly in float64 (the Chan et al. pairwise
update written for shifted sums). Pure functions on tensors: no module state, no host syncs.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "PRECISIONS",
    "chunk_moments",
    "covariance_from_moments",
    "matmul_precision",
    "product_dtype",
    "representable_shift",
    "reshift",
    "symmetric_product",
]

#: Product precisions. "float64": fp64 products (reference quality, slow on GPU);
#: "exact": fp32 products with TF32 off (fp64 products for fp64 input);
#: "fast": bf16 products with fp32 accumulation on CUDA tensor cores (fp32 on other devices).
PRECISIONS = ("float64", "exact", "fast")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Pin the float32 matmul mode for ``precision`` and restore the caller's setting afterwards."""
    previous = torch.get_float32_matmul_precision()
    wanted = "highest" if precision in ("exact", "float64") else previous
    if wanted == previous:
        yield
        return
    torch.set_float32_matmul_precision(wanted)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def product_dtype(x: torch.Tensor, precision: str) -> torch.dtype:
    """The dtype in which centered rows enter the ``Y^T Y`` product."""
    if precision == "float64" or x.dtype == torch.float64:
        return torch.float64
    if precision == "fast" and x.is_cuda:
        return torch.bfloat16
    return torch.float32


def representable_shift(shift: torch.Tensor, precision: str) -> torch.Tensor:
    """Round a float64 shift to what the products subtract, so the recorded shift is the one used."""
    shift = shift.to(torch.float64)
    return shift if precision == "float64" else shift.to(torch.float32).to(torch.float64)


def symmetric_product(y: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y^T y``; on CUDA for wide ``y`` only the upper block triangle (3 of 4 GEMM blocks) is computed.

    On CPU the single GEMM is as fast (measured), so it is used as is.
    """
    def mm(a, b):
        return torch.mm(a, b, out_dtype=out_dtype) if out_dtype is not None else a @ b

    d = y.shape[1]
    if d < 512 or not y.is_cuda:
        return mm(y.t(), y)
    h = (d // 2 + 63) // 64 * 64
    a, b = y[:, :h], y[:, h:]
    s11, s12, s22 = mm(a.t(), a), mm(a.t(), b), mm(b.t(), b)
    return torch.cat([torch.cat([s11, s12], 1), torch.cat([s12.t(), s22], 1)], 0)


_TRITON: list = []


def _fused_kernel():
    """The Triton fast-mode kernel, or ``None`` when Triton is unavailable (imported once)."""
    if not _TRITON:
        try:
            from ._triton_syrk import shifted_syrk
        except Exception:  # no Triton, or a broken install: the PyTorch path serves
            shifted_syrk = None
        _TRITON.append(shifted_syrk)
    return _TRITON[0]


def chunk_moments(
    x: torch.Tensor,
    shift: torch.Tensor,
    precision: str = "exact",
    valid: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted sums of one chunk of rows.

    Args:
        x: (n, d) rows, any floating dtype.
        shift: (d,) float64 shift ``s``.
        precision: one of :data:`PRECISIONS`.
        valid: optional (n,) bool; rows where it is False contribute nothing (also if they hold NaN).
        kernel: ``"auto"`` (the fused Triton kernel for ``"fast"`` on CUDA when available) or
            ``"torch"`` (plain PyTorch ops everywhere).

    Returns:
        ``(m, S)`` as float64 over the valid rows: ``m = sum_i (x_i - s)`` (d,) and
        ``S = sum_i (x_i - s)(x_i - s)^T`` (d, d).
    """
    dtype = product_dtype(x, precision)
    if dtype == torch.bfloat16 and kernel == "auto" and _fused_kernel() is not None:
        m, s = _fused_kernel()(x, shift, valid)
        return m.double(), s.double()
    # One fused elementwise kernel: subtract in >= fp32 and round once to the product dtype.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.sub(x, shift.to(work), out=y)
    if valid is not None:
        y.masked_fill_(~valid.unsqueeze(-1), 0)
    if dtype == torch.bfloat16:
        s = symmetric_product(y, out_dtype=torch.float32)
        m = y.sum(0, dtype=torch.float32)
    else:
        with matmul_precision(precision):
            s = symmetric_product(y)
        m = y.sum(0)
    return m.double(), s.double()


def reshift(
    n: "torch.Tensor | int", m: torch.Tensor, s: torch.Tensor, old_shift: torch.Tensor, new_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Express shifted sums around ``old_shift`` as sums around ``new_shift`` (exact in float64).

    With ``c = old - new``: ``sum (x - new) = m + n c`` and
    ``sum (x - new)(x - new)^T = S + m c^T + c m^T + n c c^T``.
    """
    c = old_shift - new_shift
    n = n.to(torch.float64) if isinstance(n, torch.Tensor) else float(n)
    m_new = m + n * c
    s_new = s + torch.outer(m, c) + torch.outer(c, m) + n * torch.outer(c, c)
    return m_new, s_new


def covariance_from_moments(n: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance ``(S - m m^T / n) / (n - 1)`` from shifted sums (float64, symmetrized)."""
    n = n.to(torch.float64)
    cov = (s - torch.outer(m, m) / n) / (n - 1)
    return 0.5 * (cov + cov.t())
