"""The content fingerprint of the batches a measurement reads from the held-out pool (:class:`PoolFingerprint`),
compared from one measurement to the next by ``SpectralLens``: it sees a pool that changed at the same size (other
samples, other content), and reads the same samples alike however they are batched, padded, packed, collated or
placed (its reading rules: :func:`batch_fingerprint`). The pool's other checks are in :mod:`spectral_lens._pools`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch


#: the fingerprint's modulus, a Mersenne prime below 2**31: every product of two residues stays within int64
_P = 2**31 - 1
#: fixed constants of the per-value mix (of the value and its position in its sample) and of the per-row mix
_A, _B, _C, _D = 1_103_515_245, 12_345, 2_654_435_761 % _P, 1_597_334_677
#: the fingerprint reads at most this many evenly spaced values of each sample where no mask applies (all of a row of
#: up to 65,536 tokens): its temporaries stay small beside the forward's activations for any input (pixels)
SAMPLE_VALUES = 65_536
#: where a mask applies: every position, and at most this many evenly spaced values of each (an ``(M, T, d)``
#: ``inputs_embeds``: 64 of its ``d``), chosen by the per-position shape only, so that a re-padded batch reads alike
POSITION_VALUES = 64
#: the ignore index that collators pad ``labels`` with: not read in an integer tensor the mask does not fit
IGNORE_INDEX = -100
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INTEGERS = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}
_UNSIGNED = {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)}


def _salt(path: str) -> int:
    """A nonzero residue for a tensor's place in the batch (its pytree path), the same in every process."""
    import zlib

    return 1 + zlib.crc32(path.encode()) % (_P - 1)


def _spaced(t: torch.Tensor, lead: int, cap: int) -> torch.Tensor:
    """``t``'s values at every index of its first ``lead`` dimensions and at most ``cap`` evenly spaced flat indices
    (the first and the last included) of the others, shape ``(*t.shape[:lead], K)``: gathered, never a copy of all
    of a non-contiguous ``t`` (channels-last pixels, an expanded tensor)."""
    inner = tuple(t.shape[lead:])
    n = 1
    for s in inner:
        n *= s
    if n <= cap:
        return t.reshape(*t.shape[:lead], n)  # a copy of at most the values read
    q, r = divmod(n - 1, cap - 1)  # i * (n - 1) // (cap - 1), exact for any n (no int64 product of i and n)
    i = torch.arange(cap, device=t.device)
    idx = i * q + i * r // (cap - 1)
    coords = []
    for s in reversed(inner):
        coords.append(idx % s)
        idx = idx // s
    return t[(slice(None),) * lead + tuple(reversed(coords))]


@functools.lru_cache(maxsize=8)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """The position term of the per-value mix for positions ``0 .. n - 1`` (the same for every unmasked batch of a
    shape: kept)."""
    return torch.arange(n, device=device) * _D + _B


