"""spectral-lens: activation-covariance and per-sample-gradient spectra as diagnostics of LLM training.

Core pieces (attach to any ``nn.Module``):

* :class:`ActivationCovarianceAccumulator` (``acc.attach(model, target)``) and :func:`attach`:
  streaming centered covariance spectra.
* :class:`PerSampleGradientProbe` (``probe.attach(model)``) and :class:`SpectralLens`
  (``lens.attach(model)``): per-sample gradient spectra and the whole measurement protocol.
* :class:`TailPredictor` and :class:`SweepController`: early prediction of the token-efficient batch tier.
* :class:`Spectrum`: the result type (float64 eigenvalues, descending) with a pickle-free file format.
* :class:`BandAlphaFitter`, :class:`RankMe`, :func:`participation_ratio`, :func:`stable_rank`,
  :func:`crossover_rank`: summaries.
* :mod:`spectral_lens.spectra`: the pure math underneath.
"""

from ._warnings import (
    CompiledModelWarning,
    InsufficientRowsWarning,
    MixedWeightsWarning,
    NonFiniteError,
    NonFiniteRowsWarning,
    SpectralLensWarning,
    SpectrumFormatError,
    StateFormatError,
    ZeroGradientWarning,
)
from .accumulate import ActivationCovarianceAccumulator
from .activation_capture import ActivationCapture, attach
from .capture import select_modules
from .spectra.fit import PAPER_WINDOWS, AlphaFit, CrossoverFit, tail_window
from .attachment import Attachment
from .gradients import NoiseScale, PerSampleGradientProbe
from .gradients.fallback import EngineFallbackWarning
from .lens import LensMeasurement, Schedule, SpectralLens, attention_mask
from .analysis.sweep import SweepController
from .analysis.tail import TailPredictor
from .spectrum import Spectrum
from .summaries import BandAlphaFitter, RankMe, crossover_rank, participation_ratio, stable_rank

__version__ = "0.1.0"

__all__ = [
    "PAPER_WINDOWS",
    "ActivationCapture",
    "ActivationCovarianceAccumulator",
    "AlphaFit",
    "Attachment",
    "BandAlphaFitter",
    "CompiledModelWarning",
    "CrossoverFit",
    "EngineFallbackWarning",
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
    "SweepController",
    "TailPredictor",
    "StateFormatError",
    "attach",
    "attention_mask",
    "crossover_rank",
    "participation_ratio",
    "select_modules",
    "stable_rank",
    "tail_window",
    "ZeroGradientWarning",
    "MixedWeightsWarning",
]
