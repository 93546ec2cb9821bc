"""Summaries of a ``Spectrum``: band-restricted power-law exponents and effective ranks."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Iterable

import numpy as np
import torch

from ._warnings import InsufficientRowsWarning
from .spectra.fit import (PAPER_WINDOWS, AlphaFit, CrossoverFit, _numerical_rank, band_alpha, estimate_crossover,
                          tail_window, window_ranks)
from .spectra import ranks as _ranks
from .spectrum import Spectrum

__all__ = ["BandAlphaFitter", "RankMe", "participation_ratio", "stable_rank", "crossover_rank"]


class BandAlphaFitter:
    """Fits ``alpha(I)`` (minus the log-log slope of the trace-normalized spectrum) over rank windows.

    Args:
        windows: one window ``(lo, hi)`` or several; 1-based inclusive ranks. Default: the paper's
            bank ``[100,200], [200,400], [400,800]``.

    Use :meth:`tail` for the scale rule (d12 -> [100,200], d36 -> [200,400], d48 -> [400,800]) and
    :meth:`head` for a leading window. ``fit`` returns one :class:`AlphaFit` for a single window, a
    list for several.

    Example::

        fit = BandAlphaFitter.tail(n_layer=12).fit(spectrum)
        fit.alpha, fit.r2, fit.stderr
    """

    def __init__(self, windows: tuple[int, int] | Iterable[tuple[int, int]] = PAPER_WINDOWS):
        try:
            if isinstance(windows, (str, bytes)):
                raise TypeError
            ws = list(windows)
            # a pair of numbers (Python or NumPy integers, e.g. from np.argmax) is one window
            self.single = len(ws) == 2 and all(isinstance(w, numbers.Real) for w in ws)
            self.windows = [tuple(ws)] if self.single else [tuple(w) for w in ws]
        except TypeError:
            raise ValueError(
                f"BandAlphaFitter: windows must be one (lo, hi) pair of 1-based ranks or a list of pairs, got {windows!r}"
            ) from None
        if not self.windows:
            raise ValueError("BandAlphaFitter needs at least one window")
        where = "windows" if self.single else "windows[{}]"
        self.windows = [window_ranks(w, f"BandAlphaFitter: {where.format(i)}") for i, w in enumerate(self.windows)]

    @classmethod
    def tail(cls, n_layer: int) -> "BandAlphaFitter":
        """The scale rule's tail window for a model of ``n_layer`` blocks (:func:`tail_window`)."""
        return cls(tail_window(n_layer))

    @classmethod
    def head(cls, window: tuple[int, int] = (10, 40)) -> "BandAlphaFitter":
        """A leading window (the paper's local windows: 10-40, 40-90, 90-200)."""
        return cls(window)

    def fit(self, spectrum: Spectrum) -> AlphaFit | list[AlphaFit]:
        """Fit every window on ``spectrum.normalized``; warns when the row count limits a window."""
        _need_spectrum(spectrum, "BandAlphaFitter.fit", "band_alpha")
        fits = []
        for lo, hi in self.windows:
            centered = spectrum.kind == "activation_covariance"  # centering costs one rank
            sample_rank = spectrum.n_rows - 1 if centered else spectrum.n_rows
            if sample_rank < hi:
                warnings.warn(
                    f"{spectrum.source or 'spectrum'}: window [{lo}, {hi}] needs at least {hi + centered} rows, "
                    f"got n_rows={spectrum.n_rows}; ranks beyond the sample rank are not resolved",
                    InsufficientRowsWarning,
                    stacklevel=2,
                )
            try:
                fits.append(band_alpha(spectrum.normalized, (lo, hi)))
            except ValueError as exc:
                raise ValueError(f"{spectrum.source or 'spectrum'} (dim={spectrum.dim}): {exc}") from None
        return fits[0] if self.single else fits

    def __repr__(self) -> str:
        return f"BandAlphaFitter(windows={self.windows})"


