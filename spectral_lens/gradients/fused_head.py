"""The language-model head and the cross-entropy in one pass over token chunks: never the full logits.

For hidden states ``h`` (N, d), a head ``W`` (V, d) (optional bias ``b``) and targets ``t``, the
per-token loss is ``lse(z_i) - z_{i, t_i}`` with ``z_i = W h_i + b``. :func:`linear_cross_entropy`
forms ``z`` for ``chunk_rows`` tokens at a time, keeps only the (N,) log-sum-exp, and in the backward
recomputes each chunk's logits to form ``softmax(z) - onehot(t)`` and its products with ``W`` and
``h``. Peak memory is one (chunk_rows, V) block instead of (N, V), and no (N, V) array is ever
written (the same idea as Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy).
The head products are PyTorch's GEMMs; the per-chunk softmax work runs in two Triton kernels on CUDA
when Triton is installed (one read of the logits for the forward, one read and one write for the
backward, fp32 inside: :mod:`spectral_lens.gradients._ce_kernel`), else in plain PyTorch (about a
dozen float32 passes per block), which is also what runs under ``torch.func`` transforms.

Accuracy (what "exact enough" means here). The logits are computed exactly as an unfused head would
compute them: ``F.linear`` in the autocast dtype when autocast is on, else in the inputs' dtype. From
there every step runs in float32 (float64 for float64 inputs), and each row's log-sum-exp is kept as
the pair ``(m, log s)``, its max and ``log sum exp(z - m)``, never as the sum ``m + log s``: the loss
is ``log s - (z_t - m)`` and the softmax ``exp((z - m) - log s)``, so nothing rounds at the scale of
the logits' common offset. Against the float64 loss *of the same logits* the loss is within a few
float32 ulps of ``|loss| + log V`` and the logits' gradient within a few ulps of its largest entry,
at any offset (tested: ``2^-21`` and ``2^-20 (1 + log V)``, offsets up to 3e4; forming ``m + log s``
first was 6e-4 off at an offset of 1e4, where PyTorch's float32 cross-entropy is 1e-6 off). Against
float64 from the float32 *inputs*, the logits' own float32 rounding adds ``|z|_max 2^-24`` per logit:
the loss is within ``4e-6 (|z|_max + log V)`` (float32; ``1e-12`` float64) and gradients within
``4e-6 (|z|_max + 1)`` (float32; ``1e-11`` float64) relative to their largest entry, as in an
unfused float32 head. They carry the
rounding of ``softmax - onehot`` to the logits' dtype, as an unfused bf16 head's do; the target entry is formed as minus the sum of the other entries (no ``p_t - 1``
cancellation). So the chunked path is never less exact than the materialized one, and
:func:`linear_cross_entropy` uses it whenever the full logits would exceed ``chunk_bytes``; for
smaller problems it runs the same code with one chunk.

Label smoothing (``label_smoothing=eps``, ``F.cross_entropy``'s): the loss ``(1 - eps) (lse - z_t) +
eps (lse - mean z)`` is formed as ``(1 - eps) (log s - (z_t - m)) + eps (log s - mean(z - m))``, two
nonnegative terms, the mean taken per chunk from the same logits as a float32 (float64) sum of the
``z - m <= 0``, same-sign terms: the smoothing term is within ``(log2 V + 2) 2^-24`` of itself in the
plain-PyTorch body (``(V / 2048 + 13) 2^-24`` in the kernels' blockwise sum) at any offset, so the bounds
above hold as they are (tested: ``(log2 V + 4) 2^-24 (|loss| + log V)`` against the same logits, offsets up to
1e4). The logits' gradient is ``softmax - (1 - eps) onehot - eps / V``: the other entries round at the scale of
``p_j + eps / V``, the target entry is ``eps (V - 1) / V`` minus the positive sum of the others' ``p_j`` (no
``p_t - 1`` cancellation), so each entry is within a few ulps of ``|g|_max + eps`` (``2^-20 (1 + log V)``
tested). ``eps = 0`` runs the plain code, bit for bit. ``-inf`` logits (a vocabulary masked or padded by a
``-inf`` bias) count 0 in ``s`` on both bodies, however many lead the row: the loss is finite without smoothing
and ``+inf`` with it (``mean z = -inf``, as in ``F.cross_entropy``), the gradient finite (NaN only where
``F.cross_entropy``'s is: a row of ``-inf`` only, or ``eps = 1`` with the target's logit ``-inf``).

The probe uses it on its own (``PerSampleGradientProbe(head_loss="auto")``, the default) when
:func:`find_chunkable_head` proves it computes the same loss as the default one; by hand it is
:func:`head_loss_fns`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn
import torch.nn.functional as F

from .._matmul import mm_fp32
from .._triton import triton_available, use_kernels
from ._batch import default_forward
from .cast_cache import cast_of
from .losses import _check_smoothing, causal_lm_targets, extract_logits

__all__ = [
    "linear_cross_entropy",
    "causal_lm_head_loss",
    "head_loss_fns",
    "without_head",
    "find_chunkable_head",
    "HeadWatch",
    "chunked_head_fns",
    "CHUNK_BYTES",
    "KERNEL_CHUNK_BYTES",
]

#: Budget for one (chunk_rows, V) block of float32 logits in the plain-PyTorch chunk body (CPU, or CUDA
#: without Triton, or under ``torch.func``) when ``chunk_rows`` is not given: 128 MiB (667 tokens at
#: V = 50,304). That body keeps a few float32 temporaries of the block's size alive.
CHUNK_BYTES = 1 << 27

#: The same budget where the Triton kernels run, counted in the logits' own dtype: 512 MiB (5,336 bf16
#: tokens at V = 50,304). No float32 block exists there; the logits and their gradient are the two
#: live blocks, so about 1 GiB at the peak. Measured on an H200 (benchmarks/RESULTS.md), the probe at
#: 1,024-token sequences took 0.90x (M = 64) and 0.90-0.97x (M = 512) the time it took with 128 MiB
#: blocks (fewer launches and host work per chunk); 2 GiB gained no more.
KERNEL_CHUNK_BYTES = 1 << 29


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype an unfused ``F.linear(h, w)`` would produce (autocast's, if autocast is on)."""
    if torch.is_autocast_enabled(h.device.type) and h.dtype != torch.float64:
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


