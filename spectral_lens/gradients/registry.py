"""Per-layer-type fast paths for per-sample gradients (the Opacus ``grad_sample`` shape).

A fast path turns what one ordinary backward pass already provides, the layer's input ``x`` (saved
by a forward hook) and the gradient ``dy`` of the summed per-sample losses with respect to the
layer's output, into per-sample gradients of the layer's own parameters, without a per-sample
backward. Lookup is by the *exact* module type: a subclass that overrides ``forward`` may use its
weight differently, so it must be registered on its own.

Register one for a custom layer::

    @register_fast_path(MyLinear, params=("weight",))
    def my_linear(module, name, x, dy):
        return torch.einsum("bto,bti->boi", dy, x)   # (M, *param.shape)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "FastPath",
    "PerSampleGradFn",
    "register_fast_path",
    "register_fast_path_by_name",
    "fast_path_for",
    "FAST_PATHS",
    "FAST_PATHS_BY_NAME",
]

#: ``fn(module, param_name, x, dy) -> Tensor (M, *param.shape)`` with ``x`` the module's first
#: positional input and ``dy`` the gradient of ``sum_m L_m`` w.r.t. its output, both with the sample
#: index in dimension 0. Called once per module call; calls are summed.
PerSampleGradFn = Callable[[nn.Module, str, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FastPath:
    """A registered fast path: the function and the local parameter names it handles."""

    per_sample_grad: PerSampleGradFn
    params: tuple[str, ...]


FAST_PATHS: dict[type, FastPath] = {}
"""Module type -> :class:`FastPath`. Populated by :func:`register_fast_path`."""


def register_fast_path(module_type: type, fn: PerSampleGradFn | None = None, *, params: tuple[str, ...] = ("weight", "bias")):
    """Register ``fn`` as the fast path for parameters ``params`` of modules of exactly ``module_type``.

    Usable as a call (``register_fast_path(T, fn)``) or a decorator (``@register_fast_path(T)``).
    Re-registering a type replaces its entry.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_fast_path needs an nn.Module subclass, got {module_type!r}")

    def add(f: PerSampleGradFn) -> PerSampleGradFn:
        FAST_PATHS[module_type] = FastPath(f, tuple(params))
        return f

    return add if fn is None else add(fn)


FAST_PATHS_BY_NAME: dict[tuple[str, str], FastPath] = {}
"""``(module's __module__, class __qualname__)`` -> :class:`FastPath`, for layer types of optional
libraries that must not be imported to register them (``transformers``' ``Conv1D``). Populated by
:func:`register_fast_path_by_name`; an entry in :data:`FAST_PATHS` for the same class wins."""


def register_fast_path_by_name(
    module: str, qualname: str, fn: PerSampleGradFn | None = None, *, params: tuple[str, ...] = ("weight", "bias")
):
    """Register ``fn`` for the class ``qualname`` defined in module ``module`` without importing it.

    Matching is exact on ``type(m).__module__`` and ``type(m).__qualname__`` (subclasses are not
    matched, as with :func:`register_fast_path`). Usable as a call or a decorator.
    """
    if not (isinstance(module, str) and module and isinstance(qualname, str) and qualname):
        raise TypeError(f"register_fast_path_by_name needs two non-empty strings, got {module!r}, {qualname!r}")

    def add(f: PerSampleGradFn) -> PerSampleGradFn:
        FAST_PATHS_BY_NAME[(module, qualname)] = FastPath(f, tuple(params))
        return f

    return add if fn is None else add(fn)


#: The classes that torch's composable APIs mix into a module's class, each with the prefix of the new class's name:
#: FSDP2's ``fully_shard`` (``FSDPModule``, ``"FSDP"``), ``torch.distributed._composable.replicate`` (``DDP``,
#: ``"DDP"``) and the FSDP2-based ``replicate`` (``ReplicateModule``, ``"Replicate"``).
_COMPOSABLE_MIXINS = {"FSDPModule": "FSDP", "DDP": "DDP", "ReplicateModule": "Replicate"}


def fsdp2_base(cls: type) -> type:
    """The class that FSDP2's ``fully_shard`` or the composable ``replicate`` mixed its class into, else ``cls``.

    ``fully_shard(module)`` swaps the module's class for ``type("FSDP" + name, (FSDPModule, cls), ...)``
    (``nn.Linear`` -> ``FSDPLinear``), and ``torch.distributed._composable.replicate`` likewise for
    ``DDP`` + name (``DDPLinear``; the FSDP2-based ``replicate``: ``Replicate`` + name), which add hooks and
    collectives around the forward but no forward of their own: the fast path of ``cls`` measures it as before
    (without this, such a layer had none, and under FSDP no other engine can measure it). Matched by the mixin's
    name and package, so torch.distributed is never imported here; a subclass of that class (or one that defines
    ``forward``) is not unwrapped.
    """
    bases = cls.__bases__
    if (len(bases) == 2 and bases[0].__module__.startswith("torch.distributed.")
            and bases[0].__name__ in _COMPOSABLE_MIXINS and "forward" not in cls.__dict__
            and cls.__name__ == _COMPOSABLE_MIXINS[bases[0].__name__] + bases[1].__name__):
        return bases[1]
    return cls


def fast_path_for(module: nn.Module, param_name: str) -> FastPath | None:
    """The fast path handling ``module.<param_name>``, or ``None`` (then the generic engine is used).

    Looked up by exact type in :data:`FAST_PATHS`, then by ``(__module__, __qualname__)`` in
    :data:`FAST_PATHS_BY_NAME`; a module that FSDP2's ``fully_shard`` or the composable ``replicate`` was applied
    to directly is looked up by the class it was (:func:`fsdp2_base`).
    """
    cls = fsdp2_base(type(module))
    entry = FAST_PATHS.get(cls)
    if entry is None:
        entry = FAST_PATHS_BY_NAME.get((cls.__module__, cls.__qualname__))
    return entry if entry is not None and param_name in entry.params else None
