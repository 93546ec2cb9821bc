"""The default per-sample loss: mean next-token cross-entropy over each sequence's valid positions.

A per-sample loss function has the signature ``loss_fn(model_output, batch) -> Tensor (M,)``: one
loss ``L_m`` per sample (sequence) of the batch, and ``L_m`` may depend on sample ``m`` only. The
probe differentiates ``sum_m L_m`` once (fast path) or each ``L_m`` separately (``vmap``/``loop``
engines); both give ``grad_W L_m`` because samples do not interact.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["causal_lm_loss", "extract_logits", "token_cross_entropy"]

#: Elements of one float32 temporary in :func:`token_cross_entropy` (2**26: 256 MiB).
_CE_BLOCK_ELEMENTS = 2**26


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy that never materializes a float32 copy of all logits.

    ``F.cross_entropy`` on bf16 logits of a 50k vocabulary writes and re-reads float32 copies of the
    whole (tokens x vocab) array several times in forward and backward, which costs more than the
    model's head matmul. Here the float32 (float64 for float64 logits) work is done on row blocks:
    forward keeps nothing but the logits it was given, backward recomputes the softmax block by block
    and writes the gradient once, in the logits' dtype. ``torch.func`` can vmap it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, targets, ignore_index):
        acc = _acc_dtype(logits)
        step = _rows_per_block(logits)
        lse = torch.cat([torch.logsumexp(logits[s : s + step].to(acc), -1) for s in range(0, logits.shape[0], step)])
        valid = targets != ignore_index
        picked = logits.gather(1, targets.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1).to(acc)
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets)
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        scale = torch.where(valid, grad_loss, torch.zeros_like(grad_loss)).unsqueeze(1)
        index = targets.masked_fill(~valid, 0).unsqueeze(1)
        step = _rows_per_block(logits)
        blocks = []
        for s in range(0, logits.shape[0], step):
            p = torch.softmax(logits[s : s + step], -1, dtype=_acc_dtype(logits))
            p.scatter_add_(1, index[s : s + step], -torch.ones_like(p[:, :1]))
            blocks.append(p.mul_(scale[s : s + step]).to(logits.dtype))
        return torch.cat(blocks), None, None


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _rows_per_block(logits: torch.Tensor) -> int:
    return max(1, _CE_BLOCK_ELEMENTS // max(1, logits.shape[-1]))


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``-log softmax(logits)[target]``, shape ``(N,)``, 0 where ``target == ignore_index``.

    ``logits`` (N, V) in any float dtype; computed in float32 (float64 for float64 logits) on row
    blocks of at most 2**26 elements, with the gradient written directly in the logits' dtype: the same
    values as ``F.cross_entropy(logits.float(), targets, reduction="none")`` at a fraction of the memory
    traffic.
    """
    return _TokenCrossEntropy.apply(logits, targets, ignore_index)


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


def causal_lm_loss(output: Any, batch: Any, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence mean autoregressive cross-entropy, shape ``(M,)``, float32 or wider
    (:func:`token_cross_entropy` per position).

    Targets by batch type:

    * tuple / list ``(input_ids, targets, ...)``: ``targets`` (M, T) are already aligned with the
      logits (``targets[:, t]`` is the token after ``input_ids[:, t]``, nanoGPT convention);
    * dict with ``"labels"``: Hugging Face convention, labels are *not* shifted (the logits at ``t``
      predict ``labels[:, t + 1]``); positions where ``attention_mask`` is 0 are masked too;
    * a bare tensor ``input_ids``: targets are ``input_ids[:, 1:]`` against ``logits[:, :-1]``.

    Positions whose target equals ``ignore_index`` are excluded from both the sum and the count, so
    padding never changes ``L_m``. A sequence with no valid position gets ``0/0 = NaN``, which the
    probe reports as a non-finite loss naming the sample.
    """
    logits = extract_logits(output)
    if isinstance(batch, dict):
        targets = batch["labels"][:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:
            targets = targets.masked_fill(mask[:, 1:] == 0, ignore_index)
        logits = logits[:, :-1]
    elif isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError("a tuple batch for the default causal-LM loss must be (input_ids, targets, ...)")
        targets = batch[1]
    else:
        targets, logits = batch[:, 1:], logits[:, :-1]
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"causal_lm_loss: logits of shape {tuple(logits.shape)} do not match targets of shape "
            f"{tuple(targets.shape)}; expected logits (M, T, vocab) and targets (M, T)"
        )
    token_loss = token_cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index).view(targets.shape)
    valid = (targets != ignore_index).to(token_loss.dtype)
    return token_loss.sum(-1) / valid.sum(-1)