def _on_one_device(t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and ``mask`` on one device without a host sync: the one on the CPU copied to the other's accelerator
    (a host-to-device copy, ``non_blocking``: safe from pageable memory), or between accelerators the mask to
    ``t``'s (a device-to-device copy, ordered on the streams)."""
    if mask.device == t.device:
        return t, mask
    if t.device.type == "cpu":
        return t.to(mask.device, non_blocking=True), mask
    return t, mask.to(t.device, non_blocking=True)


def _pair_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-row residues of an ``(M, ..., T, T)`` tensor (a 4-D attention mask) read at the real query x real key
    entries of the ``(M, T)`` ``mask``, a key counted from the row's first real one: shape ``(M, R, T)`` (``R`` the
    middle dimensions' size), one residue per query row, the same for the row re-padded on either side. In blocks of
    query rows, so that the temporaries stay at most ~4M values whatever ``T``."""
    m, n = mask.shape
    real = mask != 0
    key = real.cumsum(1) * _D + _B  # (M, T)
    t = t.reshape(m, -1, n, n)
    out = []
    step = max(1, (1 << 22) // max(1, m * t.shape[1] * n))
    if t.dtype == torch.bool:  # a bool mask: each real key's weight (its position's mix) where True, summed
        w = key % _P
        w = w ^ (w >> 16)
        w = (w * w % _P * real)[:, None, None, :]  # < 2**31: a row's sum < 2**31 * T, within int64
        for q in range(0, n, step):
            out.append((t[:, :, q:q + step] * w).sum(-1) % _P)
        return torch.cat(out, 2)
    wide, key, real = t.element_size() > 4, key[:, None, None, :], real[:, None, None, :]
    for q in range(0, n, step):  # in place on the one int64 copy: a 4-D mask of 8k x 8k is 64M entries a sample
        f = t[:, :, q:q + step].to(torch.int64, copy=True)  # (M, R, q, T), a copy (never the batch's own int64
        # values, changed in place below); values of 4 bytes or less: |v * _A| < 2**62, unreduced
        if wide:
            f.remainder_(_P)
        f.mul_(_A).add_(key).remainder_(_P)
        f.bitwise_xor_(f >> 16)
        f.mul_(f).remainder_(_P).mul_(real)
        out.append(f.sum(-1) % _P)
    return torch.cat(out, 2)


def _fits(shape: tuple[int, ...], dtype: torch.dtype, mask: Any, named: bool = False) -> str | None:
    """How a mask applies to a tensor of ``shape`` and ``dtype``: ``"pair"`` (an ``(M, ..., T, T)`` tensor of 4 or
    more dimensions, or an ``(M, T, T)`` one, bool or ``named`` (under a key naming a mask: any dtype), under an
    ``(M, T)`` mask: an attention mask of query x key entries), ``"lead"`` (its leading shape is the mask's), or
    ``None`` (it does not)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim == 0 or mask.device.type == "meta" or not shape \
            or mask.shape[0] != shape[0]:
        return None
    if (mask.ndim == 2 and shape[-2:] == (mask.shape[1],) * 2
            and (len(shape) >= 4 or (len(shape) == 3 and (dtype == torch.bool or named)))):
        return "pair"
    return "lead" if mask.ndim <= len(shape) and tuple(mask.shape) == shape[:mask.ndim] else None


def _as_integers(t: Any) -> tuple[torch.Tensor, bool] | None:
    """``t`` as the integers the fingerprint reads (floating-point, complex and unsigned tensors by their bits), and
    whether they are integers proper (whose :data:`IGNORE_INDEX` is padding); ``None`` for a tensor not read
    (0-dim, empty, sparse, meta, a subclass such as ``DTensor``, quantized)."""
    if (type(t) is not torch.Tensor or t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta"
            or t.ndim == 0):
        return None
    if t.is_complex():
        t = torch.view_as_real(t)
    ints = t.dtype in _INTEGERS and t.dtype != torch.bool
    if t.is_floating_point() or t.dtype in _UNSIGNED:
        if t.element_size() not in _BITS:
            return None
        t = t.view(_BITS[t.element_size()])
    elif t.dtype not in _INTEGERS:
        return None
    return t, ints


def _mixed(vals: torch.Tensor, mixed: torch.Tensor, read: torch.Tensor | None) -> torch.Tensor:
    """Each value's residue mixed with its position's (``mixed``), 0 where not ``read``."""
    wide = vals.element_size() > 4  # int64 (and float64 bits), reduced before the product; the others stay < 2**61
    vals = vals.long()
    f = ((vals % _P if wide else vals) * _A + mixed) % _P
    f = f ^ (f >> 16)  # not a polynomial mod P: a sample's hash is not a few power sums of its values
    f = f * f % _P
    return f if read is None else f * read


def tensor_fingerprint(t: torch.Tensor, mask: torch.Tensor | None = None, *,
                       named: bool = False) -> torch.Tensor | None:
    """A 0-dim int64 residue mod ``2**31 - 1`` of ``t``'s content, on ``t``'s device (or, for a CPU ``t`` with a mask
    on an accelerator, the mask's; no host sync), or ``None`` for a tensor it does not read (0-dim, empty, sparse,
    a subclass such as ``DTensor``, quantized).

    Dimension 0 indexes samples: each value is mixed with its position in its sample, and the samples' hashes are
    mixed and summed, so the result does not depend on how the pool is ordered or batched (a shuffled whole pool
    hashes as the fixed one), but a sample's values in another order (a flipped image) hash otherwise. ``mask``
    (nonzero = read), applied where ``t``'s leading shape is the mask's (moved to one device with it): the positions
    it excludes are not read, and a read position counts from the sample's first read one, so a pool re-padded to
    other lengths, on either side, hashes alike; every position is read, at most :data:`POSITION_VALUES` evenly
    spaced values of each. An ``(M, ..., T, T)`` tensor of 4
    or more dimensions, or a bool (any, if ``named``) ``(M, T, T)`` one, under an ``(M, T)`` mask (an attention mask
    of query x key entries) is read at its real query x real key entries, all of them. Without a mask: at most
    :data:`SAMPLE_VALUES` evenly spaced values of each sample, an integer tensor's :data:`IGNORE_INDEX` entries (a
    collator's ``labels`` padding) not read. Integer and bool tensors are read as integers, floating-point, complex
    and unsigned ones by their bits. A 0-dim tensor (a per-batch count) is no sample's content: a pool re-batched
    would hash otherwise."""
    got = _as_integers(t)
    if got is None:
        return None
    t, ints = got
    shape = tuple(t.shape)
    m = t.shape[0]
    how = _fits(shape, t.dtype, mask, named)
    if how == "pair":
        t, mask = _on_one_device(t, mask)
        rows = _pair_rows(t, mask)  # (M, R, T): one residue per query row, then read as the values of positions
        r = rows.shape[1]
        read = (mask != 0)[:, None, :].expand_as(rows).reshape(m, -1)
        pos = (mask != 0).cumsum(1)[:, None, :] * r + torch.arange(r, device=t.device)[None, :, None]
        vals, mixed = rows.reshape(m, -1), pos.reshape(m, -1) * _D + _B
    elif how == "lead":
        vals = _spaced(t, mask.ndim, POSITION_VALUES)  # (M, T, K): every position, K values of each
        vals, mask = _on_one_device(vals, mask)  # (the values read, not all of t, copied where they move)
        k = vals.shape[-1]
        vals, read = vals.reshape(m, -1, k), (mask != 0).reshape(m, -1, 1)
        pos = read.cumsum(1)  # counted from the sample's first read position: either padding side alike
        if k > 1:
            pos = pos * k + torch.arange(k, device=vals.device)
        read, vals = read.expand_as(vals).reshape(m, -1), vals.reshape(m, -1)
        mixed = pos.reshape(m, -1) * _D + _B  # positions < 2**31 (a sample's values): < 2**62
    else:
        vals = _spaced(t, 1, SAMPLE_VALUES)
        read = vals != IGNORE_INDEX if ints else None  # right-padded labels of any length alike
        mixed = _positions(vals.shape[1], t.device)
    h = _mixed(vals, mixed, read).sum(1) % _P + _C
    return (h * h % _P).sum() % _P


def _aligned_labels(labels: torch.Tensor, read: torch.Tensor, real: torch.Tensor) -> torch.Tensor | None:
    """Two residues of 2-D integer ``labels`` read where ``read``: each label's position counted from its row's first
    ``real`` token (an ``(M, T)`` mask of the inputs' real tokens, as wide as the labels, on their device), and
    counted from the row's first read label (:func:`tensor_fingerprint` under ``read``, the same value), in one
    pass, shape ``(2,)`` (``None`` for empty labels). The first sees labels shifted against their inputs
    (``[-100, x1, x2]`` and
    ``[x1, x2, -100]``), the second does not."""
    if labels.numel() == 0:
        return None
    first = real.to(torch.uint8).argmax(1, keepdim=True)  # the first maximum: the first real token (0 in a row of none)
    ahead = torch.arange(labels.shape[1], device=labels.device) - first + 1
    mixed = torch.stack([ahead, read.cumsum(1)]) * _D + _B  # (2, M, T)
    h = _mixed(labels, mixed, read).sum(-1) % _P + _C
    return (h * h % _P).sum(-1) % _P


def _documents(t: torch.Tensor, docs: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, ...],
               labels: bool = False) -> torch.Tensor | None:
    """The residue of a packed batch's per-token tensor ``t`` (its leading ``grid``, the batch's tokens, in row-major
    order) read document by document: ``docs`` (:func:`_packing`) gives each token's document slot and position in it
    (slot 0: outside every document, a tail padded to a multiple; not read) and which slots hold a token; each
    document is a sample (its values at their positions in it, at most :data:`POSITION_VALUES` of each token, an
    integer tensor's :data:`IGNORE_INDEX`, integer ``labels``' negative values, not read), as in
    :func:`tensor_fingerprint`, so the same documents packed otherwise hash alike; an empty document (repeated
    offsets) is none. On the device (``index_add_``): no host sync."""
    got = _as_integers(t)
    if got is None:
        return None
    t, ints = got
    n = 1
    for s in grid:
        n *= s
    where, live = docs
    vals = _spaced(t.reshape(n, *t.shape[len(grid):]), 1, POSITION_VALUES)  # (N, K)
    vals, where = _on_one_device(vals, where)
    live, (doc, pos), k = live.to(where.device, non_blocking=True), where, vals.shape[1]
    mixed = (pos[:, None] * k + torch.arange(k, device=vals.device)) * _D + _B
    read = (vals >= 0 if labels else vals != IGNORE_INDEX) if ints else None
    f = _mixed(vals, mixed, read).sum(1)
    h = torch.zeros(live.shape[0], dtype=torch.long, device=vals.device).index_add_(0, doc, f) % _P + _C
    return (h * h % _P * live).sum() % _P


def _not_ignored(labels: Any) -> torch.Tensor | None:
    """Where an integer ``labels`` tensor of 1 or 2 dimensions is not negative (its own mask: :data:`IGNORE_INDEX`, or
    another ignore index such as -1, which no class index is), or ``None`` for another (a float, sparse or nested one,
    one the kernels do not take): never a failed measurement."""
    if (type(labels) is not torch.Tensor or labels.layout != torch.strided or labels.is_nested
            or labels.dtype not in _INTEGERS or not 1 <= labels.ndim <= 2 or labels.device.type == "meta"):
        return None
    try:
        return labels >= 0
    except (RuntimeError, TypeError):
        return None


class _Context(NamedTuple):
    """How the tensors of one mapping of a batch (or of a batch that is no mapping) are read (:func:`_context`)."""

    masks: list[Any]  #: tried in order on its tensors: the first that fits one is its mask
    decoder: list[Any]  #: the same, for its ``decoder_*`` tensors (empty: ``masks``)
    labels: list[Any]  #: the same, for its integer ``labels`` (empty: ``masks``)
    align: bool  #: its ``labels`` are a causal LM's candidates: read also counted from their inputs' first token
    aligned: Any  #: the ``(M, T)`` padding mask of its inputs that the labels are as wide as (else None)
    every: Any  #: the all-True mask read as its ``attention_mask`` (it has none, nor its enclosing mappings)
    docs: Any  #: a packed mapping's tokens' documents (:func:`_packing`), or None
    grid: tuple[int, ...]  #: and the shape of its tokens
    sided: tuple = ()  #: ``(prefix, suffix, padding)`` of its other ``attention_mask`` keys (``chosen_attention_mask``)


def _padding(mask: Any) -> Any:
    """A mapping's ``attention_mask`` as its padding: a tensor of 1 or 2 dimensions (a floating-point one as its real
    tokens, :func:`_real_tokens`: an additive mask's are its 0s), else ``None``."""
    if not (isinstance(mask, torch.Tensor) and 1 <= mask.ndim <= 2) or mask.is_nested:
        return None
    return _real_tokens(mask) if mask.is_floating_point() else mask


def _context(batch: Any, mask: torch.Tensor | None, found: tuple[Any, Any, bool]) -> _Context:
    """How ``batch``'s tensors are read: the masks the fingerprint tries, in order, on its tensors (the first that
    fits a tensor's shape is its mask): for the others, the mapping's ``attention_mask`` of 1 or 2 dimensions (its
    padding: every real token, where ``mask_fn``'s ``mask`` may select a part of them, such as the answer tokens,
    whose rows depend on the others through attention; a floating-point one as its real tokens, :func:`_padding`: an
    additive one's are its 0s), then ``mask``, and without an ``attention_mask`` every token of the ``input_ids``
    (:func:`_every_token`); for a tensor ``X_input_ids``, ``X_labels`` beside ``X_attention_mask`` and
    ``X_input_ids`` (TRL's flat ``chosen_``/``rejected_``/``prompt_`` batches, or ``_chosen`` suffixes), that mask
    first; for a seq2seq mapping's ``decoder_*`` tensors, the
    ``decoder_attention_mask``, or else where the ``labels`` are not negative (a seq2seq collator's
    ``decoder_input_ids`` are the labels shifted right, padded with the pad id), never the encoder's (with neither,
    they take the others' masks: the encoder's where it fits); for its integer ``labels``, the
    ``decoder_attention_mask``, or else their own (not negative: -100, or another ignore index): a seq2seq batch
    without
    ``decoder_input_ids`` has labels as long as its inputs only by chance, and read under the encoder's mask then
    they would hash otherwise than in another batching. ``found``: the ``attention_mask`` (its padding or ``None``),
    ``input_ids`` and whether there was one, of a mapping without its own (of the nearest enclosing mapping with
    one, else of the first it encloses: a nested ``{"inputs": {...}, "labels": ...}`` batch). A mapping without a
    mask whose ``cu_seqlens`` (:data:`_BOUNDARIES`) are 1-D integers, or whose integer ``position_ids`` have its
    tokens' shape, is packed (:func:`_packing`)."""
    if not isinstance(batch, Mapping):
        return _Context([mask], [], [], False, None, None, None, ())
    if "attention_mask" in batch:
        own, ids, present = _padding(batch["attention_mask"]), batch.get("input_ids"), True
    else:
        own, ids, present = found
    dec = _padding(batch.get("decoder_attention_mask"))
    labels = _not_ignored(batch.get("labels"))
    align, aligned, real = False, None, None
    if dec is None:
        dec = labels if isinstance(batch.get("decoder_input_ids"), torch.Tensor) else None
        if dec is None and labels is not None:
            real = own
            labels = _unpadded(labels, batch["labels"], real, ids)
            align = labels.ndim == 2
    mine = dec if dec is not None else labels
    first = [own, mask]  # (a float one as its real tokens: _padding)
    every = None
    if not present:
        every = _every_token(batch.get("input_ids"))
        first.append(every)
    if align:  # the inputs' padding as wide as the labels: a causal LM's, or a seq2seq batch's by chance
        pad = real if real is not None else every
        aligned = pad if (isinstance(pad, torch.Tensor) and tuple(pad.shape) == tuple(labels.shape)
                          and pad.device == labels.device) else None
    sided = tuple((pre, suf, p) for k, v in batch.items() if isinstance(k, str) and "attention_mask" in k
                  and k not in ("attention_mask", "decoder_attention_mask")
                  for (pre, _, suf), p in [(k.partition("attention_mask"), _padding(v))]
                  if p is not None and pre + "input_ids" + suf in batch)  # (not a global_attention_mask)
    docs, grid = _packing(batch) if not (present or sided) else (None, ())
    return _Context(first, [dec] if dec is not None else [], [mine] if mine is not None else [], align, aligned,
                    every, docs, grid, sided)


def _real_tokens(own: Any) -> Any:
    """The real tokens of a mapping's ``attention_mask`` ``own``: where an integer or bool one is nonzero; a
    floating-point one with a positive entry is a 1/0 mask (real where positive), one without an additive mask (real
    where 0, the padding -inf, ``finfo.min`` or -1e9; all 0: no padding), told apart on the device for the whole
    tensor, so that a row of padding only (an empty document) has no real token in either (not its row's maximum);
    ``own`` itself where the kernels do not take it."""
    if not isinstance(own, torch.Tensor):
        return own
    try:
        if not own.is_floating_point():
            return own != 0
        return torch.where((own > 0).any(), own > 0, own == 0)
    except (RuntimeError, TypeError):
        return own


def _every_token(ids: Any) -> torch.Tensor | None:
    """An all-True ``(M, T)`` mask of a mapping's 2-D ``input_ids`` where it has no ``attention_mask`` (the last mask
    tried, and read as its ``attention_mask``: :func:`batch_fingerprint`): its tensors of that leading shape read
    position by position, as those of a padded batch of the same samples with an ``attention_mask`` are (a packed
    row of one document, which the default forward runs as it is, hashes as the same document in a row of several,
    run as their padded batch)."""
    if (type(ids) is not torch.Tensor or ids.ndim != 2 or ids.layout != torch.strided or ids.is_nested
            or ids.device.type == "meta"):
        return None
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)


