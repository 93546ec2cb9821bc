"""Batches as pytrees: size, slicing, device moves (inference tensors copied to normal ones, which
autograd can save) and the default way to call a model on one.

A batch is a tensor or a (nested) tuple / list / dict of tensors whose dimension 0 indexes samples
(sequences). Non-tensor leaves (strings, ints, flags) are passed through unchanged. Any other
mapping at the top (a Hugging Face ``BatchEncoding``, which is a ``collections.UserDict``, as
tokenizers and ``DataCollatorForLanguageModeling`` return it) is read as the plain ``dict`` of its
items (:func:`plain_batch`): ``torch.utils._pytree`` does not flatten it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

__all__ = ["batch_size", "slice_batch", "map_tensors", "default_forward", "plain_batch"]


def plain_batch(batch: Any) -> Any:
    """``batch`` itself, or a plain ``dict`` of its items when it is a mapping of another type (a
    ``BatchEncoding``, a ``UserDict``, a ``dict`` subclass): the form that ``torch.utils._pytree``
    flattens and ``model(**batch)`` takes."""
    if isinstance(batch, Mapping) and type(batch) is not dict:
        return dict(batch.items())
    return batch


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``; other leaves are returned unchanged."""
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, plain_batch(batch))


def batch_size(batch: Any) -> int:
    """Number of samples: the shared size of dimension 0 of every tensor leaf."""
    leaves = pytree.tree_leaves(plain_batch(batch))
    sizes = {t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.ndim > 0}
    if len(sizes) != 1:
        found = sorted(sizes) or "no tensor with a batch dimension"
        raise ValueError(f"a batch needs tensors that share dimension 0 (the sample index); got sizes {found}")
    return sizes.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor leaf (views, no copy)."""
    return map_tensors(lambda t: t[start:stop] if t.ndim > 0 else t, batch)


def default_forward(model: torch.nn.Module, batch: Any) -> Any:
    """How the probe calls ``model`` on ``batch`` unless a ``forward_fn`` is given.

    * tensor ``x``: ``model(x)``;
    * tuple / list ``(inputs, targets, ...)``: ``model(inputs)`` (nanoGPT convention);
    * dict, or any mapping (a ``BatchEncoding``): ``model(**batch)`` without the ``"labels"`` key
      (Hugging Face convention; the loss is computed by the probe from ``labels``, so the model never
      sees them).
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    raise TypeError(f"cannot call the model on a batch of type {type(batch).__name__}; pass forward_fn=")


def _autograd_usable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it when it is an inference tensor (a batch made under
    ``torch.inference_mode()``, as evaluation data often is): autograd refuses to save one for the
    backward ("Inference tensors cannot be saved for backward"), which an embedding lookup of the ids
    or a first layer's input does. A pool of such batches is fine for the no-grad activation pass."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()
