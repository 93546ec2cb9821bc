"""``PerSampleGradientProbe``: per-sample gradient spectra of chosen weight matrices (paper Sec. 2).

The thin stateful layer: binding to a model (and following its parameters), each parameter's engine, the
head-loss decision, the isolation that keeps measuring free of side effects, chunking, and the float64 Gram
state. Which models and parameters it measures (the default matrix, ``params=`` resolution, the refusals) is
:mod:`._measurable`; which engine measures a parameter is :mod:`._engine_choice`; the gradients come from
:mod:`.engines`, the math from :mod:`.gram` and :mod:`.noise_scale`.
"""

from __future__ import annotations

import warnings

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .._peft import adapter_names, is_peft, saved_copies, saved_wrappers, vmap_untraceable
from .._pipeline import refuse_probe as refuse_pipeline_stage
from .._tensor_parallel import refuse_tensor_parallel_params
from .._warnings import NonFiniteError
from ..attachment import Attachment, attach_once
from .._args import AUTOCAST_WHY, NARROW_FLOATS, check_callable, check_count, check_dtype
from ..capture import eager_forwards, measurement_autocast, measurement_pass
from .._warnings import MixedWeightsWarning, ZeroGradientWarning
from ._isolation import (cuda_devices, forked_rng, module_list, parameter_list, preserved_buffers, restore_training,
                         rng_state, set_rng_state, set_training, silenced_module_backward_hooks)
from ._validate import finite_rows, half_hint, nonfinite_loss_message
from ._steps import hold_counting as _hold_counting
from ._steps import optimizer_steps as _optimizer_steps
from ._steps import release_counting as _release_counting
from ._steps import stepped_parameters as _stepped_parameters
from ..spectrum import Spectrum
from ..spectra.eigen import all_finite
from ._engine_choice import (choose_engine, fast_refusal, general_engine, other_fast_matrix, refuse_fast,
                             running_statistics)
from ._batch import _autograd_usable, batch_as_run, batch_size, default_forward, map_tensors, slice_batch
from . import cast_cache
from .engines import LayoutRefusal, LossScale, coincidence, fast_engine, loop_engine
from .fallback import vmap_or_loop
from .fused_head import HeadWatch, chunked_head_fns, chunked_is_faster, find_chunkable_head
from .gram import (
    CPU_SLAB_ELEMENTS,
    GRAM_BLOCK_ELEMENTS,
    block_rows_for,
    fill_gram,
    fill_gram_by_columns,
    gram_against,
    gram_spectrum,
    grow_square,
    symmetrized,
)
from .losses import _check_smoothing, causal_lm_loss
from .noise_scale import NoiseScale, noise_scale_from_gram
from .._deepspeed import is_zero3, whole_shape, zero3_partitioned
from .._offload import offload_device, offloaded_names, offloading_modules, refuse_offloaded
from ._measurable import (ATTENTION_OUTPUT_PATTERNS, _refuse_recording_opacus_hooks, _refuse_scripted, _resolve_params,
                          bindable, default_gradient_param, refuse_fsdp, refuse_unfit_defaults)

__all__ = ["PerSampleGradientProbe", "ATTENTION_OUTPUT_PATTERNS", "default_gradient_param"]

ENGINES = ("auto", "fast", "vmap", "loop")
HEAD_LOSSES = ("auto", "chunked", "materialized")


@dataclass
class _Chunk:
    """Samples ``start:stop``; a non-resident chunk keeps its input batch and RNG state instead of rows,
    and until :meth:`PerSampleGradientProbe._complete` writes them into the Gram matrix its Gram blocks."""

    start: int
    stop: int
    batch: Any = None  # cloned inputs, kept only for recomputation in bounded-memory mode
    rng: Any = None  # every global RNG state at the first computation (_isolation.rng_state), replayed
    # non-resident: {name: (block against itself, block against the resident rows or None)}, float64
    blocks: Any = None
    smoothing: float = 0.0  # the default loss's label smoothing it was measured with (recomputed with it only)

    @property
    def resident(self) -> bool:
        return self.batch is None