def _unpadded(read: torch.Tensor, labels: torch.Tensor, own: Any, ids: Any) -> torch.Tensor:
    """``read`` (the ``labels`` not negative) less the padding of a causal LM's ``labels`` padded with the
    pad id (``labels = input_ids.clone()``): where the ``attention_mask`` is 0 and the labels are the ``input_ids``.
    A seq2seq label past its inputs' padding is other than their pad id: still read."""
    try:  # (input_ids or a mask the kernels do not take, a nested one without a shape: the labels' own mask)
        if not (isinstance(ids, torch.Tensor) and isinstance(own, torch.Tensor)
                and tuple(ids.shape) == tuple(labels.shape) == tuple(own.shape)
                and ids.device == labels.device == own.device):
            return read
        return read & ~((own == 0) & (labels == ids))
    except (RuntimeError, TypeError):
        return read


#: the keys of a packed batch's document boundaries (flash-attention's varlen ``cu_seqlens``, Hugging Face's
#: ``cu_seq_lens_q``): 1-D offsets ``0 = b_0 <= b_1 <= ... <= b_D``, document ``j`` the tokens ``b_j`` to ``b_{j+1}``
_BOUNDARIES = ("cu_seqlens", "cu_seqlens_q", "cu_seq_lens_q", "cu_seqlens_k", "cu_seq_lens_k")
#: a packed batch's values of the batch, not of a document (its longest document; each token's document in the
#: batch): not read, as a 0-dim per-batch count is not
_PER_BATCH = ("max_seqlen", "max_seqlen_q", "max_seqlen_k", "max_length_q", "max_length_k", "seq_idx")


