"""Forward hooks that feed module outputs into covariance accumulators: :func:`attach` (one
accumulator per selected module) and :class:`ActivationCapture`, the handle it returns.

Which modules and which tensor of their outputs are chosen by :mod:`spectral_lens.capture`; the
accumulation itself is :class:`~spectral_lens.accumulate.ActivationCovarianceAccumulator`.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from . import _compiled_feed as compiled_feed
from ._blocks import block_hidden_states
from ._compute import _spectrum_of
from ._layout import channels_first, refuse_channels_first
from ._memory import check_rows, output_width
from ._pipeline import metadata_inference
from .accumulate import ActivationCovarianceAccumulator
from .background import SolveFuture, submit
from .capture import (HookSet, Target, _FEEDING, check_pick, display_name, pick_tensor, record_names, select_modules,
                      graph_break_for_hook, recomputed_forward,
                      transformed_forward, unwrap_fabric, warn_if_compiled, refuse_parallel_wrapper_names)
from .spectrum import Spectrum

__all__ = ["ActivationCapture", "attach", "attach_one"]

# accumulator -> (weak reference to the capture whose hook feeds it, "module 'h.1' of TinyLM"); an
# accumulator is attached while that capture is alive and active (its hooks are registered)
_FED_BY: "weakref.WeakKeyDictionary[ActivationCovarianceAccumulator, tuple]" = weakref.WeakKeyDictionary()


def _claim(acc: ActivationCovarianceAccumulator, capture: "ActivationCapture", where: str) -> None:
    """Record that ``capture`` feeds ``acc``; refuse an accumulator that a live capture already feeds
    (a second hook would count every row twice, or mix two modules' rows)."""
    ref, there = _FED_BY.get(acc, (None, None))
    live = ref() if ref is not None else None
    if live is not None and live is not capture and live.active:
        raise ValueError(
            f"ActivationCovarianceAccumulator{f' {acc.name!r}' if acc.name else ''} is already attached to "
            f"{there}; one accumulator is fed by one hook "
            "(attaching it again counts every row twice, or mixes two modules). Call remove() on the "
            "handle of the first attach (or leave its `with` block) before attaching it again, or use "
            "a new accumulator"
        )
    _FED_BY[acc] = (weakref.ref(capture), where)


class _RecordKeyed(dict):
    """A capture's ``{record name: ...}`` (``accumulators``, ``compute()``'s spectra), a plain ``dict`` but for its
    ``KeyError``: a lookup by a module's own name, as a capture was keyed before review 27, names the key it has now;
    any other missing key names the keys there are (before: the bare name)."""

    def __init__(self, items, own: dict[str, str]) -> None:
        super().__init__(items)
        self._own = own  # {a module's own name: its key}, where they differ

    def __missing__(self, key):
        now = self._own.get(key) if isinstance(key, str) else None
        if now is not None and now in self:
            raise KeyError(
                f"{key!r} is now keyed {now!r}: a capture is keyed by the names the lens records (without "
                "_orig_mod / FSDP1 / checkpoint wrapper segments, a PEFT model's as before get_peft_model; until review "
                "27 the module's own name, which is each accumulator's name now; docs/guide-attach.md)")
        raise KeyError(f"{key!r}: not a key of this capture; its keys: {list(self)[:8]}"
                       + (f" (and {len(self) - 8} more)" if len(self) > 8 else ""))


class ActivationCapture(HookSet):
    """Forward hooks feeding selected modules' outputs into one accumulator each.

    Attributes:
        accumulators: ``{module_name: ActivationCovarianceAccumulator}`` in model order, keyed by the names the
            lens's records and ``weight_spectra`` use (:func:`~spectral_lens.capture.record_names`: without the
            ``_orig_mod`` / FSDP1 / checkpoint wrapper segments, a PEFT model's as before ``get_peft_model``);
            each accumulator's ``name`` (its spectrum's ``source``) is the module's own name.

    Use as a context manager (hooks are removed on exit, also on exceptions) or call ``remove()``.
    Set a padding mask for the next forward passes with ``with capture.mask(attention_mask): ...``.
    """

    def __init__(self, accumulators: dict[str, ActivationCovarianceAccumulator], *,
                 own: dict[str, str] | None = None) -> None:
        super().__init__()
        # own: {a module's own name: its key} where they differ, for the KeyError of a lookup by the old key
        self.accumulators = _RecordKeyed(accumulators, dict(own or {}))
        self._mask: torch.Tensor | None = None
        self._widths: dict[str, int | None] = {}  # module_name -> its rows' width where certain before them
        self._modules: dict[str, weakref.ref] = {}  # module_name -> its module, whose device the check reads

    @contextlib.contextmanager
    def mask(self, mask: torch.Tensor | None):
        """Valid-position mask (bool, the module output's leading shape; a ``(B, T)`` mask also fits a
        ``(B*T, d)`` output, flattened row-major) for forwards inside the block."""
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
            got = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"ActivationCapture.mask: mask must be a bool tensor (e.g. attention_mask.bool()) or None, "
                            f"got {got}")
        previous, self._mask = self._mask, mask
        try:
            yield self
        finally:
            self._mask = previous

    def __repr__(self) -> str:
        return f"ActivationCapture({list(self.accumulators)}, active={self.active})"

    def _keyed(self, items: dict) -> dict:
        """``items`` with the accumulators' ``KeyError`` for a module's own name (:class:`_RecordKeyed`)."""
        return _RecordKeyed(items, getattr(self.accumulators, "_own", {}))

    def compute(self) -> dict[str, Spectrum]:
        """``{module_name: Spectrum}`` for every attached module, keyed as :attr:`accumulators`."""
        return self._keyed({name: acc.compute() for name, acc in self.accumulators.items()})

    def compute_async(self) -> SolveFuture:
        """One :class:`concurrent.futures.Future` of ``{module_name: Spectrum}``: :meth:`compute` for the
        state as of this call, solved in the background (see
        :meth:`ActivationCovarianceAccumulator.compute_async`).

        Every accumulator is snapshotted now (no host sync); the solves run in model order on the
        worker thread. ``result()`` returns what ``compute()`` would have returned, or raises the
        first error it would have raised, and re-emits the warnings it would have emitted.
        """
        snapshots = {name: acc._snapshot() for name, acc in self.accumulators.items()}

        def job(notes: list) -> dict[str, Spectrum]:
            return self._keyed({name: _spectrum_of(materialize(), setup, notes)
                                for name, (setup, materialize) in snapshots.items()})

        return submit(job)

    def to(self, device: str | torch.device) -> "ActivationCapture":
        """Move every accumulator's state to ``device`` (:meth:`ActivationCovarianceAccumulator.to`); returns ``self``."""
        for acc in self.accumulators.values():
            acc.to(device)
        return self

    def reset(self) -> None:
        """Reset every accumulator."""
        for acc in self.accumulators.values():
            acc.reset()


