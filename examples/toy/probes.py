"""Fourier probes of hidden states along the task's cyclic index (paper App. F).

Hidden states of the pooled (last) position are grouped by the target's phase ``k = y - o`` in Z_c
and averaged per phase; the discrete Fourier transform of those phase means along ``k`` gives the
energy ``m_r`` of each Fourier mode ``chi_r`` (``r = 1 .. floor(c/2)``; the DC mode is the mean and
is removed; a mode and its conjugate are counted together). From it:

* ``H_S = sum_{r in S} m_r / sum_r m_r``: the task-band concentration of Cor. 12 for a band ``S``;
* ``H_peak = max_r m_r / sum_r m_r``: the share of the strongest single mode;
* PC1 peak mass: the first principal direction of the phase means, its score as a function of the
  phase, and the share of that score's Fourier energy in its strongest mode (optionally within a band).

Pure functions on float64 tensors; :func:`fourier_summaries` bundles them for the run records.
"""
from __future__ import annotations

import torch

__all__ = ["DEFAULT_BAND", "BAND_SWEEP", "phase_means", "mode_energy", "band_concentration",
           "peak_concentration", "pc1_peak_mass", "fourier_summaries"]

DEFAULT_BAND = (1, 8)
"""The task band ``S`` of ``H_S``: the lowest modes ``r = 1..8`` (inclusive), the learned head of a
smooth target spectrum ``beta_r^2 = C r^-p`` (Thm. 6)."""

BAND_SWEEP = ((1, 2), (1, 4), (1, 8), (1, 16), (3, 6), (5, 12), (9, 20), (17, 33))
"""Eight probe bands of varying width and offset (Fig. 11c's robustness sweep), inclusive ranges."""


def phase_means(hidden: torch.Tensor, phase: torch.Tensor, c: int) -> torch.Tensor:
    """Per-phase mean of ``hidden`` (N, d) over the rows with ``phase == k``, for k in Z_c: (c, d) float64.

    Every phase must occur at least once.
    """
    if hidden.ndim != 2 or phase.shape != hidden.shape[:1]:
        raise ValueError(f"phase_means: hidden must be (N, d) and phase (N,), got {tuple(hidden.shape)}, {tuple(phase.shape)}")
    if phase.numel() and (int(phase.min()) < 0 or int(phase.max()) >= c):
        raise ValueError(f"phase_means: phases must lie in [0, {c}), got [{int(phase.min())}, {int(phase.max())}]")
    counts = torch.bincount(phase, minlength=c).to(torch.float64)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"phase_means: no row has phase {missing[:8]}{'...' if len(missing) > 8 else ''}; "
                         f"use a larger pool")
    sums = torch.zeros(c, hidden.shape[1], dtype=torch.float64).index_add_(0, phase, hidden.to(torch.float64))
    return sums / counts[:, None]


def mode_energy(means: torch.Tensor) -> torch.Tensor:
    """Energy ``m_r`` of Fourier modes ``r = 1 .. floor(c/2)`` of phase means (c, d) -> (floor(c/2),).

    ``m_r = sum_dims |F_r|^2`` with ``F_r = sum_k means_k exp(-2 pi i r k / c)``; for ``r < c/2`` the
    conjugate mode ``c - r`` carries the same energy and is added (``2 |F_r|^2``).
    """
    if means.ndim != 2 or means.shape[0] < 3:
        raise ValueError(f"mode_energy: means must be (c >= 3, d), got {tuple(means.shape)}")
    c = means.shape[0]
    F = torch.fft.fft(means.to(torch.float64), dim=0)
    e = (F.real**2 + F.imag**2).sum(dim=1)
    half = c // 2
    m = e[1 : half + 1].clone()
    if c % 2 == 0:
        m[:-1] *= 2  # the Nyquist mode has no separate conjugate
    else:
        m *= 2
    return m


def _band(m: torch.Tensor, band: tuple[int, int]) -> slice:
    lo, hi = band
    if not 1 <= lo <= hi:
        raise ValueError(f"band must be 1 <= lo <= hi, got {band}")
    if lo > m.numel():
        raise ValueError(f"band {band} starts beyond the last mode {m.numel()}")
    return slice(lo - 1, min(hi, m.numel()))


def band_concentration(m: torch.Tensor, band: tuple[int, int] = DEFAULT_BAND) -> float:
    """``H_S``: the share of mode energy in modes ``band[0] .. band[1]`` (inclusive)."""
    total = float(m.sum())
    return float(m[_band(m, band)].sum()) / total if total > 0 else float("nan")


def peak_concentration(m: torch.Tensor) -> float:
    """``H_peak``: the share of mode energy in the single strongest mode."""
    total = float(m.sum())
    return float(m.max()) / total if total > 0 else float("nan")


def pc1_peak_mass(means: torch.Tensor, band: tuple[int, int] | None = None) -> float:
    """Share of the PC1 score's Fourier energy in its strongest mode (within ``band`` if given).

    PC1 is the top right singular vector of the centered phase means; its score ``s_k`` is a function
    on Z_c whose mode energies are computed as in :func:`mode_energy`.
    """
    x = means.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    score = x @ vh[0]
    m = mode_energy(score[:, None])
    total = float(m.sum())
    if total <= 0:
        return float("nan")
    sel = m if band is None else m[_band(m, band)]
    return float(sel.max()) / total


def fourier_summaries(hidden: torch.Tensor, phase: torch.Tensor, c: int) -> dict[str, float]:
    """The scalars the toy records at every measurement: ``H_S``, ``H_peak``, ``pc1_peak`` and the
    PC1 peak mass in each band of :data:`BAND_SWEEP` (``pc1_peak:lo-hi``)."""
    means = phase_means(hidden, phase, c)
    m = mode_energy(means)
    out = {"H_S": band_concentration(m), "H_peak": peak_concentration(m), "pc1_peak": pc1_peak_mass(means)}
    for band in BAND_SWEEP:
        if band[0] <= m.numel():
            out[f"pc1_peak:{band[0]}-{band[1]}"] = pc1_peak_mass(means, band)
    return out