def _packing(batch: Mapping) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[int, ...]]:
    """A packed mapping's documents and the shape of its tokens (its 1-D or 2-D ``input_ids``, else ``position_ids``,
    ``labels``, or an ``inputs_embeds``' leading shape), or ``(None, ())``. The documents are told by the first of
    :data:`_BOUNDARIES` that is a 1-D integer tensor of 2 or more values (flash-attention's varlen offsets), else by
    integer ``position_ids`` of the tokens' shape (Hugging Face's rule, as ``DataCollatorWithFlattening`` makes them
    without ``cu_seqlens``: a new document at each row's start and wherever the position does not grow by 1; a row
    of one document, positions ``0 .. T - 1``, reads as that sample would). Read by name and on the device (the
    offsets' values are not read on the host): each token's document slot and position in it, ``(2, N)``, and which
    slots hold a token (:func:`_documents`)."""
    grid = next(((t, tuple(t.shape[:t.ndim - drop])) for t, drop in ((batch.get(k), d) for k, d in (
        ("input_ids", 0), ("position_ids", 0), ("labels", 0), ("inputs_embeds", 1)))
        if type(t) is torch.Tensor and not t.is_nested and 1 + drop <= t.ndim <= 2 + drop and t.numel() > 0), None)
    if grid is None or grid[0].device.type == "meta":  # (no values to read: its tensors read as they are)
        return None, ()
    ref, shape = grid
    n = 1
    for size in shape:
        n *= size
    bounds = next((b for b in (batch.get(k) for k in _BOUNDARIES) if _integers(b) and b.ndim == 1 and b.numel() >= 2),
                  None)
    pos = batch.get("position_ids")
    if bounds is not None:
        cu = bounds.to(bounds.device if ref.device.type == "cpu" else ref.device, torch.long, non_blocking=True)
        d = cu.shape[0] - 1
        idx = torch.arange(n, device=cu.device)
        doc = torch.searchsorted(cu, idx, right=True)  # 1 .. d inside the documents, 0 before, d + 1 after
        at = idx - cu[(doc - 1).clamp(0, d)] + 1
        doc = doc.masked_fill(doc > d, 0)
        live = torch.zeros(d + 1, dtype=torch.long, device=cu.device).index_add_(0, doc, torch.ones_like(doc)) > 0
    elif _integers(pos) and tuple(pos.shape) == shape:
        rows = pos.reshape(-1, shape[-1]).long()
        start = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
        start[:, 1:] = rows[:, 1:] - rows[:, :-1] != 1
        start = start.reshape(-1)
        idx = torch.arange(n, device=rows.device)
        doc = start.long().cumsum(0)  # 1 .. D
        at = idx - torch.where(start, idx, 0).cummax(0).values + 1
        slots = torch.arange(n + 1, device=rows.device)
        live = (slots >= 1) & (slots <= doc[-1])  # documents 1 .. D (D on the device)
    else:
        return None, ()
    return (torch.stack([doc, at]), live), shape


