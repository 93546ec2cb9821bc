"""DeepSpeed, recognized without importing it: the ``DeepSpeedEngine`` wrapper and ZeRO stage 3 parameters.

Under ZeRO-3 every parameter of the model is partitioned over the ranks: outside a forward its ``.data``
is an empty placeholder (``numel() == 0``; the whole tensor's shape is ``ds_shape``, its size ``ds_numel``,
whether it is gathered ``ds_status``), and each module's forward gathers its parameters (an all-gather
that every rank must run) and releases them afterwards. ZeRO stages 1 and 2 keep the parameters whole and
add no ``ds_*`` attributes. The functions here read those attributes only (duck typing; spectral-lens never
imports ``deepspeed``), so a model that DeepSpeed never touched costs a loop over its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["behind_zero3_hooks", "fast_hint", "refuse_zero3_params", "refuse_zero3_placeholders", "whole_shape",
           "zero3_names", "zero3_partitioned"]


def is_zero3(p) -> bool:
    """Whether ``p`` is a parameter managed by ZeRO stage 3: it carries the attributes ZeRO-3 sets together on
    every parameter it partitions (``ds_id``, ``ds_shape``, ``ds_numel``, ``ds_status``); one of them alone
    (a user's own ``ds_numel`` attribute) is not taken for ZeRO-3."""
    return all(hasattr(p, a) for a in ("ds_id", "ds_shape", "ds_numel", "ds_status"))


def is_placeholder(p) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter that is not gathered now: its ``.data`` holds fewer elements than
    the whole tensor (``ds_numel``), an empty placeholder outside a forward or ``GatheredParameters``."""
    return is_zero3(p) and p.numel() != getattr(p, "ds_numel", -1)


def zero3_names(named: Iterable[tuple[str, object]]) -> list[str]:
    """The names, among ``(name, parameter)`` pairs, of the parameters managed by ZeRO stage 3."""
    return [n for n, p in named if is_zero3(p)]


def zero3_partitioned(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is managed by ZeRO stage 3: then each module's forward all-gathers
    its parameters over the ranks, so every rank must run as many forwards (as under FSDP)."""
    return any(is_zero3(p) for p in model.parameters())


def _describe(name: str, p) -> str:
    shape = getattr(p, "ds_shape", None)
    shape = list(shape) if shape is not None else "?"
    status = getattr(p, "ds_status", None)
    status = getattr(status, "name", status)
    return f"{name} (ds_shape {shape}, ds_status {status}, local .data shape {list(p.shape)})"


def _shown(named: dict, names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(_describe(n, named[n]) for n in names[:3]) + more


def whole_shape(p) -> torch.Size:
    """The whole tensor's shape of ``p``: ``ds_shape`` for a ZeRO-3 parameter (its ``.data`` is a placeholder
    outside a forward), ``p.shape`` otherwise."""
    shape = getattr(p, "ds_shape", None) if is_zero3(p) else None
    return p.shape if shape is None else torch.Size(shape)


def behind_zero3_hooks(module: nn.Module, handle) -> None:
    """Move the forward hook of ``handle`` (registered on ``module`` with ``prepend=True``) behind ZeRO-3's own
    forward hooks on ``module`` (functions defined in a ``deepspeed.`` module), keeping it before every other.

    ZeRO-3's forward hooks release the module's weights and wrap its output in an identity whose backward
    gathers them again before the module's backward (which then releases them). A hook before them that
    returns a new leaf output (the fast engine's ``output.detach().requires_grad_()``) had ZeRO-3 wrap that
    leaf: the backward gathered the probed module's weights while the module's own backward, cut off at the
    leaf, never released them (``Cannot free a ZeRO-3 parameter while it is still active in submodules`` at the
    next ``GatheredParameters``). Behind them, ZeRO-3 wraps the module's own output, upstream of the leaf, and
    the backward from the leaf never reaches it. A model without ZeRO-3's hooks is left as it is."""
    hooks = module._forward_hooks
    keys = list(hooks)
    zero = [i for i, k in enumerate(keys) if str(getattr(hooks[k], "__module__", "")).startswith("deepspeed.")]
    if not zero or handle.id not in hooks or keys.index(handle.id) > zero[-1]:
        return
    order = [k for k in keys[: zero[-1] + 1] if k != handle.id] + [handle.id] + keys[zero[-1] + 1 :]
    items = dict(hooks)
    hooks.clear()  # the same dictionary (the handles hold it), in the new order
    hooks.update((k, items[k]) for k in order)


def fast_hint(bad: list[str], why: dict, other_fast: Callable[[list[str]], str | None] | None, exact: str) -> str:
    """The remedy "probe matrices that have a fast path with engine='auto' or 'fast'" of a refusal of the engines
    other than the fast one (ZeRO-3, FSDP2, Accelerate's offloading; ``exact``: where the fast path is exact) for the
    refused parameters ``bad``: for them where some has no reason against its fast path (``why``: name -> reason),
    else for other matrices where ``other_fast(bad)`` names one (the reasons were the refused parameters' own),
    else ``""``. Honest about what binding cannot see: the fast path needs its layer's input batch-first (a
    sequence-first layout is found in the first pass and refused there)."""
    what = "(nn.Linear, transformers' Conv1D; not tied; on a batch-first input, the sample index in dimension 0)"
    if not all(why.get(n) for n in bad):
        return f"probe matrices that have a fast path {what} with engine='auto' or 'fast' ({exact})"
    other = None if other_fast is None else other_fast(bad)
    if other is None:
        return ""
    return (f"probe other matrices that have a fast path (such as {other}; {what[1:-1]}) with engine='auto' or 'fast' "
            f"({exact})")


def refuse_zero3_params(params: dict, engines: dict, who: str = "PerSampleGradientProbe",
                        why_not_fast: Callable[[str], str | None] | None = None,
                        other_fast: Callable[[list[str]], str | None] | None = None) -> None:
    """``ValueError`` when any of ``params`` (name -> parameter to probe) is managed by ZeRO stage 3 and its
    engine (``engines``: name -> engine) is not the fast one.

    The fast engine reads each module's input and output gradient inside the module's forward and ZeRO-3's
    own gather (and the backward through later modules regathers their weights in ZeRO-3's backward hooks),
    never the weight itself, so its rows are those of the whole weight, on every rank that runs the same
    passes (the lens runs the gradient protocol on every rank under ZeRO-3). The ``vmap`` engine calls the
    model with the parameters swapped for its own tensors (``torch.func.functional_call``), which ZeRO-3's
    gather then overwrites with its placeholders and gathered partitions, and the ``loop`` engine takes
    ``torch.autograd.grad`` of the parameters themselves, whose ``.data`` ZeRO-3 empties after each forward:
    neither can be exact. ``why_not_fast``: why the fast path cannot measure a parameter (``None`` where it can):
    said for each, and ``engine='auto'`` or ``'fast'`` suggested only where some fast path can run (before: also
    after the fast path had proved unusable). ``other_fast``: another parameter of the model whose fast path can run
    (given the refused names; ``None`` where none can): where the refused ones have none, the hint names it ("probe
    other matrices"), as a reason of one parameter (no fast path for an Embedding, a tied weight) leaves others."""
    bad = [n for n in zero3_names(params.items()) if engines.get(n) != "fast"]
    if not bad:
        return
    why = {n: why_not_fast(n) for n in bad} if why_not_fast is not None else {}
    no_fast = "".join(f"; the fast path cannot measure {n}: {why[n]}" for n in bad[:3] if why.get(n))
    fast = fast_hint(bad, why, other_fast, "exact under ZeRO-3 when every rank runs the same passes, as SpectralLens does")
    fast += ", or " if fast else ""
    raise ValueError(
        f"{who}: the probed parameter(s) {_shown(params, bad)} are partitioned by DeepSpeed ZeRO stage 3 and would "
        f"use an engine other than the fast one ({ {n: engines.get(n) for n in bad} }{no_fast}): the vmap and loop "
        "engines need the whole weight outside a forward, where it is an empty placeholder on every rank (its whole "
        f"shape is ds_shape). Instead: {fast}measure activations only (SpectralLens(model, pool, params=())), or train with ZeRO stage 1 or 2 "
        "(whole parameters), or probe an unsharded copy: on every rank, with deepspeed.zero.GatheredParameters("
        "list(model.parameters())): state = {k: v.clone() for k, v in model.state_dict().items()}; load it into a "
        "plain model of the same architecture and probe that (docs/guide-multi-gpu.md, DeepSpeed ZeRO)"
    )


def refuse_zero3_placeholders(named: dict, who: str) -> None:
    """``ValueError`` when any of ``named`` (name -> parameter to read) is a ZeRO-3 placeholder now (not
    gathered): its ``.data`` is empty, so a value read from it would be wrong. Gathered ones pass."""
    bad = [n for n, p in named.items() if is_placeholder(p)]
    if bad:
        raise ValueError(
            f"{who}: the parameter(s) {_shown(named, bad)} are DeepSpeed ZeRO stage 3 placeholders (partitioned "
            "over the ranks; this rank's .data is not the whole matrix). Gather them first, on every rank: "
            "with deepspeed.zero.GatheredParameters(list(model.parameters())): ... (docs/guide-multi-gpu.md, "
            "DeepSpeed ZeRO)"
        )
