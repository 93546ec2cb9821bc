"""Tensor parallelism (``torch.distributed.tensor.parallel.parallelize_module``: parameters that are
``DTensor`` shards on a ``DeviceMesh``) as the lens and the gradient probe meet it.

Every forward of a tensor-parallel model is a collective over its mesh, and the ranks of one mesh hold one
model replica: they must run the *same* batches, and their replicated outputs are the same rows, which
summed over them would count every row once per rank. The lens therefore treats the ranks of a
tensor-parallel mesh as one data-parallel replica (:func:`replica_ranks`, :func:`one_replica`), checks
after its pass that the measured rows really are the same on them (:func:`check_replicated`: a
sequence-parallel layer's output is a different slice of the tokens on each rank) and refuses a
tensor-parallel (sharded) matrix in the probe (:func:`refuse_tensor_parallel_params`).
Where the lens's ``group`` holds one rank of each mesh (each rank's own group, a data-parallel group), whose
agreements do not reach a rank's mesh peers, the peers compare their forwards and settings before the pass
(:func:`check_same_forwards`, :func:`probe_settings`) and agree failures between its forwards
(:class:`PeerRounds`: loading a batch, ``mask_fn``, the probe's ``compute``), so that none waits alone in a
forward's collective.

Models sharded with FSDP are left to the FSDP handling (``gradients/_measurable.py``): FSDP2's parameters
are ``DTensor``s too; FSDP2 combined with tensor parallelism on a 2-D mesh (parameters sharded along two mesh
dimensions) is refused (:func:`refuse_fsdp_with_tensor_parallel`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
import zlib

import torch
from torch import nn

from ._dtensor import dtensor_module

__all__ = ["PeerRounds", "check_replicated", "check_same_forwards", "gradient_layout", "one_replica", "probe_settings",
           "refuse_fsdp_with_tensor_parallel", "refuse_tensor_parallel_params", "replica_ranks", "tensor_parallel_params"]


def tensor_parallel_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of ``model``'s ``DTensor`` parameters placed by tensor parallelism: every
    ``DTensor`` parameter of a model without FSDP modules (none where ``torch.distributed.tensor`` was
    never imported: nothing can be a ``DTensor`` then)."""
    dtensor = dtensor_module()
    if dtensor is None:
        return []
    from .gradients._measurable import fsdp_sharded

    found = [(n, p) for n, p in model.named_parameters() if isinstance(p, dtensor.DTensor)]
    return [] if not found or fsdp_sharded(model) else found


def refuse_fsdp_with_tensor_parallel(model: nn.Module, who: str = "SpectralLens") -> None:
    """``ValueError`` for an FSDP model whose ``DTensor`` parameters are sharded along two mesh dimensions
    (FSDP2 and tensor parallelism on a 2-D ``(dp, tp)`` mesh; HSDP's are ``(Replicate(), Shard(0))``): the
    lens takes FSDP's ``DTensor``s for FSDP's alone, so it would split the pool across the ranks of one
    tensor-parallel replica, whose collectives would then mix different batches (a wrong spectrum, silently)."""
    dtensor = dtensor_module()
    if dtensor is None:
        return
    for name, p in model.named_parameters():
        if isinstance(p, dtensor.DTensor) and sum(not isinstance(pl, dtensor.Replicate) for pl in p.placements) > 1:
            from .gradients._measurable import fsdp_sharded

            if not fsdp_sharded(model):
                return
            raise ValueError(
                f"{who}: the model is sharded with FSDP and another parallelism on a multi-dimensional mesh "
                f"({_describe(name, p)}: sharded along two mesh dimensions, e.g. FSDP2 with tensor parallelism), "
                "which the lens does not support: it would split the pool across ranks that must run the same "
                "batches (one tensor-parallel replica), a wrong spectrum. Measure a copy without it (the full "
                "weights, DTensor.full_tensor() of each parameter on every rank, loaded into a plain model of the "
                "same architecture), or FSDP (or tensor parallelism) alone (docs/guide-multi-gpu.md)"
            )


def _describe(name: str, p) -> str:
    mesh = p.device_mesh
    return (f"{name} is a DTensor with placements {tuple(p.placements)} on a DeviceMesh of ranks "
            f"{mesh.mesh.tolist()}" + (f" (dims {mesh.mesh_dim_names})" if mesh.mesh_dim_names else ""))