def chunked_is_faster(device: torch.device | str) -> bool:
    """Whether ``head_loss="auto"`` should prefer the chunked head + loss on ``device`` for speed.

    Measured (benchmarks/RESULTS.md): on CUDA with the Triton kernels, head + loss forward and backward
    at 8,192 tokens x 50,304 took 0.43-0.44x the time of the materialized ``F.linear`` + ``F.cross_entropy``
    (H100, bf16) and 0.08x its peak memory; the plain-PyTorch chunk body (CPU, or CUDA without Triton)
    took 1.4-1.8x the materialized time. So: CUDA with Triton only."""
    return torch.device(device).type == "cuda" and triton_available()


def _kernels(h: torch.Tensor, dtype: torch.dtype):
    """The Triton kernels module for this call (CUDA, Triton installed, not under ``torch.func``,
    not float64), else ``None`` (the plain-PyTorch chunk body)."""
    if dtype == torch.float64 or not use_kernels(h):
        return None
    from . import _ce_kernel

    return _ce_kernel


def _logits(h, w, b, dtype) -> torch.Tensor:
    return F.linear(h.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def _token_loss(ls: torch.Tensor, zt_m: torch.Tensor, mean_e: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The per-token loss from a row's ``log s``, ``z_t - m`` and ``mean_j (z_j - m)`` (``None`` when
    ``eps`` is 0): ``(1 - eps) (log s - (z_t - m)) + eps (log s - mean(z - m))``, the label-smoothed
    cross-entropy ``(1 - eps) (lse - z_t) + eps (lse - mean z)`` with ``lse = m + log s`` never formed.
    Both terms are nonnegative (``log s >= 0 >= z_t - m, mean(z - m)``): no cancellation."""
    nll = ls - zt_m
    if not eps:
        return nll
    return (1.0 - eps) * nll + eps * (ls - mean_e)


def _row_norms(z: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, m, log s)`` of a block of logits in the plain-PyTorch body: ``e = z - m`` in ``acc`` with
    ``m`` each row's max, and ``s = sum exp(e)``. The log-sum-exp is ``m + log s``; it is kept as the
    pair, so that nothing rounds at the scale of ``|m|`` (a large common offset of the logits)."""
    z = z.to(acc)
    m = z.amax(-1)
    e = z - m[:, None]
    return e, m, e.exp().sum(-1).log()


def _softmax_grad(z, safe, m, ls, weight, acc, dtype, kernel, shifted=None, eps=0.0):
    """``(g, g_acc)`` of one chunk: ``g = (softmax(z) - (1 - eps) onehot(t) - eps / V) * weight``
    rounded once to ``dtype`` (the rounding an unfused head's logits gradient has), with
    ``softmax(z) = exp((z - m) - log s)``. The target entry is formed from the positive sum ``S`` of
    the others' ``weight p_j`` as ``weight eps (V - 1) / V - S`` (the entries sum to zero), so there
    is no ``p_t - 1`` cancellation when ``p_t ~ 1``; ``g_acc`` is the unrounded ``g`` in ``acc`` from
    the plain-PyTorch body (``None`` from the kernel, which never forms it). ``shifted``: ``z - m`` in
    ``acc`` if the caller has it. ``eps``: label smoothing (0: plain cross-entropy)."""
    if kernel is not None:  # one read, one write of the block; the same fp32 math, then one rounding
        return kernel.softmax_grad(z, safe, m, ls, weight.contiguous(), eps), None
    e = shifted if shifted is not None else z.to(acc) - m[:, None]
    g = (e - ls[:, None]).exp() * weight[:, None]
    at = safe[:, None]
    g = g.scatter(-1, at, 0.0)
    if eps:
        v = g.shape[-1]
        others = g.sum(-1, keepdim=True)
        g = g - weight[:, None] * (eps / v)
        g = g.scatter(-1, at, weight[:, None] * (eps * (v - 1) / v) - others)
    else:
        g = g.scatter(-1, at, -g.sum(-1, keepdim=True))
    return g.to(dtype), g


def _mm_acc(g: torch.Tensor, w: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``g @ w`` accumulated and returned in ``acc`` (fp32 output of a bf16/fp16 GEMM on CUDA)."""
    if g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and acc == torch.float32:
        return mm_fp32(g, w)
    return (g @ w).to(acc)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss (N,) of ``F.linear(h, w, b)`` against ``targets``, chunked over tokens, each row's
    max ``m`` and ``log s`` (N,) (its log-sum-exp is ``m + log s``, kept as the pair) and, with
    ``precompute``, the (N, d) unit-weight input gradient. Out-of-place per
    chunk, so ``torch.func`` can batch it (``generate_vmap_rule``): the probe's ``vmap`` engine works
    with it too.

    ``precompute`` (only the hidden states need a gradient, which is the probe's fast engine): the
    input gradient is linear in each token's upstream weight, ``dh_i = w_i (p_i - e_{t_i}) W``, so the
    forward forms ``(p_i - e_{t_i}) W`` for every token while the chunk's logits are at hand and the
    backward only scales it: the logits are never recomputed (one head GEMM fewer)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h, w, b, targets, ignore_index, chunk_rows, dtype, precompute, eps):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        unit = valid.to(acc) if precompute else None  # each token's weight 1 (0 if ignored)
        ms, lss, losses, dhs = [], [], [], []
        kernel = _kernels(h, dtype)
        # the head in the compute dtype once per call, not once per chunk (a (V, d) cast each time)
        # (and, in a probe update, once per update: cast_of keeps it for the later chunks)
        wc, bc = cast_of(w, dtype), None if b is None else cast_of(b, dtype)
        for s in range(0, h.shape[0], chunk_rows):
            z = _logits(h[s : s + chunk_rows], wc, bc, dtype)
            ts = safe[s : s + chunk_rows]
            g = e = None
            if kernel is not None and precompute:  # log-sum-exp and gradient in one launch
                m, ls, loss, g = kernel.lse_and_grad(z, ts, unit[s : s + chunk_rows].contiguous(), eps)
            elif kernel is not None:  # one read of the logits in their own dtype, fp32 inside
                m, ls, loss = kernel.row_lse(z, ts, eps)
            else:  # loss = log s - (z_t - m): no rounding at the scale of the logits' offset
                e, m, ls = _row_norms(z, acc)
                # the smoothing's mean of the logits as the mean of z - m <= 0: a sum of same-sign terms
                loss = _token_loss(ls, e.gather(-1, ts[:, None]).squeeze(-1), e.mean(-1) if eps else None, eps)
            ms.append(m)
            lss.append(ls)
            losses.append(loss)
            if precompute:
                if g is None:
                    g, _ = _softmax_grad(z, ts, m, ls, unit[s : s + chunk_rows], acc, dtype, kernel, shifted=e,
                                         eps=eps)
                dhs.append(_mm_acc(g, wc, acc))
        m, ls, loss = torch.cat(ms), torch.cat(lss), torch.cat(losses)
        dh_unit = torch.cat(dhs) if precompute else m.new_empty(0)
        return loss.masked_fill(~valid, 0.0), m, ls, dh_unit

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, b, targets, ignore_index, chunk_rows, dtype, precompute, eps = inputs
        ctx.mark_non_differentiable(*output[1:])
        if precompute:
            ctx.save_for_backward(targets, output[3])
        else:
            ctx.save_for_backward(h, w, b, targets, output[1], output[2])
        ctx.ignore_index, ctx.chunk_rows, ctx.dtype, ctx.precompute = ignore_index, chunk_rows, dtype, precompute
        ctx.eps = eps
        ctx.h_dtype = h.dtype

    @staticmethod
    def backward(ctx, grad_loss, _grad_m, _grad_ls, _grad_dh):
        if ctx.precompute:
            targets, dh_unit = ctx.saved_tensors
            weight = grad_loss.to(dh_unit.dtype) * (targets != ctx.ignore_index)
            return (dh_unit * weight[:, None]).to(ctx.h_dtype), None, None, None, None, None, None, None, None
        h, w, b, targets, m, ls = ctx.saved_tensors
        chunk_rows, dtype = ctx.chunk_rows, ctx.dtype
        acc = m.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = targets != ctx.ignore_index
        safe = targets.masked_fill(~valid, 0)
        weight = grad_loss.to(acc) * valid
        dhs, dw, db = [], None, None
        wc, bc = w.to(dtype), None if b is None else b.to(dtype)
        kernel = None if (need_b and b is not None) else _kernels(h, dtype)  # the bias gradient needs fp32 g
        for s in range(0, h.shape[0], chunk_rows):
            hc = h[s : s + chunk_rows]
            g, g_acc = _softmax_grad(_logits(hc, wc, bc, dtype), safe[s : s + chunk_rows], m[s : s + chunk_rows],
                                     ls[s : s + chunk_rows], weight[s : s + chunk_rows], acc, dtype, kernel,
                                     eps=ctx.eps)
            if need_b and b is not None:
                db = g_acc.sum(0) if db is None else db + g_acc.sum(0)
            if need_h:
                dhs.append(g @ wc)
            if need_w:
                part = (g.t() @ hc.to(dtype)).to(acc)
                dw = part if dw is None else dw + part
        dh = torch.cat(dhs).to(h.dtype) if need_h else None
        if need_w and dw is None:  # no tokens
            dw = torch.zeros(w.shape, dtype=acc, device=w.device)
        return (
            dh,
            None if dw is None else dw.to(w.dtype),
            None if db is None else db.to(b.dtype),
            None, None, None, None, None, None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-token ``-log softmax(hidden @ weight.T + bias)[target]``, (N,), without the (N, V) logits.

    Args:
        hidden: (N, d) final hidden states (after the last norm), any float dtype.
        weight: (V, d) head weight (tied or not).
        targets: (N,) integer class indices.
        bias: optional (V,) head bias.
        ignore_index: positions whose target equals it get loss 0 and no gradient.
        chunk_rows: tokens per chunk; ``None`` picks ``CHUNK_BYTES / (4 V)`` (at least 1), or
            ``KERNEL_CHUNK_BYTES / (b V)`` with ``b`` the bytes of the logits' dtype where the Triton
            kernels run.
        label_smoothing: ``eps`` in ``[0, 1]``: each token's loss is
            ``F.cross_entropy(z, t, label_smoothing=eps)``'s, ``(1 - eps) (lse - z_t) + eps (lse - mean z)``,
            with gradient ``softmax(z) - (1 - eps) onehot(t) - eps / V`` (ignored tokens: 0, no gradient).

    Returns float32 losses (float64 for float64 inputs). Differentiable in ``hidden``, ``weight`` and
    ``bias`` (only what requires grad is formed). Accuracy: see the module docstring.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden (N, d) and weight (V, d), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype in (torch.bool,) or targets.is_floating_point():
        raise ValueError(
            f"linear_cross_entropy: expected integer targets of shape ({hidden.shape[0]},), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtype = _compute_dtype(hidden, weight)
    if chunk_rows is None:
        if _kernels(hidden, dtype) is not None:
            chunk_rows = max(1, KERNEL_CHUNK_BYTES // (torch.finfo(dtype).bits // 8 * weight.shape[0]))
        else:
            chunk_rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    eps = _check_smoothing("linear_cross_entropy", label_smoothing)
    if hidden.shape[0] == 0:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (hidden.sum(-1) + weight.sum() * 0).to(acc)  # (0,), still connected to the graph
    # only the hidden states need a gradient (the probe's fast engine): form it in the forward
    precompute = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                  and (bias is None or not bias.requires_grad))
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_rows, dtype, precompute,
                                                eps)[0]


def causal_lm_head_loss(
    hidden: torch.Tensor,
    batch: Any,
    head: nn.Linear,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """:func:`~spectral_lens.gradients.causal_lm_loss` computed from hidden states (M, T, d) and an
    ``nn.Linear`` head, chunked: per-sequence mean next-token cross-entropy, (M,), label-smoothed by
    ``label_smoothing`` as ``causal_lm_loss``'s. Same target conventions as ``causal_lm_loss`` (tuple,
    Hugging Face dict, bare ``input_ids``)."""
    hidden, targets = causal_lm_targets(hidden, batch, ignore_index)
    token = linear_cross_entropy(
        hidden.flatten(0, -2), head.weight, targets.flatten(), head.bias, ignore_index=ignore_index,
        chunk_rows=chunk_rows, label_smoothing=label_smoothing,
    ).view(targets.shape)
    valid = (targets != ignore_index).to(token.dtype)
    return token.sum(-1) / valid.sum(-1)


@contextlib.contextmanager
def without_head(model: nn.Module, name: str):
    """Inside the block, submodule ``name`` (an ``nn.Linear``) returns its input unchanged, so the
    model's output is the hidden states the head would have read. Restored on exit, also on errors."""
    head = model.get_submodule(name)
    if type(head) is not nn.Linear:
        raise TypeError(f"without_head: {name!r} must be an nn.Linear head, got {type(head).__name__}")
    head.forward = lambda x: x  # an instance attribute shadows the class's forward
    try:
        yield head
    finally:
        del head.forward


def head_loss_fns(
    model: nn.Module,
    head: str = "lm_head",
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    *,
    example: Any = None,
    label_smoothing: float = 0.0,
):
    """``forward_fn`` / ``loss_fn`` for :class:`~spectral_lens.gradients.PerSampleGradientProbe` that run
    the model up to its ``nn.Linear`` head and compute the default causal-LM loss with
    :func:`linear_cross_entropy`: ``PerSampleGradientProbe(model, ..., **head_loss_fns(model))``.

    Only for models whose output *is* the head's output (no logit soft-capping, scaling or slicing
    after the head). Every forward checks that the output's last dimension is the head's input width;
    pass a batch as ``example`` to also check, once and here, that ``head(hidden)`` reproduces the
    model's own logits (this catches element-wise transforms such as soft-capping, which keep the
    shape). ``label_smoothing``: as ``F.cross_entropy``'s (:func:`linear_cross_entropy`). The probe's losses, gradients and spectra are those of the default loss up to the rounding
    stated in the module docstring.
    """
    module = model.get_submodule(head)
    if type(module) is not nn.Linear:
        raise TypeError(f"head_loss_fns: {head!r} must be an nn.Linear head, got {type(module).__name__}")
    eps = _check_smoothing("head_loss_fns", label_smoothing)

    def forward_fn(m: nn.Module, batch: Any):
        inputs = batch["input_ids"] if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) else batch
        with without_head(m, head):
            out = m(inputs)
        hidden = out if isinstance(out, torch.Tensor) else getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else None)
        if not isinstance(hidden, torch.Tensor) or hidden.shape[-1] != module.in_features:
            raise ValueError(
                f"head_loss_fns: with {head!r} bypassed the model returned {type(out).__name__} of shape "
                f"{tuple(getattr(hidden, 'shape', ()))}, expected hidden states (..., {module.in_features}); "
                "this model transforms the head's output, use the default loss"
            )
        return hidden

    def loss_fn(hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        return causal_lm_head_loss(hidden, batch, module, ignore_index, chunk_rows, eps)

    if example is not None:
        with torch.no_grad():
            inputs = example["input_ids"] if isinstance(example, Mapping) else example[0] if isinstance(example, (tuple, list)) else example
            out = model(inputs)
            logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else None)
            rebuilt = module(forward_fn(model, example))
            if not isinstance(logits, torch.Tensor) or logits.shape != rebuilt.shape or not torch.allclose(
                rebuilt.to(logits.dtype), logits, rtol=0, atol=1e-3 * float(logits.abs().max()) + 1e-6
            ):
                raise ValueError(
                    f"head_loss_fns: {head!r} applied to the hidden states does not reproduce the model's logits "
                    "(the model transforms the head's output, e.g. soft-capping); use the default loss"
                )

    return {"forward_fn": forward_fn, "loss_fn": loss_fn}


