"""Effective ranks of a spectrum given as eigenvalues ``lambda_j >= 0`` (covariance, or ``s_j^2``)."""

from __future__ import annotations

import math

import torch

__all__ = ["rankme", "participation_ratio", "stable_rank"]

#: Negative eigenvalues down to this fraction of the largest are an eigensolver's float64 round-off and
#: count as 0; below it the values are not a spectrum (``ValueError``). Lower-precision input has a
#: wider tolerance (:func:`_negative_tolerance`).
NEGATIVE_TOLERANCE = 1e-10


def _negative_tolerance(values: torch.Tensor) -> float:
    """The fraction of the largest eigenvalue down to which negatives count as round-off: :data:`NEGATIVE_TOLERANCE`
    for float64, none for integers (exact: any negative is refused), ``sqrt(n) * eps`` of float32 for float32/fp16/bf16 input (no eigensolver computes
    in fp16/bf16, they only store its output), as ``spectra.fit``'s numerical rank. ``torch.linalg.eigvalsh``
    of a float32 covariance of fewer rows than dimensions gives negatives of 3.5e-9 to 4e-8 of the largest
    (measured at d = 128-4,096, N = d/4 and d/2), 35x and more inside ``sqrt(n) * eps``; up to 3e-7, 6x
    inside, for rows with a mean removed in float32 (d = 256-2,048, N = d/8 to d - 1, flat to 1/j^3.3
    spectra); with the float64 tolerance ``RankMe()(eigvalsh(C))`` raised."""
    if values.dtype.is_floating_point and values.dtype != torch.float64:
        eps = torch.finfo(torch.promote_types(values.dtype, torch.float32)).eps
        return max(NEGATIVE_TOLERANCE, math.sqrt(values.numel()) * eps)
    if not values.dtype.is_floating_point:  # integers have no round-off: [10**11, -1] is no spectrum (took 1e-10)
        return 0.0
    return NEGATIVE_TOLERANCE


def rankme(values: torch.Tensor, on: str = "eigenvalues") -> torch.Tensor:
    """Entropy effective rank ``exp(-sum_j p_j log p_j)``.

    ``on="eigenvalues"`` uses ``p_j = lambda_j / sum lambda`` (the paper's definition for covariances);
    ``on="singular_values"`` uses ``p_j = sigma_j / sum sigma`` with ``sigma_j = sqrt(lambda_j)``
    (Garrido et al.'s RankMe on embedding singular values). Zero entries contribute 0. Formed from
    ``lambda / max lambda`` (scale-free, no overflow); ``ValueError`` for NaN/Inf eigenvalues, for
    negative ones beyond round-off (:data:`NEGATIVE_TOLERANCE` of the largest for float64 values,
    ``sqrt(n) * eps`` of float32 for lower precision, none for integers; those within count as 0) and for an all-zero
    (or empty) spectrum.
    """
    if on not in ("eigenvalues", "singular_values"):
        raise ValueError(f"rankme: on must be 'eigenvalues' or 'singular_values', got {on!r}")
    w = _scaled(values, "rankme")
    if w is None:
        raise ValueError("rankme: spectrum is all zero")
    if on == "singular_values":
        w = w.sqrt()
    p = w / w.sum()
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), torch.zeros_like(p))
    return torch.exp(-plogp.sum())


def _scaled(values: torch.Tensor, name: str) -> torch.Tensor | None:
    """``values`` in float64 divided by their largest entry (so squares neither overflow nor underflow),
    round-off negatives set to 0, or ``None`` for an all-zero (or empty) spectrum; raises ``ValueError``
    naming ``name`` for NaN/Inf and for negative eigenvalues beyond round-off (:func:`_negative_tolerance`)."""
    if values.ndim != 1:  # a matrix's entries are not its eigenvalues: refuse rather than flatten them
        raise ValueError(
            f"{name}: expected a 1-D tensor of eigenvalues, got shape {tuple(values.shape)}; for a matrix W pass "
            "torch.linalg.svdvals(W) ** 2, for a covariance C torch.linalg.eigvalsh(C)"
        )
    v = values.to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name}: the spectrum has NaN/Inf eigenvalues")
    if not v.numel():
        return None
    top, low = float(v.max()), float(v.min())
    tol = _negative_tolerance(values)
    if low < -tol * max(top, 0.0):
        raise ValueError(
            f"{name}: the spectrum has a negative eigenvalue {low:.6g} (largest {top:.6g}); eigenvalues of a "
            f"PSD operator must be >= 0 (round-off down to {tol:.3g} of the largest counts as 0 for "
            f"{str(values.dtype).replace('torch.', '')} values; clamp larger ones with values.clamp_min(0) if you "
            "know them to be round-off)"
        )
    return v.clamp_min(0) / top if top > 0 else None


def participation_ratio(values: torch.Tensor) -> torch.Tensor:
    """``(sum lambda)^2 / sum lambda^2`` (scale-free: formed from ``lambda / max lambda``); 0 for an
    all-zero spectrum (a zero-initialized weight, a dead layer), as the rank of a zero matrix."""
    v = _scaled(values, "participation_ratio")
    return torch.zeros((), dtype=torch.float64) if v is None else v.sum() ** 2 / (v * v).sum()


def stable_rank(values: torch.Tensor) -> torch.Tensor:
    """``sum lambda / max lambda`` (for a weight, ``||W||_F^2 / ||W||_2^2`` with ``lambda = s^2``); 0 for
    an all-zero spectrum, as the rank of a zero matrix."""
    v = _scaled(values, "stable_rank")
    return torch.zeros((), dtype=torch.float64) if v is None else v.sum()
