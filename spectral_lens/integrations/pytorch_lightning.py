"""The Lightning callback for the standalone ``pytorch_lightning`` package (extra ``lightning``)."""

from __future__ import annotations

from ._lightning_hooks import DOC, LightningHooks
from ._require import require

_pl = require("pytorch_lightning", "lightning", "spectral_lens.integrations.pytorch_lightning.SpectralLensLightningCallback")

__all__ = ["SpectralLensLightningCallback"]


class SpectralLensLightningCallback(LightningHooks, _pl.Callback):
    __doc__ = DOC
