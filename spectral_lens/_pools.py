"""What ``SpectralLens`` reads from its held-out pool besides the batches: the default ``mask_fn``
(:func:`attention_mask`) and the checks, when the lens is built, that iterating the pool gives the same
whole pool at every measurement (:func:`sample_dataset`: not a dataset of single samples; :func:`unfixed_pool`: not reshuffled and cut; :func:`sharded_pool`:
not one rank's shard), and, at a measurement split between ranks, that it is not reshuffled (:func:`reshuffled`). Import them from :mod:`spectral_lens.lens`.
The content fingerprint of the batches a measurement reads is :mod:`spectral_lens._fingerprint`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def attention_mask(batch: Any) -> torch.Tensor | None:
    """The default ``mask_fn`` of :class:`SpectralLens`: valid positions of a padded batch.

    For a dict batch (any mapping, such as Hugging Face's ``BatchEncoding``) with an
    ``"attention_mask"`` entry, that mask as bool (``True`` = real token); for every other batch
    ``None`` (all rows measured). A floating-point mask of other values than 0 and 1 (an additive mask)
    is a ``ValueError``. The mask must have the measured module output's leading shape
    (``(M, T)`` for a ``(M, T, d)`` block output). With the default ``forward_fn`` the lens hands
    ``mask_fn`` a packed batch (Hugging Face's ``DataCollatorWithFlattening``) as it runs it, the padded
    batch of its documents: the mask is then every token of every document, no padding.
    """
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        mask = batch["attention_mask"]
        # a float mask of 1/0 is a mask; an additive one (0 for real tokens, -inf or -1e9 for padding) would
        # read inverted as bool (one host sync, for floating masks only)
        if isinstance(mask, torch.Tensor) and mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"attention_mask (the default mask_fn of SpectralLens): the batch's floating-point attention_mask of "
                f"shape {tuple(mask.shape)} holds values other than 0 and 1 (min {float(mask.min())}): an additive mask "
                "(0 = real token) would be read inverted; pass the 1/0 mask (1 = real token), or mask_fn="
            )
        return mask.bool()
    return None


def sample_dataset(pool: Any) -> str | None:
    """What makes ``pool`` a dataset of single samples rather than an iterable of batches, or ``None``: a
    map-style ``torch.utils.data.Dataset`` (``TensorDataset``, ``Subset``, a dataset of dicts), whose items are
    samples without a batch dimension (a ``(T,)`` token row that a model reads as ``T`` sequences, or fails on
    deep inside). A ``DataLoader`` over it batches them. An ``IterableDataset`` is not recognized: it may yield
    whole batches (as for ``DataLoader(batch_size=None)``), which work as a pool; nor a Dataset subclass with
    its own ``__iter__`` whose first item is not ``pool[0]`` (it yields e.g. whole batches); nor a list of 1-D tensors,
    which may be the batches of a model taking 1-D input."""
    data = torch.utils.data
    if not isinstance(pool, data.Dataset) or isinstance(pool, (data.IterableDataset, data.DataLoader)):
        return None
    if getattr(type(pool), "__iter__", None) is not None and not _iterates_items(pool):
        return None  # its own __iter__ yields something else than its items (e.g. whole batches): a pool
    try:
        size = f" of {len(pool)} samples"
    except (TypeError, NotImplementedError):  # a dataset without a len: named without its size
        size = ""
    return f"is a map-style Dataset ({type(pool).__name__}{size}), whose items are single samples, not batches"


def single_sample_hint(pool: Any, batch: Any) -> str | None:
    """A note for an error raised by the first forward of ``pool``'s first ``batch`` when every tensor in the batch
    has at most one dimension (a ``(T,)`` token row, a dict of them): the items of an ``IterableDataset`` of
    single samples, or a list of 1-D samples, which the lens runs as batches (a map-style ``Dataset`` is refused
    at construction: :func:`sample_dataset`). ``None`` where some tensor has a batch dimension, or none is a
    tensor. Only a hint on an error already raised: a model that takes 1-D batches is measured as it is."""
    from torch.utils import _pytree as pytree

    from .gradients._batch import plain_batch

    leaves = [t for t in pytree.tree_leaves(plain_batch(batch)) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() > 1 for t in leaves):
        return None
    return (f"SpectralLens: the pool ({type(pool).__name__}) gave a first batch whose tensors have at most one "
            f"dimension ({', '.join(str(list(t.shape)) for t in leaves[:4])}): if its items are single samples, wrap "
            "it in a DataLoader(pool, batch_size=8) (a collate_fn that pads for ragged samples); the lens runs each "
            "item of its pools as one batch")


def _iterates_items(pool: Any) -> bool:
    """Whether the first item a Dataset's own ``__iter__`` yields is its item 0 (the same tensors, by value):
    then it iterates its samples. One item read each way, once, when the lens is built; anything that fails
    (no item 0, an empty pool) says no: the pool is taken, as before the check."""
    try:
        it = iter(pool)
        try:
            first = next(it)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        return _same(first, pool[0])
    except Exception:  # noqa: BLE001 - any failure: not shown to be a dataset of samples
        return False


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` hold equal tensors in the same structure (dicts, lists, tuples), and equal leaves."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable leaves: not the same
        return False


_RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler,
    torch.utils.data.SubsetRandomSampler,
    torch.utils.data.WeightedRandomSampler,
)


def unfixed_pool(pool: Any, cap: int | None = None) -> str | None:
    """Why iterating ``pool`` (a ``DataLoader`` with a random sampler) yields a different set of samples
    at each measurement, or ``None``. A reshuffled pool whose every sample is measured is fine (the
    spectra do not depend on the order, up to rounding); one that draws with replacement, draws a random
    part of its data (``num_samples`` not a multiple of the data's size without replacement), drops a
    shuffled remainder (``drop_last``) or is cut to its first ``cap`` samples is not the fixed pool of the
    protocol. Only torch's random samplers are recognized: a sampler of your own, an ``IterableDataset``
    with a shuffle buffer or random augmentation are not detected."""
    batch_sampler = getattr(pool, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(pool, "sampler", None)
    if not isinstance(sampler, _RANDOM_SAMPLERS):
        return None
    n = len(sampler)
    if getattr(sampler, "replacement", False):
        return "draws its samples at random with replacement"
    # without replacement, a sampler of num_samples other than its data's size draws a random part of it:
    # RandomSampler a fresh subset (fewer) or whole permutations plus one (more, not a multiple), and
    # WeightedRandomSampler a fresh subset (fewer than its weights)
    whole = len(sampler.weights) if isinstance(sampler, torch.utils.data.WeightedRandomSampler) else (
        len(sampler.data_source) if isinstance(sampler, torch.utils.data.RandomSampler) else n)
    if whole and n % whole:
        part = f"a random {n} of its {whole} samples" if n < whole else \
            f"{n // whole} whole pass(es) over its {whole} samples and a random {n % whole} of them"
        return f"draws {part} on every pass (num_samples={n}), a different set each time"
    size = getattr(batch_sampler, "batch_size", None)
    if getattr(batch_sampler, "drop_last", False) and size and n % size:
        return f"shuffles and drops a different {n % size} of its {n} samples on every pass (drop_last=True)"
    if cap is not None and cap < n:
        return f"shuffles, and gradient_samples={cap} takes the first {cap} of its {n} samples"
    return None


def reshuffled(pool: Any) -> str | None:
    """What makes iterating ``pool`` (a ``DataLoader`` with a random sampler) give its samples in a new random
    order at every pass, or ``None``. Fine in one process (the spectra do not depend on the order), not where
    the lens splits the pool between ranks (batch ``i`` on rank ``i % world``): each rank draws its own order
    from its own RNG streams, so the ranks' shares overlap and miss samples."""
    batch_sampler = getattr(pool, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(pool, "sampler", None)
    if isinstance(sampler, _RANDOM_SAMPLERS):
        return f"is a DataLoader over a {type(sampler).__name__} (shuffle=True), which draws a new order at every pass"
    return None


def sharded_pool(pool: Any) -> str | None:
    """What makes ``pool`` one rank's shard of the data (a ``DataLoader`` over a ``DistributedSampler`` of
    several replicas), or ``None``. The lens shards the pool itself (batch ``i`` on rank ``i % world``)
    and runs the gradient protocol over rank 0's whole gradient pool, so a shard per rank would measure
    a part of the pool only, silently."""
    batch_sampler = getattr(pool, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(pool, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.num_replicas > 1:
        return f"is a DataLoader over a DistributedSampler (rank {sampler.rank} of {sampler.num_replicas} replicas)"
    return None