def _integers(t: Any) -> bool:
    """Whether ``t`` is a plain strided integer tensor (not bool, nested or on the meta device)."""
    return (type(t) is torch.Tensor and t.layout == torch.strided and not t.is_nested
            and t.dtype in _INTEGERS - {torch.bool} and t.device.type != "meta")


def _enclosed(batch: Any) -> tuple[Any, Any, bool] | None:
    """The padding, ``input_ids`` and presence of the first ``attention_mask`` in the mappings ``batch`` encloses
    (depth first), or ``None``."""
    for v in (batch.values() if isinstance(batch, Mapping) else batch if type(batch) in (list, tuple) else ()):
        if isinstance(v, Mapping) and "attention_mask" in v:
            return _padding(v["attention_mask"]), v.get("input_ids"), True
        got = _enclosed(v) if isinstance(v, (Mapping, list, tuple)) else None
        if got is not None:
            return got
    return None


def _plain_tree(batch: Any) -> Any:
    """``batch`` with every mapping in it a plain ``dict`` (a nested ``BatchEncoding`` or ``UserDict``, which
    ``torch.utils._pytree`` would not open), lists and tuples rebuilt around them; no tensor copied."""
    if isinstance(batch, Mapping):
        return {k: _plain_tree(v) for k, v in batch.items()}
    if type(batch) in (list, tuple):
        return type(batch)(_plain_tree(v) for v in batch)
    return batch


