"""The batches of ``SpectralLens``'s gradient protocol: the gradient pool cut to ``gradient_samples``, counted as
the probe runs them (with its default forward a packed batch is its documents), how many samples that makes,
and, where every rank runs the protocol's passes together, the ranks' agreement on each next batch.

Functions of the pool, the cap and the probe's ``forward_fn``; :class:`~spectral_lens.lens.SpectralLens` feeds
their batches to its :class:`~spectral_lens.gradients.PerSampleGradientProbe`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._agree import agree_counts, global_rank
from ._progress import sized_total
from .gradients._batch import batch_as_run, batch_size, slice_batch

__all__ = ["agreed_batches", "gradient_batches", "gradient_total"]


def gradient_total(pool: Iterable[Any], cap: int | None, forward_fn: Callable | None) -> int | None:
    """Samples the gradient pass will take: the pool's sample count (lists, tuples, DataLoaders
    over a sized sampler or dataset; a list's batches counted as ``forward_fn``, the probe's, gets them) capped by ``cap``
    (``gradient_samples``); ``None`` when unknown."""
    n = None
    if isinstance(pool, (list, tuple)):
        n = sum(batch_size(batch_as_run(b, forward_fn)) for b in pool)
    else:
        data = getattr(pool, "dataset", None)
        bs = getattr(pool, "batch_size", None)
        # the samples its sampler draws (a sampler= over part of the data: SubsetRandomSampler, num_samples=),
        # else the dataset's (an IterableDataset's sampler has no length)
        sampler = getattr(pool, "sampler", None)
        size = sized_total(sampler) if sampler is not None else None
        size = sized_total(data) if size is None and data is not None else size
        if data is not None and bs is not None and size is not None:
            n = size - (size % bs if getattr(pool, "drop_last", False) else 0)
    if cap is None:
        return n
    return cap if n is None else min(cap, n)


def gradient_batches(pool: Iterable[Any], cap: int | None, forward_fn: Callable) -> Iterator:
    """The gradient pool's batches, cut to ``cap`` samples (``gradient_samples``; ``None``: all)."""
    seen = 0
    for batch in pool:
        # as the probe runs it (with its default forward a packed batch is its documents): the cap counts those
        batch = batch_as_run(batch, forward_fn)
        if cap is not None:
            take = min(batch_size(batch), cap - seen)
            if take <= 0:
                return
            batch = slice_batch(batch, 0, take)
        yield batch
        seen += batch_size(batch)
        if cap is not None and seen >= cap:
            return  # not one batch more from the loader (its loading and collation cost)


def agreed_batches(group, batches: Iterator, cap: int | None, model=None) -> Iterator:
    """Where every rank runs the gradient protocol and each pass is a collective (FSDP, ZeRO-3, one
    tensor-parallel replica: :meth:`~spectral_lens.lens.SpectralLens._everywhere`): each of
    ``batches`` once the ranks of ``group`` agreed that each has its next batch, of as many samples (the probe's
    passes depend on it), in one ``all_reduce`` of world integers per batch and one at the end.
    A failure while loading is agreed (every rank raises), and so are pools that differ (the same
    ``ValueError`` on every rank, naming ``cap``, the lens's ``gradient_samples``), so no rank is left in a pass
    the others never run. ``model``: the lens's, where the agreement's tensors go under NCCL
    (:func:`~spectral_lens._agree.collective_device`)."""
    end = object()
    for i in itertools.count(1):
        batch, size, error = end, 0, None
        try:
            batch = next(batches, end)
            size = 0 if batch is end else 1 + batch_size(batch)  # 0: none left
        except BaseException as exc:  # an interrupt too: agreed at once, then re-raised
            error = exc
        sizes = agree_counts(group, size, error, "loading the gradient pool's batches", model)
        if len(set(sizes)) > 1:
            each = ", ".join(f"global rank {global_rank(group, r)}: "
                             + (f"{n - 1} samples" if n else "none left") for r, n in enumerate(sizes))
            cut = "" if cap is None else f" (cut to gradient_samples={cap})"
            raise ValueError(
                f"SpectralLens: the ranks' gradient pools differ at batch {i}: {each}{cut}; under FSDP, ZeRO-3 and "
                "tensor parallelism every rank runs the gradient protocol, whose passes are collectives over the "
                "ranks, so every rank must pass the same whole gradient pool"
            )
        if batch is end:
            return
        yield batch
