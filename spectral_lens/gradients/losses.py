"""The default per-sample loss: mean next-token cross-entropy over each sequence's valid positions.

A per-sample loss function has the signature ``loss_fn(model_output, batch) -> Tensor (M,)``: one
loss ``L_m`` per sample (sequence) of the batch, and ``L_m`` may depend on sample ``m`` only. The
probe differentiates ``sum_m L_m`` once (fast path) or each ``L_m`` separately (``vmap``/``loop``
engines); both give ``grad_W L_m`` because samples do not interact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "causal_lm_targets", "extract_logits", "token_cross_entropy"]


#: elements per row block of :func:`_scaled_rows` on the CPU (a block and its float32 copy stay in L2)
_CPU_BLOCK_ELEMENTS = 1 << 18


def _scaled_rows(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``p * w`` as a new tensor in ``p``'s dtype, ``w`` (N, 1): each product is formed in the wider
    dtype and rounded once to ``p``'s, as an in-place ``p.clone().mul_(w)`` does (an out-of-place
    ``p * w`` would promote the (N, V) result to ``w``'s dtype). On the CPU a mixed-dtype product
    takes a slow path (6x the time of row blocks for (256, 50304) bf16 on the 2-core CPU,
    ``python benchmarks/bench_gradients.py --cpu-parts``), so there it runs on row blocks converted
    to ``w``'s dtype: the same roundings, bit for bit, and one pass over ``p`` instead of two."""
    if p.dtype == w.dtype:
        return p * w
    if p.device.type != "cpu" or p.ndim != 2:
        return p.clone().mul_(w)  # one mixed-dtype kernel on CUDA; out= has no vmap batching rule
    out = torch.empty_like(p)
    step = max(1, _CPU_BLOCK_ELEMENTS // max(1, p.shape[-1]))
    for s in range(0, p.shape[0], step):
        out[s : s + step].copy_(p[s : s + step].to(w.dtype).mul_(w[s : s + step]))
    return out


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy that keeps the forward's softmax, in the logits' dtype, in place of
    PyTorch's float32 log-probs; returns ``(loss, softmax)``, the second only for the backward.

    Written for bfloat16 logits, where PyTorch's own path (autocast casts the (tokens x vocab) array to
    float32, then log-softmax, a dense NLL gradient and a log-softmax backward, all in float32) moves
    2.3x the bytes. Every (tokens x vocab) pass here stays in the logits' dtype with float32
    arithmetic inside the kernels (softmax, max, a scale, a row sum): see ``benchmarks/bench_loss.py``.
    The saved softmax has the logits' size and takes their place (the logits are not saved); the
    backward scales it instead of recomputing it (the first version did, hence ``method="recompute"``),
    which saves the exponentials and one pass over the logits with the same result bit for bit.

    The loss is ``lse - z_t = (z_max - z_t) - log p_max``, formed in that order: ``p_max >= 1/V`` is
    always a normal number, so it is exact up to one rounding of ``p_max`` (absolute error <= 2^-8 for
    bf16) and the float32 rounding of the loss itself, whatever the logits' common offset (``z_max -
    z_t`` of two bf16 values is exact in float32 unless their exponents are more than 16 apart, and
    then rounds relative to itself), and never overflows or underflows. The gradient ``w_t (softmax(z) - onehot(t))`` carries two
    roundings to the logits' dtype per element, three at the target (PyTorch's path carries one: it
    casts a float32 gradient back for a bf16 head); the target entry is minus the sum of the others,
    so it stays accurate relative to itself when ``p_t ~ 1``. The algebra holds in any float dtype (the
    tests check float64 to 1e-14); in float16 ``p_max`` can be subnormal (flat rows over more than
    ~16k classes), so ``"auto"`` never picks it for float16.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, targets, ignore_index):
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0).unsqueeze(-1)
        # the softmax's largest entry is the one at the logits' arg max (exp, the division by the sum
        # and the rounding are monotone): two plain maxima, cheaper than a max with indices and a gather
        z_max = logits.amax(-1, keepdim=True)
        p = torch.softmax(logits, -1)
        p_max = p.amax(-1, keepdim=True)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # (z_max - z_t) first: it rounds at most relative to itself (exact for nearby bf16 values), so a
        # large common offset of the logits costs no rounding (lse itself would round at 2^-24 |z_max|)
        loss = ((z_max.to(acc) - logits.gather(-1, safe).to(acc)) - p_max.to(acc).log()).squeeze(-1)
        return loss.masked_fill(~valid, 0.0), p

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, targets, ignore_index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no (N, V) zeros for the softmax output's (absent) gradient
        ctx.save_for_backward(output[1], targets)
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx, grad_loss, _grad_p):
        if grad_loss is None:
            return None, None, None
        p, targets = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        safe = targets.masked_fill(~valid, 0).unsqueeze(-1)
        w = (grad_loss * valid).unsqueeze(-1)
        with torch.autocast(p.device.type, enabled=False):
            # a new tensor (p stays intact for a retained graph): float32 products, rounded to p's dtype
            g = _scaled_rows(p, w)
            # the target entry -w (1 - p_t) as minus the sum of the other entries: exact to rounding even
            # when p_t ~ 1, where (bf16(p_t) - 1) would cancel. index_put_ (not scatter_add_) is
            # deterministic on CUDA and batches under vmap.
            at = (torch.arange(g.shape[0], device=g.device), safe.squeeze(-1))
            g.index_put_(at, g.new_zeros(()).expand(g.shape[0]))
            g.index_put_(at, g.sum(-1).neg())  # float32 accumulation, one rounding
        return g, None, None