def attach(
    model: nn.Module,
    target: Target,
    *,
    pick=None,
    dim: int | None = None,
    precision: str = "exact",
    nonfinite: str = "raise",
    max_chunk_rows: int = 131072,
) -> ActivationCapture:
    """Register forward hooks on the modules ``target`` selects; each feeds its own accumulator.

    Args:
        model: any ``nn.Module`` (attach to the uncompiled module; a ``torch.compile`` wrapper warns); a
            Lightning Fabric wrapper (``fabric.setup``'s) is unwrapped, so names are the user's model's. A
            ``DistributedDataParallel``/``DataParallel`` wrapper or DeepSpeed engine is refused with a
            ``ValueError``, as the lens refuses it: pass ``model.module`` (its hooks fire in the wrapper's forward).
        target: exact dotted name, glob, compiled regex, a module of ``model`` (matched by identity;
            an ``nn.ModuleList`` stands for its members), callable ``(name, module) -> bool``, or a list.
        pick: which tensor of a module output to measure: ``None`` (the output must be a tensor),
            an ``int`` (tuple/list index), a ``str`` (dict key or attribute), or a callable. With
            ``None``, a channels-first output (a convolution, pooling, batch/instance/group norm or
            upsampling layer, or a block ending in one: ``(N, C, H, W)``) is refused at the first
            forward with a ``TypeError`` naming the ``pick=`` that reads rows of channels
            (``lambda out: out.movedim(1, -1)``); an explicit ``pick`` is never checked.
        dim, precision, nonfinite, max_chunk_rows: passed to each
            :class:`ActivationCovarianceAccumulator`.

    The capture's keys are the names the lens records (``capture.compute()["h.1.attn"]`` for a block compiled one by
    one, ``"model.layers.1"`` for a PEFT model's ``base_model.model.model.layers.1``), as ``weight_spectra`` keys its
    spectra; each accumulator's ``name`` stays the module's own.

    The hooks read outputs under ``torch.no_grad()`` and return nothing, so the model's outputs,
    gradients and autograd graph are unchanged. A module called several times per forward
    contributes rows from every call.
    """
    check_pick(pick)
    model = unwrap_fabric(model)  # fabric.setup's wrapper: names as in the user's model
    refuse_parallel_wrapper_names(model, "spectral_lens.attach")  # DDP/DataParallel/engine: model.module, as the lens
    warn_if_compiled(model)
    selected = select_modules(model, target)
    # keyed as the lens's records and weight_spectra name the modules (record_names: no wrapper segments, a PEFT
    # model's names as before get_peft_model); each accumulator's name (its spectrum's source) is the module's own
    keys = record_names(model, [name for name, _ in selected], params=False)
    accs = {
        keys[name]: ActivationCovarianceAccumulator(
            dim, precision=precision, nonfinite=nonfinite, max_chunk_rows=max_chunk_rows, name=name
        )
        for name, _ in selected
    }
    capture = ActivationCapture(accs, own={name: key for name, key in keys.items() if key != name})
    try:
        for name, module in selected:
            _claim(accs[keys[name]], capture, _where(name, model))
            capture.add(module.register_forward_hook(_make_hook(capture, keys[name], pick, module, name)))
    except BaseException:
        capture.remove()
        raise
    return capture


