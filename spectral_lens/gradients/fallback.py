"""The ``vmap`` engine's fallback: models ``torch.func.vmap`` cannot trace run on the per-sample loop.

``torch.func`` refuses many models: data-dependent Python control flow (``if x.sum() > 0``, Hugging
Face attention-mask checks) and ``.item()`` (``vmap: ...``), in-place updates of captured buffers
(BatchNorm running statistics under ``train_mode=True``: ``During a grad ... transform ...``; ``"auto"`` takes the
loop there at binding, :func:`~._engine_choice.general_engine`),
``torch.autograd.Function`` subclasses without ``setup_context`` (reentrant activation checkpointing,
custom kernels; a module backward hook, ``register_full_backward_hook``, would install one too, but the
probe switches those off while it measures), saved-tensor hooks (non-reentrant activation
checkpointing), operators without a batching rule (``Batching rule not implemented for ...``:
fake-quantize observers), native kernels without vmap support (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``:
``... doesn't match the broadcast shape ...``). :func:`is_untraceable` recognizes these refusals by the phrases torch's
messages use. With ``engine="auto"`` the probe then warns (:class:`EngineFallbackWarning`, naming the
parameters, the refusal and its likely cause) and computes those gradients with
:func:`~.engines.loop_engine`, which gives the same gradients one sample at a time; later batches go
straight to the loop. With ``engine="vmap"`` asked for explicitly it raises instead, naming the likely
cause and ``engine="loop"`` as the remedy.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .._warnings import SpectralLensWarning
from .engines import ForwardFn, LossFn, LossScale, loop_engine, vmap_engine

__all__ = ["EngineFallbackWarning", "REFUSALS", "is_untraceable", "likely_cause", "vmap_or_loop"]


class EngineFallbackWarning(SpectralLensWarning):
    """The ``vmap`` engine could not trace the model; the per-sample loop engine is used instead."""


#: Phrases of torch.func's refusals to transform a function, from torch's own messages (2.x):
#: "vmap: ...", "vmap only supports ...", "... inside of vmap", "To use autograd.Function with vmap";
#: "Batching rule not implemented for aten::..."; "During a grad (vjp, jvp, grad, etc) transform, the
#: function provided attempted to call in-place operation ..."; "In order to use an autograd.Function
#: with functorch transforms ... setup_context"; "functorch functions (vmap, grad, vjp, etc.)
#: incorrectly used ..."; "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor
#: hooks"; "... requires_grad_() ... inside of a function being transformed".
REFUSALS = (
    "vmap",
    "Batching rule not implemented",
    "During a grad (vjp, jvp, grad, etc) transform",
    "functorch",
    "torch.func",
    "function being transformed",
    # not a refusal by name: a native kernel without vmap support writing a batched result into an
    # unbatched buffer of its own (nn.LSTM / nn.GRU / nn.RNN: "output with shape [1, 24] doesn't match
    # the broadcast shape [3, 1, 24]"); a genuine shape error of the model raises again in the loop
    "doesn't match the broadcast shape",
)


def is_untraceable(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.func`` refusing to transform the model (a ``RuntimeError`` whose
    message carries one of the :data:`REFUSALS` phrases), rather than an error of the model itself."""
    return isinstance(exc, RuntimeError) and any(phrase in str(exc) for phrase in REFUSALS)


def likely_cause(exc: BaseException, model: nn.Module) -> str:
    """What in ``model`` most likely made ``torch.func`` refuse it, read from the refusal ``exc``."""
    msg = str(exc)
    if "setup_context" in msg:  # not a module backward hook: the probe switches those off while it measures
        return ("a torch.autograd.Function without setup_context: reentrant activation checkpointing or a custom "
                "autograd.Function / kernel")
    if "During a grad" in msg or "captured Tensor" in msg:
        bn = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
        ]
        if bn:
            return (f"BatchNorm in train mode ({bn[:5]}, train_mode=True) updates its running statistics in "
                    "place; train_mode=False avoids it")
        return ("an in-place update of a buffer or captured tensor in the forward (running statistics, observers, "
                "caches)")
    if "saved tensor hooks" in msg:
        return "saved-tensor hooks (non-reentrant activation checkpointing, activation offloading)"
    if "doesn't match the broadcast shape" in msg:
        rnn = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        if rnn:
            return f"nn.LSTM / nn.GRU / nn.RNN ({rnn[:5]}): their fused kernels have no vmap support"
        return "an operator whose kernel writes into a buffer of its own, without vmap support"
    if "Batching rule not implemented" in msg:
        return "an operator without a vmap batching rule (e.g. fake-quantize observers, custom operators)"
    if msg.lstrip().startswith("vmap:"):
        return "data-dependent Python control flow or .item() in the forward"
    return "an operation torch.func cannot transform"


def vmap_or_loop(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batch: Any,
    n: int,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    fallback: bool = True,
    before_loop: Callable[[], None] | None = None,
    after_sample: Callable[[], None] | None = None,
    loss_scale: LossScale | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """:func:`~.engines.vmap_engine`, or :func:`~.engines.loop_engine` with a warning when vmap cannot
    trace the model. Returns ``(rows, losses, fell_back)``. ``fallback=False`` (``engine="vmap"``
    asked for explicitly): a refusal raises a ``RuntimeError`` naming its likely cause and
    ``engine="loop"`` instead. ``before_loop``: called before the fallback loop runs (the probe's
    bounded-memory mode rewinds the RNG streams there, which the refused attempt may have advanced,
    so the loop draws what a later recomputation on the loop engine draws). ``after_sample``: the loop's
    (:func:`~.engines.loop_engine`). ``loss_scale``: both engines' (float16 backward passes).
    """
    try:
        rows, losses = vmap_engine(model, params, batch, n, forward_fn, loss_fn, loss_scale)
        return rows, losses, False
    except RuntimeError as exc:
        if not is_untraceable(exc):
            raise
        refusal = textwrap.shorten(str(exc).strip().splitlines()[0], 240, placeholder=" ...")
        cause = likely_cause(exc, model)
        if not fallback:
            raise RuntimeError(
                f"per-sample gradients of {list(params)}: engine='vmap' cannot trace {type(model).__name__} "
                f"({refusal}). Likely cause: {cause}. Pass engine='loop' (the same gradients, one backward per "
                "sample), or engine='auto', which uses it where vmap cannot trace"
            ) from exc
    warnings.warn(
        f"per-sample gradients of {list(params)}: torch.func.vmap cannot trace {type(model).__name__} "
        f"({refusal}; likely cause: {cause}); using engine='loop' (same gradients, one backward per sample). "
        "Pass engine='loop' to skip the attempt.",
        EngineFallbackWarning,
        stacklevel=4,
    )
    if before_loop is not None:
        before_loop()
    rows, losses = loop_engine(model, params, batch, n, forward_fn, loss_fn, after_sample, loss_scale)
    return rows, losses, True