def replica_ranks(model: nn.Module):
    """This rank's tensor-parallel peers: ``(global ranks, process group, description)`` of the ranks that
    hold the other shards of ``model``'s tensor-parallel parameters along their sharded mesh dimension
    (for a 1-D mesh, the whole mesh), this rank included; ``None`` without tensor parallelism (or a
    sharding that leaves each rank alone). These ranks must run the same forwards on the same batches."""
    found = tensor_parallel_params(model)
    if not found:  # (without importing torch.distributed.tensor, seconds, where nothing imported it)
        return None
    Replicate = dtensor_module().Replicate

    for name, p in found:
        mesh = p.device_mesh
        coord = mesh.get_coordinate()
        dims = [d for d, placement in enumerate(p.placements) if not isinstance(placement, Replicate)]
        if coord is None or not dims:
            continue
        # the ranks that share this rank's coordinates on the other dims: the first sharded dim's sub-group
        index = tuple(slice(None) if d == dims[0] else coord[d] for d in range(mesh.ndim))
        peers = mesh.mesh[index].flatten().tolist()
        if len(peers) > 1:
            return peers, mesh.get_group(dims[0]), _describe(name, p)
    return None


def one_replica(model: nn.Module, group, who: str = "SpectralLens"):
    """How the lens's ``group`` meets ``model``'s tensor parallelism: ``None`` without it; else
    ``(whole, peers_group)``, ``whole`` when the group is exactly this rank's tensor-parallel peers (one
    replica: every rank runs every batch, the statistics are not summed over the group), ``False`` when
    the group holds one rank of them (a data-parallel group: the usual split and sum). ``ValueError``
    when the group holds several peers and other ranks too (batches split across the peers, whose
    forwards would then mix different batches in their collectives)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    refuse_fsdp_with_tensor_parallel(model, who)
    found = replica_ranks(model)
    if found is None:
        return None
    peers, peers_group, what = found
    members = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    inside = sorted(set(peers) & set(members))
    if sorted(members) == sorted(peers):
        return True, peers_group
    if len(inside) <= 1:
        return False, peers_group
    raise ValueError(
        f"{who}: the model is tensor-parallel ({what}), and the lens's group (global ranks {sorted(members)}) "
        f"holds the tensor-parallel ranks {inside} together with other ranks. The ranks of one tensor-parallel "
        "mesh run every forward together on the same batch, so the lens cannot split the pool across them. "
        "Pass group= the data-parallel group (one rank of each tensor-parallel mesh, e.g. "
        "device_mesh['dp'].get_group()), or the tensor-parallel group alone when there is one replica"
    )


RTOL = 1e-5
"""Relative difference of the ranks' statistics above which a layer's rows count as different: far below what
different tokens or features give, far above the round-off of replicated rows computed by kernels that are
not bitwise deterministic."""


def _digest(acc) -> torch.Tensor:
    """Row count, sums and sums of squares of an accumulator's mean and covariance, and their sizes, float64
    on the CPU (zeros where it has fewer than 2 rows or its statistics cannot be read: non-finite rows, whose
    error the lens's compute raises on every rank afterwards)."""
    try:
        with warnings.catch_warnings():  # its notes (an underflow) are the lens's compute's to emit, once
            warnings.simplefilter("ignore")
            mean, cov = acc.mean.double().cpu(), acc.covariance().double().cpu()
    except Exception:  # noqa: BLE001 - not this check's error to raise (see above)
        return torch.tensor([float(acc.n_rows), 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    return torch.tensor([float(acc.n_rows), mean.sum(), (mean * mean).sum(), cov.sum(), (cov * cov).sum(),
                         mean.numel(), cov.numel()], dtype=torch.float64)


def _same(hi: torch.Tensor, lo: torch.Tensor) -> bool:
    """Whether the largest (``hi``) and smallest (``lo``) digest over the ranks agree: the row count and sizes
    exactly, the sums of squares to :data:`RTOL`, the sums to :data:`RTOL` of their Cauchy-Schwarz bound."""
    if hi[0] != lo[0] or hi[5] != lo[5] or hi[6] != lo[6]:
        return False
    for total, squares, size in ((1, 2, 5), (3, 4, 6)):
        if hi[squares] - lo[squares] > RTOL * hi[squares]:
            return False
        if hi[total] - lo[total] > RTOL * torch.sqrt(hi[size] * hi[squares]):
            return False
    return True


def check_replicated(named: list, peers_group, who: str = "SpectralLens") -> None:
    """``ValueError`` on every tensor-parallel peer when they measure different layers, or when a measured
    layer's rows differ between them (two small collectives over ``peers_group``): a sequence-parallel output (each rank holds a slice of the tokens) or
    a sharded output read as a plain tensor (each rank holds some of the features), whose statistics would
    be one rank's part. ``named``: ``(layer name, accumulator)`` in one order on every rank."""
    import torch.distributed as dist

    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(peers_group) == "nccl"
              else torch.device("cpu"))
    _check_same_layers([name for name, _ in named], peers_group, device, who)
    if not named:
        return
    digest = torch.stack([_digest(acc) for _, acc in named])
    both = torch.stack([digest, -digest])  # MAX of both: the largest and (negated) the smallest over the ranks
    both = both.to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=peers_group)
    both = both.cpu()
    differ = [name for (name, _), hi, lo in zip(named, both[0], -both[1]) if not _same(hi, lo)]
    if differ:
        raise ValueError(
            f"{who}: the outputs of {differ} differ between the tensor-parallel ranks "
            f"{dist.get_process_group_ranks(peers_group)} that ran the same batches: each rank holds part of them "
            "(a sequence-parallel output, a slice of the tokens; or a sharded output returned as a local "
            "tensor, some of the features), so no rank's statistics are the layer's. Measure a layer whose "
            "output is replicated (e.g. a RowwiseParallel output with its default Replicate() layout), or "
            "gather it in the pick, e.g. pick=lambda out: DTensor.from_local(out, mesh, [Shard(1)]).full_tensor() "
            "for a sequence-sharded output (a collective over the mesh)"
        )


def _layers_key(names: list) -> tuple[int, int]:
    """``(count, CRC-32 of the names)`` of a rank's measured layers: equal on ranks that measure the same ones."""
    return len(names), zlib.crc32("\0".join(names).encode())


def _check_same_layers(names: list, peers_group, device, who: str) -> None:
    """``ValueError`` on every tensor-parallel peer when they measure different layers (one all-reduce of a
    fixed size over ``peers_group``, before the digests, whose sizes would then differ: before, gloo aborted
    a rank's process with 'a collective mismatch', and the other one failed with a broken connection). The
    lens's own agreement on the layers runs over its ``group``, which holds one rank of each mesh when it is
    each rank's own group or the data-parallel group."""
    import torch.distributed as dist

    key = torch.tensor(_layers_key(names), dtype=torch.float64)  # a CRC-32 is exact in float64
    both = torch.cat([key, -key]).to(device)  # MAX of both: the largest and (negated) the smallest
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=peers_group)
    both = both.cpu()
    if not torch.equal(both[:2], -both[2:]):
        raise ValueError(
            f"{who}: the tensor-parallel ranks {dist.get_process_group_ranks(peers_group)} measure different "
            f"layers (this rank: {names}); the ranks of one tensor-parallel mesh run the same forwards and must "
            "measure the same layers: pass the same layers= on every rank"
        )


