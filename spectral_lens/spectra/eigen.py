"""Eigen-solves: descending float64 spectra of symmetric PSD matrices and of stacked rows."""

from __future__ import annotations

import torch

__all__ = ["eigenvalues_descending", "gram_eigenvalues", "trace_normalize"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a floating tensor is finite, read from its smallest and largest entries
    (both NaN if any entry is). ``torch.isfinite(t).all()`` makes a float copy of ``t`` (``abs``) and three
    bool masks of its size: 1.4 d x d float64 matrices for a covariance, allocated twice per ``compute()``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def eigenvalues_descending(sym: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, float64, sorted descending.

    Round-off can make eigenvalues of a PSD matrix slightly negative; they are clamped to zero so the
    result is a valid spectrum (the clamp is below float64 precision of the largest eigenvalue).
    ``ValueError`` for a matrix with NaN/Inf entries (LAPACK returned NaN eigenvalues for them, without
    an error).
    """
    if sym.ndim != 2 or sym.shape[0] != sym.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(sym.shape)}")
    sym = sym.to(torch.float64)
    if not all_finite(sym):
        raise ValueError(f"eigenvalues_descending: the {sym.shape[0]} x {sym.shape[1]} matrix has NaN/Inf entries")
    vals = torch.linalg.eigvalsh(sym)
    return vals.flip(0).clamp_min(0.0)


def gram_eigenvalues(rows: torch.Tensor) -> torch.Tensor:
    """Squared singular values of an (M, P) matrix via its M x M Gram matrix in float64, descending
    (``ValueError`` for NaN/Inf entries, or entries so large that the Gram matrix overflows)."""
    g = rows.to(torch.float64)
    return eigenvalues_descending(g @ g.t())


def trace_normalize(values: torch.Tensor) -> torch.Tensor:
    """``p_j = lambda_j / sum_k lambda_k``; raises on a spectrum that is all zero or not finite.

    The values are divided by their largest before summing, so spectra near the float64 range
    (a sum that would overflow to inf) normalize exactly instead of turning into zeros.
    """
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"cannot trace-normalize a spectrum with non-finite or no eigenvalues "
                         f"({values.numel()} values)")
    top = values.abs().max()
    if not bool(top > 0):
        raise ValueError("cannot trace-normalize a spectrum whose eigenvalues sum to zero")
    scaled = values / top
    total = scaled.sum()
    if not bool(total > 0):
        raise ValueError("cannot trace-normalize a spectrum whose eigenvalues sum to zero")
    return scaled / total
