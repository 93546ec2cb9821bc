"""Lightning callback for ``lightning.pytorch`` (extra ``lightning``: ``pip install 'spectral-lens[lightning]'``)."""

from __future__ import annotations

from ._lightning_hooks import DOC, LightningHooks
from ._require import require

_pl = require("lightning.pytorch", "lightning", "spectral_lens.integrations.lightning.SpectralLensLightningCallback")

__all__ = ["SpectralLensLightningCallback"]


class SpectralLensLightningCallback(LightningHooks, _pl.Callback):
    __doc__ = DOC

