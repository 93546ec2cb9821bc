"""Weights cast to the autocast dtype once per probe update, not once per chunk.

Autocast keeps its cast of a weight for the rest of the autocast region only when the weight is a
leaf that requires grad. The fast engine (:func:`~spectral_lens.gradients.engines.fast_engine`)
switches ``requires_grad`` off for every parameter, so that the trunk builds no autograd graph. As a
side effect, autocast re-casts every weight in every chunk. On an H100 (GPT-2 small, M = 64 in 8
chunks, bf16) the probe launched 1,288 cast kernels, against 297 for the no-grad forward of the same
chunks; about 1,000 extra launches.

:func:`cached_linear_casts` keeps one cast of each weight and bias for the whole ``update``:

* Every ``nn.Linear`` whose forward is ``nn.Linear.forward`` gets, for the duration of the pass, an
  instance ``forward`` that hands ``F.linear`` the kept casts. The model's parameters themselves are
  untouched.
* :func:`~spectral_lens.gradients.linear_cross_entropy` casts the head through :func:`cast_of`.

The result is bit-identical. A cast is a deterministic rounding, so the kept copy holds the same
bits autocast would make. And under autocast, ``F.linear`` leaves an operand that is already in the
autocast dtype as it is. A kept cast is reused only while its source is the same tensor object, at
the same version counter and data pointer, so an in-place update or a re-allocated parameter (as
with FSDP) gets a fresh cast. Tensors that require grad, float64 tensors (autocast leaves them
alone) and tensor subclasses always take the plain path.

The cost is memory. During ``update`` the probe holds one copy, in the autocast dtype, of each
``nn.Linear`` weight it has used. That is what autocast itself holds through a training step's
forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
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

    ``model``: the model whose plain ``nn.Linear`` modules :func:`cached_linear_casts` will serve,
    found here once (a module-tree walk per chunk cost about as much host time as the casts did);
    ``None``: they are found at each :func:`cached_linear_casts`."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self._kept: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, int, torch.Tensor]] = {}
        self._by_module: dict[int, tuple] = {}  # _linear_forward's last casts per module (one lookup)
        self.linears = None if model is None else _plain_linears(model)

    def __len__(self) -> int:
        return len(self._kept)

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t.to(dtype)``, made once while ``t`` is unchanged (same object, version and storage)."""
        key = (id(t), dtype)
        hit = self._kept.get(key)
        if hit is not None and hit[0] is t and hit[1] == t._version and hit[2] == t.data_ptr():
            return hit[3]
        out = t.to(dtype)  # t does not require grad (_keepable): no graph to cut
        self._kept[key] = (t, t._version, t.data_ptr(), out)  # holding t: its id cannot be reused
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


def _linear_forward(module: nn.Linear, cache: CastCache, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with the autocast casts of weight and bias taken from ``cache``.

    It runs once per ``nn.Linear`` call, so the common case (the same weight and bias, unchanged,
    under the same autocast state as the module's previous call) is one dictionary lookup and a few
    comparisons; its Python cost must stay below that of the casts it saves."""
    params = module._parameters
    w, b = params["weight"], params["bias"]
    hit = cache._by_module.get(id(module))
    if (hit is not None and hit[0] is w and hit[1] is b and hit[2] == w._version and hit[3] == w.data_ptr()
            and (b is None or hit[4] == b._version) and torch.is_autocast_enabled(hit[5])
            and torch.get_autocast_dtype(hit[5]) == hit[6]):
        return F.linear(input, hit[7], hit[8])
    device = input.device.type
    if torch.is_autocast_enabled(device) and w.device.type == device:
        dtype = torch.get_autocast_dtype(device)
        if _keepable(w, dtype) and (b is None or _keepable(b, dtype)):
            wc, bc = cache.cast(w, dtype), None if b is None else cache.cast(b, dtype)
            cache._by_module[id(module)] = (w, b, w._version, w.data_ptr(), None if b is None else b._version,
                                            device, dtype, wc, bc)
            return F.linear(input, wc, bc)
    return F.linear(input, w, b)


def _compiled(model: nn.Module) -> bool:
    """A ``torch.compile``d model or submodule: an instance ``forward`` would cost recompilations."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported yet: nothing can be compiled
    if dynamo is None:
        return False
    return any(isinstance(m, dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _plain_linears(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward is ``nn.Linear.forward``; none in a compiled model."""
    if _compiled(model):
        return []
    return [m for m in model.modules() if type(m).forward is nn.Linear.forward]


@contextlib.contextmanager
def cached_linear_casts(model: nn.Module, cache: CastCache | None):
    """Inside the block, ``model``'s plain ``nn.Linear`` modules and :func:`cast_of` take their casts to
    the autocast dtype from ``cache``. ``None``, or a compiled model: nothing changes. Modules that
    already have an instance ``forward`` (set by another library's wrapper) are left alone. Every
    instance ``forward`` set here is removed on exit, also on an exception."""
    if cache is None:
        yield
        return
    mine = []
    for m in _plain_linears(model) if cache.linears is None else cache.linears:
        if "forward" not in m.__dict__:
            f = functools.partial(_linear_forward, m, cache)
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
