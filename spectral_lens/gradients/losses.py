"""The default per-sample loss: mean next-token cross-entropy over each sequence's valid positions.

A per-sample loss function has the signature ``loss_fn(model_output, batch) -> Tensor (M,)``: one
loss ``L_m`` per sample (sequence) of the batch, and ``L_m`` may depend on sample ``m`` only. The
probe differentiates ``sum_m L_m`` once (fast path) or each ``L_m`` separately (``vmap``/``loop``
engines); both give ``grad_W L_m`` because samples do not interact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "extract_logits", "token_cross_entropy"]

def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``-log softmax(logits)[target]``, shape ``(N,)``, 0 where ``target == ignore_index``.

    ``logits`` (N, V) in any float dtype. PyTorch's fused log-softmax kernels accumulate in float32
    internally without float32 copies of the (tokens x vocab) array; the per-token losses are returned
    in float32 (float64 for float64 logits). Measured on an H100 (benchmarks/RESULTS.md), a blocked
    float32 implementation spent 60% of the probe's time here; the native kernels are the fastest
    option short of fusing the loss into the model's head.
    """
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