METHODS = ("auto", "native", "recompute")


def _check_smoothing(who: str, eps: Any) -> float:
    """``eps`` as a float in ``[0, 1]`` (``F.cross_entropy``'s ``label_smoothing`` range), else a ``ValueError``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"{who}: label_smoothing must be a number in [0, 1] (F.cross_entropy's), got {eps!r}")
    return float(eps)


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, method: str = "auto"
) -> torch.Tensor:
    """Per-token ``-log softmax(logits)[target]``, shape ``(N,)``, 0 where ``target == ignore_index``.

    ``logits`` (N, V) in any float dtype; the result is float32 (float64 for float64 logits).

    ``method``:

    * ``"native"``: PyTorch's ``F.cross_entropy``. Under ``torch.autocast`` it first casts bf16/fp16
      logits to a float32 (N, V) copy; the loss is then exact to float32 rounding.
    * ``"recompute"``: :class:`_SoftmaxCrossEntropy`: no float32 copy, no saved log-probs: the
      forward's softmax is kept in the logits' dtype, in place of the logits, and the backward scales
      it (the name is from the first version, which recomputed it there). See
      ``benchmarks/bench_loss.py`` for its time against the native autocast path; the loss is
      within 2^-8 absolute (plus the loss's own float32 rounding) and each gradient entry within two bf16 roundings (three at the target)
      of float64 on the same logits.
    * ``"auto"`` (default): ``"recompute"`` for bf16 logits, ``"native"`` otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"token_cross_entropy: method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "recompute" if logits.dtype == torch.bfloat16 else "native"
    if method == "recompute":
        with torch.autocast(logits.device.type, enabled=False):
            return _SoftmaxCrossEntropy.apply(logits, targets, ignore_index)[0]
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    return loss.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def extract_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits`` (Hugging Face), a dict with
    ``"logits"``, or a tuple / list whose first element is the logits (nanoGPT returns ``(logits, loss)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, a tuple "
        "whose first element is the logits, an object with .logits, or pass loss_fn="
    )


def causal_lm_targets(x: torch.Tensor, batch: Any, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Align per-position model outputs ``x`` (M, T, ...) (logits or hidden states) with next-token
    targets (M, T'), by the batch conventions of :func:`causal_lm_loss`; returns ``(x', targets)``."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                f"causal_lm_loss: the dict batch (keys {sorted(map(str, batch))}) has no 'labels', which the "
                "default loss reads its next-token targets from (Hugging Face convention: unshifted, -100 at "
                "ignored positions). Pass 'labels' (for a causal LM: a copy of input_ids with padding set to "
                "-100, as DataCollatorForLanguageModeling(mlm=False) makes), or an (input_ids, targets) tuple, "
                "or loss_fn= for another loss"
            )
        targets = batch["labels"][:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:
            # a target counts when both its position and the one predicting it are real tokens: with left
            # padding the last pad would otherwise "predict" the first real token, a term the sequence alone
            # does not have (its first token is never a target)
            targets = targets.masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), ignore_index)
        x = x[:, :-1]
    elif isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError("a tuple batch for the default causal-LM loss must be (input_ids, targets, ...)")
        targets = batch[1]
    else:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 2:
            got = f"shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(
                f"causal_lm_loss: a tensor batch is input_ids of shape (M, T), one row per sequence; got {got} "
                "(one sequence: input_ids[None]; a pool is a list of batches, e.g. pool=[input_ids], not the "
                "tensor itself)"
            )
        targets, x = batch[:, 1:], x[:, :-1]
    if x.shape[:-1] != targets.shape:
        raise ValueError(
            f"causal_lm_loss: logits of shape {tuple(x.shape)} do not match targets of shape "
            f"{tuple(targets.shape)}; expected logits (M, T, vocab) and targets (M, T)"
        )
    return x, targets


