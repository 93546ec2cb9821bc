"""Names of a Hugging Face PEFT model (LoRA and the other ``peft`` adapters) as a user types them.

``get_peft_model(model, LoraConfig(...))`` wraps the model (``PeftModel.base_model.model`` is it again)
and replaces each target ``nn.Linear``/``Conv1D`` by a layer holding the original one as ``base_layer``.
So the model's own names gain a ``base_model.model.`` prefix and the targets' weights a ``base_layer``
segment: ``base_model.model.transformer.h.1.attn.c_proj.base_layer.weight`` for GPT-2's
``transformer.h.1.attn.c_proj.weight``. :func:`short_name` gives the name without them, which the
lens's ``layers=`` and the probe's ``params=`` also match (the names of the model before ``peft`` wrapped
it, and of ``merge_and_unload()``'s). A module in ``modules_to_save`` (often the LM head) is wrapped too:
its forward runs the active adapter's trained copy, ``lm_head.modules_to_save.default``, which
:func:`saved_copies` names ``lm_head`` for the probe (the active adapter's: the probe follows
``set_adapter``). Records carry these short names too (:func:`spectral_lens.capture.record_names`), so a
LoRA run's keys are the base model's. No import of ``peft``: it is recognized by its classes' module.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

__all__ = ["adapter_names", "base_prefix", "has_peft_layers", "is_peft", "saved_copies", "saved_wrappers", "short_name",
           "vmap_untraceable"]


def _peft_class(obj: object) -> type | None:
    """The first class of ``obj``'s MRO defined in ``peft``: its own class, or the one FSDP2's ``fully_shard``
    subclassed in place (``FSDPPeftModel``, defined in ``torch.distributed.fsdp``); ``None`` for no peft object."""
    return next((c for c in type(obj).__mro__ if c.__module__.split(".", 1)[0] == "peft"), None)


def _is_peft(obj: object) -> bool:
    return _peft_class(obj) is not None


is_peft = _is_peft  # an object of a peft class (a PeftModel, a LoRA layer, a ModulesToSaveWrapper)


def adapter_names(model: nn.Module) -> tuple[str, ...] | None:
    """The names of the adapters of a ``PeftModel`` (its ``peft_config``, which ``add_adapter``,
    ``load_adapter`` and ``delete_adapter`` change, and with them its ``modules_to_save`` wrappers);
    ``None`` for any other model (read in O(1): the probe compares it before each pass)."""
    config = getattr(model, "peft_config", None) if _is_peft(model) else None
    return tuple(config) if isinstance(config, dict) else None


def has_peft_layers(model: nn.Module) -> bool:
    """Whether ``model`` is a ``PeftModel`` or holds ``peft`` layers (its ``get_base_model()`` does)."""
    return any(_is_peft(m) for m in model.modules())


def base_prefix(model: nn.Module) -> str:
    """``"base_model.model."`` for a ``PeftModel`` (the name of its ``get_base_model()`` plus a dot);
    ``""`` for any other model."""
    if not _is_peft(model) or not callable(getattr(model, "get_base_model", None)):
        return ""
    inner = model.get_base_model()
    return next((f"{n}." for n, m in model.named_modules() if m is inner and n), "")


def short_name(name: str, prefix: str, *, base_layer: bool) -> str:
    """``name`` without the ``PeftModel``'s ``prefix`` and, with ``base_layer=True`` (parameter names),
    without the ``base_layer`` segments of ``peft``'s wrapped layers: the name the weight has in the
    model before wrapping (``lora_A``/``lora_B`` keep theirs)."""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    if base_layer:
        name = ".".join(part for part in name.split(".") if part != "base_layer")
    return name


def saved_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: wrapper}`` for each ``peft`` ``ModulesToSaveWrapper`` of ``model``
    (``LoraConfig(modules_to_save=[...])``); ``{}`` for a model without one."""
    return {name: m for name, m in model.named_modules()
            if getattr(_peft_class(m), "__name__", None) == "ModulesToSaveWrapper"}


def saved_copies(model: nn.Module, wrappers: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """``{"<wrapper>.modules_to_save.<adapter>.": "<wrapper>."}`` for each ``peft`` ``ModulesToSaveWrapper``
    (``wrappers``, default :func:`saved_wrappers` of ``model``) whose forward runs one active adapter's copy:
    the copy's names as the user types them (``lm_head.weight``). A wrapper whose adapters are disabled
    (``disable_adapter()``) or whose active adapter has no copy runs its frozen ``original_module``, which then
    has those names: ``{"<wrapper>.original_module.": "<wrapper>."}``; otherwise the original keeps its own
    name only.
    Depends on the active adapter (``set_adapter``): the probe reads it again before each pass."""
    out = {}
    for name, m in (saved_wrappers(model) if wrappers is None else wrappers).items():
        active, copies = list(getattr(m, "active_adapters", None) or []), getattr(m, "modules_to_save", {})
        if getattr(m, "disable_adapters", False) or not any(a in copies for a in active):
            out[f"{name}.original_module."] = f"{name}."  # peft's forward runs the original
        elif len(active) == 1:
            out[f"{name}.modules_to_save.{active[0]}."] = f"{name}."
    return out


@functools.lru_cache(maxsize=64)
def _untraceable_functions(module: str) -> tuple[str, ...]:
    """The ``torch.autograd.Function`` classes in the namespace of the Python module ``module`` that
    ``torch.func.vmap`` cannot run: without ``setup_context`` (old-style ``forward(ctx, ...)``), or without a
    ``vmap`` rule of their own or ``generate_vmap_rule = True``."""
    base = torch.autograd.Function
    return tuple(name for name, obj in vars(sys.modules.get(module, sys)).items()
                 if isinstance(obj, type) and issubclass(obj, base) and obj is not base
                 and (obj.setup_context is base.setup_context
                      or (obj.vmap is base.vmap and not getattr(obj, "generate_vmap_rule", False))))


def vmap_untraceable(model: nn.Module) -> dict[str, str]:
    """``{name: "<layer class>, whose module defines <Functions>"}`` for each ``peft`` layer of ``model`` whose forward runs a
    ``torch.autograd.Function`` that ``torch.func.vmap`` cannot trace (LoHa's ``HadaWeight``, RandLoRA's
    ``UniqueBaseGrad``: recognized as the Functions of the layer class's own Python module); ``{}`` for a
    model without ``peft`` layers or with LoRA's only."""
    out = {}
    for name, m in model.named_modules():
        cls = _peft_class(m)
        fns = _untraceable_functions(cls.__module__) if cls is not None else ()
        if fns:
            out[name] = f"{cls.__module__}.{cls.__name__}, whose module defines {', '.join(fns)}"
    return out
