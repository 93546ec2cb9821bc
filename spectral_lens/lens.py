"""``SpectralLens``: the one object a training loop calls to measure spectra at a checkpoint.

Configured once with the model, the fixed held-out pool, the layers and the matrices to probe;
``measure(step, tokens)`` runs the activation protocol (covariance spectra of the chosen layers over
the whole pool) and the gradient protocol (per-sample gradient spectra of the chosen matrices), and
appends one measurement to a run record when a :class:`~spectral_lens.records.RunWriter` is given.

:class:`~spectral_lens.schedule.Schedule` (when to measure) is in ``schedule``; the layer-stack defaults
(``_blocks``), the default mask and pool checks (``_pools``) and the pool's content fingerprint
(``_fingerprint``) are in private modules; all are importable from here. The ranks' agreement under
``torch.distributed`` (on failures, layers, pool lengths, and rank 0's values) is in the private module ``_agree``;
the gradient protocol's batches (the gradient pool cut to ``gradient_samples``, and the ranks' agreement on each batch
where every rank runs the protocol) in ``_gradient_pool``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ._agree import (_own_collectives, agree, agree_before_pass, agree_round, agree_settings, agree_widths,
                     batch_digest, batch_structure, built_together, callable_name, collective_device, collective_pass,
                     from_rank0, ranks, refuse_other_counts)
from ._args import AUTOCAST_WHY, NARROW_FLOATS, as_integer, check_callable, check_count, check_dtype, check_window
from ._gradient_pool import agreed_batches, gradient_batches, gradient_total
from ._blocks import _names_modules, all_blocks, block_hidden_states, deepest_block
from ._fingerprint import PoolFingerprint
from ._pools import attention_mask, reshuffled, sample_dataset, sharded_pool, single_sample_hint, unfixed_pool
from ._progress import progress_bar, sized_total
from ._sync import deferred_interrupt
from ._tensor_parallel import PeerRounds, check_replicated, check_same_forwards, gradient_layout, one_replica, probe_settings
from . import _pipeline
from .activation_capture import ActivationCapture, attach
from .attachment import Attachment, attach_once
from ._warnings import NonFiniteError, SpectralLensWarning
from .capture import (Target, check_pick, eager_forwards, measurement_autocast, measurement_pass, select_modules,
                      record_names)
from .gradients import PerSampleGradientProbe
from ._deepspeed import zero3_partitioned
from ._offload import execution_device
from .gradients._measurable import bindable, fsdp_sharded, is_encoder_decoder, kept_sharded
from .gradients._batch import batch_as_run, batch_size, default_forward
from .gradients._isolation import cuda_devices, forked_rng, preserved_buffers
from .spectra.fit import tail_window, window_that_fits
from .spectra.moments import PRECISIONS
from .records import RunWriter, spectrum_summaries
from .schedule import Schedule
from .spectrum import Spectrum

__all__ = [
    "SpectralLens",
    "Schedule",
    "LensMeasurement",
    "attention_mask",
    "deepest_block",
    "all_blocks",
    "block_hidden_states",
]


@dataclass(frozen=True)
class LensMeasurement:
    """One checkpoint's spectra and scalars.

    Attributes:
        step, tokens: checkpoint position.
        spectra: ``{"act:<module>": Spectrum, "grad:<parameter>": Spectrum}``.
        scalars: ``noise_scale`` (B_simple in samples, from the first probed matrix),
            ``noise_scale:<parameter>`` for each, ``val_loss`` when given. A noise scale is
            ``math.inf`` when the estimated squared mean gradient is <= 0 (for example all gradients
            zero): it is kept as ``inf``, never dropped or clipped.
        summaries: per spectrum name, the scalar summaries of
            :func:`~spectral_lens.records.spectrum_summaries`: ``rankme``, ``participation_ratio``,
            ``stable_rank``, and ``alpha_tail``/``alpha_head`` (with ``_r2``) when the lens's windows
            fit the spectrum (see ``SpectralLens(tail_window=..., head_window=...)``). The same values
            the run record stores.
    """

    step: int
    tokens: int
    spectra: dict[str, Spectrum]
    scalars: dict[str, float]
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Every scalar as one flat mapping for logging sinks: ``scalars`` as they are, and each
        summary as ``"<spectrum>/<summary>"`` (e.g. ``"act:blocks.3/alpha_tail"``). Values may be
        ``inf`` or ``nan``; a sink decides how to show them."""
        out = dict(self.scalars)
        for name, summ in self.summaries.items():
            out.update({f"{name}/{k}": float(v) for k, v in summ.items()})
        return out


@contextlib.contextmanager
def _hinted(pool, batch, first: bool):
    """An error of the first forward of this rank's first batch gets :func:`single_sample_hint`'s note (where
    ``add_note`` exists: Python 3.11+), its type and message unchanged."""
    try:
        yield
    except Exception as exc:
        note = single_sample_hint(pool, batch) if first and hasattr(exc, "add_note") else None
        if note:
            exc.add_note(note)
        raise


def _peers_told(tp, error: BaseException) -> None:
    """``error``, this rank's, raised before the check of its tensor-parallel peers' pools and settings
    (:func:`check_same_forwards`: a pool's ``len`` failing on one rank), carried into that check, which they run
    next (``tp``: :func:`one_replica`'s, a group holding one rank of the mesh): they raise a ``RuntimeError`` naming
    this rank and quoting its error, instead of waiting in it until the process-group timeout. Returns (the caller
    agrees ``error`` over its own group, then raises it)."""
    try:
        check_same_forwards(None, tp[1], error=error)
    except BaseException as exc:  # error itself, as agreed with them (or marked where their collective failed)
        if exc is not error:
            raise


def _checked_group(group):
    """``group`` if it is ``None`` or a ``torch.distributed`` process group; else a ``TypeError`` saying what to
    pass (a ``DeviceMesh`` was accepted here and failed at the first ``measure`` with torch's "Group ... is not
    registered")."""
    if group is None:
        return group
    import torch.distributed as dist

    if dist.is_available() and (isinstance(group, dist.ProcessGroup)
                                or (type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER)):
        return group  # (new_group gives the ranks outside it NON_GROUP_MEMBER, an int)
    kind = type(group).__name__
    hint = ("pass one of its dimensions' process group, e.g. mesh['dp'].get_group() (mesh.get_group() for a "
            "1-D mesh)" if kind == "DeviceMesh" else "pass a group made by torch.distributed.new_group, or leave "
            "group= out (the whole world)")
    raise TypeError(f"SpectralLens: group= takes a torch.distributed process group, got {kind}: {hint}")


@contextlib.contextmanager
def _recomputation(rounds: PeerRounds):
    """Around one recomputation of a non-resident chunk in bounded-memory mode where every rank runs the gradient
    protocol (FSDP, ZeRO-3, one tensor-parallel replica): a round of the ranks first (:meth:`PeerRounds.forward`),
    so that a failure of one rank between the recomputations (the Gram blocks out of memory, replaying a chunk's RNG
    state) raises on every rank at once; the recomputation's forwards and backwards are collectives, so an error
    inside them is :func:`~spectral_lens._agree.collective_pass`'s (as in the pass's updates). Before, the failed
    rank's agreement met the other ranks' recomputation collectives: a gloo abort (NCCL: mixed buffers)."""
    with rounds.forward(), collective_pass("the gradient protocol's recomputation of a non-resident chunk "
                                           "(bounded-memory mode)"):
        yield