class RankMe:
    """Entropy effective rank ``exp(-sum p log p)`` with the variant explicit.

    Args:
        on: ``"eigenvalues"`` (default; the paper's definition, ``p = lambda / sum lambda``; for
            gradient spectra this is RankMe of ``s^2``) or ``"singular_values"`` (Garrido et al.,
            ``p = s / sum s`` with ``s = sqrt(lambda)``).
    """

    def __init__(self, on: str = "eigenvalues"):
        if on not in ("eigenvalues", "singular_values"):
            raise ValueError(f"RankMe: on must be 'eigenvalues' or 'singular_values', got {on!r}")
        self.on = on

    def __call__(self, spectrum: Spectrum | torch.Tensor) -> float:
        return float(_ranks.rankme(_values(spectrum, "RankMe"), on=self.on))

    def __repr__(self) -> str:
        return f"RankMe(on={self.on!r})"


def crossover_rank(spectrum: Spectrum, ranks: tuple[int, int] | None = None, method: str = "bend") -> CrossoverFit:
    """Automatic head/tail crossover estimate of a spectrum (see :func:`spectral_lens.spectra.estimate_crossover`).

    The default ranks stop at the sample rank (``n_rows - 1`` for an activation covariance, ``n_rows``
    otherwise, as :class:`BandAlphaFitter` warns) and at the numerical rank, whichever is smaller."""
    _need_spectrum(spectrum, "crossover_rank", "estimate_crossover")
    if ranks is None:
        sample_rank = spectrum.n_rows - (spectrum.kind == "activation_covariance")
        resolved = max(0, min(_numerical_rank(spectrum.values), sample_rank))
        if resolved < 9:
            raise ValueError(
                f"{spectrum.source or 'spectrum'} (dim={spectrum.dim}, n_rows={spectrum.n_rows}): need at least 9 "
                f"ranks to locate a crossover; only {resolved} are resolved (a covariance of N rows has at most "
                "N - 1 eigenvalues above round-off)"
            )
        ranks = (1, resolved)
    return estimate_crossover(spectrum.normalized, ranks=ranks, method=method)


def _need_spectrum(spectrum: Any, where: str, raw: str) -> None:
    if not isinstance(spectrum, Spectrum):
        raise TypeError(
            f"{where} needs a Spectrum (it reads its row count and kind), got {type(spectrum).__name__}; wrap "
            f"eigenvalues as Spectrum(values, n_rows=..., dim=...), or call spectral_lens.spectra.{raw} on "
            "trace-normalized values"
        )


def _values(spectrum: Spectrum | torch.Tensor, where: str) -> torch.Tensor:
    """The eigenvalues of ``spectrum`` as a tensor of their own dtype, which sets the round-off tolerance of
    negatives (:func:`spectral_lens.spectra.ranks._negative_tolerance`). A list is read as NumPy reads it
    (Python floats are float64): through ``torch.as_tensor`` alone it took torch's default dtype, float32,
    which rounded the values, turned 1e39 into Inf and gave float64 data float32's tolerance. Arrays are
    copied first: torch refuses a reversed view (``np.sort(x)[::-1]``, negative strides), which was
    reported as 'needs a Spectrum or a 1-D tensor ... got ndarray', and warns on a read-only one. NumPy's
    long double (float128 on x86 Linux), which torch has no dtype for, is read as float64."""
    if isinstance(spectrum, Spectrum):
        return spectrum.values
    try:
        if isinstance(spectrum, torch.Tensor):
            values = spectrum
        else:
            arr = np.array(spectrum)
            values = torch.as_tensor(arr.astype(np.float64) if arr.dtype == np.longdouble else arr)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{where} needs a Spectrum or a 1-D tensor of eigenvalues, got {type(spectrum).__name__}")
    return values


def participation_ratio(spectrum: Spectrum | torch.Tensor) -> float:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` of a spectrum or eigenvalue tensor (0 for an
    all-zero spectrum; ``ValueError`` for NaN/Inf eigenvalues)."""
    return float(_ranks.participation_ratio(_values(spectrum, "participation_ratio")))


def stable_rank(spectrum: Spectrum | torch.Tensor) -> float:
    """Stable rank ``sum lambda / max lambda`` (``||W||_F^2 / ||W||_2^2`` for a weight spectrum; 0 for an
    all-zero spectrum, e.g. a zero-initialized weight; ``ValueError`` for NaN/Inf eigenvalues)."""
    return float(_ranks.stable_rank(_values(spectrum, "stable_rank")))
