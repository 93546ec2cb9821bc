"""Gradient noise scale ``B_simple`` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", App. A) from per-sample gradients, via their Gram matrix.

With per-sample gradients ``g_1 .. g_M`` (batch sizes ``B_small = 1`` and ``B_big = M`` in the
paper's two-batch estimator) and Gram matrix ``K = G G^T``:

* ``mean_m |g_m|^2 = tr(K) / M`` and ``|g_mean|^2 = 1^T K 1 / M^2``;
* ``tr(Sigma)`` (unbiased) ``= M / (M - 1) * (tr(K)/M - 1^T K 1/M^2)``, the usual sample variance
  summed over coordinates;
* ``|G|^2`` (unbiased) ``= (M |g_mean|^2 - tr(K)/M) / (M - 1) = |g_mean|^2 - tr(Sigma)/M``;
* ``B_simple = tr(Sigma) / |G|^2``.

Both pieces are unbiased; their ratio is not (it is the paper's estimator). When the noise dominates,
the unbiased ``|G|^2`` can be <= 0: then ``B_simple`` is reported as ``inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..spectra.eigen import all_finite

__all__ = ["NoiseScale", "noise_scale_from_gram"]


@dataclass(frozen=True)
class NoiseScale:
    """Gradient noise scale of one parameter from M per-sample gradients (see module docs).

    Attributes:
        b_simple: ``tr(Sigma) / |G|^2`` in samples (sequences); ``inf`` when ``grad_norm_sq <= 0``.
        trace_sigma: unbiased estimate of the per-sample gradient covariance trace.
        grad_norm_sq: unbiased estimate of the squared norm of the true mean gradient.
        mean_grad_norm_sq: ``|g_mean|^2`` of the M samples (biased upward by ``tr(Sigma)/M``).
        n_samples: M.
        source: parameter name.
    """

    b_simple: float
    trace_sigma: float
    grad_norm_sq: float
    mean_grad_norm_sq: float
    n_samples: int
    source: str | None = None


def noise_scale_from_gram(k: torch.Tensor, source: str | None = None) -> NoiseScale:
    """:class:`NoiseScale` from the (M, M) Gram matrix of per-sample gradients; needs M >= 2.

    ``tr(Sigma)`` is the difference of two uncentred sums, so it inherits the Gram entries' rounding
    relative to ``|g|^2``: measured against float64 per-sample gradients, within 2.5e-6 up to
    ``|mean gradient| / |per-sample noise|`` = 1e5, 1.5e-4 at 1e6 and 1.5e-2 at 1e7 (an audit,
    2026-11-27). Gradients that much larger than their noise are not a regime the noise scale is
    meant for. ``ValueError`` for a ``k`` that is not square, or holds NaN/Inf.
    """
    where = source or "noise scale"
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{where}: expected a square (M, M) Gram matrix, got shape {tuple(k.shape)}")
    m = k.shape[0]
    if m < 2:
        raise ValueError(f"{where}: needs at least 2 samples, got {m}")
    k = k.to(torch.float64)
    if not all_finite(k):  # no M x M masks
        raise ValueError(f"{where}: the Gram matrix holds NaN/Inf (non-finite per-sample gradients)")
    small = float(torch.diagonal(k).sum()) / m  # mean |g_m|^2
    big = float(k.sum()) / m**2  # |g_mean|^2
    trace_sigma = (small - big) * m / (m - 1)
    grad_sq = (m * big - small) / (m - 1)
    b = trace_sigma / grad_sq if grad_sq > 0 else math.inf
    return NoiseScale(b, trace_sigma, grad_sq, big, m, source)