def attach_one(acc: ActivationCovarianceAccumulator, model: nn.Module, target: Target, pick) -> ActivationCapture:
    """:meth:`ActivationCovarianceAccumulator.attach`: hook ``acc`` to the one module ``target`` selects."""
    check_pick(pick)
    model = unwrap_fabric(model)  # fabric.setup's wrapper: names as in the user's model
    refuse_parallel_wrapper_names(model, f"{acc._label()}.attach")  # DDP/DataParallel/engine: model.module
    warn_if_compiled(model)
    selected = select_modules(model, target)
    if len(selected) != 1:
        raise ValueError(
            f"{acc._label()}.attach: target {target!r} selects {len(selected)} modules of {type(model).__name__} "
            f"({[n for n, _ in selected][:8]}); one accumulator measures one module: name exactly one, or use "
            "spectral_lens.attach(model, target) for one accumulator per module"
        )
    name, module = selected[0]
    key = record_names(model, [name], params=False)[name]  # as attach keys it: the records' name
    capture = ActivationCapture({key: acc}, own={name: key} if key != name else None)
    _claim(acc, capture, _where(name, model))  # before any change: a refused attach changes nothing
    # the name last: a hook that cannot be registered leaves the accumulator as it was (before: renamed)
    capture.add(module.register_forward_hook(_make_hook(capture, key, pick, module, name)))
    if acc.name is None or acc.name == getattr(acc, "_attach_name", None):  # unset, or set by an earlier attach
        acc.name = acc._attach_name = name
    return capture


def _where(name: str, model: nn.Module) -> str:
    return f"module {name!r} of {type(model).__name__}" if name else f"the root module ({type(model).__name__})"