def _contexts(batch: Any, mask: torch.Tensor | None) -> dict[tuple, _Context]:
    """The :func:`_context` of ``batch`` (at ``()``) and of every mapping in it (at its keys' path): a mapping
    without an ``attention_mask`` takes its nearest enclosing mapping's, else the first it encloses."""
    out: dict[tuple, _Context] = {}
    none = (None, None, False)

    def visit(node: Any, at: tuple, found: tuple[Any, Any, bool]) -> None:
        if isinstance(node, Mapping):
            if "attention_mask" in node:
                found = (_padding(node["attention_mask"]), node.get("input_ids"), True)
            elif not found[2]:
                found = _enclosed(node) or none
            try:
                out[at] = _context(node, mask, found)
            except _UNREAD:  # a mask or inputs the kernels do not take (a nested one): its tensors read as they are
                out[at] = _context(None, mask, none)
            for k, v in node.items():
                visit(v, at + (k,), found)
        elif type(node) in (list, tuple):
            for i, v in enumerate(node):
                visit(v, at + (i,), found)

    visit(batch, (), none)
    if () not in out:
        out[()] = _context(batch, mask, none)
    return out


#: the 1-D tensors of a mapping that are one ``(T,)`` row shared by its samples even where ``T`` is its sample count
_SHARED_ROWS = ("position_ids", "cache_position")
#: a mapping's tensors that are its token grid (read under the mask they define, never as per-sample values)
_GRIDS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def _shared(t: torch.Tensor, masks: list[Any], key: Any = None) -> torch.Tensor:
    """``t`` as the samples of the batch read it where it is one value shared by all of them under an ``(M, T)``
    mask of ``masks``: a ``(1, T, ...)`` or a ``(T,)`` tensor (a ``position_ids``), broadcast to each of the ``M``
    samples (a view), so that a pool re-batched and re-padded hashes alike. Other tensors as they are: a leading
    dimension of 1 that is not the mask's ``T`` is a count of its own (one image's ``image_grid_thw``), and a 1-D
    tensor of ``M`` values a per-sample one (lengths, class labels), unless it is a mapping's ``position_ids`` or
    ``cache_position`` (:data:`_SHARED_ROWS`: in a batch whose ``T`` is its ``M``, by name; other 1-D tensors of
    ``T == M`` values: :func:`_readings`)."""
    if t.ndim == 0:
        return t
    for m in masks:
        if not (isinstance(m, torch.Tensor) and m.ndim == 2):
            continue
        rows, n = m.shape
        if t.ndim >= 2 and t.shape[0] == 1 and t.shape[1] == n:
            return t.expand(rows, *t.shape[1:])
        if t.ndim == 1 and t.shape[0] == n and (n != rows or key in _SHARED_ROWS):
            return t[None].expand(rows, n)
    return t


#: a mapping's tensors read as a 4-D (or 3-D) attention mask (:func:`_pair_rows`) where one fits: those whose key
#: names a mask or a bias (``attention_mask``, ``attn_bias``), not an ``(M, 3, T, T)`` image of a batch padded to its
#: side ``T``
_PAIR_NAMES = ("mask", "bias")


#: what a tensor the fingerprint cannot read raises in its kernels (a backend's own, a nested one, an empty dimension)
_UNREAD = (RuntimeError, TypeError, IndexError, ValueError)