def causal_lm_loss(
    output: Any, batch: Any, ignore_index: int = -100, method: str = "auto", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-sequence mean autoregressive cross-entropy, shape ``(M,)``, float32 or wider
    (:func:`token_cross_entropy` per position).

    Targets by batch type:

    * tuple / list ``(input_ids, targets, ...)``: ``targets`` (M, T) are already aligned with the
      logits (``targets[:, t]`` is the token after ``input_ids[:, t]``, nanoGPT convention);
    * dict (or any mapping, e.g. a ``BatchEncoding``) with ``"labels"``: Hugging Face convention,
      labels are *not* shifted (the logits at ``t`` predict ``labels[:, t + 1]``); a target is
      masked too where ``attention_mask`` is 0 at its position or at the position predicting it (left
      padding: the last pad does not predict the first real token), so a padded sequence has the loss of
      the sequence alone. A packed batch (documents concatenated in a row) is read as its documents,
      padded (:func:`spectral_lens.gradients._batch.unpack_documents`), by the probe. Without ``"labels"`` a ``ValueError`` says what to pass;
    * a bare tensor ``input_ids``: targets are ``input_ids[:, 1:]`` against ``logits[:, :-1]``.

    ``method`` picks the cross-entropy kernel (:func:`token_cross_entropy`). Positions whose target
    equals ``ignore_index`` are excluded from both the sum and the count, so
    padding never changes ``L_m``. A sequence with no valid position gets ``0/0 = NaN``, which the
    probe reports as a non-finite loss naming the sample.

    ``label_smoothing`` (``eps`` in ``[0, 1]``): each token's loss is ``F.cross_entropy``'s with
    ``label_smoothing=eps``, ``(1 - eps) * nll + eps * mean over the vocabulary of -log p`` (Hugging
    Face's ``LabelSmoother``), computed by ``F.cross_entropy`` on the logits in float32 (or their wider
    dtype); ``method`` must then be ``"auto"`` or ``"native"``.
    """
    eps = _check_smoothing("causal_lm_loss", label_smoothing)
    logits, targets = causal_lm_targets(extract_logits(output), batch, ignore_index)
    if eps:
        if method not in ("auto", "native"):
            raise ValueError(f"causal_lm_loss: label_smoothing={eps} runs F.cross_entropy (method 'auto' or "
                             f"'native'), got method={method!r}")
        if logits.dtype != torch.float64:
            logits = logits.float()
        token_loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                                     reduction="none", label_smoothing=eps)
    else:
        token_loss = token_cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index, method)
    token_loss = token_loss.view(targets.shape)
    valid = (targets != ignore_index).to(token_loss.dtype)
    return token_loss.sum(-1) / valid.sum(-1)
