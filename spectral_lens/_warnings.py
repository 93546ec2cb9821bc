"""Warning and error types of spectral-lens, so users can filter or catch them precisely."""

from __future__ import annotations

__all__ = [
    "SpectralLensWarning",
    "InsufficientRowsWarning",
    "CompiledModelWarning",
    "NonFiniteRowsWarning",
    "ZeroGradientWarning",
    "MixedWeightsWarning",
    "NonFiniteError",
    "SpectrumFormatError",
    "StateFormatError",
]


class SpectralLensWarning(UserWarning):
    """Base class of every warning spectral-lens emits (``warnings.filterwarnings`` on it)."""


class InsufficientRowsWarning(SpectralLensWarning):
    """Fewer rows (samples) than a rank window needs: eigenvalues beyond ``rows - 1`` are noise or zero."""


class CompiledModelWarning(SpectralLensWarning):
    """Hooks were attached to a ``torch.compile`` wrapper, where they may not fire as expected."""


class NonFiniteRowsWarning(SpectralLensWarning):
    """Rows containing NaN or Inf were skipped (only under ``nonfinite="skip"``)."""


class ZeroGradientWarning(SpectralLensWarning):
    """Every per-sample gradient of a probed parameter is exactly zero (zero-initialized head at
    step 0, or no gradient path); the gradient spectrum is all zero."""


class MixedWeightsWarning(SpectralLensWarning):
    """A ``PerSampleGradientProbe`` saw the model's weights written in place (an optimizer step) between two
    ``update`` calls without a ``reset()``: its spectrum mixes rows from two checkpoints. Warned once per
    accumulation; to accumulate across steps on purpose, filter it
    (``warnings.filterwarnings("ignore", category=MixedWeightsWarning)``)."""


class NonFiniteError(ValueError):
    """Input rows or losses contained NaN or Inf, or rows whose products leave the range of the
    precision they are formed in (overflow to Inf, or underflow below float32's normal range)."""


class SpectrumFormatError(ValueError):
    """A file on disk is not a valid spectral-lens file (corrupted, truncated or of another kind)."""


class StateFormatError(ValueError):
    """An accumulator state (dict or file) is malformed, corrupted or of another configuration."""