def _attempt(read: Any, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """``read(*args, **kwargs)``, or ``None`` where the kernels do not take the tensor (a backend's own): never a
    failed measurement."""
    try:
        return read(*args, **kwargs)
    except _UNREAD:
        return None


def _leaf(t: torch.Tensor, key: Any, ctx: _Context, named: bool, mapping: bool) -> list[torch.Tensor | None]:
    """The candidate readings of one tensor of a batch, in order of preference, ``None`` for one this batch's shapes
    rule out, the last computed wherever the tensor is read at all (``None``: not read). Where a shape alone cannot
    say how the tensor is laid out, the first candidate that every batch of a pass had is the pass's
    (:class:`PoolFingerprint`), so a shape that fits only by chance in some batches does not decide:

    * integer ``labels`` beside a padding mask as wide as them: counted from their inputs' first real token (a
      causal LM's, whose shift against the inputs is other content), or from their own first (a seq2seq batch's,
      as long as its inputs only by chance);
    * a 1-D tensor of ``M`` values in a batch of ``T == M`` tokens: per sample (lengths), or a ``(T,)`` row shared by
      the samples (a per-position weight);
    * a 2-D tensor as wide as the mask: per position under it, or per sample (``(M, K)`` targets of ``K == T``);
    * a non-bool 3-D ``(M, T, T)`` tensor not under a key naming a mask: at its real query x key entries (a float
      attention mask of a tuple batch), or by position (an ``(M, T, d)`` embedding of ``d == T``).

    In a packed mapping (``ctx.docs``) a tensor of its tokens' shape is read by document (:func:`_documents`), and
    the boundaries and per-batch values (:data:`_BOUNDARIES`, :data:`_PER_BATCH`) are not read."""
    if ctx.docs is not None:
        if key in _BOUNDARIES or key in _PER_BATCH:
            return [None]
        if t.ndim >= len(ctx.grid) and tuple(t.shape[:len(ctx.grid)]) == ctx.grid:
            return [_attempt(_documents, t, ctx.docs, ctx.grid, labels=key == "labels")]
    side = next((p for pre, suf, p in ctx.sided if isinstance(key, str) and key.startswith(pre) and key.endswith(suf)),
                None)  # under a flat mapping's chosen_attention_mask (its chosen_input_ids, chosen_labels)
    mine = [side, *ctx.masks] if side is not None else ctx.labels if ctx.labels and key == "labels" else \
        ctx.decoder if ctx.decoder and isinstance(key, str) and key.startswith("decoder_") else ctx.masks
    pairs = not mapping or named

    def fit(x: torch.Tensor) -> tuple[Any, str | None]:
        """The first of ``mine`` that fits ``x``, and how."""
        for m in mine:
            how = _fits(tuple(x.shape), x.dtype, m, named)
            if how and (pairs or how != "pair"):
                return m, how
        return None, None

    def plain(x: torch.Tensor) -> torch.Tensor | None:
        return _attempt(tensor_fingerprint, x, fit(x)[0], named=named)

    if t.ndim == 0:
        return [None]
    if ctx.align and mine is ctx.labels and key == "labels":
        both = None if ctx.aligned is None else _attempt(_aligned_labels, t, mine[0], ctx.aligned)
        return [None, plain(t)] if both is None else [both[0], both[1]]
    rows = next((m for m in mine if isinstance(m, torch.Tensor) and m.ndim == 2), None)  # the batch's (M, T)
    x = _shared(t, mine, key)
    if t.ndim == 1 and not (mapping and key in _SHARED_ROWS):
        got = plain(x)
        if rows is None:
            return [None, None, got]
        m, n = rows.shape[0], t.shape[0]
        shared = None if n != rows.shape[1] else got if x is not t else plain(t[None].expand(m, n))
        return [got if n == m else None, shared, got]
    if t.ndim == 2 and not (mapping and key in _GRIDS):
        m, how = fit(x)
        got = _attempt(tensor_fingerprint, x, m, named=named)
        if how == "lead" and m.ndim == 2:  # per position, or per sample: its second dimension T by chance
            return [got, _attempt(tensor_fingerprint, t)]
        return [None, got]
    if t.ndim == 3 and t.dtype != torch.bool and not (mapping and named):
        square = rows is not None and tuple(x.shape) == (rows.shape[0], rows.shape[1], rows.shape[1])
        return [_attempt(tensor_fingerprint, x, rows, named=True) if square else None, plain(x)]
    return [plain(x)]


def _readings(batch: Any, mask: torch.Tensor | None = None) -> list[tuple[str, list[torch.Tensor | None]]]:
    """Each tensor of ``batch`` read (:func:`_leaf`): its place (its pytree path) and its candidate residues, each
    salted by its place; the all-True ``attention_mask`` of a mapping without one (:func:`_every_token`) as one
    more tensor."""
    from torch.utils import _pytree as pytree

    from .gradients._batch import plain_batch

    batch = _plain_tree(plain_batch(batch))
    contexts = _contexts(batch, mask)
    out = []
    with torch.no_grad():  # (the gradient pass reads its batches outside no_grad)
        for path, leaf in pytree.tree_flatten_with_path(batch)[0]:
            if not isinstance(leaf, torch.Tensor):
                continue
            keys = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path)
            at = next(keys[:j] for j in range(len(keys), -1, -1) if keys[:j] in contexts)
            mapping = _is_mapping(batch, at)
            key = keys[len(at)] if mapping and len(at) < len(keys) else None
            place = pytree.keystr(path)
            named = mapping and any(w in place.lower() for w in _PAIR_NAMES)
            try:
                found = _leaf(leaf, key, contexts[at], named, mapping)
            except _UNREAD:  # a tensor the kernels do not take (a backend's own, a nested one
                continue                       # without sizes): not read, never a failed measurement
            if found[-1] is not None:
                salt = _salt(place)
                out.append((place, [None if h is None else h * salt % _P for h in found]))
        for at, ctx in contexts.items():
            if ctx.docs is not None:  # packed: its all-True mask by document (a row of one reads as unpacked)
                place = "".join(f"[{k!r}]" for k in at) + "['attention_mask']"
                h = _attempt(_documents, torch.ones(ctx.grid, dtype=torch.bool, device=ctx.docs[0].device), ctx.docs,
                             ctx.grid)
                if h is not None:
                    out.append((place, [h * _salt(place) % _P]))
            elif isinstance(ctx.every, torch.Tensor):  # read as the attention_mask of 1s it
                place = "".join(f"[{k!r}]" for k in at) + "['attention_mask']"  # stands for (None: 0 rows)
                h = _attempt(tensor_fingerprint, ctx.every, ctx.every)
                if h is not None:
                    out.append((place, [h * _salt(place) % _P]))
    return out


