"""The ``vmap`` engine's fallback: models ``torch.func.vmap`` cannot trace run on the per-sample loop.

``vmap`` fails on data-dependent Python control flow (``if x.sum() > 0``), on ``.item()`` and on some
in-place ops; Hugging Face models hit this through their attention-mask handling. Instead of PyTorch's
raw ``RuntimeError("vmap: ...")`` the probe warns (:class:`EngineFallbackWarning`, naming the
parameters and the cause) and computes those gradients with :func:`~.engines.loop_engine`, which gives
the same gradients one sample at a time. Later batches go straight to the loop.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .._warnings import SpectralLensWarning
from .engines import ForwardFn, LossFn, loop_engine, vmap_engine

__all__ = ["EngineFallbackWarning", "is_untraceable", "vmap_or_loop"]


class EngineFallbackWarning(SpectralLensWarning):
    """The ``vmap`` engine could not trace the model; the per-sample loop engine is used instead."""


def is_untraceable(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.func.vmap`` refusing to trace the model (its messages start with ``vmap:``)."""
    return isinstance(exc, RuntimeError) and str(exc).lstrip().startswith("vmap:")


def vmap_or_loop(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batch: Any,
    n: int,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """:func:`~.engines.vmap_engine`, or :func:`~.engines.loop_engine` with a warning when vmap cannot
    trace the model. Returns ``(rows, losses, fell_back)``."""
    try:
        rows, losses = vmap_engine(model, params, batch, n, forward_fn, loss_fn)
        return rows, losses, False
    except RuntimeError as exc:
        if not is_untraceable(exc):
            raise
        cause = str(exc).strip().splitlines()[0][:240]
    warnings.warn(
        f"per-sample gradients of {list(params)}: torch.func.vmap cannot trace {type(model).__name__} "
        f"({cause}); using engine='loop' (same gradients, one backward per sample). Pass engine='loop' "
        "to skip the attempt.",
        EngineFallbackWarning,
        stacklevel=4,
    )
    rows, losses = loop_engine(model, params, batch, n, forward_fn, loss_fn)
    return rows, losses, True