def gradient_layout(pool, cap: int | None, forward_fn) -> int | None:
    """CRC-32 of the sizes of the batches the gradient protocol will run (as
    :func:`~spectral_lens._gradient_pool.gradient_batches` cuts them to ``cap``), as runs ``(size, count)``:
    lists and tuples (their batches as ``forward_fn`` gets them), DataLoaders over a sized dataset; ``None`` when
    unknown. The probe runs one forward per chunk of each batch, so peers with as many samples in other batches
    would run different numbers of forwards."""
    from ._progress import sized_total
    from .gradients._batch import batch_as_run, batch_size

    if isinstance(pool, (list, tuple)):
        runs = [(batch_size(batch_as_run(b, forward_fn)), 1) for b in pool]
    else:
        data, bs = getattr(pool, "dataset", None), getattr(pool, "batch_size", None)
        if data is None or bs is None or sized_total(data) is None:
            return None
        n, bs = len(data), int(bs)
        runs = [(bs, n // bs)] + ([] if getattr(pool, "drop_last", False) or n % bs == 0 else [(n % bs, 1)])
    out, left = [], cap
    for size, count in runs:
        if left is None:
            _run(out, size, count)
            continue
        if left <= 0 or size <= 0:  # gradient_batches stops at the cap (and at an empty batch under a cap)
            break
        whole = min(count, left // size)  # whole batches while they fit, then one batch cut to the cap
        _run(out, size, whole)
        left -= size * whole
        if whole < count:
            _run(out, left, 1)
            break
    return zlib.crc32(repr(out).encode())


def _run(out: list, size: int, count: int) -> None:
    """Append ``count`` batches of ``size`` to the runs ``out`` (merged with the last run of that size)."""
    if count <= 0:
        return
    if out and out[-1][0] == size:
        out[-1] = (size, out[-1][1] + count)
    else:
        out.append((size, count))


PEERS_BEFORE = ("a tensor-parallel rank's work before its peers' check of their pools and settings (measure()'s "
                "arguments, the lens, a pool's len)")
"""What the peers name where a rank failed before :func:`check_same_forwards` (they cannot tell which step)."""


def check_same_forwards(forwards: int | None, peers_group, who: str = "SpectralLens", what: str = "forwards",
                        layout: int | None = None, settings: str = "", error: BaseException | None = None,
                        failed: str = PEERS_BEFORE) -> None:
    """``ValueError`` on every tensor-parallel peer, before any forward, when they would run different numbers
    of forwards (``forwards``: this rank's, ``None`` for a pool without ``len``, not checked; ``what``: what is
    counted, the activation pass's forwards or the gradient protocol's samples; ``layout``: for the gradient
    protocol, :func:`gradient_layout` of its pool, ``None`` where unknown, not checked), or with other
    ``settings`` (text: the lens's and, for the gradient protocol, the probe's :func:`probe_settings`; a
    ``chunk_size`` of its own on one rank ran other numbers of forwards, a gloo abort). Needed where the
    lens's ``group`` holds one rank of the mesh (each rank's own group, a data-parallel group), whose agreement
    on the pools and settings does not reach the peers: before, the rank with more batches ran a forward alone
    and its all-reduce met another collective of its peer (gloo aborted a process, 'collective mismatch'). One
    all-reduce over ``peers_group`` (of the same size on every peer, whatever it knows).

    ``error``: this rank failed before the pass (a bad argument of ``measure``, the lens's group agreement, a
    pool's ``len``; ``failed``: what the peers name, :data:`PEERS_BEFORE`), after which it calls this in place of
    the pass's check, so that its peers, whose group
    agreement did not see it, learn it here instead of waiting in the check until the process-group timeout:
    this rank raises ``error``, the peers a ``RuntimeError`` naming its global rank and quoting its error (a
    second collective, on that path only; :func:`~spectral_lens._agree.agree_round`'s rules)."""
    import torch.distributed as dist

    from ._agree import out_of_step

    if error is not None and out_of_step(error):  # another collective would only wait too
        raise error
    mine = [-1.0 if forwards is None else float(forwards), -1.0 if layout is None else float(layout),
            -1.0 if error is not None else float(zlib.crc32(settings.encode()))]  # -1: failed (a CRC-32 is >= 0)
    both = torch.tensor(mine + [-x for x in mine], dtype=torch.float64)  # a CRC-32 is exact in float64
    if dist.get_backend(peers_group) == "nccl":
        both = both.to(torch.device("cuda", torch.cuda.current_device()))
    from ._agree import _own_collectives

    with _own_collectives(error, what):
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=peers_group)
    n = len(mine)
    if error is not None or float(both[n + 2]) > 0:  # -MAX(-crc) < 0: a peer failed before the pass
        _peers_failed(peers_group, error, failed, both.device)
    both = both.cpu()
    hi, lo = float(both[0]), -float(both[n])
    ranks = dist.get_process_group_ranks(peers_group)
    if float(both[2]) != -float(both[n + 2]):  # first: other settings may be why the counts differ
        phase = "gradient protocol" if "gradient" in what else "activation pass"
        raise ValueError(
            f"{who}: the tensor-parallel ranks {ranks} run the {phase} with other settings "
            f"({_differing_settings(peers_group, settings, both.device)}): "
            "the ranks of one tensor-parallel mesh run every forward together, and other settings run other "
            "forwards (a probe's chunk_size: one forward per chunk) or other "
            "collectives in them; the lens's group= holds one rank of the mesh, so its own agreement on the settings "
            "does not reach them: give the ranks of one mesh the same lens (and probe)"
        )
    if lo >= 0 and hi != lo:  # every rank knows its count, and they differ (the same on every peer)
        raise ValueError(
            f"{who}: the tensor-parallel ranks {ranks} would run different "
            f"numbers of {what} (this rank: {forwards}, the others between {int(lo)} and {int(hi)}): the ranks of "
            "one tensor-parallel mesh run every forward together, so each must get the same pool (the lens's "
            "group= holds one rank of the mesh: give the ranks of one mesh the same pool, e.g. a data loader "
            "sharded by the data-parallel rank, not the global rank)"
        )
    if -float(both[n + 1]) >= 0 and float(both[1]) != -float(both[n + 1]):  # as many, in batches of other sizes
        raise ValueError(
            f"{who}: the tensor-parallel ranks {ranks} would run {what.split(' (')[0].replace('samples', 'batches')} "
            f"of other sizes (as many samples, {forwards}, in other batches): the probe runs one forward per "
            "chunk of each batch, and the ranks of one tensor-parallel mesh run every forward together, so each "
            "must get the same pool, in the same batches"
        )


def _peers_failed(peers_group, error: BaseException | None, failed: str, device) -> None:
    """Where a peer failed before the pass (:func:`check_same_forwards`' ``error``): each peer's error text in one
    more all-reduce (:func:`~spectral_lens._agree._causes`, every peer's row: empty where it did not fail); then
    ``error`` on a failed rank, a ``RuntimeError`` naming the failed global ranks and quoting their errors on the
    others (a ``NonFiniteError`` where each was one, as :func:`~spectral_lens._agree.agree` raises)."""
    import torch.distributed as dist

    from ._agree import _causes, _own_collectives, _raise_failed

    rank, world = dist.get_rank(peers_group), dist.get_world_size(peers_group)
    with _own_collectives(error, failed):
        texts = _causes(peers_group, list(range(world)), rank, world, error, device)
    if error is not None:
        raise error
    down = [r for r, text in enumerate(texts) if text]
    _raise_failed(peers_group, down, failed, nonfinite=all(texts[r].startswith("NonFiniteError") for r in down),
                  causes=[texts[r] for r in down])


def _settings_items(text: str) -> dict[str, str]:
    """``{name: value}`` of a settings text (:meth:`SpectralLens._peer_settings`: ``a=1, b=(2, 3); probe: c=4``;
    the probe's as ``probe.c``)."""
    lens, _, probe = text.partition("; probe: ")
    items = {}
    for prefix, part in (("", lens), ("probe.", probe)):
        for item in re.split(r", (?=[A-Za-z_]+=)", part) if part else []:
            name, _, value = item.partition("=")
            items[prefix + name] = value
    return items


def _differing_settings(peers_group, settings: str, device) -> str:
    """The settings that differ between the peers, each with its value on each global rank (their texts gathered
    once, on this failure path only): e.g. ``params=() (no gradient protocol) on global rank 1, params=<probed
    matrices> on global rank 0``."""
    import contextlib

    import torch.distributed as dist

    every: list = [None] * dist.get_world_size(peers_group)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(every, settings, group=peers_group)
    ranks = dist.get_process_group_ranks(peers_group)
    parsed = [_settings_items(text) for text in every]
    names = sorted({name for items in parsed for name in items}, key=lambda n: (n.startswith("probe."), n))
    differ = [n for n in names if len({items.get(n) for items in parsed}) > 1]
    shown = [n for n in differ if not n.startswith("probe.")] or differ
    out = "; ".join(", ".join(f"{n}={items.get(n, '(none)')} on global rank {r}" for r, items in zip(ranks, parsed))
                    for n in shown[:4])
    return out or f"this rank: {settings}"


def probe_settings(probe) -> str:
    """The settings of a gradient probe that decide which forwards and collectives its passes run, as text: the
    chunk size (one forward per chunk of each batch), the engines (the per-sample loop runs a forward per sample),
    ``max_resident_samples`` (recomputation passes in ``compute``), ``head_loss`` (a check forward) and the
    autocast dtype (the dtype of the collectives' tensors); and the default loss's label smoothing in use (its own
    or an integration's): the ranks of one replica run one backward, which would mix two losses' gradients."""
    return (f"chunk_size={probe.chunk_size}, engine={probe.engine!r}, engines={sorted(probe.engines_.items())}, "
            f"max_resident_samples={probe.max_resident_samples}, head_loss={probe.head_loss!r}, "
            f"autocast_dtype={probe.autocast_dtype}, label_smoothing={getattr(probe, '_label_smoothing', 0.0):g}")


class PeerRounds:
    """The agreement of this rank's tensor-parallel peers between the forwards of one pass, where the lens's
    ``group`` holds one rank of the mesh (each rank's own group, a data-parallel group), so that its own
    agreement does not reach them. Before each forward the peers agree, in one ``all_reduce`` of
    ``2 x peers`` integers over ``group`` (:func:`~spectral_lens._agree.agree_round`), that each has its next batch,
    of the same shapes and dtypes (:meth:`agreed`), and after the last one that each pool ended; a failure of this
    rank outside the forwards (loading a batch, its ``mask_fn``, the lens's checks before a forward) is carried
    into the peers' next round (:meth:`fail`). Then the failed rank raises its own error and the peers a
    ``RuntimeError`` naming its global rank, ``what`` failed and its error, at once: before, they waited in their
    next forward's collective until the process-group timeout. A failure inside a forward (from a round's
    go-ahead to the next round) is not agreed: the peers may wait in its collectives, as in training. With
    ``agreed(..., last_round=False)`` the round after the last forward is the caller's :meth:`end`, once the
    work after the forwards is done too (the probe's ``compute``): a failure there on one rank joins it (before,
    the peer returned the measurement and went on alone); where that work runs forwards too (bounded-memory
    mode's recomputations), each is preceded by a round of its own (:meth:`forward`)."""

    def __init__(self, group, what: str, model=None, who: str = "SpectralLens") -> None:
        self.group, self.what, self.model, self.who = group, what, model, who
        self.forwards = 0  # the forwards the peers agreed to run so far
        self.open = True  # rounds are left: a failure of this rank joins the peers' next one
        self.inside = False  # between a round's go-ahead and the next round: in a forward's collectives

    def agreed(self, batches, last_round: bool = True):
        """Each of ``batches`` (this rank's, in the order it forwards them; their loading and what precedes it
        happens in ``next``) once the peers agreed on it; one round more at the end (``last_round=False``: left
        to :meth:`end` or :meth:`fail`, the caller's, after its work that follows the forwards)."""
        from ._agree import agree_round, batch_digest

        end = object()
        while True:
            batch, digest, error = end, 0, None
            try:
                batch = next(batches, end)
                digest = 0 if batch is end else batch_digest(batch)
            except BaseException as exc:  # noqa: BLE001 - an interrupt too: agreed at once, then re-raised
                error = exc
            if batch is end and error is None and not last_round:
                return  # the rounds stay open: the last one is end()'s, or fail()'s
            self.open = False  # this round settles it: the peers raise alike where it raises
            counts, digests = agree_round(self.group, self.forwards + (batch is not end), digest, error,
                                          self.what, self.model, quote=True)
            self._refuse_differing(counts, digests, batch is end)
            if batch is end:
                return
            self.open, self.inside = True, True
            self.forwards += 1
            yield batch
            self.inside = False

    def end(self) -> None:
        """The round after the last forward where :meth:`agreed` left it (``last_round=False``): this rank's pool
        ended and its work after the forwards succeeded (a peer's failure there, carried by its :meth:`fail`, is
        raised here as in any round; pools of other lengths are the ``ValueError`` of :meth:`agreed`)."""
        from ._agree import agree_round

        if not self.open or self.inside:  # settled already (a round raised), or called from inside a forward
            return
        self.open = False
        counts, digests = agree_round(self.group, self.forwards, 0, None, self.what, self.model, quote=True)
        self._refuse_differing(counts, digests, True)

    def _refuse_differing(self, counts: list[int], digests: list[int], ended: bool) -> None:
        """``ValueError`` (on every peer: the round's values are the same there) when the peers' pools gave
        other numbers of batches, or batches of other shapes or dtypes, which would leave their forwards'
        collectives mismatched."""
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(self.group)
        if len(set(counts)) > 1:
            each = ", ".join(f"global rank {r}: {c}{'' if c == self.forwards else ' or more'}"
                             for r, c in zip(ranks, counts))
            raise ValueError(
                f"{self.who}: the tensor-parallel ranks {ranks} would run different numbers of forwards ({each}): "
                "the ranks of one tensor-parallel mesh run every forward together, so each must get the same pool "
                "(the lens's group= holds one rank of the mesh: give the ranks of one mesh the same pool, e.g. a "
                "data loader sharded by the data-parallel rank, not the global rank)"
            )
        if not ended and len(set(digests)) > 1:
            raise ValueError(
                f"{self.who}: the tensor-parallel ranks {ranks} would run their forward {self.forwards} on batches "
                "of other shapes or dtypes: the ranks of one tensor-parallel mesh run every forward together, so "
                "each must get the same pool, in the same batches"
            )

    @contextlib.contextmanager
    def forward(self):
        """One round more, then the caller's forward(s) of the mesh inside the block: where the work after
        :meth:`agreed`'s forwards runs forwards too (the probe's ``compute`` in bounded-memory mode recomputes its
        non-resident chunks; the lens passes this as its ``_around_recompute``), a failure of one rank outside them
        (replaying a chunk's RNG state, the eigendecomposition, a non-finite Gram) is carried into the peers' round
        before their next recomputation, or into :meth:`end` after ``compute`` (before, they waited in that
        forward's collectives, or in the training's next forward, until the process-group timeout). A failure
        inside the block is not agreed (as inside :meth:`agreed`'s forwards)."""
        from ._agree import agree_round

        if not self.open or self.inside:  # settled already, or nested in a forward: no round
            yield
            return
        self.open = False
        counts, digests = agree_round(self.group, self.forwards + 1, 0, None, self.what, self.model, quote=True)
        self._refuse_differing(counts, digests, True)  # (other counts: a peer with fewer forwards ended its pass)
        self.open, self.inside = True, True
        self.forwards += 1
        yield
        self.inside = False

    def fail(self, error: BaseException) -> BaseException:
        """Carry ``error``, this rank's, into the peers' next round where it was not agreed with them already
        (a round settled it, or it came from a forward: :meth:`agreed`; or it left the collectives out of step).
        Returns what the caller agrees on with its own group, then raises: ``error``, or a ``KeyboardInterrupt``
        caused by it where a Ctrl-C reached this rank during the round, held across the round's collectives
        (:func:`~spectral_lens._sync.deferred_interrupt`; before, that ``KeyboardInterrupt`` left here and the
        caller skipped its group's agreement, whose other ranks, a (dp, tp) mesh's other replica, then waited in it
        until the process-group timeout)."""
        from ._agree import _OUT_OF_STEP, agree_round, out_of_step
        from ._sync import deferred_interrupt

        if not self.open or self.inside or out_of_step(error):
            return error
        self.open = False
        with deferred_interrupt() as interrupted:  # (agree_round's own hold is nested in this one: it holds it)
            try:
                agree_round(self.group, 0, 0, error, self.what, self.model, quote=True)
            except BaseException as exc:  # agree_round raises error itself, as agreed (marked where it failed)
                if exc is not error:
                    raise
        if not interrupted or isinstance(error, KeyboardInterrupt):
            return error
        interrupt = KeyboardInterrupt()
        interrupt.__cause__ = error
        if out_of_step(error):  # no agreement is tried after it either
            setattr(interrupt, _OUT_OF_STEP, True)
        return interrupt


def refuse_tensor_parallel_params(model: nn.Module, names, who: str = "PerSampleGradientProbe") -> None:
    """``ValueError`` for probed matrices that are tensor-parallel ``DTensor`` shards (``names``: the probed
    parameters' names): the probe's per-sample rows would be one rank's shard of each gradient (or fail
    inside ``DTensor``'s dispatch)."""
    params = dict(tensor_parallel_params(model))
    sharded = [n for n in names if n in params]
    if sharded:
        raise ValueError(
            f"{who}: {_describe(sharded[0], params[sharded[0]])}"
            + (f" (and {len(sharded) - 1} more probed matrices)" if len(sharded) > 1 else "")
            + ": the probe does not measure tensor-parallel matrices (each rank holds a shard of the weight "
            "and of its per-sample gradients). Probe a matrix that is not parallelized (a plain nn.Parameter, "
            "e.g. a replicated output head), or measure activations only (SpectralLens(..., params=())), or "
            "probe a copy without tensor parallelism: load the full weights (DTensor.full_tensor() of each "
            "parameter, on every rank) into a plain model of the same architecture and probe that"
        )