def _is_mapping(batch: Any, at: tuple) -> bool:
    """Whether the node of ``batch`` at the keys' path ``at`` is a mapping."""
    node = batch
    for k in at:
        node = node[k]
    return isinstance(node, Mapping)


def batch_fingerprint(batch: Any, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The residues (:func:`tensor_fingerprint`) of every tensor in ``batch`` (a tensor, or a nested tuple, list
    or dict of them; other leaves, such as strings, are not read), each salted by its place in the batch, each
    under the first mask of :func:`_context` that fits it (a mapping's ``attention_mask``, or its nearest enclosing
    or first enclosed mapping's, before ``mask``, ``mask_fn``'s). A tensor shared by the batch's samples under an
    ``(M, T)`` mask (a ``(1, T)`` or ``(T,)`` ``position_ids``) is read as each sample's (:func:`_shared`); a 0-dim
    one (a per-batch count) is not read: either would make a re-batched pool hash otherwise. In a mapping, only a
    tensor under a key naming a mask or a bias (:data:`_PAIR_NAMES`) is read as a 4-D attention mask. A packed
    mapping (``cu_seqlens``, or ``position_ids`` restarts) is read by document (:func:`_documents`). A tensor whose
    kernels fail, or a mapping whose mask does (a nested one), is read as if without it, never raising. Of
    a tensor's candidate readings (:func:`_leaf`), the first this batch has."""
    return [next(h for h in found if h is not None) for _, found in _readings(batch, mask)]


class PoolFingerprint:
    """A running fingerprint of the batches one measurement's pass reads (:func:`_readings`), summed on each batch's
    device; :meth:`value` reads it once, at the end of the pass (one host sync per device). Two passes over the
    same samples, in any order and batching, give the same value; other content (almost surely) another. Where a
    tensor has several candidate readings (:func:`_leaf`), each is summed, and the pass's value takes the first
    that every batch holding the tensor had (a tensor as wide as the mask in every batch is per position; one that
    is not in some batch is per sample in all). Reads the batches only: no RNG, no state."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, int, int], dict[torch.device, torch.Tensor]] = {}
        self._missed: set[tuple[str, int, int]] = set()  # candidates a batch holding their tensor did not have
        self.batches = 0

    def add(self, batch: Any, mask: torch.Tensor | None = None) -> None:
        self.batches += 1
        for place, found in _readings(batch, mask):
            for i, h in enumerate(found):
                key = (place, len(found), i)
                if h is None or h.device.type == "meta":  # (nothing to read back: never a failed value())
                    self._missed.add(key)
                    continue
                sums = self._sums.setdefault(key, {})
                s = sums.get(h.device)
                sums[h.device] = h if s is None else (s + h) % _P

    def read(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Each of ``batches``, added as it passes (:meth:`add`, the batch's ``attention_mask`` as the mask)."""
        for batch in batches:
            self.add(batch)
            yield batch

    def value(self) -> int:
        first: dict[tuple[str, int], int] = {}  # each tensor's first candidate that every batch had, else its last
        for place, n, i in self._sums:
            if (place, n, i) not in self._missed:
                first[(place, n)] = min(i, first.get((place, n), n - 1))
            else:
                first.setdefault((place, n), n - 1)
        total: dict[torch.device, torch.Tensor] = {}
        for (place, n), i in first.items():
            for device, s in self._sums.get((place, n, i), {}).items():
                total[device] = s if device not in total else (total[device] + s) % _P
        return sum(int(s) for s in total.values()) % _P
