"""spectral-lens: activation-covariance and per-sample-gradient spectra as diagnostics of LLM training.

Core pieces (attach to any ``nn.Module``):

* :class:`ActivationCovarianceAccumulator` and :func:`attach`: streaming centered covariance spectra.
* :class:`Spectrum`: the result type (float64 eigenvalues, descending) with a pickle-free file format.
* :class:`BandAlphaFitter`, :class:`RankMe`, :func:`participation_ratio`, :func:`stable_rank`,
  :func:`crossover_rank`: summaries.
* :mod:`spectral_lens.spectra`: the pure math underneath.
"""

from ._warnings import (
    CompiledModelWarning,
    InsufficientRowsWarning,
    NonFiniteError,
    NonFiniteRowsWarning,
    SpectralLensWarning,
    SpectrumFormatError,
    StateFormatError,
    ZeroGradientWarning,
)
from .accumulate import ActivationCapture, ActivationCovarianceAccumulator, attach
from .capture import select_modules
from .spectra.fit import PAPER_WINDOWS, AlphaFit, CrossoverFit, tail_window
from .gradients import NoiseScale, PerSampleGradientProbe
from .lens import LensMeasurement, Schedule, SpectralLens
from .spectrum import Spectrum
from .summaries import BandAlphaFitter, RankMe, crossover_rank, participation_ratio, stable_rank

__version__ = "0.1.0"

__all__ = [
    "PAPER_WINDOWS",
    "ActivationCapture",
    "ActivationCovarianceAccumulator",
    "AlphaFit",
    "BandAlphaFitter",
    "CompiledModelWarning",
    "CrossoverFit",
    "InsufficientRowsWarning",
    "LensMeasurement",
    "NoiseScale",
    "PerSampleGradientProbe",
    "Schedule",
    "SpectralLens",
    "NonFiniteError",
    "NonFiniteRowsWarning",
    "RankMe",
    "SpectralLensWarning",
    "Spectrum",
    "SpectrumFormatError",
    "StateFormatError",
    "attach",
    "crossover_rank",
    "participation_ratio",
    "select_modules",
    "stable_rank",
    "tail_window",
    "ZeroGradientWarning",
]
