"""Weights cast to the autocast dtype once per probe update, not once per chunk.

Autocast keeps its cast of a weight for the rest of the autocast region only when the weight is a
leaf that requires grad. The fast engine (:func:`~spectral_lens.gradients.engines.fast_engine`)
switches ``requires_grad`` off for every parameter, so that the trunk builds no autograd graph. As a
side effect, autocast re-casts every weight in every chunk. On an H100 (GPT-2 small, M = 64 in 8
chunks, bf16) the probe launched 1,288 cast kernels, against 297 for the no-grad forward of the same
chunks; about 1,000 extra launches.

:func:`cached_linear_casts` keeps one cast of each weight and bias for the whole ``update``:

* Every ``nn.Linear`` whose forward is ``nn.Linear.forward`` gets, for the duration of the pass, an
  instance ``forward`` that hands ``F.linear`` the kept casts. So does every ``transformers``
  ``Conv1D`` (GPT-2's projections) whose forward has exactly the source this module reproduces
  (``torch.addmm`` of bias, input and weight); any other version is left alone. The model's
  parameters themselves are untouched.
* :func:`~spectral_lens.gradients.linear_cross_entropy` casts the head through :func:`cast_of`.

The result is bit-identical. A cast is a deterministic rounding, so the kept copy holds the same
bits autocast would make. And under autocast, ``F.linear`` leaves an operand that is already in the
autocast dtype as it is. A kept cast is reused only while its source is the same tensor object, at
the same version counter and data pointer, so an in-place update or a re-allocated parameter (as
with FSDP) gets a fresh cast. Tensors that require grad, float64 tensors (autocast leaves them
alone), tensor subclasses (DTensor) and parametrized or hook-computed weights always take the plain
path.

The cost is memory. During ``update`` the probe holds one copy, in the autocast dtype, of each
``nn.Linear`` weight it has used. That is what autocast itself holds through a training step's
forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CastCache", "cached_linear_casts", "cast_of", "ENABLED"]

#: Switch for benchmarks and tests (the probe reads it at each ``update``); the cache changes no result.
ENABLED = True

_ACTIVE = threading.local()  # .cache: the CastCache of the pass running on this thread, if any


class CastCache:
    """Casts of tensors that do not require grad, kept by source tensor and dtype.

    ``model``: the model whose ``nn.Linear`` (and ``Conv1D``) modules :func:`cached_linear_casts` will serve,
    found here once (a module-tree walk per chunk cost about as much host time as the casts did);
    ``None``: they are found at each :func:`cached_linear_casts`. ``modules``: ``list(model.modules())`` where
    the caller has it (the probe's one walk per update; no walk here)."""

    def __init__(self, model: nn.Module | None = None, modules: list[nn.Module] | None = None) -> None:
        self._kept: dict[tuple[int, torch.dtype], tuple] = {}  # (source, _state(source), cast)
        self._by_module: dict[int, tuple] = {}  # the modules' kept casts (see _kept_params)
        self.modules = None if model is None else _cast_keeping_modules(model, modules)

    def __len__(self) -> int:
        """Casts held: by :meth:`cast` and for modules (see :func:`cached_linear_casts`)."""
        return len(self._kept) + len(self._by_module)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.to(dtype)``, made once while ``t`` is unchanged (same object, version and storage)."""
        key = (id(t), dtype)
        hit = self._kept.get(key)
        if hit is not None and hit[0] is t and hit[1] == _state(t):
            return hit[2]
        out = t.to(dtype)  # t does not require grad (_keepable): no graph to cut
        self._kept[key] = (t, _state(t), out)  # holding t: its id cannot be reused
        return out


def _keepable(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the cast of ``t`` to ``dtype`` may be kept: a plain tensor or parameter, not requiring
    grad, floating point, not float64 (autocast does not cast it) and not already ``dtype``."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and not t.requires_grad
        and t.is_floating_point()
        and t.dtype not in (torch.float64, dtype)
    )


def cast_of(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, taken from the active pass's cache where it may be kept."""
    cache = getattr(_ACTIVE, "cache", None)
    if cache is not None and _keepable(t, dtype):
        return cache.cast(t, dtype)
    return t.to(dtype)


def _kept_params(module: nn.Module, cache: CastCache, device: str) -> tuple | None:
    """``(weight, bias)`` of ``module`` cast to the autocast dtype and kept in ``cache``, or ``None``
    where autocast would not cast them (autocast off, float64, requiring grad, a tensor subclass, a
    parametrized weight).

    One entry per module, replaced when its weight or bias changes (another object, version or
    storage), so the copies held never exceed one per module. It runs once per module call, so the
    common case (the same tensors, unchanged, under the same autocast state as the module's previous
    call) is one dictionary lookup and a few comparisons: its Python cost must stay below that of the
    casts it saves."""
    params = module._parameters
    w = params.get("weight")
    if w is None or "bias" not in params:  # a parametrized (torch.nn.utils.parametrize) or hooked weight
        return None
    b = params["bias"]
    # entry: (weight, bias, their (version, data_ptr) pairs, autocast device and dtype, the casts)
    hit = cache._by_module.get(id(module))
    if (hit is not None and hit[0] is w and hit[1] is b and hit[2] == _state(w) and hit[3] == _state(b)
            and torch.is_autocast_enabled(hit[4]) and torch.get_autocast_dtype(hit[4]) == hit[5]):
        return hit[6]
    if not torch.is_autocast_enabled(device) or w.device.type != device:
        return None
    dtype = torch.get_autocast_dtype(device)
    if not (_keepable(w, dtype) and (b is None or _keepable(b, dtype))):
        return None
    kept = (w.to(dtype), None if b is None else b.to(dtype))  # neither requires grad (_keepable)
    cache._by_module[id(module)] = (w, b, _state(w), _state(b), device, dtype, kept)
    return kept


def _state(t: torch.Tensor | None) -> tuple[int, int] | None:
    """What changes when a tensor's values may have: its version counter and its storage address."""
    return None if t is None else (t._version, t.data_ptr())


def _linear_forward(module: nn.Linear, cache: CastCache, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with the autocast casts of weight and bias taken from ``cache``."""
    kept = _kept_params(module, cache, input.device.type)
    if kept is None:
        return F.linear(input, module.weight, module.bias)
    return F.linear(input, *kept)


#: ``transformers.pytorch_utils.Conv1D.forward`` as this module reproduces it (GPT-2's projections:
#: ``x W + b`` with the weight stored transposed). A class whose forward has other source is left alone.
_HF_CONV1D_FORWARD = """
def forward(self, x):
    size_out = x.size()[:-1] + (self.nf,)
    x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    x = x.view(size_out)
    return x
"""


def _conv1d_forward(module: nn.Module, cache: CastCache, x: torch.Tensor) -> torch.Tensor:
    """``Conv1D.forward`` (:data:`_HF_CONV1D_FORWARD`) with the casts of weight and bias from ``cache``."""
    size_out = x.size()[:-1] + (module.nf,)
    kept = _kept_params(module, cache, x.device.type)
    w, b = (module.weight, module.bias) if kept is None else kept
    return torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)


@functools.lru_cache(maxsize=None)
def _is_hf_conv1d(cls: type) -> bool:
    """``cls`` is ``transformers``' ``Conv1D`` and its forward is exactly :data:`_HF_CONV1D_FORWARD`."""
    from .conv1d import HF_CONV1D  # (module, qualname): transformers is never imported here

    if (cls.__module__, cls.__qualname__) != HF_CONV1D:
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    strip = lambda text: [line.strip() for line in text.strip().splitlines() if line.strip()]  # noqa: E731
    return strip(source) == strip(_HF_CONV1D_FORWARD)


def _cached_forward(module: nn.Module):
    """The cast-keeping forward for ``module``'s class (``None``: not one this module reproduces)."""
    cls = type(module)
    if cls.forward is nn.Linear.forward:
        return _linear_forward
    if cls.__name__ == "Conv1D" and _is_hf_conv1d(cls):
        return _conv1d_forward
    return None


def _compiled(model: nn.Module, modules: list[nn.Module] | None = None) -> bool:
    """A ``torch.compile``d model or submodule: an instance ``forward`` would cost recompilations.
    ``modules``: ``list(model.modules())`` where the caller has it."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported yet: nothing can be compiled
    if dynamo is None:
        return False
    return any(isinstance(m, dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in (model.modules() if modules is None else modules))


def _cast_keeping_modules(model: nn.Module, modules: list[nn.Module] | None = None) -> list[tuple[nn.Module, object]]:
    """``(module, cast-keeping forward)`` for every ``nn.Linear`` (forward ``nn.Linear.forward``) and
    ``transformers`` ``Conv1D`` of ``model``; none in a compiled model. ``modules``: ``list(model.modules())``
    where the caller has it."""
    if _compiled(model, modules):
        return []
    found = ((m, _cached_forward(m)) for m in (model.modules() if modules is None else modules))
    return [(m, f) for m, f in found if f is not None]


@contextlib.contextmanager
def cached_linear_casts(model: nn.Module, cache: CastCache | None):
    """Inside the block, ``model``'s plain ``nn.Linear`` and ``Conv1D`` modules and :func:`cast_of` take their casts to
    the autocast dtype from ``cache``. ``None``, or a compiled model: nothing changes. Modules that
    already have an instance ``forward`` (set by another library's wrapper) are left alone. Every
    instance ``forward`` set here is removed on exit, also on an exception."""
    if cache is None:
        yield
        return
    mine = []
    for m, forward in _cast_keeping_modules(model) if cache.modules is None else cache.modules:
        if "forward" not in m.__dict__:
            f = functools.partial(forward, m, cache)
            # an instance attribute shadows the class's forward (hooks still run); a plain dict
            # store, since nn.Module.__setattr__ costs several microseconds per call
            m.__dict__["forward"] = f
            mine.append((m, f))
    outer, _ACTIVE.cache = getattr(_ACTIVE, "cache", None), cache
    try:
        yield
    finally:
        _ACTIVE.cache = outer
        for m, f in mine:
            if m.__dict__.get("forward") is f:  # without_head may have replaced and removed it
                del m.__dict__["forward"]
