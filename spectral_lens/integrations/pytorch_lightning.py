"""The Lightning callback for the standalone ``pytorch_lightning`` package (extra ``lightning``)."""

from __future__ import annotations

from ._lightning_hooks import LightningHooks
from ._require import require

_pl = require("pytorch_lightning", "lightning", "spectral_lens.integrations.pytorch_lightning.SpectralLensLightningCallback")

__all__ = ["SpectralLensLightningCallback"]


class SpectralLensLightningCallback(LightningHooks, _pl.Callback):
    """:class:`spectral_lens.integrations.lightning.SpectralLensLightningCallback` for the standalone
    ``pytorch_lightning`` package: the same arguments and behaviour (both share ``LightningHooks``)."""