class SpectralLens:
    """Measure activation and per-sample gradient spectra of a model over a fixed held-out pool.

    Args:
        model: the model being trained, or ``None`` to configure the
            lens first and bind it later with :meth:`attach`. A ``DistributedDataParallel`` or
            ``DataParallel`` wrapper is refused with a ``ValueError``: pass ``wrapper.module``. A
            ``torch.compile`` wrapper is unwrapped (names without ``_orig_mod.``); the measurement's
            forwards run eagerly (``torch.compiler.set_stance("force_eager")``), so hooks fire and
            nothing is compiled or recompiled.
        pool: a re-iterable of batches (list, DataLoader): each batch as the model's forward takes it
            through ``forward_fn`` (default: ``model(batch[0])`` for ``(input_ids, targets)`` tuples,
            ``model(**batch)`` for dicts and other mappings such as ``BatchEncoding``,
            ``model(batch)`` for tensors). Reuse the same pool at every checkpoint and across runs
            (the paper's protocol). A one-shot iterator (a generator) is refused with a ``TypeError``:
            it would be empty from the second pass on, and so is a tuple of tensors (``(x, y)`` is one batch: pass
            ``[(x, y)]``), and so is a map-style ``Dataset`` (its items are single samples: wrap it in a
            ``DataLoader``); a pool whose content changes between measurements at the same row counts is warned
            once (a content fingerprint, :class:`~spectral_lens._fingerprint.PoolFingerprint`); a ``DataLoader`` whose passes differ in content
            (shuffled and cut by ``gradient_samples``, sampled with replacement, a random part of the data
            drawn by ``num_samples``, or shuffled with ``drop_last``) with a ``ValueError`` (:func:`unfixed_pool`), and so is one rank's shard (a
            ``DataLoader`` over a ``DistributedSampler``): every rank passes the same whole pool, not shuffled
            (each rank would shuffle its own way: refused at ``measure`` when the pool is split between ranks).
        layers: modules whose outputs are measured: ``None`` = the deepest block (paper default),
            ``"all"`` = every block (depth profile), or any target of :func:`spectral_lens.attach`
            (module objects such as ``model.h[-1]`` are resolved to their names when the lens binds).
            With ``torch.compile``d blocks, names and globs may leave out ``_orig_mod`` (the records' names).
        params: matrices for the per-sample gradient spectrum: ``None`` = the final block's attention
            output projection; a name/glob/list as :class:`PerSampleGradientProbe` takes; ``()`` = none.
        gradient_pool: batches for the gradient protocol (default: ``pool``).
        gradient_samples: cap on sequences M used for gradient spectra (paper: 512), at least 2;
            ``None`` = all.
        precision, pick: passed to the activation accumulators. With ``pick=None`` and the lens's
            own choice of blocks (``layers=None`` or ``"all"``), a block returning a tuple is read at
            its first element, the hidden states (:func:`block_hidden_states`: Falcon, BLOOM,
            GPT-Neo, MPT layers in ``transformers`` 5; most decoder layers return a tensor); with
            ``layers=`` given, ``pick=None`` requires a tensor output. A channels-first output (a CNN's
            blocks) is refused unless a ``pick`` reads it (``lambda out: out.movedim(1, -1)``), as in
            :func:`spectral_lens.attach`.
        mask_fn: ``mask_fn(batch) -> bool mask`` of the positions to measure, or ``None``. Default
            :func:`attention_mask`: padded positions of dict (mapping) batches with an ``"attention_mask"``
            are excluded from the activation rows (the gradient loss masks them too). Pass your own
            function to override, or ``mask_fn=None`` to measure every position.
        forward_fn: how to call the model on a batch for the activation pass.
        probe: a configured :class:`PerSampleGradientProbe` (custom ``loss_fn``, ``chunk_size``,
            ``autocast_dtype``, ...) to use instead of one built from ``params``; an unattached probe
            is attached to the model (and :meth:`detach` unbinds it again), a probe already attached
            to this model is used as it is and stays attached after :meth:`detach`.
        autocast_dtype: run the activation pass under ``torch.autocast`` with this dtype (e.g. bf16).
            ``None``: in the model's own precision, also when ``measure`` is called inside the
            training step's ``torch.autocast`` block (switched off for the measurement).
        writer: a :class:`~spectral_lens.records.RunWriter`; each measurement is appended to it.
        schedule: a :class:`Schedule` used by :meth:`maybe_measure`.
        progress: progress bars over the pool (``tqdm``): ``None`` (default) = on in a terminal, off
            in CI (``$CI`` set) and when stderr is not a TTY; ``True``/``False`` force it.
        tail_window, head_window: rank windows of ``alpha_tail``/``alpha_head`` in
            :attr:`LensMeasurement.summaries`; one that differs from the ``writer``'s recorded window is
            a ``ValueError`` (the record's summaries use the writer's). Default: the ``writer``'s
            recorded windows; without a writer, the scale rule for the depth of the model's
            layer stack (:func:`~spectral_lens.tail_window`) and ``(10, 40)``. Under ``torch.distributed`` every
            rank summarizes with the group's rank 0 windows (the rank with the writer).
        group: ``torch.distributed`` process group (default: the whole world once it is
            initialized; anything else, a ``DeviceMesh`` included, is a ``TypeError``: pass
            ``mesh["dp"].get_group()``). Every rank of the group calls ``measure`` together; a rank outside it
            raises ``ValueError``. Each rank runs the activation pass on its share of the pool
            (batch ``i`` goes to group rank ``i % world``; a rank without a batch joins with zero
            rows) and statistics are synced; the gradient protocol runs on the group's rank 0 over
            the whole gradient pool (cross-sample Gram entries need every sample's gradient) and its
            results are broadcast. Before the sync and before the broadcast the ranks agree that
            their local work succeeded: if it failed on any rank, every rank raises (the failed
            rank its own exception, the others a ``RuntimeError`` naming it) instead of waiting in a
            collective until the process-group timeout. Building the lens is agreed the same way (one
            small ``all_reduce`` at the end of the constructor, with ``torch.distributed`` initialized), so
            every rank of the group builds it together: an error in one rank's constructor (a layer its
            model lacks) is raised on every rank there, the others naming it and quoting its error.
            A model sharded with FSDP (``fully_shard``, ``FullyShardedDataParallel``), whose every
            forward is a collective: every rank runs as many activation forwards (one unmeasured where
            its share is a batch short; the pools' lengths are compared, a pool without a ``len`` round
            by round as it goes), the FSDP2 modules sharded before are resharded after, and every rank
            runs the gradient protocol (the gradient pools compared batch by batch; rank 0's result is
            broadcast); see the multi-GPU guide's FSDP section. Likewise a model partitioned by DeepSpeed
            ZeRO stage 3 (the guide's DeepSpeed ZeRO section). A tensor-parallel model
            (``parallelize_module``): a group that is exactly one replica's tensor-parallel ranks
            measures as one process (every rank runs every batch, rows not summed twice, the ranks'
            rows compared after the pass); for a ``(dp, tp)`` mesh pass the data-parallel group
            (``mesh["dp"].get_group()``); a group mixing both is refused. A pipeline stage's module
            (``torch.distributed.pipelining``): pass a ``forward_fn`` that runs one batch through the
            schedule, called by every rank of the pipeline together, and ``params=()``; every rank of the
            pipeline runs every batch (with a ``(pp, dp)`` mesh pass the data-parallel group), measures the
            layers its stage holds and gets every stage's spectra. See the guide's sections.

    Measuring leaves the model's train/eval mode, gradients, buffers, hooks and the global RNG
    streams (torch CPU/CUDA, Python ``random``, numpy) as they were; iterating the pools is part of
    the measurement, so a shuffling ``DataLoader`` does not advance the training loop's RNG.

    ``history`` grows by one :class:`LensMeasurement` per measurement, by design: CPU float64
    eigenvalues (8 bytes per layer width and per gradient sample) and about 1.5 KB of summaries per
    spectrum; ``lens.history.clear()`` frees it (the ``writer``'s record keeps everything). The probe's
    per-sample gradients are dropped after each measurement.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        pool: Iterable[Any] | None = None,
        *,
        layers: Target | str | None = None,
        params: str | Sequence[str] | None = None,
        gradient_pool: Iterable[Any] | None = None,
        gradient_samples: int | None = None,
        precision: str = "exact",
        pick=None,
        mask_fn: Callable[[Any], torch.Tensor | None] | None = attention_mask,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        probe: PerSampleGradientProbe | None = None,
        autocast_dtype: torch.dtype | None = None,
        writer=None,
        schedule: Schedule | None = None,
        progress: bool | None = None,
        tail_window: tuple[int, int] | None = None,
        head_window: tuple[int, int] | None = None,
        group=None,
    ) -> None:
        # an error on one rank (a layer its model lacks, an argument only it computes wrongly) stops every
        # rank here, named on the others, instead of leaving them in their first collective until the timeout;
        # a rank that built its lens unbinds it then (a probe= it attached is free again); under NCCL the agreement
        # runs on the model's GPU (a lens is often built before torch.cuda.set_device: _agree.built_device)
        with built_together(group, "building the lens", undo=self.detach, model=model):
            if pool is None:
                raise ValueError("SpectralLens needs pool=: a re-iterable of held-out batches")
            for what, p in (("pool", pool), ("gradient_pool", gradient_pool)):
                why = sample_dataset(p)
                if why:  # iterated, one sample per "batch": a crash deep in the model, or rows read wrongly
                    raise TypeError(
                        f"SpectralLens: {what} {why}; the lens runs each item of its pools as one batch: wrap it in "
                        f"a DataLoader, {what}=DataLoader(dataset, batch_size=8) (shuffle=False; a collate_fn that "
                        f"pads for ragged samples), or DataLoader(dataset, batch_size=None) if its items are whole "
                        f"batches"
                    )
                if p is not None and (isinstance(p, (str, bytes, torch.Tensor)) or not isinstance(p, Iterable)):
                    raise TypeError(
                        f"SpectralLens: {what} must be a re-iterable of held-out batches (a list of batches, a "
                        f"DataLoader), got {type(p).__name__}"
                        + (f" of shape {tuple(p.shape)}, whose iteration yields single samples without a batch "
                           f"dimension: pass a list of batches, e.g. list({what}.split(8))" if isinstance(p, torch.Tensor) else "")
                    )
                if isinstance(p, Mapping):  # one dict batch (a tokenizer's BatchEncoding): iterating it yields its keys
                    raise TypeError(
                        f"SpectralLens: {what} is a mapping ({type(p).__name__} with keys {sorted(map(str, p))[:6]}), "
                        f"whose iteration yields its keys, not batches: a single dict batch is passed as [batch], a "
                        f"pool as a list of them or a DataLoader"
                    )
                if isinstance(p, tuple) and len(p) > 1 and all(isinstance(b, torch.Tensor) for b in p):
                    # (x, y): a batch everywhere else (the default forward_fn runs model(x)), but iterated as a pool
                    # it is two batches, x and then y, the targets measured as inputs
                    shapes = ", ".join(str(tuple(b.shape)) for b in p[:4]) + (", ..." if len(p) > 4 else "")
                    raise TypeError(
                        f"SpectralLens: {what} is a tuple of {len(p)} tensors (shapes {shapes}), which the lens reads "
                        f"as one batch (inputs, targets, ...) elsewhere, but would iterate as a pool of {len(p)} "
                        f"batches, each tensor measured as the model's inputs (the targets too): pass one (x, y) batch "
                        f"as {what}=[(x, y)], a pool of tensor batches as a list (e.g. list(ids.split(8))), or a "
                        f"DataLoader"
                    )
            who = "SpectralLens"
            gradient_samples = check_count(who, "gradient_samples", gradient_samples, 0, none_ok=True)
            check_callable(who, "mask_fn", mask_fn, "batch -> bool mask")
            check_callable(who, "forward_fn", forward_fn, "(model, batch) -> output")
            check_dtype(who, "autocast_dtype", autocast_dtype, refuse=NARROW_FLOATS, why=AUTOCAST_WHY)
            if probe is not None and not isinstance(probe, PerSampleGradientProbe):
                raise TypeError(f"SpectralLens: probe must be a PerSampleGradientProbe or None, got {type(probe).__name__}")
            if writer is not None and not callable(getattr(writer, "log_measurement", None)):
                raise TypeError(
                    f"SpectralLens: writer must be a RunWriter (spectral_lens.records) or None, got {type(writer).__name__}"
                    + (" (open one with RunWriter(path, RunInfo(...)))" if isinstance(writer, (str, os.PathLike)) else "")
                )
            tail_window = check_window(who, "tail_window", tail_window)
            head_window = check_window(who, "head_window", head_window)
            if probe is not None and params is not None:
                raise ValueError("SpectralLens: pass params= or a configured probe=, not both")
            for what, p in (("pool", pool), ("gradient_pool", gradient_pool)):
                if isinstance(p, Iterator):  # a generator: empty after the first pass over it
                    raise TypeError(
                        f"SpectralLens: {what} is a one-shot iterator ({type(p).__name__}), exhausted after its first "
                        f"pass; the lens iterates its pools at every measurement: pass a re-iterable of batches "
                        f"such as a list or a DataLoader (e.g. {what}=list(...))"
                    )
            if gradient_samples is not None and int(gradient_samples) < 2:
                raise ValueError(
                    f"SpectralLens: gradient_samples={gradient_samples}, but a gradient spectrum needs at least 2 "
                    "samples (sequences); pass gradient_samples >= 2, or None for the whole gradient pool"
                )
            if precision not in PRECISIONS:
                raise ValueError(f"SpectralLens: precision must be one of {PRECISIONS}, got {precision!r}")
            # the gradient pass reads gradient_pool (default: pool), cut to gradient_samples
            checks = ([("pool", pool, gradient_samples)] if gradient_pool is None
                      else [("pool", pool, None), ("gradient_pool", gradient_pool, gradient_samples)])
            for what, p, cap in checks:
                why = sharded_pool(p)
                if why:
                    raise ValueError(
                        f"SpectralLens: {what} {why}: each rank would pass its own shard, which the lens shards again "
                        "(batch i on rank i % world; the gradient protocol runs on rank 0), so a measurement would see "
                        "a part of the pool only. Pass the same whole pool on every rank: a DataLoader without the "
                        "DistributedSampler, or a list of batches"
                    )
                why = unfixed_pool(p, cap)
                if why:
                    raise ValueError(
                        f"SpectralLens: {what} {why}, so the measured sequences would change from checkpoint to "
                        "checkpoint; the protocol measures a fixed held-out pool (paper Sec. 2). Pass a DataLoader "
                        "with shuffle=False (the spectra do not depend on the order) or a list of batches"
                    )
            self.pool = pool
            self.layers_spec = layers
            self.params_spec = params
            self.gradient_pool = pool if gradient_pool is None else gradient_pool
            self.gradient_samples = gradient_samples
            self.precision = precision
            check_pick(pick)
            self.pick = pick
            self._pick = pick  # the pick in use: block_hidden_states for the lens's own blocks (set by _bind)
            self.mask_fn = mask_fn
            self.forward_fn = forward_fn or default_forward
            self.autocast_dtype = autocast_dtype
            self.writer = writer
            self.schedule = schedule
            self.progress = progress
            for what, mine in (("tail_window", tail_window), ("head_window", head_window)):
                recorded = getattr(writer, what, None)
                if mine is not None and recorded is not None and tuple(mine) != tuple(recorded):
                    raise ValueError(
                        f"SpectralLens: {what}={tuple(mine)} differs from the writer's recorded {what} "
                        f"{tuple(recorded)}; the record's summaries use the writer's, so the measurements' summaries "
                        f"and what sinks log would disagree with it: leave {what} out (the writer's is used) or pass "
                        f"the same window"
                    )
            self.tail_window = None if tail_window is None else tuple(tail_window)
            self.head_window = None if head_window is None else tuple(head_window)
            self.group = _checked_group(group)
            self.model: nn.Module | None = None
            self.layers = None
            self.probe: PerSampleGradientProbe | None = probe
            self._owns_probe = False  # whether _bind attached or built the probe (detach unbinds only such a one)
            self.history: list[LensMeasurement] = []
            self._window_warned = False  # the tail window's misfit is said once per lens (_warn_window)
            self._rows = {}  # each spectrum's rows at the last measurement (_warn_pool_changed)
            self._pool_warned = False
            self._content = {}  # each pool's content fingerprint at the last measurement (_warn_pool_changed)
            self._content_now = {}  # PoolFingerprint of each pool read by this measurement's passes
            self._stage, self._missing = None, []  # the pipeline stage holding the model (_bind), the layers it lacks
            self._depth = 0  # under pipeline parallelism: the blocks of all stages (counted at each measurement)
            if model is not None:
                self._bind(model)

    # ------------------------------------------------------------------ attachment
    def _bind(self, model: nn.Module) -> None:
        model = bindable(model, "SpectralLens", needs="SpectralLens needs the model as an nn.Module")
        one_replica(model, self.group)  # tensor parallelism: a group that would split its ranks' batches is refused now
        layers = self.layers_spec
        chosen = layers is None or (isinstance(layers, str) and layers == "all")  # the lens picks the blocks
        stage = self._pipeline_stage(model)
        self._stage, self._missing = stage, []
        if is_encoder_decoder(model) and (chosen or self.forward_fn is default_forward):
            raise ValueError(
                f"SpectralLens: {type(model).__name__} is an encoder-decoder model (config.is_encoder_decoder); the "
                "lens's defaults are made for decoder-only and encoder-only models. Pass layers= (e.g. the "
                "decoder's last block), forward_fn= (e.g. lambda m, b: m(**b), labels included, so the decoder gets "
                "its input), and probe=PerSampleGradientProbe(params=..., forward_fn=..., loss_fn=...) with an "
                "unshifted loss, or params=() to measure activations only"
            )
        if stage is not None:  # pipeline parallelism: the layers this stage holds (maybe none)
            layers, self._missing = self._stage_layers(model, stage, layers)
        elif layers is None or chosen:
            # "all": a block object registered under several names (ALBERT, a looped stack) once, under its first
            # name, whose hook sees every call (as before each entry had to match: a second name is refused)
            listed = {n for n, _ in model.named_modules()}
            layers = deepest_block(model) if layers is None else [n for n in all_blocks(model) if n in listed]
            select_modules(model, layers)  # e.g. a block shared with another (ALBERT): refused now, not when measuring
        elif _names_modules(layers):  # module objects: their names in this model (or a clear error now)
            names = [n for n, _ in select_modules(model, layers)]
            layers = names[0] if isinstance(layers, nn.Module) and len(names) == 1 else names
        else:  # names or globs: a name that matches nothing fails here, not at the first measurement
            try:
                select_modules(model, layers)
            except ValueError as e:
                raise ValueError(f"SpectralLens layers={layers!r}: {e}") from None
        probe, owns = self.probe, False
        if probe is not None:
            if probe.model is None:
                probe.attach(model)
                owns = True  # the lens bound it, so the lens unbinds it (detach)
            elif probe.model is not model:
                raise ValueError("SpectralLens: probe= was built for another model")
        elif not self._activations_only():
            probe, owns = PerSampleGradientProbe(model, self.params_spec), True
        self.model, self.layers, self.probe, self._owns_probe = model, layers, probe, owns
        self._pick = block_hidden_states if chosen and self.pick is None else self.pick

    def _activations_only(self) -> bool:
        """Whether ``params=()`` (or ``[]``) asks for no gradient protocol."""
        return isinstance(self.params_spec, (list, tuple)) and len(self.params_spec) == 0

    def _pipeline_stage(self, model: nn.Module):
        """The pipeline stage (``torch.distributed.pipelining``) that holds ``model``, checked against the lens's
        options; ``None`` without pipeline parallelism."""
        stage = _pipeline.pipeline_stage(model)
        if stage is None or stage.num_stages < 2:
            return None
        where = _pipeline.describe(stage)
        _pipeline.whole_pipeline(stage, self.group)  # a group splitting the pool across stages: refused now
        if self.forward_fn is default_forward:
            raise ValueError(
                f"SpectralLens: the model is {where}; the lens's default forward would call this stage's "
                "module on the pool's batches alone (token ids fed to a middle slice). Pass forward_fn= that "
                "runs one pool batch through your schedule, called on every rank of the pipeline in lockstep, "
                "e.g. lambda m, b: schedule.eval(b[0]) on the first stage, schedule.eval(target=b[1]) on the "
                "last (with a loss_fn) and schedule.eval() between (Schedule.eval: torch >= 2.9); with params=() (the gradient protocol "
                "needs the whole pipeline). Or attach a capture to the stage's layers around your own "
                "schedule steps: sl.attach(stage_module, layers) (the multi-GPU guide's pipeline section)"
            )
        if self.probe is not None or not self._activations_only():
            _pipeline.refuse_probe(model, "SpectralLens")
        return stage

    @staticmethod
    def _stage_layers(model: nn.Module, stage, layers) -> tuple[list[str], list[str]]:
        """The names of ``layers`` that this pipeline stage holds and the positions of the targets it holds none of
        (another stage may). ``None``: the deepest block, on the last stage; ``"all"``: every block of every stage."""
        if layers is None or (isinstance(layers, str) and layers == "all"):
            blocks = _pipeline.stage_blocks(model)
            if layers is not None:
                return blocks, []
            if stage.stage_index != stage.num_stages - 1:
                return [], []
            if not blocks:
                raise ValueError(f"SpectralLens: the last pipeline stage ({type(model).__name__}) holds no block to "
                                 "measure by default (the model's deepest block); pass layers=")
            return blocks[-1:], []
        targets = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        names, missing = [], []
        for i, t in enumerate(targets):
            try:
                names += [n for n, _ in select_modules(model, t)]
            except ValueError:
                missing.append(i)  # by position, the same on every rank (a callable's repr holds its address)
        return list(dict.fromkeys(names)), missing

    def attach(self, model: nn.Module) -> Attachment:
        """Bind a lens built without a model (``SpectralLens(pool=..., ...)``) to ``model``.

        Resolves ``layers`` and the probed ``params`` in it. Returns an
        :class:`~spectral_lens.attachment.Attachment`; ``handle.remove()``
        (or leaving ``with lens.attach(model):``) unbinds the lens again. Hooks are registered only
        while measuring. A lens that is already attached (built with a model, or attached before)
        raises ``ValueError``: remove the first handle (or ``detach()``) first.
        """
        return attach_once(
            self, model,
            elsewhere=lambda other: (f"SpectralLens is attached to another {type(other).__name__}; call remove() on "
                                     "its handle first"),
            again=lambda same: (f"SpectralLens is already attached to this {type(same).__name__} (built with it, or "
                                "attached before); keep using it, or call remove() on the first handle (or detach()) "
                                "before attaching again"),
        )

    def detach(self) -> None:
        """Unbind the lens from the model (idempotent); the history is kept. The gradient probe is
        unbound too when the lens bound it (one it built from ``params``, or a ``probe=`` that was not
        attached yet); a ``probe=`` the user had attached to the model stays attached (the user's)."""
        if self.probe is not None and self._owns_probe:
            self.probe.detach()
        self.model, self.layers, self._owns_probe, self._stage = None, None, False, None

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("SpectralLens is not attached to a model: call lens.attach(model) first")
        return self.model

    # ------------------------------------------------------------------ helpers
    def _device(self) -> torch.device:
        model = self._require_model()
        p = next(model.parameters(), None)
        if p is not None and p.device.type == "meta":  # offloaded by Accelerate: where its hooks run the model
            return execution_device(model) or p.device
        return p.device if p is not None else torch.device("cpu")

    def _windows(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        tail, head = self.tail_window, self.head_window
        if self.writer is not None:
            tail = tail if tail is not None else getattr(self.writer, "tail_window", None)
            head = head if head is not None else getattr(self.writer, "head_window", None)
        if tail is None and self._stage is not None and self._depth:  # a pipeline stage: the whole model's depth
            tail = tail_window(self._depth)
        if tail is None:
            try:
                tail = tail_window(len(all_blocks(self._require_model())))
            except ValueError:
                tail = tail_window(12)
        return tail, head if head is not None else (10, 40)

    def _warn_measured(self, step: int) -> None:
        """A warning, before the passes, when the run record already holds a measurement at ``step``: the
        writer appends this one as a second measurement there, which the analyses count as one more
        checkpoint (re-running a script over saved checkpoints; a resumed loop without ``drop_after``).

        The writer is asked: :meth:`RunWriter.has_measurement` (which reads only the lines appended since
        it was last asked), or a duck-typed writer's ``measured_steps()``."""
        writer = self.writer
        if writer is None or getattr(writer, "closed", False):
            return
        has = getattr(writer, "has_measurement", None)
        measured = getattr(writer, "measured_steps", None)
        if has is not None:
            held = has(step)
        elif measured is not None:
            held = step in measured()
        else:
            return
        if not held:
            return
        warnings.warn(
            f"SpectralLens.measure: the run record {getattr(self.writer, 'path', self.writer)} already holds a measurement at step {step}; "
            "this one is appended as a second measurement at that step, which the analyses count as one more "
            "checkpoint. Measuring saved checkpoints again: skip the steps in writer.measured_steps(); training "
            "resumed from a checkpoint: call writer.drop_after(checkpoint_step) first", SpectralLensWarning, stacklevel=3)

    def _warn_pool_changed(self, spectra: dict[str, Spectrum]) -> None:
        """Once per lens: a warning when the pool changed since the last measurement (a fixed pool gives the same
        rows at every checkpoint: a pool whose size changes, a streaming or randomly sampled one, measures other
        rows): a spectrum's row count differs, or else the content fingerprint of the batches this rank read
        (:class:`~spectral_lens._fingerprint.PoolFingerprint` of the pool, and of a ``gradient_pool`` of its own) does.
        Under ``torch.distributed`` each rank compares its own share (no collective). Both messages start with
        ``"SpectralLens: the pool changed"``, the filter that silences them."""
        rows = {name: int(s.n_rows) for name, s in spectra.items()}
        changed = [(n, self._rows[n], r) for n, r in rows.items() if n in self._rows and self._rows[n] != r]
        content = {what: fp.value() for what, fp in self._content_now.items()}  # read once: the pass is done
        other = [what for what, v in content.items() if what in self._content and self._content[what] != v]
        self._rows, self._content, self._content_now = rows, content, {}
        if not (changed or other) or self._pool_warned:
            return
        self._pool_warned = True
        silence = ("; to change the pool on purpose, warnings.filterwarnings('ignore', 'SpectralLens: the pool "
                   "changed', SpectralLensWarning) silences this (said once per lens)")
        if not changed:
            warnings.warn(
                f"SpectralLens: the pool changed between measurements: the {' and the '.join(other)} gave the same "
                "row counts as at the previous measurement but other content (its batches' tensors hash otherwise: "
                "a fresh iterator of training batches, a streaming IterableDataset, random augmentation), and the "
                "protocol compares spectra of a fixed held-out pool (paper Sec. 2). Pass a pool that yields the same "
                "batches at every measurement (a list of batches, a DataLoader over a fixed dataset)" + silence,
                SpectralLensWarning, stacklevel=3)
            return
        name, before, now = changed[0]
        warnings.warn(
            f"SpectralLens: the pool changed between measurements: {name} has {now} rows at this measurement and had "
            f"{before} at the previous one"
            f"{f' ({len(changed) - 1} more spectra alike)' if len(changed) > 1 else ''} (the pool or its mask changed), "
            "and the protocol compares spectra of a fixed held-out pool (paper Sec. 2). Pass a "
            "pool that yields the same batches at every measurement (a list of batches, a DataLoader with "
            "shuffle=False over a fixed dataset)" + silence, SpectralLensWarning, stacklevel=3)

    def _warn_window(self, tail, spectra: dict[str, Spectrum], summaries: dict[str, dict[str, float]]) -> None:
        """Once per lens: a warning when the tail window does not fit an activation spectrum (a model narrower
        than the window's upper rank, or a pool of fewer rows), whose ``alpha_tail`` is then left out of the
        measurement and the record, where the early prediction (``spectral-lens predict``) looks for it."""
        if self._window_warned or tail is None:
            return
        short = [(name, s) for name, s in spectra.items()
                 if name.startswith("act:") and summaries[name] and "alpha_tail" not in summaries[name]]
        if not short:
            return
        self._window_warned = True
        name, s = short[0]
        # a window must end within the nonzero eigenvalues: at most the width and rows - 1, fewer on
        # rank-deficient activations (few distinct inputs), where the width alone gave advice that did not fit
        fits = max(min(int(s.values.numel()), int(s.n_rows) - 1, s.n_nonzero), 1)
        warnings.warn(
            f"SpectralLens: the tail window {tuple(tail)} does not fit {name} ({s.values.numel()} eigenvalues from "
            f"{s.n_rows} rows, {s.n_nonzero} nonzero{f'; {len(short) - 1} more spectra alike' if len(short) > 1 else ''}), so alpha_tail "
            "is left out of the summaries, and a run recorded with this window cannot be used by the early "
            "prediction (spectral-lens predict); pass "
            f"SpectralLens(tail_window=(lo, hi)) with hi <= {fits} (e.g. {window_that_fits(fits)}), or "
            "RunWriter(tail_window=...) (said once per lens)", SpectralLensWarning, stacklevel=3)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode, forked RNG streams and preserved buffers for the activation pass (the iteration
        over the pool included); modes, RNG states and buffers are restored on exit, also on errors (a model
        that was training through ``model.train()``, then every module's own flag)."""
        model = self._require_model()
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with forked_rng(cuda_devices(model)), preserved_buffers(model):
                yield
        finally:
            if modes[0][1]:  # a training model goes back through its train() override too, as it came through eval():
                model.train()  # state an override derives from the mode (LeViT's eval bias cache) is not left as measured
            for m, training in modes:
                m.training = training

    # ---------------------------------------------------------------- protocols
    def activation_spectra(self) -> dict[str, Spectrum]:
        """Covariance spectra of every selected layer over the pool (synced across ranks).

        Under ``torch.distributed`` the ranks agree, before ``sync``, that every rank's share of the
        pool ran (a failure on one rank makes every rank raise, see :meth:`measure`) and on each
        layer's width, so a rank that got no batch (a pool of fewer batches than ranks) joins the
        sync with zero rows.

        On a pipeline stage (``torch.distributed.pipelining``) every batch runs through the user's
        ``forward_fn`` on every rank of the pipeline (or, with a data-parallel ``group``, the ranks of this
        stage split the pool as usual); each rank measures the layers it holds, and every rank returns
        every stage's spectra (gathered over the pipeline's group). Called by itself (not through
        :meth:`measure`), it first agrees on the lens's settings with the other ranks as :meth:`measure` does.
        """
        self._agree_settings("SpectralLens.activation_spectra: checking the lens")
        return self._activations()

    def _activations(self) -> dict[str, Spectrum]:
        """:meth:`activation_spectra`, the settings agreed already."""
        stage = self._stage if self.model is not None else None
        if stage is None:
            return self._activation_spectra(False)
        whole = _pipeline.whole_pipeline(stage, self.group)
        spectra, error = {}, None
        try:
            with _pipeline.grads_set_aside(self.model):  # a schedule's eval() rescales the stage's .grad
                spectra = self._activation_spectra(whole)
        except BaseException as exc:  # an interrupt too
            if whole:  # agreed over the group, which is the pipeline: every rank raises with it
                raise
            error = exc  # the ranks of the other stages wait in the merge: agreed over the pipeline
        if not whole:
            agree(stage.group, error, "the activation pass of a pipeline stage (with its data-parallel group)",
                  self.model)
        spectra, self._depth = _pipeline.merge_stages(stage, spectra, self._missing, self.layers_spec,
                                                      len(_pipeline.stage_blocks(self.model)))
        return spectra

    def _activation_spectra(self, whole_pipeline: bool) -> dict[str, Spectrum]:
        model = self._require_model()
        rank, world = ranks(self.group)
        tp = one_replica(model, self.group)  # tensor parallelism: (group is one replica, its peers' group)
        # every forward a collective of the group (one tensor-parallel replica; the stages of one pipeline, each
        # batch through the schedule): its pools compared as they go
        lockstep = (tp is not None and tp[0]) or whole_pipeline
        if lockstep:
            rank, world = 0, 1  # every rank runs every batch; its rows are not summed over the group
        error, peers, checked = None, None, False
        try:
            if tp is not None and not tp[0]:  # a group with one rank of the mesh: its peers' pools compared first
                total, settings = sized_total(self.pool), self._peer_settings()
                checked = True  # (after the last step that can fail before the check: its failure is carried into it)
                check_same_forwards(None if total is None else len(range(rank, total, world)), tp[1],
                                    settings=settings)
                # and agreed between the forwards (a failure of one rank's loading or mask_fn too)
                peers = PeerRounds(tp[1], "the activation pass of a tensor-parallel rank outside its forwards "
                                   "(loading a batch of the pool, its mask_fn)", model)
            why = reshuffled(self.pool) if world > 1 else None
            if why:  # the same pool type on every rank: every rank raises
                raise ValueError(
                    f"SpectralLens: the pool {why}; the {world} ranks measure their shares of it (batch i on rank "
                    "i % world), each from its own pass, whose order comes from that rank's RNG streams, so the shares "
                    "would overlap and miss samples. Pass a DataLoader with shuffle=False (the spectra do not depend "
                    "on the order) or a list of batches"
                )
            capture = (attach(model, self.layers, pick=self._pick, precision=self.precision) if self.layers != []
                       else ActivationCapture({}))  # a pipeline stage holding none of the layers
            batches = self._activation_pass(model, capture, rank, world, lockstep, peers)
            if peers is not None:  # their round after the last forward, once the pass's contexts exited too
                peers.end()
        except BaseException as exc:  # an interrupt too (Ctrl-C on one rank): agreed below, then re-raised
            error = exc
            if peers is not None:  # with this rank's tensor-parallel peers first (their next round; a Ctrl-C
                error = peers.fail(exc)  # there held, agreed below as this rank's error)
            elif tp is not None and not tp[0] and not checked:  # before their check: carried into it
                _peers_told(tp, exc)
        agree(self.group, error, "the activation pass", model)
        named = sorted(capture.accumulators.items(), key=lambda item: item[0])  # one order on every rank
        # a Ctrl-C on one rank between these collectives (one sync per layer) is held back until they ended and
        # agreed below, instead of leaving the other ranks waiting in the next one (no collective here in a single
        # process: its SIGINT handler is left alone)
        with deferred_interrupt() if tp is not None or world > 1 else contextlib.nullcontext([]) as interrupted:
            if tp is not None:
                check_replicated(named, tp[1])
            if world > 1:  # (one tensor-parallel replica: world 1 here, its ranks' rows are the same, not summed)
                agree_widths(self.group, named, batches, model)
                # under NCCL the accumulators' sums on the agreements' device too: one device per rank (other
                # backends: sync as before, the state's device or the CPU)
                dev = collective_device(self.group, model)
                on = {"device": dev} if dev.type == "cuda" else {}
                for _, acc in named:
                    acc.sync(self.group, **on)
        spectra, error = {}, None
        try:  # local work after the sync (an eigendecomposition out of memory on one rank): agreed too
            if interrupted:
                raise KeyboardInterrupt
            if batches == 0:  # the same on every rank (each counts every batch; pools' lengths agreed above)
                raise ValueError(
                    f"SpectralLens: the pool gave no batches ({type(self.pool).__name__}"
                    f"{f' of length {len(self.pool)}' if sized_total(self.pool) is not None else ''}); the activation "
                    "protocol measures the fixed held-out pool: pass one that yields the same batches at every "
                    "measurement (a non-empty list or a DataLoader over a non-empty dataset)"
                )
            spectra = capture.compute()
        except NonFiniteError as exc:  # the accumulator's remedy names its own option, which the lens has not
            error = NonFiniteError(f"{exc} (SpectralLens has no nonfinite= option: it measures finite hidden states "
                                   "only; to skip non-finite rows, attach an ActivationCovarianceAccumulator "
                                   "yourself: sl.attach(model, layers, nonfinite='skip'))")
            error.__cause__ = exc
        except BaseException as exc:
            error = exc
        if tp is not None and not tp[0]:  # the peers outside the group: one round (a failure of one rank's solve, its
            try:  # peer then waited in its next collective with it until the process-group timeout)
                agree_round(tp[1], 0, 0, error, "computing the activation spectra of a tensor-parallel rank", model,
                            quote=True)
            except BaseException as exc:  # this rank's error (raised as agreed), or the peer's: agreed below too
                error = exc
        agree(self.group, error, "computing the activation spectra", model)
        names = record_names(model, spectra, params=False)  # eager; a PEFT model's as before get_peft_model
        return {f"act:{names[name]}": spectrum for name, spectrum in spectra.items()}

    def _activation_pass(self, model: nn.Module, capture, rank: int, world: int, lockstep: bool = False,
                         peers: PeerRounds | None = None) -> int:
        """This rank's forwards over its share of the pool (batch ``i`` for ``i % world == rank``);
        returns the number of batches the pool gave (all of them, not only this rank's). ``lockstep``: one
        tensor-parallel replica (``world`` 1 here), whose group's ranks run every forward together; ``peers``:
        the rounds of this rank's tensor-parallel peers where the group holds one rank of the mesh."""
        with capture, kept_sharded(model):  # first: whatever fails below, the hooks leave with it
            return self._forwards(model, capture, rank, world, lockstep, peers)

    def _forwards(self, model: nn.Module, capture, rank: int, world: int, lockstep: bool,
                  peers: PeerRounds | None = None) -> int:
        dev = self._device()
        autocast = measurement_autocast(dev, self.autocast_dtype)
        total = sized_total(self.pool)
        # under FSDP (and DeepSpeed ZeRO-3) every forward all-gathers the weights over the ranks, so every
        # rank must run as many forwards: the pool is loaded in rounds of world batches compared before each
        # round's forwards (a rank with no batch of its own in the last round runs one unmeasured); pools of
        # different lengths (with a len) are refused before any forward; likewise one tensor-parallel replica
        # (lockstep), whose ranks all run every batch: rounds of one batch, compared over the group
        fsdp = lockstep or (world > 1 and (bool(fsdp_sharded(model)) or zero3_partitioned(model)))
        if fsdp and total is not None:  # one collective (a pipeline's stages measure the layers they hold)
            agree_before_pass(self.group, None if self._stage is not None else sorted(capture.accumulators), total,
                              model)
        bar = progress_bar(None if total is None else len(range(rank, total, world)), "activations", self.progress, "batch")
        self._content_now["pool"] = PoolFingerprint()  # this rank's batches (_own_batches), read at the end (no sync)
        try:
            with self._eval_mode(), torch.no_grad(), autocast, eager_forwards(), measurement_pass(capture):
                if fsdp:  # with a len too: a loading or mask_fn failure on one rank is agreed, not a timeout
                    return self._forwards_in_rounds(model, capture, rank, world, bar, lockstep)
                seen = [0]  # batches the pool gave (all of them, not only this rank's)
                mine = self._own_batches(capture, rank, world, seen)
                for batch, mask in mine if peers is None else peers.agreed(mine, last_round=False):
                    with capture.mask(mask), _hinted(self.pool, batch, first=seen[0] == 1 + rank):
                        self.forward_fn(model, batch)
                    if bar is not None:
                        bar.update(1)
                return seen[0]
        finally:
            if bar is not None:
                bar.close()

    def _own_batches(self, capture, rank: int, world: int, seen: list[int]):
        """This rank's batches of the pool (batch ``i`` for ``i % world == rank``) as it runs them, with their
        masks (checked: :meth:`ActivationCapture.mask`), so that what can fail before a forward fails in ``next``
        (agreed there by a tensor-parallel rank's peers); ``seen[0]``: the batches the pool gave so far."""
        for i, batch in enumerate(self.pool):
            seen[0] = i + 1
            if i % world != rank:
                continue
            batch = batch_as_run(batch, self.forward_fn)  # packed: its documents (default forward)
            mask = self.mask_fn(batch) if self.mask_fn is not None else None
            with capture.mask(mask):  # its check of the mask, here
                pass
            self._content_now["pool"].add(batch, mask)
            yield batch, mask

    def _forwards_in_rounds(self, model: nn.Module, capture, rank: int, world: int, bar, lockstep: bool) -> int:
        """Under FSDP (any pool, with a ``len`` or without): in rounds of ``world`` batches (batch ``i`` on rank
        ``i % world``), each rank loads the round's batches (keeping its own and the first) and the mask
        of its own, then the ranks agree on how many batches each pool gave so far (one ``all_reduce`` of
        2 x world integers per round) before the round's forwards. A failure while loading or masking is
        agreed (every rank raises), and so are pools of different lengths (the same ``ValueError`` on
        every rank, as for pools with a ``len``), so no rank is left in a forward's all-gather. In the
        last round a rank without a batch of its own runs one unmeasured forward of the round's first.
        ``lockstep`` (one tensor-parallel replica, a whole pipeline; ``world`` 1 here): the ranks run each batch
        together, and its tensors' shapes and dtypes are compared in the same ``all_reduce`` (a batch of another
        shape on one rank would leave the forward's collectives mismatched). A failure inside a forward is
        raised at once, not agreed (:func:`~spectral_lens._agree.collective_pass`)."""
        batches, it = 0, None
        while True:
            got, mine, first, mask, digest, error = 0, None, None, None, 0, None
            try:
                it = iter(self.pool) if it is None else it
                for j, batch in zip(range(world), it):  # zip stops on the count first: no batch is skipped
                    got = j + 1
                    if j in (0, rank):  # the batches this rank runs, as it runs them (packed: its documents)
                        batch = batch_as_run(batch, self.forward_fn)
                    first = batch if j == 0 else first
                    mine = batch if j == rank else mine
                if rank < got and self.mask_fn is not None:
                    mask = self.mask_fn(mine)
                if rank < got:
                    self._content_now["pool"].add(mine, mask)  # in the agreed part: a failure stops every rank
                digest = batch_digest(mine) if lockstep and rank < got else 0
            except BaseException as exc:  # an interrupt too: agreed at once, then re-raised
                error = exc
            counts, digests = agree_round(self.group, batches + got, digest, error, "loading the pool's batches or "
                                          "their masks (mask_fn)", model)
            refuse_other_counts(self.group, counts, batches + world)
            if got == 0:
                return batches
            if len(set(digests)) > 1:  # the same on every rank: all of them raise, before the forward
                raise ValueError(
                    f"SpectralLens: the pool's batch {batches} differs in shape or dtype between the ranks that run it "
                    f"together (this rank's: {batch_structure(mine)}); one tensor-parallel replica, or the stages of "
                    "one pipeline, run every batch together, so every rank must iterate the same whole pool"
                )
            # each forward is a collective (FSDP's all-gathers, tensor parallelism's all-reduces, a pipeline's
            # sends): a failure inside it is raised at once, unagreed (the other ranks wait inside theirs)
            if rank < got:
                with collective_pass(f"the activation pass's forward of the pool's batch {batches + rank}"), \
                        capture.mask(mask), _hinted(self.pool, mine, first=batches == 0):
                    self.forward_fn(model, mine)
                if bar is not None:
                    bar.update(1)
            else:
                with collective_pass(f"the activation pass's unmeasured forward of the pool's batch {batches}"), \
                        measurement_pass():  # feeds no capture: this rank's rows are its share only
                    self.forward_fn(model, first)
            batches += got
            if got < world:
                return batches

    def _gradient_total(self) -> int | None:
        """Samples the gradient pass will take (:func:`~spectral_lens._gradient_pool.gradient_total`); ``None`` when
        unknown."""
        forward_fn = None if self.probe is None else self.probe.forward_fn  # None: params=(), no gradient pass
        return gradient_total(self.gradient_pool, self.gradient_samples, forward_fn)

    def gradient_spectra(self) -> tuple[dict[str, Spectrum], dict[str, float]]:
        """Per-sample gradient spectra of the probed matrices and their noise scales (rank 0 of the
        group computes them and broadcasts the result, after every rank agreed it succeeded). Called by itself (not
        through :meth:`measure`), it first agrees on the lens's settings with the other ranks as :meth:`measure`
        does (a lens without a gradient protocol on one rank would otherwise skip the collectives the others wait
        in)."""
        self._agree_settings("SpectralLens.gradient_spectra: checking the lens", gradient=True)
        return self._gradients(alone=True)

    def _gradients(self, alone: bool = False) -> tuple[dict[str, Spectrum], dict[str, float]]:
        """:meth:`gradient_spectra`, the settings agreed already (``alone``: called by itself, not after the
        activation pass, whose check compared the tensor-parallel peers' settings, a gradient protocol's presence
        included)."""
        self._require_model()
        rank = ranks(self.group)[0]
        if self.probe is None:
            if alone and rank == 0 and not self._everywhere():  # where a peer with a probe checks its settings
                tp = one_replica(self.model, self.group)
                if tp is not None:  # a group with one rank of the mesh: the peers' settings compared (params=() on
                    # one peer only: a ValueError on each naming the difference; before, its peer waited in this
                    # check until the process-group timeout)
                    try:
                        settings = self._peer_settings()
                    except BaseException as exc:  # an interrupt too: carried into the peers' check
                        _peers_told(tp, exc)
                        raise
                    check_same_forwards(None, tp[1], what="gradient samples (gradient_pool)", settings=settings)
            return {}, {}
        result: list = [None]
        error = None
        everywhere = self._everywhere()
        if rank == 0 or everywhere:
            peers, tp, checked = None, None, False
            try:
                tp = None if everywhere else one_replica(self.model, self.group)
                if tp is not None:  # a group with one rank of the mesh (which runs it alike): the peers' pools compared
                    layout = gradient_layout(self.gradient_pool, self.gradient_samples, self.probe.forward_fn)
                    total, settings = self._gradient_total(), self._peer_settings(probe=True)
                    checked = True  # (after the last step that can fail before the check)
                    check_same_forwards(total, tp[1], what="gradient samples (gradient_pool)",
                                        layout=layout,  # and their batches' sizes (one forward per chunk of each)
                                        settings=settings)
                    peers = PeerRounds(tp[1], "the gradient protocol of a tensor-parallel rank outside its passes "
                                       "(loading a batch of the gradient pool)", self.model)  # agreed between them
                result = [self._gradient_pass() if peers is None else self._gradient_pass(peers)]
                if peers is not None:  # their round after the last pass, once this rank's compute succeeded too
                    peers.end()
            except BaseException as exc:  # an interrupt too: agreed with the other ranks below, then re-raised
                error = exc
                if peers is not None:  # with this rank's tensor-parallel peers first (their next round; a Ctrl-C
                    error = peers.fail(exc)  # there held, agreed below as this rank's error)
                elif tp is not None and not checked:  # before their check (its gradient pool's length): carried into it
                    _peers_told(tp, exc)
            finally:  # the rows of G (M x P per matrix, on the device) are not kept through the training in between
                self.probe.reset()
        agree(self.group, error, "the gradient protocol (it runs on every rank under FSDP, ZeRO-3 and tensor "
              "parallelism)" if everywhere
              else "the gradient protocol (it runs on the group's rank 0)", self.model)
        return from_rank0(self.group, result[0], self.model)

    def _agree_settings(self, what: str, gradient: bool = False) -> None:
        """This rank's lens checked (attached to a model) and its :meth:`_settings` agreed with the other ranks'
        (:func:`~spectral_lens._agree.agree_settings`: one ``all_reduce``; none in a single process); ``gradient``:
        before the gradient protocol alone (:meth:`_settings_agreed`)."""
        error, settings = None, {}
        try:
            self._require_model()
            settings = self._settings()
        except BaseException as exc:  # an interrupt too
            error = exc
        self._settings_agreed(settings, error, what, gradient)

    def _settings_agreed(self, settings: dict[str, str], error: BaseException | None, what: str,
                         gradient: bool = False) -> None:
        """:func:`~spectral_lens._agree.agree_settings` over the lens's group; where it raises (this rank's
        ``error``, or another rank's) and the group holds one rank of a tensor-parallel mesh, the error is carried
        first into the peers' check before the pass (:func:`check_same_forwards`, which they run next: the activation
        pass's, or with ``gradient`` the gradient protocol's, on the group's rank 0 only), so that they raise too,
        naming this rank and quoting its error (before, they waited in that check until the process-group timeout:
        ``measure(step, 1.5)`` on one rank). No collective more where nothing failed."""
        try:
            agree_settings(self.group, settings, error, what, self.model)
        except BaseException as exc:  # an interrupt too
            tp = None
            try:
                if self.model is not None and not (gradient and ranks(self.group)[0] != 0):
                    tp = one_replica(self.model, self.group)
            except Exception:  # noqa: BLE001 - not a member, a group mixing peers: the same on every rank, no peers'
                pass             # check follows there
            if tp is not None and not tp[0]:
                _peers_told(tp, exc)
            raise

    def _settings(self) -> dict[str, str]:
        """What every rank's lens must share, as text (compared by :func:`~spectral_lens._agree.agree_settings`):
        the options that decide which rows each rank feeds to the summed statistics, and whether there is a
        gradient protocol (a rank without one skips its agreement and broadcast); where every rank runs the
        gradient protocol's passes (FSDP, ZeRO-3, one tensor-parallel replica), the probe's settings that decide
        them (:func:`~spectral_lens._tensor_parallel.probe_settings`: a ``chunk_size`` of its own on one rank ran
        other numbers of forwards), and its label smoothing in use (one backward of two losses would mix them). The layers and the pools' lengths are compared where they are used (a
        pipeline's stages measure other layers)."""
        settings = {"precision": repr(self.precision), "mask_fn": callable_name(self.mask_fn),
                    "pick": callable_name(self._pick), "autocast_dtype": str(self.autocast_dtype),
                    "params": "() (no gradient protocol)" if self.probe is None else "<probed matrices>"}
        if self.probe is not None and self._everywhere():  # every rank runs its passes: the same forwards
            settings["probe"] = probe_settings(self.probe)
        return settings

    def _peer_settings(self, probe: bool = False) -> str:
        """:meth:`_settings` as text, and the probe's :func:`~spectral_lens._tensor_parallel.probe_settings` with
        ``probe``: what a rank's tensor-parallel peers compare where the lens's group holds one rank of the mesh."""
        text = ", ".join(f"{k}={v}" for k, v in sorted(self._settings().items()))
        return text + (f"; probe: {probe_settings(self.probe)}" if probe else "")

    def _everywhere(self) -> bool:
        """Whether every rank of the group runs the gradient protocol (the same passes; rank 0's result is
        broadcast as usual): every pass is a collective over the ranks, as under FSDP and DeepSpeed ZeRO-3
        (the weights all-gathered) and in one tensor-parallel replica (its all-reduces)."""
        if ranks(self.group)[1] == 1:
            return False
        tp = one_replica(self.model, self.group)
        return bool(fsdp_sharded(self.model)) or zero3_partitioned(self.model) or (tp is not None and bool(tp[0]))

    def _gradient_pass(self, peers: PeerRounds | None = None) -> tuple[dict[str, Spectrum], dict[str, float]]:
        """The gradient protocol over the whole gradient pool, on this rank (``peers``: the rounds of its
        tensor-parallel peers where the group holds one rank of the mesh)."""
        self.probe.reset()
        bar = progress_bar(self._gradient_total(), "gradients", self.progress, "sample")
        try:
            # iterating the pool draws random numbers too (a DataLoader iterator's base seed, a
            # shuffling sampler, numpy augmentation): under the fork, as in the activation pass
            with forked_rng(cuda_devices(self.model)):
                batches = gradient_batches(self.gradient_pool, self.gradient_samples, self.probe.forward_fn)
                if self.gradient_pool is not self.pool:  # a gradient pool of its own: fingerprinted as it loads (in
                    content = self._content_now["gradient_pool"] = PoolFingerprint()  # the ranks' agreements below)
                    batches = content.read(batches)  # (the pool's own is read by the activation pass)
                everywhere = self._everywhere()
                if everywhere:  # every rank runs these passes: the pools compared as they go
                    batches = agreed_batches(self.group, batches, self.gradient_samples, self.model)
                elif peers is not None:  # and this rank's tensor-parallel peers; their last round after the
                    batches = peers.agreed(batches, last_round=False)  # compute (_gradients'), see below
                for i, batch in enumerate(batches):
                    # everywhere, a forward and backward that are collectives: as in _forwards_in_rounds
                    with (collective_pass(f"the gradient protocol's pass over the gradient pool's batch {i}")
                          if everywhere else contextlib.nullcontext()):
                        self.probe.update(batch)
                    if bar is not None:
                        bar.update(batch_size(batch))
        finally:
            if bar is not None:
                bar.close()
        if self.probe.n_samples_ < 2:
            raise ValueError(
                f"SpectralLens: the gradient pool gave {self.probe.n_samples_} sample(s) (sequences), and a "
                "gradient spectrum needs at least 2; pass a gradient_pool (default: pool) that yields the same "
                "batches at every measurement (a list or a DataLoader, not an exhausted iterator), or "
                "params=() to measure activations only"
            )
        # bounded-memory mode's compute recomputes chunks: forwards that are collectives of a tensor-parallel mesh,
        # each after a round of the peers (a failure of one rank between them raises on each at once); where every
        # rank runs the protocol, collectives over the group: a round of its ranks before each, and one after
        rounds = peers
        if peers is None and everywhere and self.probe.max_resident_samples is not None:
            rounds = PeerRounds(self.group, "the gradient protocol's compute in bounded-memory mode (between its "
                                "recomputations, collectives over the ranks)", self.model)
        try:
            self.probe._around_recompute = None if rounds is None else (
                rounds.forward if rounds is peers else lambda: _recomputation(rounds))
            try:
                spectra = self.probe.compute()
                noise = self.probe.noise_scale()
            finally:
                self.probe._around_recompute = None
            if rounds is not peers:
                rounds.end()
        except BaseException as exc:  # an interrupt too
            if rounds is None or rounds is peers:
                raise
            failed = rounds.fail(exc)  # into the other ranks' next round (held Ctrl-C: a KeyboardInterrupt)
            if failed is exc:
                raise
            raise failed from exc
        if isinstance(spectra, Spectrum):
            spectra = {next(iter(self.probe.params)): spectra}
            noise = {next(iter(self.probe.params)): noise}
        names = record_names(self.model, spectra, params=True)  # eager; a PEFT model's as before get_peft_model
        scalars = {f"noise_scale:{names[n]}": float(ns.b_simple) for n, ns in noise.items()}
        scalars["noise_scale"] = scalars[f"noise_scale:{names[next(iter(noise))]}"]
        return {f"grad:{names[n]}": s for n, s in spectra.items()}, scalars

    # ----------------------------------------------------------------- interface
    def measure(self, step: int, tokens: int, *, val_loss: float | None = None, progress: float | None = None) -> LensMeasurement:
        """Run both protocols now; store and return the measurement (rank 0 writes the record).

        Under ``torch.distributed`` every rank of the group calls it together. An error in one rank's
        local work (its forwards, rank 0's gradient protocol, an out-of-memory) is agreed before the
        next collective: that rank raises its own exception and every other rank a ``RuntimeError``
        naming it, at once and with the process group still usable. So is a failure of rank 0's record
        write (``writer.log_measurement``, a full disk), after the gradient broadcast (where the group holds one rank
        of each tensor-parallel mesh, with the mesh peers too: one ``all_reduce`` more). Before any pass the ranks
        agree on the arguments and on the lens's ``precision``, ``mask_fn``, ``pick``, ``autocast_dtype`` and
        whether it has a gradient protocol (one ``all_reduce``): a bad argument on one rank stops every rank
        there, and settings that differ are a ``ValueError`` on every rank naming them.
        """
        # before the passes: a bad argument would otherwise fail only after the whole measurement. Agreed with the
        # other ranks (one all_reduce per measurement), so a bad argument or a lens configured otherwise on one rank
        # stops every rank here instead of leaving the others waiting in the first collective of the passes
        error, settings = None, {}
        try:
            try:
                step, tokens = as_integer(step), as_integer(tokens)  # 0.5 is refused, not truncated to 0
                val_loss = None if val_loss is None else float(val_loss)
            except (TypeError, ValueError):
                raise TypeError(f"SpectralLens.measure: step and tokens must be integers and val_loss a number or "
                                f"None; got step={step!r}, tokens={tokens!r}, val_loss={val_loss!r}") from None
            self._require_model()
            settings = self._settings()
            self._warn_measured(step)
        except BaseException as exc:  # an interrupt too
            error = exc
        self._settings_agreed(settings, error, "checking measure()'s arguments and the lens")
        self._content_now = {}  # filled by this measurement's passes (_warn_pool_changed)
        spectra = self._activations()
        grad_spectra, scalars = self._gradients()
        spectra.update(grad_spectra)
        for s in spectra.values():
            s.metadata.update(step=int(step), tokens=int(tokens))
        if val_loss is not None:
            scalars["val_loss"] = float(val_loss)
        # the rest is local work after the last collective, and rank 0 alone writes the record (the other
        # ranks have writer=None, so they cannot tell whether there is one): a failure on one rank (a full
        # disk on rank 0) is agreed, so the other ranks raise too instead of going on into a collective
        # (a callback's agreement, the training loop's next step) that rank 0 never reaches
        # rank 0's windows on every rank: only rank 0 has the writer and its recorded windows, and summaries
        # that differ between ranks could send code that branches on them (an early stop) down different
        # paths, into mismatched collectives
        windows = self._windows()
        m, error = None, None
        try:
            # inside: a Ctrl-C on one rank during the broadcast (held until it ended, or raised as it returns) is
            # agreed below, with the mesh peers too; before, that rank raised alone, its mesh peers waited in their
            # round below and its group's ranks in their agreement until the process-group timeout. A broadcast that
            # failed is marked: no agreement is tried after it (the other ranks may wait in it)
            with deferred_interrupt() if ranks(self.group)[1] > 1 else contextlib.nullcontext([]) as interrupted, \
                    _own_collectives(None, "the broadcast of rank 0's summary windows"):
                tail, head = from_rank0(self.group, windows, self.model)
            if interrupted:
                raise KeyboardInterrupt
            summaries = {name: spectrum_summaries(s, tail=tail, head=head) for name, s in spectra.items()}
            self._warn_window(tail, spectra, summaries)
            self._warn_pool_changed(spectra)
            m = LensMeasurement(int(step), int(tokens), spectra, scalars, summaries)
            self.history.append(m)
            if self.writer is not None and ranks(self.group)[0] == 0:
                extra = {k: v for k, v in scalars.items() if k != "val_loss"}
                # the writer's summaries are these when its windows are the lens's (the default): handed over,
                # not computed a second time (18 ms per d = 4096 spectrum on the 2-core CPU)
                # (RunWriter's own log_measurement only: a subclass's override may not take summaries=)
                windows = (tuple(tail), None if head is None else tuple(head))
                same = getattr(type(self.writer), "log_measurement", None) is RunWriter.log_measurement \
                    and (self.writer.tail_window, self.writer.head_window) == windows
                done = dict(summaries=summaries, summarize=False) if same else {}
                self.writer.log_measurement(step, tokens, spectra, val_loss=val_loss, progress=progress, scalars=extra,
                                            **done)
        except BaseException as exc:  # an interrupt too: agreed with the other ranks below, then re-raised
            error = exc
        what = "summarizing or writing the run record (rank 0 writes it)"
        peers = self._mesh_peers()
        if peers is not None:
            # this rank's tensor-parallel mesh peers first, outside the group: one round (before, a failed write on
            # rank 0 was agreed over its group only; its mesh peers returned the measurement and waited in the next
            # forward until the process-group timeout)
            try:
                agree_round(peers, 0, 0, error, what, self.model, quote=True)
            except BaseException as exc:  # this rank's error (raised as agreed), or a peer's: agreed below too
                error = exc
        agree(self.group, error, what, self.model)
        return m

    def _mesh_peers(self):
        """The process group of this rank's tensor-parallel mesh peers where the lens's group holds one rank of
        each mesh (each rank's own group, a data-parallel group: :func:`one_replica`), whose agreements do not
        reach them; else ``None`` (a plain model, one replica, a single process: no collective more)."""
        try:
            tp = one_replica(self.model, self.group)
        except ValueError:  # a group mixing a mesh's ranks with others: refused before the passes, on every rank
            return None
        return None if tp is None or tp[0] else tp[1]

    def maybe_measure(self, step: int, tokens: int, **kwargs) -> LensMeasurement | None:
        """``measure`` if ``step`` is in the schedule, else ``None``."""
        if self.schedule is None:
            raise ValueError("SpectralLens.maybe_measure needs schedule=...")
        return self.measure(step, tokens, **kwargs) if step in self.schedule else None

    def __repr__(self) -> str:
        if self.model is None:  # not attached: what the lens was configured with
            layers, params = self.layers_spec, self.params_spec
            if self.probe is not None:
                params = self.probe.params_spec
        else:
            layers, params = self.layers, None if self.probe is None else list(self.probe.params)
        return f"SpectralLens(layers={layers!r}, params={params!r}, precision={self.precision!r})"
