"""A float64 per-sample gradient reference for the probe's tests: one forward and one ``autograd.grad`` per
sample."""

from __future__ import annotations

import torch

from spectral_lens.gradients.losses import causal_lm_loss


def per_sample_grams(model, batches, names) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """float64 Gram matrices (per parameter name) and losses of ``(inputs, targets)`` ``batches``, sample by
    sample."""
    ps = [model.get_parameter(n) for n in names]
    rows, losses = {n: [] for n in names}, []
    for x, y in batches:
        for i in range(x.shape[0]):
            sample = (x[i : i + 1], y[i : i + 1])
            loss = causal_lm_loss(model(sample[0]), sample)
            for n, grad in zip(names, torch.autograd.grad(loss.sum(), ps)):
                rows[n].append(grad.reshape(-1).double())
            losses.append(loss.detach().double())
    return {n: torch.stack(r) @ torch.stack(r).T for n, r in rows.items()}, torch.cat(losses)
