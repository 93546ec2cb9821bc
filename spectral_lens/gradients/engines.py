"""Per-sample gradient engines. Each maps a batch chunk to rows ``g_m`` (M_chunk, P) and losses.

* :func:`fast_engine`: registered per-layer fast paths (:mod:`.registry`). Every parameter's
  ``requires_grad`` is switched off for the pass (a probed one's only inside its own module's calls,
  so that a use elsewhere shows up in the backward), so the trunk runs without building an autograd
  graph; a forward hook on each probed module detaches its output into a fresh leaf that requires
  grad, and a single ``torch.autograd.grad(sum_m L_m, outputs)`` returns ``dL/dy`` for every probed
  module. Autograd therefore only differentiates the graph *above* the lowest probed module, and never
  forms any parameter gradient. The fast path then contracts ``x`` and ``dy`` per sample.
* :func:`vmap_engine`: the generic ``torch.func`` recipe ``vmap(grad(functional_call))`` for any
  parameter of any module; non-probed parameters are constants (the call runs under
  ``torch.no_grad``, which ``torch.func.grad`` ignores for its own argument only). Tied parameters get
  the sum of all their uses (``functional_call(..., tie_weights=True)``).
* :func:`loop_engine`: one ``torch.autograd.grad`` per sample; slow, works for any model (also models
  that ``vmap`` cannot trace: data-dependent control flow, ``.item()``).

None of them writes ``.grad``: gradients are taken with ``torch.autograd.grad`` or ``torch.func.grad``
with respect to chosen tensors. ``requires_grad`` flags they change are restored in ``finally``.

Activation checkpointing: non-reentrant checkpointing (``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``, torch's ``apply_activation_checkpointing``) re-runs a segment's forward inside
the backward and must see the same saved tensors again, so the fast engine's hook stays on through
``torch.autograd.grad`` and does the same there (it only stops recording). Reentrant checkpointing
runs its segments under ``torch.no_grad`` and differentiates them only through ``.backward()``, so no
``torch.autograd.grad`` can reach a parameter inside or below one: the fast and loop engines raise
:class:`ReentrantCheckpointError` instead of a wrong "no gradient path" or all-zero gradients.

float16 backward passes (float16 weights, or autocast to float16) are loss-scaled: float16
flushes gradients below 2^-24 (6e-8) to zero, keeps fewer bits below 2^-14 (6e-5) and overflows above
65504, and per-sample gradients of a mean-reduced loss are small (a token's logit gradient is about
``1 / (T V)``). Each engine seeds its backward with a power of two ``S`` (:class:`LossScale`, carried
from chunk to chunk) and divides the float32 rows by it, which is exact; it reads the largest
float16 gradient it sees (the probed modules' float16 output gradients on the fast engine, the rows
on the others) and backs ``S`` off on an overflow or raises it when that largest entry is below 2^6, then runs
the backward again (:func:`scaled_backward`; the fast and loop engines keep the graph for that, the
vmap engine reruns with the same random draws). bfloat16 has float32's exponent range and is not
scaled (its rounding, 2^-8, is not a range problem).
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.checkpoint import CheckpointFunction
from torch.utils import _pytree as pytree

from .._deepspeed import behind_zero3_hooks
from ._isolation import _no_backward_hooks, _no_backward_pre_hooks, rng_state, set_rng_state, silenced_tensor_hooks
from ._batch import slice_batch
from .cast_cache import CastCache, cached_linear_casts
from .registry import fast_path_for

__all__ = [
    "LayoutRefusal",
    "LossScale",
    "coincidence",
    "scaled_backward",
    "fast_engine",
    "vmap_engine",
    "loop_engine",
    "only_requires_grad",
    "NoGradientPathError",
    "ReentrantCheckpointError",
]

ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]


class NoGradientPathError(ValueError):
    """A probed parameter does not influence the loss (its module's output is not used by the loss)."""


class ReentrantCheckpointError(RuntimeError):
    """A probed parameter sits inside or below a reentrant activation-checkpoint segment, through which
    ``torch.autograd.grad`` cannot differentiate."""


_REENTRANT = (
    "reentrant activation checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=True), or "
    "Hugging Face gradient_checkpointing_enable() with use_reentrant=True) runs its segments under "
    "torch.no_grad and differentiates them only through .backward(), so torch.autograd.grad (which the "
    "probe uses, to leave .grad untouched) gets no gradient through them. Use non-reentrant checkpointing, "
    "which the probe supports: use_reentrant=False (Hugging Face: gradient_checkpointing_enable("
    "gradient_checkpointing_kwargs={'use_reentrant': False})), or turn checkpointing off while measuring"
)


def _in_reentrant_checkpoint() -> bool:
    """Whether the caller runs inside the forward of a reentrant checkpoint segment (torch's
    ``CheckpointFunction``, or a ``CheckpointFunction`` of the same design such as DeepSpeed's)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and (
            code is _CHECKPOINT_FORWARD or getattr(code, "co_qualname", "") == "CheckpointFunction.forward"
        ):
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FORWARD = CheckpointFunction.forward.__code__


def _reentrant_inside(name: str, module: nn.Module) -> ReentrantCheckpointError:
    return ReentrantCheckpointError(
        f"{name}: {type(module).__name__} runs inside a reentrant activation-checkpoint segment: {_REENTRANT}"
    )


@contextmanager
def _reentrant_below(names: Iterable[str]):
    """Re-raise torch's refusal to differentiate a reentrant checkpoint segment with ``torch.autograd.grad``
    (a probed parameter below the segment) as :class:`ReentrantCheckpointError` naming the parameters."""
    try:
        yield
    except RuntimeError as exc:
        if "use_reentrant=True" not in str(exc) or "checkpoint" not in str(exc):
            raise
        raise ReentrantCheckpointError(
            f"{list(names)}: a reentrant activation-checkpoint segment lies between these parameters and "
            f"the loss: {_REENTRANT}"
        ) from exc


@contextmanager
def only_requires_grad(model: nn.Module, params: Iterable[torch.Tensor] = (), *, every=None):
    """Set ``requires_grad`` to True exactly for ``params`` (False for every other parameter of
    ``model``) inside the block; restore every flag on exit, also on an exception. ``every``: the
    list of ``model.parameters()``, for callers that run many passes (the walk is per call else)."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in (model.parameters() if every is None else every)]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


#: float16 loss scaling (:func:`scaled_backward`): the largest gradient entry is brought to
#: [2^LOW, 2^TOP); the scale stays within [2^-MAX_EXP, 2^MAX_EXP].
_SCALE_LOW, _SCALE_TOP, _SCALE_MAX_EXP = 6, 13, 40


#: calls of :func:`scaled_backward` that keep a carried overflow level before trying above it again
_CEILING_CALLS = 32


class LossScale:
    """The power-of-two seed of float16 backward passes, carried from chunk to chunk (as
    ``torch.amp.GradScaler``'s scale is from step to step); starts at 1. ``overflow_amax``: the
    largest watched entry at which a recent call's backward overflowed (the backward's largest
    gradient, often the logits', limits the scale before the watched ones reach 2^6), as a scaled
    value, so that it holds for gradients of any magnitude; not tried again for the next
    ``_CEILING_CALLS`` calls."""

    def __init__(self) -> None:
        self.value = 1.0
        self.overflow_amax: float | None = None
        self.ceiling_calls = 0


#: the largest seed of a float16 loss (a loss_fn that returns float16 losses: the seed is their gradient)
_HALF_SEED_TOP = 2.0 ** 15


def _wanted_scale(amax: float, scale: float, bound: float) -> float | None:
    """After a finite pass at ``scale`` whose largest float16 gradient entry was ``amax`` (scaled): the
    scale for another try, or ``None`` to keep the pass (largest entry at least 2^LOW, or the bound)."""
    if amax >= 2.0 ** _SCALE_LOW or scale >= bound:
        return None
    if amax == 0:  # all zero: underflowed, or no gradient at all
        return min(scale * 2.0 ** 12, bound)
    # amax = f 2^e with f in [1/2, 1): scaled by 2^(TOP - e) it lands in [2^(TOP-1), 2^TOP)
    return min(scale * 2.0 ** (_SCALE_TOP - math.frexp(amax)[1]), bound)


def _between(low: float, high: float) -> float:
    """The power of two halfway (in exponent, rounded down) between two powers of two."""
    return 2.0 ** ((math.frexp(low)[1] + math.frexp(high)[1]) // 2 - 1)


def scaled_backward(grads_at: Callable[[float], list], watched: Callable[[list], list], scale: LossScale | None,
                    top: float = 2.0 ** _SCALE_MAX_EXP):
    """``grads_at(s)``: the gradients of the per-sample losses seeded with ``s`` (a power of two);
    ``watched(grads)``: the tensors among them whose range decides (float16 output gradients, or rows). Runs ``grads_at`` at
    ``scale.value``, then at other powers of two while the largest watched entry is non-finite (an
    overflow in the backward: ``s / 2^8``, or halfway to the largest finite one tried) or below 2^6
    (``s`` that brings it to [2^12, 2^13), ``* 2^12`` when every entry is zero; never at or above a
    scale that overflowed: halfway to it), within 2^+-40. Returns ``(grads, s)`` of the kept pass (a
    finite one when any was); ``scale.value`` becomes ``s``, unless every watched entry of the kept pass is
    zero (no gradient: a sample whose every label is ignored), which leaves it as it was.
    ``scale=None``: one pass at ``s = 1``. ``top``: the largest scale (2^15 where the losses themselves
    are float16: the seed is their gradient)."""
    if scale is None:
        return grads_at(1.0), 1.0
    s, bound = min(scale.value, top), 2.0 ** _SCALE_MAX_EXP
    # the largest finite pass so far; the smallest scale that overflowed (or at which a recent call's
    # overflow level is reached: else every chunk tried above it again, overflowed and bisected back,
    # 5 passes instead of 1)
    kept, ceiling, overflowed = None, None, False
    zero, kept_amax = False, 0.0  # the kept pass all zero (no gradient: its scale is not carried); its maximum
    for _ in range(16):  # a bisection in the exponent: ends well within this
        grads = grads_at(s)
        seen = [(g.coalesce().values() if g.is_sparse else g).detach().abs().amax().float()
                for g in watched(grads) if g is not None and g.numel()]
        if not seen:
            kept = (grads, s)
            break
        amax = torch.stack(seen).amax().item()
        if math.isfinite(amax):
            kept, zero, kept_amax = (grads, s), amax == 0, amax
            if ceiling is None and amax > 0 and scale.overflow_amax is not None:
                # the scale at which this pass's watched maximum would reach that level (2 s: stay at s)
                ceiling = max(2.0 ** math.floor(math.log2(s * scale.overflow_amax / amax)), 2 * s)
            nxt = _wanted_scale(amax, s, top)
            if nxt is not None and ceiling is not None:
                nxt = min(nxt, _between(s, ceiling))
            if nxt is None or nxt <= s:
                break
        else:
            ceiling, overflowed = s, True
            if kept is not None:
                nxt = _between(kept[1], s)
                if nxt <= kept[1]:
                    break
            elif s <= 1 / bound:
                kept = (grads, s)  # overflows at every scale: the caller reports the non-finite rows
                break
            else:
                nxt = max(s / 2.0 ** 8, 1 / bound)
        s = nxt
    grads, s = kept if kept is not None else (grads, s)
    if overflowed and kept is not None and kept_amax > 0 and math.isfinite(kept_amax):
        scale.overflow_amax, scale.ceiling_calls = kept_amax * ceiling / s, _CEILING_CALLS
    elif scale.overflow_amax is not None:
        scale.ceiling_calls -= 1
        if scale.ceiling_calls <= 0:  # tried above again next time: the backward's ratios may have changed
            scale.overflow_amax = None
    if not zero:  # the search up to 2^40 for an all-zero pass would start the next sample there: an overflow
        scale.value = s
    return grads, s


def _half(tensors: Iterable[torch.Tensor]) -> bool:
    return any(t.dtype == torch.float16 for t in tensors)


def _half_of(gs: list) -> list:
    return [g for g in gs if g is not None and g.dtype == torch.float16]


def _half_backward(params: Iterable[torch.Tensor]) -> bool:
    """Whether the backward reaching ``params`` runs in float16: float16 parameters, or autocast to
    float16 on their device (their gradients are then float32, the backward's activations float16)."""
    params = list(params)
    if _half(params):
        return True
    return any(torch.is_autocast_enabled(d) and torch.get_autocast_dtype(d) == torch.float16
               for d in {p.device.type for p in params})


def _present(gs: list) -> list:
    return [g for g in gs if g is not None]


def _unscaled(g: torch.Tensor, s: float) -> torch.Tensor:
    """``g / s`` (exact: ``s`` is a power of two), float16 as float32."""
    g = g.float() if g.dtype == torch.float16 else g
    return g if s == 1 else (g.float() if g.dtype == torch.bfloat16 else g) / s


def _checked_losses(losses: Any, n: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        hint = ("; the batch's dimension 0 is the sample index, so a single sequence needs a batch dimension "
                "(ids[None], or a batch of 1 as ids[:1])") if shape == () else ""
        raise ValueError(f"loss_fn must return per-sample losses of shape ({n},), got {shape}{hint}")
    return losses


class LayoutRefusal(str):
    """A reason of :func:`fast_engine`'s ``not_called`` that is the input's layout (dimension 0 is not the sample
    index: the shape check, or the even-samples check), not a module never called or a weight used elsewhere.
    ``sizes``: for the shape check, the dimension-0 sizes of the refused calls' inputs and outputs; ``None`` for
    the even-samples check. A chunk refused so after an earlier chunk of ``n`` samples was accepted means that
    acceptance was a coincidence (the probe recomputes or refuses those rows) where the even-samples check refused
    it, or a refused call has ``n`` rows (a shared tensor keeps its rows whatever the chunk): other row counts (a
    batch of one sequence taking a per-sequence path, ``(T, d)``) say nothing about the earlier chunks
    (:func:`coincidence`)."""

    sizes: frozenset[int] | None = None

    def __new__(cls, text: str, sizes: Iterable[int] | None = None) -> LayoutRefusal:  # noqa: PYI034
        self = super().__new__(cls, text)
        self.sizes = None if sizes is None else frozenset(sizes)
        return self


def coincidence(why: str, accepted: Iterable[int] | None) -> bool:
    """Whether the refusal ``why`` shows that the fast path's acceptance of the same parameter in chunks of
    ``accepted`` sample counts was a coincidence (``accepted`` ``None``: counts unknown, taken as yes; empty: never
    accepted). Only a :class:`LayoutRefusal` does: by the even-samples check always, by the shape check where a
    refused call had as many rows as an accepted chunk had samples."""
    if not isinstance(why, LayoutRefusal) or (accepted is not None and not accepted):
        return False
    return why.sizes is None or accepted is None or bool(why.sizes & set(accepted))


def _mixes_rows(even: torch.Tensor | None, full: torch.Tensor | None) -> bool:
    """Whether an output's rows of dimension 0 are not the chunk's samples in order, from its gradient of the
    even samples' losses (``even``) and of all of them (``full``), by exact zeros alone (no tolerance): an
    even sample's loss reaches an odd row (a row per position, or a token of an even sample on an odd row),
    or an even row that no even sample's loss reaches has a gradient all the same (a token of an odd sample
    on an even row: tokens of odd samples alone, gathered across the samples, k == n, passed the first test)."""
    if even is None or even.ndim == 0:  # no gradient; no rows (the shape check refuses a 0-dim output)
        return False
    odd = even[1::2].ne(0).any()
    if full is None:
        return bool(odd)
    k = (even.shape[0] + 1) // 2
    e, f = even[::2].reshape(k, -1), full[::2].reshape(k, -1)
    return bool(odd | (f.ne(0).any(1) & ~e.ne(0).any(1)).any())  # one host sync, as the first test alone


def fast_engine(
    model: nn.Module,
    sites: dict[str, tuple[nn.Module, str]],
    batch: Any,
    n: int,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    casts: CastCache | None = None,
    every: list[torch.Tensor] | None = None,
    loss_scale: LossScale | None = None,
    checked: set | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Rows ``(n, P)`` for every ``name -> (module, local_param_name)`` in ``sites`` from one backward.

    ``casts``: a :class:`~spectral_lens.gradients.cast_cache.CastCache` shared by the chunks of one
    update, so that autocast casts each ``nn.Linear`` weight once instead of once per chunk (the
    parameters do not require grad here, so autocast's own cache does not apply); ``None``: no cache.
    ``every``: ``list(model.parameters())``, computed once by a caller that runs many chunks.
    ``loss_scale``: the :class:`LossScale` of float16 backward passes (module docstring); ``None``: a
    fresh one (starting at 1) for this call.

    Returns ``(rows, losses, not_called)``; ``not_called`` maps each name the fast path cannot serve
    to the reason, and their gradients need the generic engine: the module never ran in the forward
    (for example ``nn.MultiheadAttention.out_proj``, whose weight is used functionally), the weight
    also reached the loss outside the module's calls (``F.linear(x, module.weight)`` elsewhere, a
    direct ``module.forward(x)``: the probed weights require grad except inside their module's call
    and are inputs of the backward, so such a use gets a gradient there), or a call's
    input or output gradient does not have the chunk's ``n`` samples in dimension 0 (a sequence-first
    ``(T, M, d)`` layout, tokens flattened to ``(M * T, d)``, a weight applied to something other
    than the samples): the fast path's ``g_m`` contracts dimension 0 as the sample index. Where an
    input holds ``n`` in dimension 0 and is 2-D or holds ``n`` also in dimension 1 or the batch beyond
    its dimension 0 (a sequence-first layout or a position table ``(T, d)`` the samples share with
    ``T == n``, ``n`` tokens gathered across samples: they pass the shape check), one more backward, of
    the even samples' losses at the main backward's loss scale, tells them apart: a gradient on an odd
    row of dimension 0, or an even row that only the odd samples' losses reach (:func:`_mixes_rows`),
    sends the module to the generic engine. An input of 3 or more dimensions with ``n`` in dimension 0 alone
    (an LM's ``(n, T, d)``, or a shared ``(K, a, d)`` table with ``K == n``) is checked so once per signature
    ``(name, module id, shape, dtype)``: ``checked`` holds the signatures found per-sample (a shared tensor's
    layout is static), filled here; ``None``: checked in every call. Layout refusals (the shape check, the
    even-samples check) are :class:`LayoutRefusal` reasons. A module
    called several times gets the sum over calls. Raises :class:`NoGradientPathError` when a probed
    module's output does not reach the loss.
    """
    modules = {id(mod): mod for mod, _ in sites.values()}
    names = {k: next(n for n, (m, _) in sites.items() if id(m) == k) for k in modules}
    calls: dict[int, list] = {k: [] for k in modules}
    recording = [True]
    # The probed parameters require grad everywhere except inside their own module's call (off in a
    # forward pre-hook, on again in the forward hook): a use elsewhere (F.linear(h, lin.weight), a
    # direct lin.forward(x), a hook reading the weight) then reaches them in the graph, which the
    # fast path, reading only the module's calls, would miss.
    own = {k: [getattr(m, local) for m, local in sites.values() if id(m) == k] for k in modules}
    probed = list({id(p): p for ps in own.values() for p in ps}.values())

    def pre_hook(module, args):
        for p in own[id(module)]:
            p.requires_grad_(False)

    def hook(module, args, kwargs, output):
        # The same output transformation in the forward and in any re-run of it inside the backward
        # (non-reentrant activation checkpointing recomputes a segment there and must see the same
        # saved tensors); only the forward's calls are recorded.
        for p in own[id(module)]:
            p.requires_grad_(True)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"fast path for {type(module).__name__}: module output is not a tensor")
        if not torch.is_grad_enabled() and _in_reentrant_checkpoint():
            raise _reentrant_inside(names[id(module)], module)
        y = output.detach().requires_grad_() if not output.requires_grad else output
        if recording[0]:
            x = (args[0] if args else next(iter(kwargs.values()))).detach()
            calls[id(module)].append((x, x._version, y))
        # downstream sees a clone of the leaf: gradients reach y, and in-place ops cannot rewrite it
        return y.clone()

    # prepend: before the user's own forward hooks on the module, so y is the output the weight
    # produced and a hook that changes it (scaling, steering, an adapter) is part of the backward
    handles = [mod.register_forward_hook(hook, with_kwargs=True, prepend=True) for mod in modules.values()]
    for mod, h in zip(modules.values(), handles):  # under ZeRO-3: after its hooks, whose backward is cut off here
        behind_zero3_hooks(mod, h)
    # last: a user's pre-hook that reads the weight runs while it requires grad (a use outside the call)
    handles += [mod.register_forward_pre_hook(pre_hook) for mod in modules.values()]
    try:
        with only_requires_grad(model, probed, every=every), torch.enable_grad(), cached_linear_casts(model, casts):
            losses = _checked_losses(loss_fn(forward_fn(model, batch), batch), n)
            recording[0] = False
            ys = [y for k in calls for _, _, y in calls[k]]
            # inputs whose dimension 0 holds n without being the sample index pass the shape check below: a
            # sequence-first (T, n, d) input with T == n, a tensor the samples share (a position table (T, d) or
            # (T, 1, d) projected once and broadcast over the batch) with T == n, n tokens gathered across the
            # samples (a mixture-of-experts layer's (k, d) with k == n). Where dimension 0 holds n and so does
            # dimension 1 or the batch beyond its dimension 0 (the sequence length), or the input is 2-D (a
            # per-sample one, (n, d), is a pooled or last-token head: little graph above it), one more backward,
            # of the even samples' losses, after the main one (at its loss scale), checks the rows (_mixes_rows).
            # Of the other inputs with dimension 0 == n, those of 3 or more dimensions (a shared (K, a, d) table with
            # K == n, not the sequence length) are checked once per signature (``checked``): a shared tensor's
            # layout is static, so an LM's or ViT's (n, T, d) layers pay one backward per distinct shape, not per
            # chunk; data-dependent layouts (tokens gathered by a router: 2-D) stay checked per chunk
            sizes = {s for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) for s in t.shape[1:]}
            per_chunk = lambda x: x.ndim <= 2 or x.shape[1] == n or n in sizes  # noqa: E731
            # id(y) -> the signature of a call checked once per signature, or None (checked in every chunk)
            static = {id(y): None if per_chunk(x) else (names[k], k, tuple(x.shape), x.dtype)
                      for k in calls for x, _, y in calls[k] if n > 1 and x.ndim >= 1 and x.shape[0] == n}
            both = [y for y in ys if id(y) in static and (static[id(y)] is None or (
                y.ndim >= 1 and y.shape[0] == n  # else the shape check refuses it
                and (checked is None or static[id(y)] not in checked)))]
            check = bool(both) and losses.requires_grad
            # float16 output gradients, or float32 ones of modules inside a float16 model (PEFT's float32 LoRA
            # factors on a float16 base): loss-scaled (the graph kept for another try); others: one plain pass
            half_ys = _half(ys)
            half = ((half_ys or _half(model.parameters() if every is None else every)) and losses.requires_grad
                    and bool(torch.isfinite(losses).all()))

            def grads_at(s):
                with _reentrant_below(sites), silenced_tensor_hooks(probed):
                    if not losses.requires_grad:
                        return [None] * (len(ys) + len(probed))
                    seed = losses.new_full(losses.shape, s)
                    return list(torch.autograd.grad(losses, ys + probed, seed, retain_graph=half or check,
                                                    allow_unused=True))

            got, scale = scaled_backward(grads_at, lambda gs: (_half_of if half_ys else _present)(gs[: len(ys)]),
                                         (loss_scale or LossScale()) if half else None,
                                         _HALF_SEED_TOP if losses.dtype == torch.float16 else 2.0 ** _SCALE_MAX_EXP)
            mixed = set()
            if check:
                try:
                    with _reentrant_below(sites), silenced_tensor_hooks(probed):
                        seed = losses.new_zeros(losses.shape)
                        seed[::2] = scale  # the main pass's loss scale: a float16 gradient unscaled underflows to 0
                        even = torch.autograd.grad(losses, both, seed, allow_unused=True)
                except RuntimeError as exc:
                    # selective activation checkpointing allows one backward only: the once-per-signature check
                    # cannot run there, and those layers keep the fast path unchecked (as before it existed);
                    # a per-chunk one raises as it did
                    if "selective activation checkpoint" not in str(exc) or any(static[id(y)] is None for y in both):
                        raise
                    even = [None] * len(both)
                    if checked is not None:
                        checked.update(static[id(y)] for y in both)  # not tried again: each try costs a backward
                full = dict(zip(map(id, ys), got))
                mixed = {id(y) for y, g in zip(both, even) if _mixes_rows(g, full[id(y)])}
                if checked is not None:  # the static layouts found per-sample: not checked again, where the check
                    # saw something (an even sample's loss reached the output: not a chunk of ignored labels)
                    checked.update(static[id(y)] for y, g in zip(both, even) if static[id(y)] is not None
                                   and id(y) not in mixed and g is not None and bool(g.ne(0).any()))
            dys, elsewhere = got[: len(ys)], {id(p) for p, g in zip(probed, got[len(ys) :]) if g is not None}
    finally:
        for h in handles:
            h.remove()
    it = iter(dys)
    grads_of = {k: [(x, v, next(it)) for x, v, _ in c] for k, c in calls.items()}
    mixes = {k for k, c in calls.items() if any(id(y) in mixed for _, _, y in c)}

    rows, not_called = {}, {}
    for name, (mod, local) in sites.items():
        used = [(x, v, dy) for x, v, dy in grads_of[id(mod)] if dy is not None]
        if not grads_of[id(mod)]:
            not_called[name] = "its module never ran its forward (the weight is used functionally)"
            continue
        if id(getattr(mod, local)) in elsewhere:
            not_called[name] = (
                f"the weight also reaches the loss outside the calls of its {type(mod).__name__} (used "
                "functionally, e.g. F.linear(x, module.weight), a direct module.forward(x), or by a hook), "
                "which the fast path does not see"
            )
            continue
        shapes = [(tuple(x.shape), tuple(dy.shape)) for x, _, dy in used if x.ndim == 0 or x.shape[0] != n
                  or dy.ndim == 0 or dy.shape[0] != n]
        if id(mod) in mixes:
            not_called[name] = LayoutRefusal(
                f"{type(mod).__name__} saw inputs of shape {tuple(grads_of[id(mod)][0][0].shape)} for a chunk of {n} "
                "samples, and a sample's loss reaches other rows of dimension 0: the fast path needs the sample "
                "index in dimension 0 (not a sequence-first (T, M, d) layout, a tensor the samples share such as a "
                "position table (T, d) with T == chunk_size, or tokens gathered across the samples)"
            )
            continue
        if shapes:
            not_called[name] = LayoutRefusal(
                f"{type(mod).__name__} saw an input of shape {shapes[0][0]} (output {shapes[0][1]}) for a chunk of "
                f"{n} samples: the fast path needs the sample index in dimension 0 (not a sequence-first "
                "layout or tokens flattened across samples)",
                {s[0] for pair in shapes for s in pair if s},
            )
            continue
        if not used:
            raise NoGradientPathError(
                f"{name}: the output of {type(mod).__name__} does not reach the loss (no gradient path)"
            )
        fn = fast_path_for(mod, local).per_sample_grad
        total = None
        for x, version, dy in used:
            if x._version != version:
                raise RuntimeError(  # not "use engine='vmap'": its backward (and the loop's) needs the input too
                    f"{name}: the input of {type(mod).__name__} was modified in place after the call; no engine can "
                    "measure the weight then: its gradient needs the input as the call saw it (the vmap and loop "
                    "engines fail in autograd: 'modified by an inplace operation'). Make that operation out of "
                    "place (or clone the input before it)"
                )
            g = fn(mod, local, x, dy)
            total = g if total is None else total + g
        rows[name] = _unscaled(total, scale).reshape(n, -1)
    return rows, losses.detach(), not_called


class _Bound(nn.Module):
    """``batch -> per-sample losses`` as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn, self.loss_fn = forward_fn, loss_fn
        # the wrapper is ours: a global module backward hook must not wrap it either (the probe switches the
        # model's own off), or torch.func refuses the BackwardHook's autograd.Function (no setup_context)
        vars(self).update(_get_backward_hooks=_no_backward_hooks, _get_backward_pre_hooks=_no_backward_pre_hooks)

    def forward(self, batch):
        return self.loss_fn(self.forward_fn(self.model, batch), batch)


def vmap_engine(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batch: Any,
    n: int,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    loss_scale: LossScale | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows ``(n, P)`` for ``params`` (dotted name -> parameter) via ``vmap(grad(functional_call))``
    (a float16 backward, float16 parameters or autocast to float16: loss-scaled, ``loss_scale`` as in
    :func:`fast_engine`, read from the rows; a retry replays the first try's random draws).

    The model must be traceable by ``torch.func.vmap`` (no ``.item()``, no data-dependent Python
    control flow, no in-place ops on captured buffers). A parameter with no path to the loss gets zero
    rows (``torch.func.grad`` cannot tell); the probe warns (``ZeroGradientWarning``) on all-zero gradients.
    """
    bound = _Bound(model, forward_fn, loss_fn)
    leaves, spec = pytree.tree_flatten(batch)
    dims = tuple(0 if isinstance(t, torch.Tensor) and t.ndim > 0 else None for t in leaves)

    def one(p, s, *sample):
        sample = pytree.tree_unflatten([t.unsqueeze(0) if d == 0 else t for t, d in zip(sample, dims)], spec)
        loss = _checked_losses(functional_call(bound, p, (sample,)), 1).sum()
        return loss * s, loss  # the seed s: the gradient of loss * s, exact for a power of two

    first = {}  # one name per tensor: tied names must not receive two different tensors
    for k, v in params.items():
        first.setdefault(id(v), k)
    detached = {"model." + k: params[k].detach() for k in first.values()}
    # functional_call swaps a tied tensor under each of its names and, for one module object registered under
    # several names (a shared block: h.0 is h.1), puts the wrong tensor back: its own detached copy stayed in
    # the model. Every slot holding a probed tensor is put back here.
    slots = [(m, k, p) for m in {id(m): m for m in model.modules()}.values() for k, p in m._parameters.items()
             if id(p) in first]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # vmap falls back to a per-sample loop for kernels without batching rules (SDPA on some
            # backends) and says so on every call; that is the documented cost of this engine.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            run = vmap(grad_and_value(one, has_aux=True), in_dims=(None, None, *dims), randomness="different")
            if not (_half_backward(detached.values()) or _half(model.parameters())):
                (grads, (_, losses)), s = run(detached, 1.0, *leaves), 1.0
            else:  # a float16 backward: loss-scaled, each try with the first one's random draws
                # every global stream (torch, Python's random, numpy's generator: rng_state), not torch's alone: a
                # forward drawing from numpy drew anew at every try
                devices = sorted({p.device.index for p in detached.values() if p.device.type == "cuda"})
                state = rng_state(devices)

                def grads_at(s):
                    set_rng_state(state, devices)
                    got, (_, lo) = run(detached, s, *leaves)
                    return got, lo

                try:  # a non-finite loss: nothing to rescale, the probe reports it
                    (grads, losses), s = scaled_backward(
                        grads_at, lambda r: list(r[0].values()) if bool(torch.isfinite(r[1]).all()) else [],
                        loss_scale or LossScale())
                except BaseException:
                    set_rng_state(state, devices)  # as torch.random.fork_rng left it
                    raise
                # the streams as after one pass (every try draws the same): the last try's end, which they hold now
    finally:
        for m, k, p in slots:
            if m._parameters[k] is not p:  # [] not get(): a scripted module's dictionary has no get
                m._parameters[k] = p
    rows = {k: _unscaled(grads["model." + first[id(v)]], s).reshape(n, -1) for k, v in params.items()}
    return rows, losses


def loop_engine(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    batch: Any,
    n: int,
    forward_fn: ForwardFn,
    loss_fn: LossFn,
    after_sample: Callable[[], None] | None = None,
    loss_scale: LossScale | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows ``(n, P)`` for ``params`` with one forward and one ``torch.autograd.grad`` per sample
    (a float16 backward, float16 parameters or autocast to float16: loss-scaled per sample,
    ``loss_scale`` as in :func:`fast_engine`, read from the rows; a retry reuses the sample's graph).

    Only the probed parameters require grad during the loop, so nothing below them builds a graph.
    A forward hook on each probed parameter's module checks that it does not run inside a reentrant
    activation-checkpoint segment (:class:`ReentrantCheckpointError`; its gradient would read as zero).
    ``after_sample`` is called after each sample's pass (the probe's: puts back the buffers it wrote,
    :func:`~._isolation.preserved_buffers`), so a forward that updates a buffer it reads gives every
    sample what one batched forward gives it.
    """
    unique = list({id(p): p for p in params.values()}.values())
    rows: dict[str, list] = {k: [] for k in params}
    losses = []
    # a float16 backward (also of float32 parameters in a float16 model): loss-scaled per sample (module docstring)
    half_params = _half_backward(unique) or _half(model.parameters())
    loss_scale = loss_scale or LossScale()

    def check(name):
        def hook(module, args, output):
            if not torch.is_grad_enabled() and _in_reentrant_checkpoint():
                raise _reentrant_inside(name, module)

        return hook

    owners = {}
    for name in params:
        mod = model.get_submodule(name.rpartition(".")[0])
        owners.setdefault(id(mod), (name, mod))
    # a scripted module (torch.jit.script; a traced one does) takes no hook, and no checkpoint can run inside TorchScript
    handles = [mod.register_forward_hook(check(name)) for name, mod in owners.values()
               if not isinstance(mod, torch.jit.RecursiveScriptModule)]
    try:
        with only_requires_grad(model, unique), torch.enable_grad():
            for i in range(n):
                sample = slice_batch(batch, i, i + 1)
                loss = _checked_losses(loss_fn(forward_fn(model, sample), sample), 1).sum()
                half = half_params and loss.requires_grad and bool(torch.isfinite(loss))

                def grads_at(s):
                    with _reentrant_below(params), silenced_tensor_hooks(unique):
                        if not loss.requires_grad:
                            return [None] * len(unique)
                        return list(torch.autograd.grad(loss, unique, loss.new_full((), s), retain_graph=half,
                                                        allow_unused=True))

                gs, scale = scaled_backward(grads_at, _present, loss_scale if half else None,
                                            _HALF_SEED_TOP if loss.dtype == torch.float16 else 2.0 ** _SCALE_MAX_EXP)
                if after_sample is not None:
                    after_sample()
                # a sparse gradient (nn.Embedding(sparse=True)) is densified: a row is a flat dense vector
                by_id = {id(p): (torch.zeros_like(p) if g is None else _unscaled(g.to_dense() if g.is_sparse else g, scale))
                         for p, g in zip(unique, gs)}
                for k, p in params.items():
                    rows[k].append(by_id[id(p)].reshape(1, -1))
                losses.append(loss.detach().reshape(1))
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}, torch.cat(losses)