_GLOBAL_HOOK_REASON = "a global module forward hook is registered (it could change the head's output)"


class HeadWatch:
    """What every ``nn.Linear`` of ``model`` returned in one forward, to prove (:meth:`verdict`) that the
    default loss can be chunked through one of them.

    Use it around a forward (``with HeadWatch(model) as watch: out = forward()``), then call
    ``watch.verdict(out, exclude)``. Inside the block every ``nn.Linear`` carries a forward hook,
    prepended so it sees what ``forward`` returned before any user hook; every hook is removed on
    exit, also when the forward raises. Which modules have their ``forward`` replaced on the instance
    is read when the watch is built, so build it outside a probe pass (whose weight-cast cache sets
    instance forwards of its own; :mod:`~spectral_lens.gradients.cast_cache`).

    The forward may build an autograd graph: the probe's fast engine runs its first chunk's forward
    inside a watch, so the decision costs no forward of its own. The hooks hold the tensors they see
    by weak reference, except the input of the latest ``nn.Linear`` call, which :meth:`verdict`
    returns as the hidden states when that call is the head's (the usual case: nothing runs after
    the head).
    """

    def __init__(self, model: nn.Module) -> None:
        self._linears: dict[int, tuple[str, nn.Module]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                self._linears.setdefault(id(mod), (name, mod))
        self._patched = {k for k, (_, mod) in self._linears.items() if "forward" in vars(mod)}
        self._seen: dict[int, list] = {k: [] for k in self._linears}
        self._last: tuple[int, torch.Tensor | None] | None = None  # (module id, input) of the latest call
        self._handles: list = []
        self._global_hooks = False

    def __enter__(self) -> "HeadWatch":
        self._global_hooks = bool(nn.modules.module._global_forward_hooks)
        try:
            for _, mod in self._linears.values():
                self._handles.append(mod.register_forward_hook(self._hook, prepend=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module, args, output) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._seen[id(module)].append(
            (
                weakref.ref(output) if isinstance(output, torch.Tensor) else None,
                getattr(output, "_version", None),
                None if x is None else weakref.ref(x),
                None if x is None else x._version,
            )
        )
        self._last = (id(module), x)

    def verdict(self, out: Any, exclude: Iterable[torch.Tensor] = ()) -> tuple[str | None, str, torch.Tensor | None]:
        """``(name, "", hidden)`` when the default loss of the forward's output ``out`` can run chunked
        through the ``nn.Linear`` ``name`` (the conditions are :func:`find_chunkable_head`'s), else
        ``(None, reason, None)``. ``hidden`` is the head's input in this forward (what the forward
        returns with the head bypassed, :func:`without_head`), or ``None`` when another ``nn.Linear``
        ran after the head (its input was not kept)."""
        if self._global_hooks:
            return None, _GLOBAL_HOOK_REASON, None
        try:
            logits = extract_logits(out)
        except TypeError as exc:
            return None, f"no logits found in the model output ({exc})", None
        names, seen = self._linears, self._seen
        probed = {id(p) for p in exclude}

        def probed_part(head: nn.Module, name: str) -> str:
            hit = [k for k, p in (("weight", head.weight), ("bias", head.bias)) if p is not None and id(p) in probed]
            return f"the probed parameters include the head's {hit[0]} ({name}.{hit[0]}, tied or not)" if hit else ""

        hits = [k for k, calls in seen.items() if any(r is not None and r() is logits for r, _, _, _ in calls)]
        if not hits:
            width = logits.shape[-1] if logits.ndim else None
            for k, calls in seen.items():  # a probed head's output is the fast engine's copy, not what it returned
                if calls and names[k][1].out_features == width and probed_part(names[k][1], names[k][0]):
                    return None, probed_part(names[k][1], names[k][0]), None
            same = [names[k][0] for k, calls in seen.items() if calls and names[k][1].out_features == width]
            where = f" (nn.Linear with out_features={width}: {same})" if same else f" (no nn.Linear has out_features={width})"
            return None, (
                f"the logits ({str(logits.dtype).replace('torch.', '')}, {width} classes) are not the tensor an "
                f"nn.Linear head returned{where}: something runs after the head (soft-capping, scaling, a dtype cast "
                "such as .float(), slicing, a hook) or the head is not an nn.Linear"
            ), None
        key = hits[0]
        name, head = names[key]
        calls = seen[key]
        _, version, x_ref, x_version = next(c for c in calls if c[0] is not None and c[0]() is logits)
        x = None if x_ref is None else x_ref()
        reason = ""
        if type(head) is not nn.Linear:
            reason = f"{name!r} is a {type(head).__name__}, a subclass of nn.Linear (its forward may differ)"
        elif key in self._patched:
            reason = f"{name!r} has its forward replaced on the instance"
        elif any(p is not None and type(p) is not nn.Parameter for p in (head.weight, head.bias)):
            reason = (
                f"the weight or bias of {name!r} is not a plain nn.Parameter (a tensor set by a wrapper such as "
                "FSDP or a parametrization; it may not hold the values outside the module's forward)"
            )
        elif len(calls) != 1:
            reason = f"{name!r} ran {len(calls)} times in one forward (bypassing it would change the other calls)"
        elif logits._version != version:
            reason = f"the output of {name!r} is modified in place after the head (e.g. logits.mul_())"
        elif x is not None and x._version != x_version:
            reason = f"the input of {name!r} is modified in place after the head"
        elif head._forward_hooks or getattr(head, "_forward_hooks_with_kwargs", None):
            reason = f"{name!r} has forward hooks (bypassed, they would see the hidden states instead of the logits)"
        else:
            reason = probed_part(head, name)
        if reason:
            return None, reason, None
        last = self._last
        hidden = last[1] if last is not None and last[0] == key and last[1] is x else None
        return name, "", hidden


def find_chunkable_head(
    model: nn.Module, run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> tuple[str | None, str]:
    """The ``nn.Linear`` head the default loss can be chunked through, proved on one forward.

    Calls ``run()`` once under ``torch.no_grad()`` (a forward of ``model`` returning its output) inside
    a :class:`HeadWatch` (a temporary forward hook on every ``nn.Linear``, prepended, so it sees what
    ``forward`` returned before any user hook; removed afterwards, also when ``run`` raises).
    Returns ``(name, "")`` for the module ``name`` when all of these hold, else ``(None, reason)``:

    * the tensor the default loss reads, ``extract_logits(output)``, **is the very tensor object** the
      module's ``forward`` returned (so nothing ran after the head: no soft-capping, scaling, dtype cast
      such as ``.float()`` on lower-precision logits, slicing, or a user hook replacing the output), and
      neither it nor the head's input was modified in place later in the forward (``_version``);
    * the module is exactly ``nn.Linear`` (not a subclass) holding its weight and bias as plain
      ``nn.Parameter`` (not a wrapper-managed tensor such as FSDP's or a ``DTensor``), its ``forward`` is
      not patched on the instance, it ran once in the forward and has no forward hooks of its own (bypassed, those hooks
      would see the hidden states), and no global module forward hook is registered;
    * none of the tensors in ``exclude`` (the probed parameters) is the head's weight or bias (tied
      embeddings are fine unless the probed parameter *is* the head's weight).

    Under these conditions, bypassing the head (:func:`without_head`) makes the same forward return
    the head's input where it returned the logits, so :func:`causal_lm_head_loss` on that output is the
    default loss of the model's output up to the rounding in the module docstring.
    """
    if nn.modules.module._global_forward_hooks:  # decided without a forward
        return None, _GLOBAL_HOOK_REASON
    watch = HeadWatch(model)
    with watch, torch.no_grad():
        out = run()
    name, reason, _ = watch.verdict(out, exclude)
    return name, reason


def chunked_head_fns(
    model: nn.Module,
    head: str,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    label_smoothing: float = 0.0,
):
    """``forward_fn`` / ``loss_fn`` that compute the default loss (:func:`causal_lm_loss` of
    ``forward(model, batch)``, label-smoothed by ``label_smoothing``) through
    :func:`causal_lm_head_loss`: ``forward`` runs with the head
    ``head`` bypassed (:func:`without_head`) and the hidden states are read where the logits were
    (``extract_logits``). Exact only for heads :func:`find_chunkable_head` accepts; the probe's
    ``head_loss="auto"`` builds these after that check. Unlike :func:`head_loss_fns`, the model is
    called as the default forward calls it (a dict batch passes ``attention_mask`` and the rest)."""
    module = model.get_submodule(head)
    if type(module) is not nn.Linear:
        raise TypeError(f"chunked_head_fns: {head!r} must be an nn.Linear head, got {type(module).__name__}")
    eps = _check_smoothing("chunked_head_fns", label_smoothing)

    def forward_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        with without_head(m, head):
            return extract_logits(forward(m, batch))

    def loss_fn(hidden: torch.Tensor, batch: Any) -> torch.Tensor:
        return causal_lm_head_loss(hidden, batch, module, ignore_index, chunk_rows, eps)

    return {"forward_fn": forward_fn, "loss_fn": loss_fn}