class PerSampleGradientProbe:
    """Singular-value spectra of ``G`` (M x P), the stacked per-sample gradients of weight matrices.

    One sample is one sequence; ``g_m = vec(grad_W L_m)`` with ``L_m`` the mean loss over that
    sequence's valid positions (paper Sec. 2). ``update(batch)`` adds the batch's samples, ``compute()``
    returns a :class:`~spectral_lens.Spectrum` (``kind="gradient"``, values ``s_j^2``) per parameter.

    Args:
        model: any ``nn.Module``, or ``None`` to build the probe first and bind it later with
            :meth:`attach` (``params`` are resolved then). A ``DistributedDataParallel`` or
            ``DataParallel`` wrapper is refused with a ``ValueError``: pass ``wrapper.module``. On a
            model sharded with FSDP2 (``fully_shard``) the fast engine measures the full weights
            exactly when every rank calls ``update`` with the same batches; other engines and FSDP1
            (``FullyShardedDataParallel``) are refused with a ``ValueError`` (also when the model was
            sharded after binding: then by ``update``, before any pass). Under DeepSpeed ZeRO stage 3
            likewise: the fast engine measures the whole weights when every rank calls ``update`` with
            the same batches (the default loss then takes the materialized logits), the ``vmap`` and
            ``loop`` engines are refused. A
            ``torch.compile`` wrapper is unwrapped (``_orig_mod``: names as in the uncompiled model);
            ``update`` runs its passes eagerly (``torch.compiler.set_stance("force_eager")``).
        params: dotted parameter name(s), globs over parameter names (``"blocks.*.attn.c_proj.weight"``)
            or module names (meaning the module's ``weight``); in a model with ``torch.compile``d
            blocks, also their eager names (without ``_orig_mod``, as the records name them); in a PEFT
            model, also the names of the model before ``get_peft_model`` (without ``base_model.model.``
            and a wrapped layer's ``base_layer``; ``lm_head`` for the copy a ``modules_to_save`` head's forward
            runs: the active adapter's, resolved again at each ``update`` after ``set_adapter``, and after
            ``add_adapter`` / ``get_peft_model`` changed the layers).
            Default: the final block's attention output projection (:func:`default_gradient_param`).
            Several matrices share each pass.
        loss_fn: ``loss_fn(model_output, batch) -> (M,)`` per-sample losses. Default:
            :func:`~spectral_lens.gradients.causal_lm_loss` (mean next-token cross-entropy, padding
            masked by ``ignore_index``).
        forward_fn: ``forward_fn(model, batch) -> output``; default :func:`default_forward`.
        engine: ``"auto"`` (fast path where one is registered for the module type, the weight is
            not shared and no BatchNorm normalizes by batch statistics, ``"vmap"`` otherwise, falling back to ``"loop"`` with an
            :class:`~spectral_lens.EngineFallbackWarning` where ``torch.func`` refuses the model; in a PEFT
            model with LoHa layers, whose forward ``torch.func`` cannot trace, with Accelerate's offloading, or with
            BatchNorm updating running statistics (``train_mode=True``), ``"loop"`` at once, without a warning),
            ``"fast"`` (error if impossible), ``"vmap"`` (error naming the likely cause if ``torch.func``
            refuses the model; a ``ValueError`` at once in a PEFT model with LoHa layers), ``"loop"``.
        chunk_size: samples per forward/backward pass (default 16). Results do not depend on it; memory
            grows with it (one chunk's activations and its ``(chunk_size, P)`` rows per parameter).
            Below ~16 sequences of 1,024 tokens per pass a GPT-2-small probe on an H200 is bound by
            the host's kernel launches: a probe kept across measurements took 1.77x the no-grad
            forward at 8, 1.45x at 16 (M = 64, same chunks for the forward; benchmarks/RESULTS.md).
        keep_matrix: keep ``G`` retrievable with :meth:`matrix` (needs all rows resident).
        max_resident_samples: ``None`` (default): every row of ``G`` stays in memory, one pass,
            peak ``O(M^2 + M P)``. An int ``K``: at most ``K`` rows (plus one chunk) are held, the other
            chunks' input batches are kept and their cross Gram blocks are recomputed in
            :meth:`compute`, peak ``O(M^2 + (K + chunk) P)`` for ~``M(M-K)/(2K)`` extra sample gradients (docs/gradients.md).
        offload_rows: hold the resident rows of ``G`` in host memory (pinned when the model is on CUDA)
            instead of on the model's device: device memory ``O(M^2 + one chunk)`` without recomputation,
            host memory ``O(M P)``. :meth:`compute` then moves ``G`` to the device once, in column
            slabs (:func:`~spectral_lens.gradients.gram.fill_gram_by_columns`). No effect on a CPU model.
        storage_dtype: dtype of the held rows; default float32 (float64 for float64 parameters).
            ``torch.bfloat16`` halves memory at ~3 significant digits per entry. float16 and float8
            are refused (``ValueError``): float16 flushes small per-sample gradient entries.
        autocast_dtype: run forward passes under ``torch.autocast(device, dtype)`` (e.g. bfloat16).
            ``None``: in the model's own precision, also when ``update`` is called inside the caller's
            ``torch.autocast`` block (switched off for the measurement). Under autocast, an ``update`` of several chunks casts each
            ``nn.Linear`` weight once and keeps the cast until it returns, bit-identical to casting it
            per chunk (:mod:`~spectral_lens.gradients.cast_cache`).
        train_mode: measure in train mode (dropout active). Default False: eval mode, the caller's
            mode is restored afterwards.
        ignore_index: target value excluded from the default loss.
        head_loss: how the default loss meets the model's head. ``"auto"`` (default): on CUDA with
            Triton installed (where the chunked path is the faster one,
            :func:`~spectral_lens.gradients.fused_head.chunked_is_faster`; elsewhere ``"auto"`` keeps
            the materialized logits), on the first ``update`` the first chunk's own forward checks
            (:class:`~spectral_lens.gradients.fused_head.HeadWatch`; with the vmap or loop engine, one
            extra no-grad forward of the batch's first sequence,
            :func:`~spectral_lens.gradients.fused_head.find_chunkable_head`) that the logits the
            default loss reads are the unmodified output of an ``nn.Linear`` head whose weight is not
            probed; if so the head and the loss run chunked over tokens
            (:func:`~spectral_lens.gradients.linear_cross_entropy`: never the full tokens x vocab
            logits, same loss and gradients up to float rounding), else the logits are materialized
            as before. ``"chunked"``: the same check, a ``ValueError`` with its reason if it fails.
            ``"materialized"``: always the full logits. When ``loss_fn`` or ``forward_fn`` is given,
            ``"auto"`` does nothing (a user's loss is never replaced). The decision is
            ``probe.head_loss_`` (``"chunked (lm_head)"``, ``"materialized: <reason>"``), made once
            per attached model. A label-smoothed default loss takes the same decision
            (``linear_cross_entropy(label_smoothing=)``).
        label_smoothing: label smoothing of the default loss, ``F.cross_entropy``'s (in ``[0, 1]``; per token
            ``(1 - eps) * nll + eps * mean over the vocabulary of -log p``), in both head losses: measure the
            loss you train on. Refused with ``loss_fn`` (smooth inside it). Without it, the Hugging Face
            callback smooths the default loss by the trainer's ``label_smoothing_factor`` during its
            measurements; with it, the probe's own value is kept. A spectrum of smoothed rows has
            ``metadata["label_smoothing"]``.

    Measuring has no side effects: ``.grad``, ``requires_grad``, train/eval flags, module buffers
    (BatchNorm running statistics also with ``train_mode=True``), the CPU and CUDA RNG states, Python's
    ``random`` and numpy's global RNG, and the hook dictionaries are as before, also when an exception
    interrupts ``update``; every pass (a chunk, or a sample on the loop engine) starts from the buffers the
    measurement found, so a forward that writes a buffer it reads gives rows independent of ``chunk_size``
    and engine. Gradient hooks on parameters (``param.register_hook``) and module backward hooks
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``, ``register_backward_hook``, and
    the global ``register_module_*backward*hook`` ones) are not called: the rows are the loss's own
    gradients on every engine, so a gradient reversal or clipping implemented as such a hook is not in
    them (forward hooks run: they are part of the model). In bounded-memory mode a recomputed chunk
    replays every one of these RNG streams from the state its first computation started from, so its
    forward draws the same dropout masks and the same Python / numpy random numbers.

    Example::

        probe = PerSampleGradientProbe(model, autocast_dtype=torch.bfloat16)
        for x, y in pool:
            probe.update((x, y))
        spectrum = probe.compute()
        RankMe()(spectrum), probe.noise_scale().b_simple
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        params: str | Sequence[str] | None = None,
        *,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        engine: str = "auto",
        chunk_size: int = 16,
        keep_matrix: bool = False,
        max_resident_samples: int | None = None,
        offload_rows: bool = False,
        storage_dtype: torch.dtype | None = None,
        autocast_dtype: torch.dtype | None = None,
        train_mode: bool = False,
        ignore_index: int = -100,
        head_loss: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if head_loss not in HEAD_LOSSES:
            raise ValueError(f"head_loss must be one of {HEAD_LOSSES}, got {head_loss!r}")
        if head_loss == "chunked" and (loss_fn is not None or forward_fn is not None):
            raise ValueError(
                "head_loss='chunked' computes the default loss through the model's head; it cannot be combined "
                "with loss_fn/forward_fn (leave them out, or pass head_loss_fns(model, ...) as they are)"
            )
        who = "PerSampleGradientProbe"
        label_smoothing = _check_smoothing(who, label_smoothing)
        if label_smoothing and loss_fn is not None:
            raise ValueError(
                f"{who}: label_smoothing={label_smoothing:g} smooths the default loss; with loss_fn given, smooth "
                "inside your loss_fn (e.g. F.cross_entropy(..., label_smoothing=...)) and leave label_smoothing=0"
            )
        chunk_size = check_count(who, "chunk_size", chunk_size, 1)
        max_resident_samples = check_count(who, "max_resident_samples", max_resident_samples, 1, none_ok=True)
        check_callable(who, "loss_fn", loss_fn, "(model_output, batch) -> per-sample losses (M,)")
        check_callable(who, "forward_fn", forward_fn, "(model, batch) -> output")
        check_dtype(who, "storage_dtype", storage_dtype, refuse=(torch.float16, *NARROW_FLOATS),
                    why="float16 rows flush per-sample gradient entries below 6e-8 and round those below 6e-5 "
                        "to fewer bits (typical per-sample gradients are that small: 13% of a small-weight "
                        "model's spectrum was lost), and float8 or float4 rows keep 1 to 3 bits; use "
                        "torch.bfloat16 (the same memory, float32's range), torch.float32 or None")
        check_dtype(who, "autocast_dtype", autocast_dtype, refuse=NARROW_FLOATS, why=AUTOCAST_WHY)
        if keep_matrix and max_resident_samples is not None:
            raise ValueError("keep_matrix=True needs every row resident: leave max_resident_samples=None")
        self.model: nn.Module | None = None
        self._every: list[torch.Tensor] | None = None  # list(model.parameters()) during an update
        self._devices: list[int] | None = None  # cuda_devices(model) during an update (_isolated)
        self._forked: tuple | None = None  # the RNG state _isolated forked, during an update (rng_state's value)
        self._modules: list[nn.Module] | None = None  # list(model.modules()) during an update (_isolated)
        # float16 backward passes' seeds, carried between chunks (engines): the fast engine's (read from module
        # output gradients) and the vmap / loop engines' (read from the rows, larger)
        self._loss_scale, self._row_loss_scale = LossScale(), LossScale()
        # during an update: puts back the buffers a pass wrote (preserved_buffers' rewind)
        self._rewind_buffers: Callable[[], None] | None = None
        # a caller's context around each recomputation of a non-resident chunk in compute (bounded-memory mode),
        # entered after its RNG state is replayed, before its forwards: the lens's round of a tensor-parallel
        # rank's mesh peers (PeerRounds.forward), whose forwards are collectives of the mesh; None: nothing
        self._around_recompute: Callable[[], Any] | None = None
        # signatures of static 3-D+ fast-path inputs the even-samples check found per-sample (fast_engine's
        # ``checked``): checked once per probe and model, not per chunk
        self._layouts: set = set()
        self.params: dict[str, nn.Parameter] = {}
        self.params_spec = params
        smooth = {"label_smoothing": label_smoothing} if label_smoothing else {}
        self.loss_fn = loss_fn or functools.partial(causal_lm_loss, ignore_index=ignore_index, **smooth)  # picklable
        self._custom_loss = loss_fn
        self._custom_forward = forward_fn
        self.forward_fn = forward_fn or default_forward
        self.ignore_index = ignore_index
        self.head_loss = head_loss
        self.head_loss_: str | None = self._initial_head_loss()
        self._head_fns: tuple[Callable, Callable] | None = None  # (forward_fn, loss_fn) once chunked is chosen
        self.label_smoothing = label_smoothing
        # the default loss's now (label_smoothing, or an integration's: _trained_loss), in both head losses
        self._label_smoothing = label_smoothing
        self.engine = engine
        self.chunk_size = int(chunk_size)
        self.keep_matrix = keep_matrix
        self.max_resident_samples = max_resident_samples
        self.offload_rows = bool(offload_rows)
        self.storage_dtype = storage_dtype
        self.autocast_dtype = autocast_dtype
        self.train_mode = train_mode
        self.sites: dict[str, tuple[nn.Module, str]] = {}
        self.engines_: dict[str, str] = {}
        # a PEFT model's modules_to_save wrappers and the copies their forwards ran when params were resolved
        self._wrappers: dict[str, nn.Module] = {}
        self._copies: dict[str, str] = {}
        self._untraceable: dict[str, str] = {}  # peft layers whose forward torch.func.vmap cannot trace (LoHa)
        self._offloading: list[str] = []  # modules whose Accelerate hook offloads their weights
        self._adapters: tuple[str, ...] | None = None  # a PeftModel's adapter names: add_adapter may add wrappers
        self.reset()
        if model is not None:
            self._bind(model)

    # ----------------------------------------------------------------------------- attachment
    def _bind(self, model: nn.Module) -> None:
        model = bindable(model, "PerSampleGradientProbe", needs="PerSampleGradientProbe.attach needs an nn.Module")
        _refuse_scripted(model)
        refuse_pipeline_stage(model, "PerSampleGradientProbe")  # the per-sample loss needs the whole pipeline
        refuse_unfit_defaults(model, forward=self._custom_forward is None, loss=self._custom_loss is None)
        params = _resolve_params(model, self.params_spec)
        self.model, self.params = model, params
        self._wrappers = saved_wrappers(model)
        self._copies = saved_copies(model, self._wrappers)
        self._adapters = adapter_names(model)
        self._untraceable = vmap_untraceable(model)
        self._offloading = offloading_modules(model)
        self.sites = {n: self._site(n) for n in params}
        self._layouts = set()
        self._choose_engines()
        self._refuse_offloaded()  # Accelerate's meta placeholders: the fast engine only
        self._forget_head_loss()
        self.reset()

    def attach(self, model: nn.Module) -> Attachment:
        """Bind the probe to ``model``: resolve ``params`` in it and choose the engines.

        For a probe built before the model is known (``PerSampleGradientProbe(params=..., ...)``).
        Returns an :class:`~spectral_lens.attachment.Attachment`; ``handle.remove()`` (or leaving ``with probe.attach(model):``) unbinds the
        probe and forgets its samples. The probe registers no hook outside ``update``, so attaching
        changes nothing in the model. A probe that is already attached (to this model or another)
        must be removed first: attaching again raises ``ValueError``.
        """
        return attach_once(
            self, model,
            elsewhere=lambda other: (f"PerSampleGradientProbe is attached to another {type(other).__name__}; "
                                     "call remove() on its handle (or detach()) first"),
            again=lambda same: (f"PerSampleGradientProbe is already attached to this {type(same).__name__} (params "
                                f"{list(self.params)}, {self.n_samples_} samples); attaching again would discard its "
                                "samples. Keep using it, or call remove() on the first handle (or detach()) before "
                                "attaching it again"),
        )

    def detach(self) -> None:
        """Unbind the probe from its model and forget every sample (idempotent)."""
        self.model, self.params, self.sites, self.engines_ = None, {}, {}, {}
        self._wrappers, self._copies, self._untraceable, self._adapters = {}, {}, {}, None
        self._offloading, self._layouts = [], set()
        self._forget_head_loss()
        self.reset()

    def _require_model(self, what: str) -> None:
        if self.model is None:
            raise RuntimeError(
                f"PerSampleGradientProbe: {what} needs a model, and the probe is not attached to one; "
                "call probe.attach(model) first (or build it as PerSampleGradientProbe(model, params))"
            )

    # ----------------------------------------------------------------------------- configuration
    def _site(self, name: str) -> tuple[nn.Module, str]:
        path, _, local = name.rpartition(".")
        return self.model.get_submodule(path), local

    def _follow_params(self, rescanned: bool = False) -> None:
        """Re-read every probed parameter from the model before a pass.

        A parameter object replaced since :meth:`attach` (``model.load_state_dict(sd, assign=True)``,
        ``module.weight = nn.Parameter(...)``, ``to_empty``, a Hugging Face ``resize_token_embeddings``)
        or a replaced module is followed: the probe measures the weights the model now computes with,
        never the stale tensors (whose gradients would be wrong, or all zero). A new shape with samples
        already taken or a parameter that is gone raises ``ValueError``; a replacement in
        bounded-memory mode (whose recomputation would mix the two) ``RuntimeError``, as a change in
        place does. In a PEFT model with ``modules_to_save`` the names follow the active adapter
        (:meth:`_follow_adapter`), also to a wrapper added since (``add_adapter`` / ``load_adapter``: the
        ``PeftModel``'s adapter names changed) and to a probed module replaced by a ``peft`` layer.
        """
        if self._adapters is not None and adapter_names(self.model) != self._adapters:
            self._rescan_peft()
        elif self._wrappers:
            self._follow_adapter()
        changed, placeholders = {}, {}
        for name, old in self.params.items():
            path, _, local = name.rpartition(".")
            mod = self.model
            for part in path.split(".") if path else ():  # get_submodule's walk, ~20x cheaper
                # ``in`` and ``[]``: a scripted module's ``_modules`` (torch.jit's OrderedModuleDict) has no ``get``
                mod = mod._modules[part] if isinstance(mod, nn.Module) and part in mod._modules else None
            new = getattr(mod, local, None)
            if new is old and mod is self.sites[name][0]:
                continue
            if (mod is self.sites[name][0] and isinstance(new, nn.Parameter) and new.device.type == old.device.type
                    == "meta" and new.shape == old.shape and new.dtype == old.dtype and offloaded_names(self.model, [name])):
                # Accelerate's offloading hook puts a new meta placeholder back after every forward: the same
                # weight (its value in the hook's store), not a replaced one
                placeholders[name] = new
                continue
            if is_peft(mod) and mod is not self.sites[name][0] and not rescanned:  # a peft layer or wrapper now
                self._rescan_peft()
                return self._follow_params(rescanned=True)
            if not isinstance(new, nn.Parameter):
                raise ValueError(
                    f"PerSampleGradientProbe: the probed parameter {name!r} is no longer a parameter of "
                    f"{type(self.model).__name__} (found {type(new).__name__}); re-attach the probe to the model as "
                    "it is now (remove() the handle or detach(), then attach(model))"
                )
            if self.n_samples_ and (new.shape != old.shape or self.max_resident_samples is not None):
                shape = new.shape != old.shape
                why = (f"its shape changed from {tuple(old.shape)} to {tuple(new.shape)}" if shape
                       else "bounded-memory mode (max_resident_samples) would recompute the earlier samples with it "
                            "and mix checkpoints")
                raise (ValueError if shape else RuntimeError)(  # RuntimeError: as for weights changed in place
                    f"PerSampleGradientProbe: the probed parameter {name!r} was replaced by a new tensor since the "
                    f"probe's {self.n_samples_} samples were taken, and {why}; call reset() first"
                )
            changed[name] = (mod, local, new)
        self.params.update(placeholders)
        for name, (mod, local, new) in changed.items():
            self.params[name], self.sites[name] = new, (mod, local)
        for name in changed:
            self.engines_[name] = self._choose_engine(name)

    def _rescan_peft(self) -> None:
        """Read the PEFT model's wrappers, adapter names and vmap-untraceable layers again (peft changed its
        layers since binding: ``add_adapter``), then resolve ``params`` and choose the engines again."""
        self._adapters, self._wrappers = adapter_names(self.model), saved_wrappers(self.model)
        self._untraceable = vmap_untraceable(self.model)
        self._follow_adapter(rescan=True)

    def _follow_adapter(self, rescan: bool = False) -> None:
        """Resolve ``params`` again when a PEFT ``modules_to_save`` wrapper now runs another copy than when
        they were resolved (``set_adapter``, ``disable_adapter()``), or, with ``rescan=True``, after peft changed
        the model's layers (a wrapper added by ``add_adapter``: :meth:`_rescan_peft`):
        ``"lm_head"`` names the copy the forward runs now (``lm_head.modules_to_save.<active>.weight``), never a
        copy the forward no longer uses (all zero rows) nor a module peft replaced. The head-loss decision is made
        again too (a chunked head may be such a copy). With samples taken and other parameters named now,
        ``ValueError``: their rows would mix two matrices."""
        copies = saved_copies(self.model, self._wrappers)
        if copies == self._copies and not rescan:
            return
        params = _resolve_params(self.model, self.params_spec)
        if list(params) != list(self.params) and self.n_samples_:
            raise ValueError(
                f"PerSampleGradientProbe: the PEFT model's active adapter or its peft layers changed (set_adapter, "
                f"disable_adapter, add_adapter or load_adapter with modules_to_save) since the probe's "
                f"{self.n_samples_} samples were taken, and params={self.params_spec!r} now name {list(params)} "
                f"instead of {list(self.params)}; call reset() first (SpectralLens.measure does), or set the adapter "
                "back before the next update"
            )
        renamed = list(params) != list(self.params)
        if renamed:  # the same names: a replaced tensor or module is followed (and checked) by _follow_params
            self.params = params
            self.sites = {n: self._site(n) for n in params}
        if renamed or rescan:
            self._choose_engines()
        if renamed:
            self.reset()
        self._copies = copies
        self._forget_head_loss()

    def _choose_engines(self) -> None:
        """Every probed parameter's engine, then the refusals that depend on them (FSDP, tensor parallelism)."""
        self.engines_ = {n: self._choose_engine(n) for n in self.params}
        refuse_fsdp(self.model, self.engines_, why_not_fast=self._why_not_fast(), other_fast=self._other_fast)
        refuse_tensor_parallel_params(self.model, self.params)

    def _choose_engine(self, name: str) -> str:
        """The engine of parameter ``name`` (:func:`~._engine_choice.choose_engine`)."""
        return choose_engine(self.engine, self.model, name, self.sites[name], self.params[name],
                             train_mode=self.train_mode, untraceable=self._untraceable, offloading=self._offloading)

    def _why_not_fast(self, unusable: dict[str, str] | None = None) -> Callable[[str], str | None]:
        """Why the fast path cannot measure a parameter (:func:`~._engine_choice.fast_refusal`, or ``unusable``:
        found in a pass), for the refusals of an engine other than the fast one (Accelerate's offloading, ZeRO-3,
        FSDP), so that they suggest the fast engine only where it can run."""
        def why(name: str) -> str | None:
            return (unusable or {}).get(name) or fast_refusal(self.model, name, self.sites[name], self.params[name],
                                                              self.train_mode)
        return why

    def _other_fast(self, refused: list[str]) -> str | None:
        """Another parameter of the model whose fast path can run (:func:`~._engine_choice.other_fast_matrix`), for
        the refusals that suggest "other matrices" when the refused parameters' own fast paths cannot."""
        return other_fast_matrix(self.model, self.train_mode, refused)

    def _refuse_offloaded(self, unusable: dict[str, str] | None = None) -> None:
        """:func:`~spectral_lens._offload.refuse_offloaded`, told :meth:`_why_not_fast`."""
        refuse_offloaded(self.model, self.engines_, why_not_fast=self._why_not_fast(unusable), other_fast=self._other_fast)

    def _forget_head_loss(self) -> None:
        """Drop the head-loss decision (the model, its layers or the adapter changed): made again as at binding."""
        self.head_loss_, self._head_fns = self._initial_head_loss(), None

    @contextlib.contextmanager
    def _trained_loss(self, label_smoothing: float):
        """The default loss label-smoothed by ``label_smoothing`` inside the block (an integration's: the loss the
        trainer trains on, e.g. Hugging Face's ``label_smoothing_factor``): :func:`causal_lm_loss`'s
        ``label_smoothing`` on the materialized logits, :func:`~spectral_lens.gradients.causal_lm_head_loss`'s on the
        chunked head loss, chosen by ``head_loss`` as for the plain loss (decided again in the block). The default
        loss and the head-loss decision are back afterwards. A probe with a user's ``loss_fn`` or ``forward_fn`` is
        left as it is, and so is one built with its own ``label_smoothing``."""
        if self._custom_loss is not None or self._custom_forward is not None or self.label_smoothing:
            yield
            return
        saved = self.loss_fn, self.head_loss_, self._head_fns, self._label_smoothing
        self._label_smoothing = float(label_smoothing)
        self.loss_fn = functools.partial(causal_lm_loss, ignore_index=self.ignore_index,
                                         label_smoothing=self._label_smoothing)
        self._forget_head_loss()
        try:
            yield
        finally:
            self.loss_fn, self.head_loss_, self._head_fns, self._label_smoothing = saved

    def _initial_head_loss(self) -> str | None:
        """The head-loss decision known without the model's output; ``None``: decided at the first update."""
        if self._custom_loss is not None or self._custom_forward is not None:
            return "custom: loss_fn/forward_fn given, used as they are (the probe never replaces a user's loss)"
        if self.head_loss == "materialized":
            return "materialized: head_loss='materialized'"
        model = getattr(self, "model", None)
        if model is not None and zero3_partitioned(model):
            why = ("the model is partitioned by DeepSpeed ZeRO stage 3: the chunked loss reads the head's weight "
                   "outside the head's forward, where it is an empty placeholder")
            if self.head_loss == "chunked":
                raise ValueError(f"head_loss='chunked' impossible for {type(model).__name__}: {why}; use "
                                 "head_loss='auto' or 'materialized'")
            return f"materialized: {why}"
        return None

    def _decide_without_forward(self) -> None:
        """``head_loss="auto"`` where the chunked path is the slower one: materialized, no check needed."""
        if self.head_loss == "auto" and not chunked_is_faster(self.device):
            # exact either way; without the Triton kernels the chunked body is the slower one (measured)
            self.head_loss_ = (f"materialized: the chunked head + loss is slower without its Triton kernels "
                               f"(on {self.device.type}); head_loss='chunked' forces it")

    def _settle_head_loss(self, head: str | None, reason: str) -> None:
        """Record the head-loss decision from a :class:`~spectral_lens.gradients.fused_head.HeadWatch`
        verdict; ``head_loss="chunked"`` with no provable head raises its reason."""
        if head is None:
            if self.head_loss == "chunked":
                raise ValueError(
                    f"head_loss='chunked' impossible for {type(self.model).__name__}: {reason}; "
                    "use head_loss='auto' or 'materialized'"
                )
            self.head_loss_ = f"materialized: {reason}"
            return
        fns = chunked_head_fns(self.model, head, self.ignore_index, forward=self.forward_fn,
                               label_smoothing=self._label_smoothing)
        self._head_fns = (fns["forward_fn"], fns["loss_fn"])
        self.head_loss_ = f"chunked ({head})"

    def _decide_head_loss(self, sample: Any, devices) -> None:
        """The decision by a forward of its own: one no-grad forward of ``sample`` (one sequence), for
        probes whose first chunk does not run on the fast engine alone (see :meth:`_deciding_fns`).
        Runs inside :meth:`_isolated`, on its own forked RNG so the measurement's dropout masks are
        unchanged."""
        with forked_rng(devices):
            head, reason = find_chunkable_head(
                self.model, lambda: self.forward_fn(self.model, sample), self.params.values()
            )
        self._rewind_buffers()  # the measured passes start from the same buffers
        self._settle_head_loss(head, reason)

    def _deciding_fns(self) -> tuple[Callable, Callable]:
        """``forward_fn`` / ``loss_fn`` for the first chunk while the head-loss decision is pending, on
        the fast engine: that chunk's own forward runs inside a
        :class:`~spectral_lens.gradients.fused_head.HeadWatch`, and its loss settles the decision from
        what the watch saw. Chunked: the chunk's loss is the chunked loss of the head's input, which
        is the tensor the chunked path's forward returns, so the chunk's rows are the chunked path's
        (the head's own product in this forward is the one extra cost, no extra forward).
        Materialized: the default loss of the forward's output, the materialized path itself. (When
        another ``nn.Linear`` ran after the head, its input is not kept: that one chunk takes the
        default loss, equal to the chunked one up to the rounding in ``fused_head``'s docstring.)
        The forward's output travels in a list that the loss empties, so the full logits are freed
        before the chunked loss runs."""
        watch = HeadWatch(self.model)  # built outside the pass: the cast cache patches forwards inside it

        def forward_fn(model: nn.Module, batch: Any) -> list:
            with watch:
                return [self.forward_fn(model, batch)]

        def loss_fn(held: list, batch: Any) -> torch.Tensor:
            out = held.pop()
            head, reason, hidden = watch.verdict(out, self.params.values())
            self._settle_head_loss(head, reason)
            if hidden is None:
                return self.loss_fn(out, batch)
            del out  # the full logits go here; the graph keeps what the backward needs
            return self._head_fns[1](hidden, batch)

        return forward_fn, loss_fn

    def _loss_fns(self) -> tuple[Callable, Callable]:
        """The ``(forward_fn, loss_fn)`` the engines use now that the head-loss decision is made."""
        return self._head_fns or (self.forward_fn, self.loss_fn)

    def _row_dtype(self, name: str) -> torch.dtype:
        if self.storage_dtype is not None:
            return self.storage_dtype
        return torch.float64 if self.params[name].dtype == torch.float64 else torch.float32

    @property
    def device(self) -> torch.device:
        """Device of the first probed parameter (batches are moved there); for a weight offloaded by Accelerate
        (a meta placeholder between forwards), the execution device its hook materializes it on."""
        name, p = next(iter(self.params.items()))
        return (offload_device(self.model, name) or p.device) if p.device.type == "meta" else p.device

    # ----------------------------------------------------------------------------- state
    def reset(self) -> "PerSampleGradientProbe":
        """Forget every sample (the configuration is kept)."""
        self.n_samples_ = 0
        # float64 Gram matrices, sized (M, M) by _complete only (an update writes none: no O(M^2) growth per update)
        self._gram: dict[str, torch.Tensor | None] = {n: None for n in self.params}
        self._gram_device: torch.device | None = None  # where the Gram matrices live: the last update's device
        self._rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.params}  # resident chunks only
        self._chunks: list[_Chunk] = []
        self._losses: list[torch.Tensor] = []
        self._finite: list[tuple[str, torch.Tensor]] = []  # per-chunk row finiteness, checked per update
        self._filled = 0  # leading resident rows whose Gram entries among themselves are complete
        self._far_done: set[tuple[int, int]] = set()  # non-resident chunk pairs whose block is filled
        # (ids, version counters) of the model's parameters at the last update (_parameter_versions), and the
        # optimizer step count then (_optimizer_steps)
        self._versions: tuple[tuple[int, ...], tuple[int, ...], int] | None = None
        self._mixed_warned = False  # MixedWeightsWarning given in this accumulation
        self._rows_smoothing: set[float] = set()  # the default loss's label smoothing of the samples held (metadata)
        # parameters with rows from the fast path among the samples held -> the sample counts of those chunks
        self._fast_rows: dict[str, set[int] | None] = {}  # None: counts not recorded (an older pickle)
        self._sync_counting()
        return self

    def __getstate__(self) -> dict[str, Any]:
        # pickle / copy.deepcopy (a model keeping its probe as an attribute): a copied finalizer is dead, so the
        # copy takes its own hold of the step hook (__setstate__). The chunked head loss's functions close over the
        # head module it was decided on (a copy would measure the original model's head; a pickle fails on them):
        # the copy decides again on its own model, at its next update
        # the lens's hook around recomputations (set during its compute only: a copy made then, from a model's hook or
        # another thread, would run the original's peers' rounds) is not copied
        state = {**self.__dict__, "_counting": None, "_around_recompute": None}
        if self._head_fns is not None:
            state.update(_head_fns=None, head_loss_=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a probe pickled before label smoothing existed: unsmoothed, its rows of unrecorded smoothing; before review
        # 30 (tpbounded): no hook around recomputations
        self.__dict__.update({"label_smoothing": 0.0, "_label_smoothing": 0.0, "_rows_smoothing": set(),
                              "_layouts": set(), "_fast_rows": {}, "_around_recompute": None, **state})
        if isinstance(self._fast_rows, set):  # pickled by review 30's gradchunks pass: chunk sizes not recorded
            self._fast_rows = dict.fromkeys(self._fast_rows)
        self._sync_counting()

    def _sync_counting(self) -> None:
        """Hold the global optimizer step hook exactly while an accumulation is under way (``_versions`` set, from
        the first update until :meth:`reset`, :meth:`detach`, a failed first update, or garbage collection: a
        ``weakref.finalize``), so that no hook is left behind by a probe holding no rows."""
        held = getattr(self, "_counting", None)
        if self._versions is not None and held is None:
            self._counting = weakref.finalize(self, _release_counting, _hold_counting())
        elif self._versions is None and held is not None:
            self._counting = None
            held()  # runs _release_counting once, and detaches the finalizer

    def _snapshot(self):
        """What :meth:`update` may change, for :meth:`_restore`, in time independent of ``M``: an update only
        appends to the row, chunk and loss lists (their objects and lengths are kept, not copies), and
        writes neither the Gram tensors nor ``_far_done`` nor an earlier chunk (its non-resident chunks'
        Gram blocks wait on the new chunks until :meth:`_complete`)."""
        return (self.n_samples_, dict(self._gram), self._gram_device, {n: (r, len(r)) for n, r in self._rows.items()},
                (self._chunks, len(self._chunks)), (self._losses, len(self._losses)), self._filled, self._far_done,
                self._versions, dict(self.engines_), self.head_loss_, self._head_fns, set(self._rows_smoothing),
                {k: v if v is None else set(v) for k, v in self._fast_rows.items()})

    def _restore(self, snap) -> None:
        (self.n_samples_, self._gram, self._gram_device, rows, chunks, losses, self._filled, self._far_done,
         self._versions, self.engines_, self.head_loss_, self._head_fns, self._rows_smoothing, self._fast_rows) = snap
        for kept, n in (*rows.values(), chunks, losses):
            del kept[n:]
        self._rows = {name: kept for name, (kept, _) in rows.items()}
        self._chunks, self._losses = chunks[0], losses[0]
        self._finite = []

    @contextlib.contextmanager
    def _isolated(self):
        """Eval (or train) mode, forked RNG streams (torch, Python ``random``, numpy), buffers preserved,
        the user's module backward hooks switched off (:func:`~._isolation.silenced_module_backward_hooks`;
        the engines switch parameter hooks off around each ``torch.autograd.grad``,
        :func:`~._isolation.silenced_tensor_hooks`),
        autocast as ``autocast_dtype`` says (a caller's autocast switched off when it is ``None``); every
        flag restored on exit."""
        # one walk over the model per update (module_list), its list shared by every part below (each walked
        # the model itself: five walks per update, ~160 named_modules generator steps on a 2-block GPT); read
        # afresh at every update, so a module added or replaced, a flag toggled or a hook added between updates
        # is seen as before
        modules = module_list(self.model)
        # sharded after the probe was bound (fully_shard works in place): found in the module list (no walk)
        refuse_fsdp(self.model, self.engines_, modules, self.params, self._why_not_fast(), self._other_fast)
        # partitioned after binding (ZeRO-3 partitions every parameter, so the probed ones tell: no walk over the
        # model's modules on every update, ~0.2 ms on a GPT-2-sized model)
        if (self.head_loss_ or "chunked").startswith("chunked") and any(is_zero3(p) for p in self.params.values()):
            self._forget_head_loss()
        if any(p.is_inference() for p in self.params.values()):
            bad = [n for n, p in self.params.items() if p.is_inference()]
            raise RuntimeError(
                f"PerSampleGradientProbe: the probed parameter(s) {bad} are inference tensors (the model was built "
                "or loaded inside torch.inference_mode()), which autograd cannot differentiate; build the model "
                "outside inference_mode"
            )
        if self.train_mode:
            _refuse_recording_opacus_hooks(self.model)
        params = parameter_list(modules)
        if any(isinstance(p, nn.parameter.UninitializedTensorMixin) for p in params):
            lazy = [n for n, p in self.model.named_parameters() if isinstance(p, nn.parameter.UninitializedTensorMixin)]
            raise RuntimeError(
                f"PerSampleGradientProbe: the model's parameter(s) {lazy} are uninitialized (a lazy module such as "
                "nn.LazyLinear that has not run yet; its shapes are set by its first forward): run the model once on "
                "a batch before update()"
            )
        self._modules = modules
        modes = [(m, m.training) for m in modules]
        # the modes are set only when some flag is to change (the usual eval-mode model measured in eval mode:
        # no second walk over the modules per update, which a pool of one-sequence batches pays per sequence);
        # on exit only the flags that differ are set back
        switch = any(training != self.train_mode for _, training in modes)
        flags = [(p, p.requires_grad) for p in params]
        self._every = params  # the fast engine's flag switching reuses the list per chunk
        # Accelerate's meta placeholders: their names, to restore the flag on the ones the model holds afterwards
        named = [n for n, _ in self.model.named_parameters()] if any(p.is_meta for p in params) else None
        dev = self.device
        devices = self._devices = cuda_devices(self.model, params)
        cast = measurement_autocast(dev, self.autocast_dtype)
        called_train = False
        try:
            with forked_rng(devices) as self._forked, preserved_buffers(self.model, modules) as self._rewind_buffers, \
                    silenced_module_backward_hooks(self.model, modules), cast, \
                    eager_forwards(), measurement_pass():
                if switch:  # model.train(), or its flags directly
                    called_train = set_training(self.model, modules, self.train_mode)
                yield devices
            if self._versions is not None:  # bumped by the pass's own writes, undone on exit: not the user's
                self._versions = (*self._parameter_versions(params), self._versions[2])
        finally:
            self._every = self._rewind_buffers = self._devices = self._modules = self._forked = None
            try:
                # an override's side effects of the switch undone by the override itself (a Hugging Face model
                # with use_kernels re-kernelizes for the mode; PEFT's DoRA layer clears its cache): model.train()
                # with the model's own mode before, then every flag as it was
                if called_train:
                    self.model.train(modes[0][1])
            finally:
                restore_training(modes)
                for p, flag in flags:
                    p.requires_grad_(flag)
                # Accelerate's offloading hooks put a new meta placeholder in place of each offloaded parameter
                # after every forward, created with the flag it had during the pass (the engines' False): the
                # flag is restored on the parameter the model holds now, too
                if named is not None:
                    live = dict(self.model.named_parameters())
                    for n, (p, flag) in zip(named, flags):
                        q = live.get(n)
                        if q is not None and q is not p and q.requires_grad != flag:
                            q.requires_grad_(flag)

    def _parameter_versions(self, params: list[torch.Tensor] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids and version counters of the model's parameters (``params``: their list, else walked). An
        inference tensor, which has no counter, counts as ``-1`` (the probe refuses one only where it is probed)."""
        params = parameter_list(module_list(self.model)) if params is None else params
        try:
            versions = tuple(p._version for p in params)
        except RuntimeError:  # "Inference tensors do not track version counter"
            versions = tuple(-1 if p.is_inference() else p._version for p in params)
        return tuple(map(id, params)), versions

    def _check_versions(self, params: list[torch.Tensor] | None = None) -> None:
        """Weights changed since the last update: parameters written in place (their version counters moved; the
        probe's own passes re-read the counters on exit from :meth:`_isolated`) or stepped by a
        ``torch.optim.Optimizer`` (:func:`_optimizer_steps`: a fused optimizer moves no counter).
        ``RuntimeError`` in bounded-memory mode, whose recomputation would mix checkpoints; otherwise a
        :class:`~spectral_lens.MixedWeightsWarning` naming them, once per accumulation (the rows taken so far
        are the old weights'). A parameter replaced by a new tensor is not counted here (:meth:`_follow_params`)."""
        ids, versions = self._parameter_versions(params)
        if self._versions is None:  # an accumulation starts: its steps are counted from here on (hook held first)
            self._versions = (ids, versions, -1)
            self._sync_counting()
            self._versions = (ids, versions, _optimizer_steps())
            return
        before, self._versions = self._versions, (ids, versions, _optimizer_steps())
        moved = before[1] != versions
        stepped = _stepped_parameters(before[2], set(ids)) if self._versions[2] != before[2] else set()
        if not (moved or stepped):
            return
        if self.max_resident_samples is not None:
            self._versions = before
            raise RuntimeError(
                "model parameters were modified in place since the first update(); bounded-memory mode "
                "(max_resident_samples) recomputes earlier samples and would mix checkpoints. Call reset()."
            )
        if self._mixed_warned or not self.n_samples_:
            return
        old = dict(zip(before[0], before[1]))
        changed = stepped | {i for i, v in zip(ids, versions) if old.get(i, v) != v}
        if not changed:  # parameters added or replaced, none written in place
            return
        names = [n for n, p in self.model.named_parameters() if id(p) in changed]
        shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        self._mixed_warned = True
        warnings.warn(
            f"PerSampleGradientProbe: the model's weights changed since the probe's {self.n_samples_} samples were "
            f"taken ({len(names)} parameter(s): {shown}; written in place or stepped by an optimizer): the spectrum "
            "will mix per-sample gradients from different weights. Call reset() between checkpoints "
            "(SpectralLens.measure does); to accumulate across steps on purpose, filter this warning "
            "(warnings.filterwarnings('ignore', category=spectral_lens.MixedWeightsWarning)). Warned once until reset()",
            MixedWeightsWarning,
            stacklevel=3,
        )

    # ----------------------------------------------------------------------------- gradients
    def _gradients(
        self, batch: Any, n: int, casts: cast_cache.CastCache | None = None, rng: tuple | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, str]]:
        """Rows (n, P) in storage dtype for every probed parameter, the n losses, and the parameters the fast
        path refused in this pass for their input's layout, with the reason (:class:`~.engines.LayoutRefusal`).
        ``casts``: the autocast casts shared by the chunks of one update (fast engine only). ``rng``: in
        bounded-memory mode, the RNG state (:func:`~._isolation.rng_state`) the streams are in now, where the
        caller has just taken or set it (a non-resident chunk's: not taken a second time)."""
        rows: dict[str, torch.Tensor] = {}
        losses = None
        # every pass starts from the buffers the measurement found (preserved_buffers' rewind after each
        # engine's pass, and after each sample's in the loop engine): a forward that writes a buffer it reads
        # (a counter, a renormalization by running statistics) made the rows depend on chunk_size and engine
        # bounded memory: every engine pass starts from the chunk's RNG state, so the draws do not depend
        # on which passes ran before it (a fallback or engine switch in the first computation, which a
        # recomputation on the settled engines does not repeat)
        rewind = None
        if self.max_resident_samples is not None:
            devices = self._devices  # _isolated's
            start = rng_state(devices) if rng is None else rng
            rewind = lambda: set_rng_state(start, devices)  # noqa: E731
        fast = {k: self.sites[k] for k, e in self.engines_.items() if e == "fast"}
        layout: dict[str, str] = {}
        if fast:
            forward_fn, loss_fn = self._deciding_fns() if self.head_loss_ is None else self._loss_fns()
            got, losses, not_called = fast_engine(self.model, fast, batch, n, forward_fn, loss_fn, casts, self._every,
                                                 self._loss_scale, self._layouts)
            self._rewind_buffers()
            rows.update(got)
            layout = {k: why for k, why in not_called.items() if isinstance(why, LayoutRefusal)}
            self._refuse_kept_fast_rows(layout)
            for k, why in not_called.items():
                if self.engine == "fast":
                    refuse_fast(self.model, k, why, self._untraceable, self._offloading, train_mode=self.train_mode)
                # the loop where vmap cannot trace the model (Accelerate's hooks, a PEFT LoHa layer, running statistics
                # updated in place), as "auto" chooses at binding
                self.engines_[k] = general_engine(self._untraceable, self._offloading,
                                                  running_statistics(self.model, self.train_mode))
            if not_called:  # vmap cannot measure a ZeRO-3, FSDP-sharded or offloaded parameter: refused before its pass
                refuse_fsdp(self.model, self.engines_, params=self.params, why_not_fast=self._why_not_fast(not_called),
                            other_fast=self._other_fast)
                self._refuse_offloaded(not_called)
        forward_fn, loss_fn = self._loss_fns()  # decided by now (by the fast engine's forward, or before)
        for kind in ("vmap", "loop"):
            todo = {k: self.params[k] for k, e in self.engines_.items() if e == kind and k not in rows}
            if todo and rewind is not None:
                rewind()
            if todo and kind == "vmap":
                got, lo, fell_back = vmap_or_loop(self.model, todo, batch, n, forward_fn, loss_fn,
                                                  fallback=self.engine != "vmap", before_loop=rewind,
                                                  after_sample=self._rewind_buffers, loss_scale=self._row_loss_scale)
                self._rewind_buffers()
                if fell_back:
                    self.engines_.update({k: "loop" for k in todo})
            elif todo:
                got, lo = loop_engine(self.model, todo, batch, n, forward_fn, loss_fn, self._rewind_buffers,
                                     self._row_loss_scale)
            if todo:
                rows.update(got)
                losses = lo if losses is None else losses
        return {k: rows[k].to(self._row_dtype(k)) for k in self.params}, losses, layout

    def _refuse_kept_fast_rows(self, layout: dict[str, str]) -> None:
        """``RuntimeError`` where a parameter the fast path measured in earlier updates is refused now for its
        input's layout (``layout``: name -> reason) in a way that shows the earlier acceptance was a coincidence
        (dimension 0 of the input equal to the chunk size without being the sample index:
        :func:`~.engines.coincidence`), so the rows held are wrong, and the batches of those updates are not kept
        to measure them again (bounded-memory mode keeps none for its resident rows)."""
        kept = [k for k, why in layout.items() if k in self._fast_rows and coincidence(why, self._fast_rows[k])]
        if kept:
            k = kept[0]
            raise RuntimeError(
                f"PerSampleGradientProbe: {k}: the fast path measured it for the {self.n_samples_} samples of earlier "
                f"updates, and now refuses it: {layout[k]}. The earlier chunks passed only by coincidence (dimension 0 "
                "of the input equal to their chunk size without being the sample index), so the rows held are wrong, "
                "and their batches are not kept to measure them again. Call reset() and measure with engine='vmap' "
                "(a new PerSampleGradientProbe(..., engine='vmap'), or leave this parameter out of params)"
            )

    def _chunk_rows(self, chunk: _Chunk, devices, casts) -> dict[str, torch.Tensor]:
        """Recompute a non-resident chunk's rows, replaying its RNG states (torch CPU and CUDA, Python's
        ``random``, numpy's global generator: the forward draws what it drew the first time); its forwards inside
        ``_around_recompute()`` where a caller set one."""
        set_rng_state(chunk.rng, devices)
        with contextlib.nullcontext() if self._around_recompute is None else self._around_recompute():
            return self._gradients(chunk.batch, chunk.stop - chunk.start, casts, chunk.rng)[0]

    def _measure(self, batch: Any, n: int, casts: cast_cache.CastCache | None, devices) -> None:
        """Add the update's chunks. A parameter the fast path accepted in an earlier chunk of the update and
        refuses in a later one for its input's layout in a way that shows the acceptance was a coincidence (a shared
        or gathered tensor with as many rows as that chunk had samples: :func:`~.engines.coincidence`; a refused
        ``(T, d)`` of a batch of one sequence is none) has wrong rows in the earlier chunks: the update's chunks are
        then all measured again, from the RNG state and buffers the update started from, with the engines as they
        are now, as if that parameter had left the fast path at the first chunk (at most once per parameter: it
        stays off it). Rows of earlier updates cannot be measured again: :meth:`_refuse_kept_fast_rows`."""
        begin = (len(self._chunks), {k: len(r) for k, r in self._rows.items()}, len(self._losses), len(self._finite),
                 self.n_samples_)
        s, accepted = 0, {}  # name -> the sample counts of the chunks the fast path served it in
        while s < n:
            e = min(n, s + self.chunk_size)
            sub = slice_batch(batch, s, e)
            chunk = _Chunk(self.n_samples_, self.n_samples_ + e - s)
            if not self._fits(e - s):  # keep what recomputation needs instead of the rows
                chunk.batch = map_tensors(torch.clone, sub)
                chunk.rng = rng_state(devices)
            fast = [k for k, engine in self.engines_.items() if engine == "fast"]
            rows, losses, layout = self._gradients(sub, e - s, casts, chunk.rng)
            if any(coincidence(why, accepted.get(k, ())) for k, why in layout.items()):  # measure it again:
                # drop its chunks, rewind its RNG streams
                del self._chunks[begin[0]:], self._losses[begin[2]:], self._finite[begin[3]:]
                for k, r in self._rows.items():
                    del r[begin[1][k]:]
                self.n_samples_ = begin[4]
                set_rng_state(self._forked, devices)  # the streams as the update found them: nothing drew before
                s, accepted = 0, {}
                continue
            for k in fast:
                if self.engines_[k] == "fast":
                    accepted.setdefault(k, set()).add(e - s)
            self._add_chunk(chunk, rows, losses)
            s = e
        for k, sizes in accepted.items():
            kept = self._fast_rows.get(k, set())
            self._fast_rows[k] = None if kept is None else kept | sizes

    def _casts(self, passes: int) -> cast_cache.CastCache | None:
        """A cast cache for ``passes`` forward passes of one call; none for a single pass (nothing to
        reuse, and no copies held)."""
        return cast_cache.CastCache(self.model, self._modules) if cast_cache.ENABLED and passes > 1 else None

    # ----------------------------------------------------------------------------- public API
    def update(self, batch: Any) -> "PerSampleGradientProbe":
        """Add the per-sample gradients of every sample (sequence) in ``batch``.

        ``batch``: what ``forward_fn``/``loss_fn`` take (default: ``(input_ids, targets)``, a dict with
        ``input_ids``/``labels``, or ``input_ids``), sample index in dimension 0 of every tensor. Any
        other mapping (a Hugging Face ``BatchEncoding``) is taken as the plain ``dict`` of its items,
        which is what ``forward_fn``/``loss_fn`` then receive. With the default ``forward_fn``, a packed
        batch (``DataCollatorWithFlattening``) is read as the padded batch of its documents, one sample
        each (:func:`~spectral_lens.gradients._batch.batch_as_run`); a ``forward_fn`` of your own gets it
        as given. Tensors made under
        ``torch.inference_mode()`` are copied to normal tensors (autograd cannot save them). On an exception the probe is left
        exactly as before the call. Returns ``self``. The probed parameters are read from the model
        by name at each call (:meth:`_follow_params`): a replaced parameter or module is followed. Weights
        changed since the previous call (written in place, or stepped by a ``torch.optim`` optimizer) warn once
        until :meth:`reset` with a :class:`~spectral_lens.MixedWeightsWarning` (a ``RuntimeError`` in
        bounded-memory mode): the rows would mix checkpoints (:meth:`_check_versions`).
        Inside ``torch.inference_mode()`` (an evaluation loop) it works as inside ``torch.no_grad()``:
        the probe's state and passes are made outside inference mode.
        """
        if torch.is_inference_mode_enabled():  # its tensors could not be written or differentiated later
            with torch.inference_mode(False):
                return self.update(batch)
        self._require_model("update()")
        self._follow_params()
        dev = self.device
        if any(p.is_meta for p in self.params.values()):  # offloaded after binding (a placeholder, followed above)
            self._refuse_offloaded()
        if dev.type == "meta":
            name = next(iter(self.params))
            raise RuntimeError(
                f"PerSampleGradientProbe: the probed parameter {name!r} is on the meta device (a shape without "
                "data): the model's weights were never materialized; load them (e.g. model.to_empty(device=...) "
                "and load_state_dict) before update()"
            )
        batch = batch_as_run(batch, self.forward_fn)  # a packed batch as its documents (default forward)
        n = batch_size(batch)
        batch = map_tensors(lambda t: _autograd_usable(t.to(dev, non_blocking=True)), batch)
        snap, start, first = self._snapshot(), self.n_samples_, len(self._losses)
        try:
            self._gram_device = dev  # the Gram matrices are sized and filled there by _complete
            with self._isolated() as devices:
                self._check_versions(self._every)  # before this update's passes (their own writes re-read on exit)
                if self.head_loss_ is None and n > 0:
                    self._decide_without_forward()
                if self.head_loss_ is None and n > 0 and any(e != "fast" for e in self.engines_.values()):
                    # the vmap and loop engines: a check forward of one sequence (on the fast engine
                    # alone the first chunk's own forward decides, _deciding_fns)
                    self._decide_head_loss(slice_batch(batch, 0, 1), devices)
                self._measure(batch, n, casts=self._casts(-(-n // self.chunk_size)), devices=devices)
            self._check_new(start, first)
        except BaseException:
            self._restore(snap)
            self._sync_counting()  # a failed first update holds no accumulation, nor the step hook
            raise
        return self

    def _hold(self, rows: torch.Tensor) -> torch.Tensor:
        """Resident rows as kept: on the device, or copied to pinned host memory without a sync (the
        copy is stream-ordered, and the host reads it only after update()'s own sync)."""
        if not self.offload_rows or rows.device.type == "cpu":
            return rows
        host = torch.empty(rows.shape, dtype=rows.dtype, device="cpu", pin_memory=True)
        return host.copy_(rows, non_blocking=True)

    def _fits(self, n: int) -> bool:
        """Whether the next chunk of ``n`` rows stays resident. Resident chunks form a prefix, so every
        later chunk meets all of them at its own creation and only non-resident pairs are left over."""
        if self.max_resident_samples is None:
            return True
        if self._chunks and not self._chunks[-1].resident:
            return False
        return self.n_samples_ + n <= self.max_resident_samples

    def _add_chunk(self, chunk: _Chunk, rows: dict[str, torch.Tensor], losses: torch.Tensor) -> None:
        """Record a chunk. Resident rows are kept and their Gram entries deferred to one blocked fill;
        a non-resident chunk gets its blocks against itself and every resident row now (its rows are not
        kept), held on the chunk until :meth:`_complete` writes them into the Gram matrix."""
        e = chunk.stop
        if not chunk.resident:
            chunk.blocks = {}
        for name, r in rows.items():
            self._finite.append((name, finite_rows(r)))
            if chunk.resident:
                self._rows[name].append(self._hold(r))
                continue
            br = block_rows_for(r.shape[1])
            own = symmetrized(gram_against(r, [r], br))
            cross = gram_against(r, self._rows[name], br) if self._rows[name] else None
            chunk.blocks[name] = (own, cross)
        self._chunks.append(chunk)
        self._losses.append(losses.detach().to(torch.float64))
        self.n_samples_ = e
        chunk.smoothing = self._label_smoothing
        self._rows_smoothing.add(self._label_smoothing)

    def _check_new(self, start: int, first: int) -> None:
        """One host sync per update: non-finite losses or gradients among the new samples (from sample
        ``start``, whose losses begin at ``self._losses[first]``: only the update's own are joined)."""
        finite, self._finite = self._finite, []
        if self.n_samples_ == start:
            return
        losses = torch.cat(self._losses[first:]).cpu()
        bad = (~torch.isfinite(losses)).nonzero().flatten() + start
        if bad.numel():
            message = nonfinite_loss_message(bad.tolist(), list(self.params), self._custom_loss)
            if self._label_smoothing and bool(torch.isposinf(losses).any()):
                whose = "label_smoothing" if self.label_smoothing else "the trainer's"
                message += (f"; the default loss is label-smoothed (eps={self._label_smoothing:g}, {whose}): a "
                            "logit of -inf (a vocabulary masked or padded by a -inf bias) makes the mean of -log p over "
                            "the vocabulary +inf, in F.cross_entropy and Hugging Face's LabelSmoother too")
            raise NonFiniteError(message)
        for name in self.params:
            ok = torch.cat([f for n, f in finite if n == name]).cpu()
            bad = (~ok).nonzero().flatten() + start
            if bad.numel():
                raise NonFiniteError(f"{name}: non-finite per-sample gradient for sample(s) {bad.tolist()[:20]}"
                                     f"{half_hint(self.model, self.params[name], self.autocast_dtype)}")

    def _complete(self) -> None:
        """Fill the Gram entries still missing: resident rows by float64 blocks (column slabs on the CPU
        or from host memory), then the blocks between non-resident chunks (bounded-memory mode) by
        recomputing their gradients panel by panel."""
        if torch.is_inference_mode_enabled():  # as in update: the state stays made of normal tensors
            with torch.inference_mode(False):
                return self._complete()
        for name, k in self._gram.items():  # (M, M), zero-padded: updates only add samples
            if k is None or k.shape[0] < self.n_samples_ or k.device != self._gram_device:
                self._gram[name] = grow_square(k, self.n_samples_, self._gram_device)
        for c in self._chunks:  # the non-resident chunks' blocks computed by their updates
            for name, (own, cross) in (c.blocks or {}).items():
                k = self._gram[name]
                k[c.start : c.stop, c.start : c.stop] = own
                if cross is not None:
                    k[c.start : c.stop, : cross.shape[1]] = cross
                    k[: cross.shape[1], c.start : c.stop] = cross.t()
            c.blocks = None
        n_res = sum(c.stop - c.start for c in self._chunks if c.resident)
        if self._filled < n_res:
            for name, blocks in self._rows.items():
                k = self._gram[name]
                if blocks and blocks[0].device != k.device:  # offloaded rows: one pass over G
                    fill_gram_by_columns(k, blocks, self._filled, GRAM_BLOCK_ELEMENTS // max(1, k.shape[0]))
                elif blocks and k.device.type == "cpu":  # one float64 slab in cache, no fresh row copies
                    fill_gram_by_columns(k, blocks, self._filled, CPU_SLAB_ELEMENTS // max(1, k.shape[0]))
                else:
                    fill_gram(k, blocks, self._filled, block_rows_for(whole_shape(self.params[name]).numel()))
            self._filled = n_res
        far = [i for i, c in enumerate(self._chunks) if not c.resident]
        missing = lambda i, j: i != j and (min(i, j), max(i, j)) not in self._far_done  # noqa: E731
        if not any(missing(i, j) for i in far for j in far):
            return
        self._follow_params()  # a replaced parameter raises here: recomputing with it would mix weights
        self._check_versions()
        self._check_recomputed_loss(far)
        with self._isolated() as devices:
            casts = self._casts(2)  # every non-resident chunk is recomputed at least once more
            while True:
                pending = [i for i in far if any(missing(i, j) for j in far)]
                if not pending:
                    break
                panel, size = {}, 0  # up to max_resident_samples rows held at once
                for i in pending:
                    c = self._chunks[i]
                    if panel and size + (c.stop - c.start) > self.max_resident_samples:
                        break
                    panel[i] = self._chunk_rows(c, devices, casts)
                    size += c.stop - c.start
                for i in far:
                    todo = [j for j in panel if missing(i, j)]
                    if not todo:
                        continue
                    rows_i = panel[i] if i in panel else self._chunk_rows(self._chunks[i], devices, casts)
                    for j in todo:
                        a, b = self._chunks[i], self._chunks[j]
                        for name in self.params:
                            blk = gram_against(rows_i[name], [panel[j][name]], block_rows_for(whole_shape(self.params[name]).numel()))
                            self._gram[name][a.start : a.stop, b.start : b.stop] = blk
                            self._gram[name][b.start : b.stop, a.start : a.stop] = blk.t()
                        self._far_done.add((min(i, j), max(i, j)))

    def _check_recomputed_loss(self, far: list[int]) -> None:
        """Bounded-memory mode recomputes non-resident chunks with the default loss of now: refused where one was
        measured with another label smoothing (inside an integration's :meth:`_trained_loss`, computed after the
        block with new samples), whose Gram blocks would mix the gradients of two losses."""
        other = sorted({c.smoothing for c in (self._chunks[i] for i in far)} - {self._label_smoothing})
        if other:
            raise RuntimeError(
                f"PerSampleGradientProbe: bounded-memory mode (max_resident_samples) must recompute samples measured "
                f"with the default loss at label smoothing {', '.join(f'{e:g}' for e in other)}, but the default loss "
                f"now has label smoothing {self._label_smoothing:g} (an integration's smoothing ends with its "
                "measurement): recomputing them would mix two losses' gradients. Call reset() before adding samples "
                "with another loss (compute() inside the integration's measurement needs no recomputation later)"
            )

    def _check_grams(self) -> None:
        """``NonFiniteError`` naming the parameters whose Gram matrix holds NaN/Inf. Each update has
        checked the losses and the per-sample gradients finite, so such a matrix means gradients whose
        float64 inner products overflow (a squared norm above ~1.8e308): huge or diverged weights.
        (It failed inside the eigen-solve, with a message naming only the matrix shape.)"""
        bad = [name for name in self.params if not all_finite(self._gram[name])]  # no M x M masks
        if not bad:
            return
        sizes = ((float(p.detach().abs().max()), n) for n, p in self.model.named_parameters() if p.numel())
        top, where = max(sizes, key=lambda t: math.inf if math.isnan(t[0]) else t[0])
        raise NonFiniteError(
            f"PerSampleGradientProbe: the per-sample gradient Gram matrix of {bad} holds NaN/Inf: the "
            f"{self.n_samples_} losses and per-sample gradients were finite, but their float64 inner products "
            f"overflow (squared gradient norms above ~1.8e308); the largest |weight| in the model is {top:.3g} "
            f"({where}). Check the model for huge or diverged weights (a bad checkpoint or a diverged run), or "
            "scale the loss down in loss_fn (alpha and the spectrum's shape do not change; its values scale by "
            "the square)"
        )

    def _need_samples(self, what: str) -> None:
        self._require_model(what)
        if self.n_samples_ < 2:
            raise ValueError(f"{what} needs at least 2 samples (sequences), got {self.n_samples_}; call update() first")

    def gram(self, name: str | None = None) -> torch.Tensor:
        """The (M, M) float64 Gram matrix ``G G^T`` of parameter ``name`` (default: the only one)."""
        name = self._name(name)
        self._need_samples("gram()")
        self._complete()
        return self._gram[name].clone()

    def matrix(self, name: str | None = None) -> torch.Tensor:
        """``G`` (M, P) in the storage dtype; needs ``keep_matrix=True``. In host memory with ``offload_rows``."""
        if not self.keep_matrix:
            raise RuntimeError("matrix() needs PerSampleGradientProbe(..., keep_matrix=True)")
        name = self._name(name)
        if not self._rows[name]:
            raise ValueError("matrix(): no samples yet; call update() first")
        return torch.cat(self._rows[name])

    def _name(self, name: str | None) -> str:
        if name is None:
            if len(self.params) > 1:
                raise ValueError(f"several parameters are probed, name one of {list(self.params)}")
            return next(iter(self.params))
        if name not in self.params:
            raise KeyError(f"{name!r} is not probed; probed: {list(self.params)}")
        return name

    @property
    def losses_(self) -> torch.Tensor:
        """The per-sample losses ``L_m`` seen so far, (M,) float64 on the CPU."""
        return torch.cat(self._losses).cpu() if self._losses else torch.zeros(0, dtype=torch.float64, device="cpu")

    def compute(self) -> Spectrum | dict[str, Spectrum]:
        """Squared singular values of ``G`` per parameter, as ``Spectrum(kind="gradient")``.

        A single :class:`Spectrum` when one parameter is probed, else ``{name: Spectrum}``.
        ``dim = min(M, P)``; ``metadata`` records the engine, shapes, dtypes and the mean loss.
        """
        self._need_samples("a gradient spectrum")
        self._complete()
        self._check_grams()
        out = {}
        for name, p in self.params.items():
            shape = whole_shape(p)  # ZeRO-3: ds_shape (outside a forward .data is an empty placeholder)
            k = self._gram[name]
            if not bool(torch.diagonal(k).sum() > 0):
                warnings.warn(
                    f"{name}: all {self.n_samples_} per-sample gradients are exactly zero: either nothing upstream "
                    "passes gradient yet (e.g. a zero-initialized head at step 0) or the parameter has no gradient "
                    "path to the loss (unused module, detached output, frozen branch); the spectrum is all zero",
                    ZeroGradientWarning,
                    stacklevel=2,
                )
            out[name] = Spectrum(
                values=gram_spectrum(k, shape.numel()),
                n_rows=self.n_samples_,
                dim=min(self.n_samples_, shape.numel()),
                kind="gradient",
                source=name,
                metadata={
                    "engine": self.engines_[name],
                    # before the long head_loss text: `spectral-lens inspect` shows the first 300 characters
                    **self._smoothing_metadata(),
                    "head_loss": self.head_loss_,
                    "param_shape": list(shape),
                    "n_params": shape.numel(),
                    "storage_dtype": str(self._row_dtype(name)).replace("torch.", ""),
                    "autocast_dtype": None if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", ""),
                    "train_mode": self.train_mode,
                    "mean_loss": float(self.losses_.mean()),
                },
            )
        return out[next(iter(out))] if len(out) == 1 else out

    def _smoothing_metadata(self) -> dict[str, Any]:
        """``{"label_smoothing": eps}`` when the samples held were measured with the label-smoothed default loss
        (an integration's, :meth:`_trained_loss`; a list when the accumulation mixed several), else nothing: the
        spectrum's record says which loss its rows are the gradients of."""
        smoothing = sorted(self._rows_smoothing)
        if not any(smoothing):
            return {}
        return {"label_smoothing": smoothing[0] if len(smoothing) == 1 else smoothing}

    def noise_scale(self) -> NoiseScale | dict[str, NoiseScale]:
        """Gradient noise scale ``B_simple`` per parameter from the same per-sample gradients
        (:func:`~spectral_lens.gradients.noise_scale_from_gram`)."""
        self._need_samples("the noise scale")
        self._complete()
        self._check_grams()
        out = {n: noise_scale_from_gram(self._gram[n], source=n) for n in self.params}
        return out[next(iter(out))] if len(out) == 1 else out

    def __repr__(self) -> str:
        return (
            f"PerSampleGradientProbe(params={list(self.params)}, engines={self.engines_}, head_loss={self.head_loss_!r}, "
            f"n_samples={self.n_samples_}, chunk_size={self.chunk_size})"
        )
