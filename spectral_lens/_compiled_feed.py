"""Feeding a capture from inside a ``torch.compile``d graph, without a graph break.

A capture's hook reads its tensor into an accumulator on the host side, which a compiled graph
cannot hold. Traced as Python, the hook breaks the graph (Dynamo cannot trace a ``ContextVar``), which
splits the user's compiled forward at every captured module and is refused outright under
``torch.compile(..., fullgraph=True)``. Traced as one opaque operator, it is neither: the graph calls
``spectral_lens::feed_rows(rows, token, key)`` where the hook ran, and the operator's body, run with the
real tensor, looks the hook up by ``key`` and feeds it eagerly (every rule of an eager hook applies
there: measurement passes, recomputation, a removed capture, the mask set at run time).

The operator returns nothing, so a compiler would drop it as dead code; it is declared to mutate
``token`` (a one-element tensor of the hook's, never written), which keeps it in the graph and in
program order. It is tagged ``cudagraph_unsafe`` where torch has the tag: a CUDA graph replay would
skip its host-side body.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

__all__ = ["available", "feed_rows", "register"]

# key -> the hook object, while it lives; a compiled graph holds only the key (an int constant), so a
# graph compiled while a capture was attached and run after it was removed finds no live hook, or an
# inactive one, and feeds nothing
_HOOKS: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(hook: object) -> int:
    """A key under which the operator finds ``hook`` (its ``feed(rows)`` method) at run time."""
    key = next(_KEYS)
    _HOOKS[key] = hook
    return key


def _define() -> Callable | None:
    custom_op = getattr(getattr(torch, "library", None), "custom_op", None)
    if custom_op is None:  # torch < 2.4
        return None
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)  # torch < 2.5: no tags argument, no such tag
    tags = {} if tag is None else {"tags": (tag,)}

    # the schema written out: torch 2.4 cannot read it from this module's (string) annotations
    @custom_op("spectral_lens::feed_rows", mutates_args=("token",), schema="(Tensor rows, Tensor(a!) token, int key) -> ()",
               **tags)
    def feed(rows: torch.Tensor, token: torch.Tensor, key: int) -> None:
        _unbump(token)
        hook = _HOOKS.get(key)
        if hook is not None:
            hook.feed(rows)

    @feed.register_fake
    def _(rows, token, key):
        return None

    return feed


def _unbump(token: torch.Tensor) -> None:
    """Set ``token``'s version counter back to 0: the declared mutation bumps it (before this body runs)
    though nothing writes it, and a graph run op by op (``backend="eager"``, a backend returning
    ``gm.forward``) with activation checkpointing inside it saves the token as an input of the
    checkpointed region, whose backward then refused the bumped version ("modified by an inplace
    operation")."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None or token.is_inference():  # inference tensors have no version counter (a graph run
        return  # under inference_mode hands the operator a copy made there)
    try:
        setter((token,), (0,))  # newer torch takes tuples
    except TypeError:
        setter(token, 0)


try:
    _FEED_ROWS = _define()
except Exception:  # an operator library that refuses the definition: hooks break the graph instead
    _FEED_ROWS = None


def available() -> bool:
    """Whether this torch can define the operator (torch >= 2.4)."""
    return _FEED_ROWS is not None


def feed_rows(rows: torch.Tensor, token: torch.Tensor, key: int) -> None:
    """Call the operator (inside a compiled graph: traced as one node)."""
    _FEED_ROWS(rows, token, key)
