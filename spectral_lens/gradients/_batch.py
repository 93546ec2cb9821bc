"""Batches as pytrees: size, slicing, device moves (inference tensors copied to normal ones, which
autograd can save) and the default way to call a model on one.

A batch is a tensor or a (nested) tuple / list / dict of tensors whose dimension 0 indexes samples
(sequences). Non-tensor leaves (strings, ints, flags) are passed through unchanged. Any other
mapping at the top (a Hugging Face ``BatchEncoding``, which is a ``collections.UserDict``, as
tokenizers and ``DataCollatorForLanguageModeling`` return it) is read as the plain ``dict`` of its
items (:func:`plain_batch`): ``torch.utils._pytree`` does not flatten it.

A *packed* dict batch (several documents concatenated in a row, as Hugging Face's
``DataCollatorWithFlattening`` makes: ``position_ids`` restarting per document, or ``seq_idx`` /
``cu_seq_lens_q``, and no ``attention_mask``) is read as the right-padded batch of its documents
(:func:`unpack_documents`) by the probe and the lens when they run the default forward
(:func:`batch_as_run`): one sample per document, each run as a sequence of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

__all__ = ["batch_size", "slice_batch", "map_tensors", "default_forward", "plain_batch", "batch_as_run", "unpack_documents"]

#: keys that describe how documents are packed in a row (Hugging Face's DataCollatorWithFlattening,
#: flash-attention kwargs): read by :func:`unpack_documents`, absent from the batch it returns
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def plain_batch(batch: Any) -> Any:
    """``batch`` itself, or a plain ``dict`` of its items when it is a mapping of another type (a
    ``BatchEncoding``, a ``UserDict``, a ``dict`` subclass): the form that ``torch.utils._pytree``
    flattens and ``model(**batch)`` takes. Cheap (no copy of a tensor, no host sync): the helpers below
    call it on every slice."""
    if isinstance(batch, Mapping) and type(batch) is not dict:
        return dict(batch.items())
    return batch


def batch_as_run(batch: Any, forward_fn: Callable) -> Any:
    """``batch`` as the probe and the lens hand it to ``forward_fn`` (and to ``loss_fn`` / ``mask_fn``):
    :func:`plain_batch`, and with the default forward (:func:`default_forward`) a packed dict batch as the
    right-padded batch of its documents (:func:`unpack_documents`). A ``forward_fn`` of your own gets the
    batch as given, packed rows included (one sample per row, as before packing was read): a model that
    runs packed rows itself (flash-attention varlen kwargs) keeps them."""
    batch = plain_batch(batch)
    if forward_fn is default_forward and isinstance(batch, dict):
        return unpack_documents(batch)
    return batch


def _document_ids(batch: dict) -> torch.Tensor | None:
    """(M, T) index of the document each token belongs to, numbered from 0 in each row, from every
    packing field the batch has (``position_ids`` by Hugging Face's rule: a new document wherever the
    position does not grow by 1; ``seq_idx``; ``cu_seq_lens_q`` over the row-major flattened tokens);
    ``None`` without any. Fields that disagree raise a ``ValueError``."""
    found: dict[str, torch.Tensor] = {}
    pos = batch.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.ndim == 2 and pos.shape[1] > 0:
        step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        found["position_ids"] = (step != 1).long().cumsum(-1)
    seq = batch.get("seq_idx")
    if isinstance(seq, torch.Tensor) and seq.ndim == 2 and seq.shape[1] > 0:
        found["seq_idx"] = (torch.diff(seq, prepend=seq[:, :1], dim=-1) != 0).long().cumsum(-1)
    cu = batch.get("cu_seq_lens_q")
    grid = next((batch[k] for k in ("input_ids", "labels", "position_ids", "seq_idx")
                 if isinstance(batch.get(k), torch.Tensor) and batch[k].ndim == 2), None)
    if isinstance(cu, torch.Tensor) and grid is not None:
        m, t = grid.shape
        cu = cu.to("cpu", torch.long)
        if cu.ndim != 1 or cu.numel() < 2 or cu[0] != 0 or cu[-1] != m * t or bool((cu.diff() <= 0).any()):
            raise ValueError(
                f"packed batch: cu_seq_lens_q {cu.tolist()} is not the increasing document boundaries 0 .. {m * t} "
                f"of its (M, T) = {(m, t)} tokens"
            )
        starts = torch.zeros(m * t, dtype=torch.long)
        starts[cu[:-1]] = 1
        starts = starts.view(m, t)
        if not bool(starts[:, 0].all()):
            raise ValueError(f"packed batch: cu_seq_lens_q {cu.tolist()} puts a document across two rows of the "
                             f"(M, T) = {(m, t)} batch")
        found["cu_seq_lens_q"] = starts.cumsum(-1) - 1
    if not found:
        return None
    names = list(found)
    ref = found[names[0]]
    for k in names[1:]:
        other = found[k].to(ref.device)
        if other.shape != ref.shape or not torch.equal(other, ref):
            raise ValueError(
                f"packed batch: {names[0]} and {k} give different document boundaries (batch keys "
                f"{sorted(map(str, batch))}); make them describe the same packing"
            )
    return ref


def _collator_positions(pos: Any) -> bool:
    """Whether ``pos`` are the ``position_ids`` of packed rows as ``DataCollatorWithFlattening`` makes
    them: integer ``(M, T)``, each row from 0, and every position that does not grow by 1 back at 0 (a
    new document), at least once. Not packed: positions offset by a prefix or a KV cache, scaled or
    strided positions, floats, a left-padded batch's positions counted from its first real token. One
    host sync."""
    if (not isinstance(pos, torch.Tensor) or pos.ndim != 2 or pos.shape[1] < 2 or pos.is_floating_point()
            or pos.is_complex() or pos.dtype == torch.bool):
        return False
    restart = pos[:, 1:] != pos[:, :-1] + 1
    return bool(restart.any() & (pos[:, 0] == 0).all() & ((pos[:, 1:] == 0) | ~restart).all())


def unpack_documents(batch: dict, pad_label: int = -100) -> dict:
    """A packed dict batch as the right-padded batch of its documents; any other ``batch`` unchanged.

    Packed: no ``attention_mask`` and a packing field (:data:`PACKING_KEYS`: ``seq_idx``,
    ``cu_seq_lens_q``, ...), or integer ``position_ids`` that restart at 0 within a row, each row starting
    at 0 (Hugging Face's ``DataCollatorWithFlattening``: one row of concatenated documents, positions from
    0 in each, ``labels`` -100 at each document's first token; :func:`_collator_positions`). Document
    ``d`` of row ``r`` becomes one row of the result, documents in row-major order, padded on the
    right to the longest: every ``(M, T)`` tensor field is split by document (padding repeats the
    document's last entry; ``labels`` are ``pad_label`` there), ``attention_mask`` marks each
    document's tokens, and the packing fields (:data:`PACKING_KEYS`) are dropped. Each document is then
    a sequence of its own: the model never attends across documents, whatever attention it uses
    (transformers 5.24 masks packed rows only when it builds no KV cache, i.e. with
    ``use_cache=False``). Other tensor fields, which cannot be split by document, raise a
    ``ValueError`` naming them.
    """
    if batch.get("attention_mask") is not None:
        extra = [k for k in PACKING_KEYS if k in batch]
        if extra:
            raise ValueError(
                f"a batch with both attention_mask and the packing fields {extra} (keys {sorted(map(str, batch))}): "
                "a packed row (DataCollatorWithFlattening) has no attention_mask, a padded batch no packing "
                "fields; pass one or the other"
            )
        return batch
    if not any(k in batch for k in PACKING_KEYS) and not _collator_positions(batch.get("position_ids")):
        return batch
    ids = _document_ids(batch)
    if ids is None:
        raise ValueError(
            f"packed batch: the packing fields {[k for k in PACKING_KEYS if k in batch]} (keys "
            f"{sorted(map(str, batch))}) need per-token (M, T) position_ids, seq_idx, or input_ids / labels "
            "for cu_seq_lens_q, to find the documents"
        )
    m, t = ids.shape
    counts = ids[:, -1] + 1  # documents per row
    starts = torch.diff(ids, prepend=ids[:, :1] - 1, dim=-1) != 0  # (M, T), True at each document's first token
    row, start = starts.nonzero(as_tuple=True)
    flat_start = row * t + start
    length = torch.diff(flat_start, append=flat_start.new_tensor([m * t]))
    ends = torch.cumsum(counts, 0) - 1  # a row's last document ends at the row's end
    length[ends] = (t - start[ends])
    width = int(length.max())
    j = torch.arange(width, device=ids.device)
    valid = j < length[:, None]  # (D, width)
    index = flat_start[:, None] + torch.minimum(j, length[:, None] - 1)  # padding repeats the last token
    out: dict = {}
    for k, v in batch.items():
        if k in PACKING_KEYS:
            continue
        if not isinstance(v, torch.Tensor) or v.ndim == 0:
            out[k] = v
            continue
        if v.shape[:2] != (m, t):
            raise ValueError(
                f"packed batch: field {k!r} of shape {tuple(v.shape)} cannot be split into the documents of the "
                f"(M, T) = {(m, t)} rows (keys {sorted(map(str, batch))}); pass per-token (M, T, ...) fields only, "
                "or pad the documents yourself (one row each, with attention_mask)"
            )
        v = v.flatten(0, 1).index_select(0, index.flatten().to(v.device)).view(*index.shape, *v.shape[2:])
        if k == "labels":
            v = v.masked_fill(~valid.to(v.device), pad_label)
        out[k] = v
    out["attention_mask"] = valid.long()
    return out


def _flat(batch: Any) -> list | None:
    """The leaves of ``batch`` where it is a plain tensor, or a ``tuple`` / ``list`` / ``dict`` of plain tensors
    (the usual batch; ``pytree`` flattens it into the same leaves in the same order), else ``None``. The
    probe maps and slices every batch on every update: ``torch.utils._pytree`` costs ~8-30 us a call there."""
    t = type(batch)
    if t is torch.Tensor:
        return [batch]
    leaves = batch.values() if t is dict else batch if t is tuple or t is list else None
    if leaves is None or not all(type(x) is torch.Tensor for x in leaves):
        return None
    return list(leaves)


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``batch``; other leaves are returned unchanged. A plain tensor or a
    ``tuple`` / ``list`` / ``dict`` of them is mapped directly (what ``pytree.tree_map`` gives, without it)."""
    batch = plain_batch(batch)
    flat = _flat(batch)
    if flat is None:
        return pytree.tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, batch)
    t = type(batch)
    if t is torch.Tensor:
        return fn(batch)
    if t is dict:
        return {k: fn(v) for k, v in batch.items()}
    return t(fn(x) for x in flat)


def batch_size(batch: Any) -> int:
    """Number of samples: the shared size of dimension 0 of every tensor leaf."""
    batch = plain_batch(batch)
    leaves = _flat(batch)
    leaves = pytree.tree_leaves(batch) if leaves is None else leaves
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
      sees them). The probe and the lens hand it a packed batch as the padded batch of its documents
      (:func:`batch_as_run`); called directly, it runs the batch as given.
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
