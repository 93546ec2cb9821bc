"""Optional adapters to training frameworks and experiment loggers.

Nothing here is imported by ``import spectral_lens``; each adapter imports its framework when it is
first used and, when the framework is missing, raises an ``ImportError`` naming the extra to install:

* :class:`SpectralLensCallback` (``spectral_lens.integrations.hf``): a Hugging Face
  ``transformers.TrainerCallback``; extra ``hf``.
* :class:`SpectralLensLightningCallback` (``spectral_lens.integrations.lightning``): a
  ``lightning.pytorch`` ``Callback``; extra ``lightning``. The same callback for the older
  ``pytorch_lightning`` package lives in ``spectral_lens.integrations.pytorch_lightning``.
* :class:`TensorBoardSink` (``spectral_lens.integrations.tensorboard``): scalars and spectrum figures
  through ``torch.utils.tensorboard.SummaryWriter``; extra ``tensorboard``.
* :class:`WandbSink` (``spectral_lens.integrations.wandb``): the same for Weights & Biases; extra
  ``wandb``.
* :func:`measurement_summaries` and :func:`measurement_scalars`: the flat scalars every sink logs.
* :func:`checkpoint_position` and :func:`log_history` (``spectral_lens.integrations.trainer_state``): a
  saved Trainer checkpoint's step and tokens, and its logged curves, read from ``trainer_state.json``
  (JSON only; no extra needed).

JSONL run records (:class:`~spectral_lens.records.RunWriter`) stay the default store; sinks are
extra views of the same measurements.
"""

from __future__ import annotations

import importlib

__all__ = [
    "SpectralLensCallback",
    "SpectralLensLightningCallback",
    "TensorBoardSink",
    "WandbSink",
    "measurement_summaries",
    "measurement_scalars",
    "checkpoint_position",
    "log_history",
]

_HOMES = {
    "SpectralLensCallback": ".hf",
    "SpectralLensLightningCallback": ".lightning",
    "TensorBoardSink": ".tensorboard",
    "WandbSink": ".wandb",
    "measurement_summaries": ".summaries",
    "measurement_scalars": ".summaries",
    "checkpoint_position": ".trainer_state",
    "log_history": ".trainer_state",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