def _token_mask(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask for ``rows``: as given, or flattened row-major when the module returned one row per
    token of the flattened ``(batch, position)`` grid (``rows`` of shape ``(B*T, d)``, ``mask`` ``(B, T)``),
    as the router and the experts of a mixture-of-experts layer do in ``transformers`` 5."""
    if (mask is not None and isinstance(rows, torch.Tensor) and rows.ndim == 2 and mask.ndim > 1
            and rows.shape[0] == mask.numel()):
        return mask.reshape(-1)
    return mask


def _make_hook(capture: ActivationCapture, name: str, pick, module: nn.Module, own: str | None = None) -> "_Feed":
    # read as given (no pick, or the lens's own reading of the blocks it chose): a channels-first output,
    # (N, C, H, W) of a convolution, would be read as rows of W, so it is refused; an explicit pick wins
    layout = channels_first(module) if pick is None or pick is block_hidden_states else None
    capture._widths[name] = output_width(module, pick)  # for the memory check (None: known at its rows)
    capture._modules[name] = weakref.ref(module)  # its device read at the pass's first rows (_memory.layer_device)
    return _Feed(capture, capture.accumulators[name], pick, display_name(name if own is None else own, module), layout)


class _Copied:
    """The hook a copy of a hooked model carries instead of :class:`_Feed`: measures nothing."""

    __slots__ = ()

    def __call__(self, module, args, output) -> None:
        return None

    def __repr__(self) -> str:
        return "<spectral_lens hook of a copied model: inert>"


class _Feed:
    """The forward hook of one attached module: picks the measured tensor and feeds the accumulator.

    A copy of the model takes its hook dictionaries along. ``copy.deepcopy(model)`` (an EMA or
    evaluation copy, ``torch.optim.swa_utils.AveragedModel``) and pickling (``torch.save(model)``)
    give the copy an inert :class:`_Copied` in this hook's place: the copy's forwards add no rows to
    the original's accumulator (nor hold it alive), and pickling does not fail on a local function.
    Inside another measurement's pass (a lens's activation pass, a probe's update:
    :func:`~spectral_lens.capture.measurement_pass`) it reads nothing, nor in a forward that
    ``torch.func`` transforms or ``torch.jit.trace`` / ``torch.export`` trace
    (:func:`~spectral_lens.capture.transformed_forward`), nor in a pipeline stage's metadata inference
    (``torch.distributed.pipelining``: a first microbatch run again, or uninitialized tensors).
    Under ``torch.compile`` the hook is traced as one operator call (:mod:`spectral_lens._compiled_feed`)
    whose body runs :meth:`feed` with the real tensor: no graph break, also under ``fullgraph=True``.
    """

    __slots__ = ("capture", "acc", "pick", "where", "layout", "key", "token", "__weakref__")

    def __init__(self, capture: ActivationCapture, acc: ActivationCovarianceAccumulator, pick, where: str,
                 layout=None) -> None:
        self.capture, self.acc, self.pick, self.where, self.layout = capture, acc, pick, where, layout
        with torch.inference_mode(False):  # an attach inside inference_mode: an inference token could not be
            # handed to the operator's declared mutation outside it ("Inplace update to inference tensor")
            self.key, self.token = compiled_feed.register(self), torch.zeros(1)

    def __call__(self, module, args, output) -> None:
        if torch.compiler.is_compiling():  # traced: the rows reach feed() through the operator at run time
            if not transformed_forward():  # an export, or a torch.func transform in the graph, records nothing
                # the layout is checked in feed(), at run time: raised while tracing, its error would reach the
                # user inside Dynamo's "Observed exception" report
                self._from_graph(pick_tensor(output, self.pick, self.where))
            return
        if transformed_forward() or self._skips():  # torch.func / jit.trace / export: no real rows
            return
        self._update(pick_tensor(output, self.pick, self.where))

    def _update(self, rows: torch.Tensor) -> None:
        """Feed ``rows`` (eagerly, or in a compiled graph's operator body) after the layout check."""
        if self.layout is not None:  # a layer or block whose output may be channels-first (_layout)
            refuse_channels_first(self.layout, rows, self.where, chosen=self.pick is block_hidden_states)
        if not self.acc.initialized:  # a layer's first rows: will the pass fit (still, at this layer's width)?
            check_rows(self.capture, self.acc, rows)
        self.acc.update(rows, mask=_token_mask(rows, self.capture._mask))

    def _skips(self) -> bool:
        """Whether this forward is not the user's: another measurement's pass (measurement_pass),
        activation checkpointing's recomputation (the rows were read in the first forward), or a pipeline
        stage's metadata inference."""
        owner = _FEEDING.get()
        if owner is not None and owner is not self.capture:
            return True
        # a lens's own pass (owner: this capture; no-grad, so no checkpoint recomputes in it) reads every
        # forward, also when the lens measures from inside a backward pass (a user's tensor or grad hook)
        return ((owner is None and recomputed_forward())
                or metadata_inference())  # a pipeline stage's shape inference: a repeated microbatch, or torch.empty rows

    def _from_graph(self, rows: torch.Tensor) -> None:
        if compiled_feed.available():
            compiled_feed.feed_rows(rows, self.token, self.key)
        else:  # torch < 2.4: a graph break, after which this runs eagerly
            graph_break_for_hook(self.where)
            self.feed(rows)

    def feed(self, rows: torch.Tensor) -> None:
        """The run-time body of a compiled graph's call: feeds ``rows`` unless this forward is skipped
        or the capture was removed since the graph was compiled."""
        if self.capture.active and not self._skips():
            self._update(rows)

    def __deepcopy__(self, memo) -> _Copied:
        return _Copied()

    def __reduce__(self):
        return (_Copied, ())
