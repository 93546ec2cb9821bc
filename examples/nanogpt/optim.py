"""Optimizer groups, the matrix-optimizer switch (Muon / AdamW / Lamb), and LR/momentum schedules."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .muon import Muon
from .variants import Recipe

MATRIX_OPTIMIZERS = ("muon", "adamw", "lamb")
# base rate used when the matrix optimizer is switched away from the variant's own
# (adamw: the paper's LSWA-Adam control, App. B.3; lamb: same, untuned; muon: the Untied record's)
FALLBACK_MATRIX_LR = {"adamw": 0.004, "lamb": 0.004, "muon": 0.02}


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Partition trainable parameters into the groups ``matrix``, ``embed``, ``head``, ``scalar``.

    ``embed``: token/position/value embeddings (the tied head is the token embedding);
    ``head``: untied LM head; ``scalar``: ndim < 2; ``matrix``: every other (2-D block) weight.
    """
    groups = {"matrix": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            groups["scalar"].append(p)
        elif name.startswith(("wte.", "wpe.", "value_embeds.")):
            groups["embed"].append(p)
        elif name.startswith("lm_head."):
            groups["head"].append(p)
        else:
            groups["matrix"].append(p)
    return groups


def _lamb(params, lr, betas, eps, weight_decay):
    try:
        import torch_optimizer
    except ImportError as e:
        raise ImportError("matrix_optimizer='lamb' needs the torch-optimizer package (and pytorch-ranger): "
                          "pip install torch-optimizer pytorch-ranger (add --no-deps if pip would replace "
                          f"your torch build); import failed with: {e}") from e
    return torch_optimizer.Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_optimizers(model: nn.Module, recipe: Recipe, *, matrix_optimizer: str | None = None,
                     matrix_lr: float | None = None, lr_scale: float = 1.0,
                     muon_impl: str = "auto") -> list[torch.optim.Optimizer]:
    """Adam(W) for embeddings/head/scalars plus the matrix optimizer, rates times ``lr_scale``.

    ``matrix_optimizer`` defaults to the recipe's; switching it uses ``matrix_lr`` or
    :data:`FALLBACK_MATRIX_LR`. ``muon_impl``: "records" (:class:`~.muon.Muon`), "torch"
    (``torch.optim.Muon``, which matches the records only for EMA momentum and the
    sqrt(max(1, r/c)) scale), or "auto" (torch's where it matches and the weights are on CUDA).
    Every param group stores its unscheduled rate as ``base_lr`` for :func:`apply_schedule`.
    """
    kind = matrix_optimizer or recipe.matrix_optimizer
    if kind not in MATRIX_OPTIMIZERS:
        raise ValueError(f"matrix_optimizer={kind!r}, expected one of {MATRIX_OPTIMIZERS}")
    if muon_impl not in ("auto", "records", "torch"):
        raise ValueError(f"muon_impl={muon_impl!r}, expected 'auto', 'records' or 'torch'")
    if matrix_lr is None:
        matrix_lr = recipe.matrix_lr if kind == recipe.matrix_optimizer else FALLBACK_MATRIX_LR[kind]
    parts = split_params(model)
    rates = {"embed": recipe.embed_lr, "head": recipe.head_lr, "scalar": recipe.scalar_lr}
    adam_groups = [dict(params=parts[k], lr=rates[k] * lr_scale, base_lr=rates[k] * lr_scale,
                        weight_decay=0.0 if k == "scalar" else recipe.weight_decay, name=k)
                   for k in ("embed", "head", "scalar") if parts[k]]
    fused = all(p.is_cuda for g in adam_groups for p in g["params"])
    opts = [torch.optim.AdamW(adam_groups, betas=recipe.betas, eps=recipe.eps, fused=fused)]
    lr = matrix_lr * lr_scale
    mats = parts["matrix"]
    if kind == "adamw":
        opt = torch.optim.AdamW(mats, lr=lr, betas=recipe.betas, eps=recipe.eps,
                                weight_decay=recipe.weight_decay, fused=all(p.is_cuda for p in mats))
    elif kind == "lamb":
        opt = _lamb(mats, lr, recipe.betas, recipe.eps, recipe.weight_decay)
    else:
        torch_ok = (hasattr(torch.optim, "Muon") and recipe.muon_scale == "sqrt_ratio"
                    and all(p.ndim == 2 for p in mats))
        if muon_impl == "torch" and not torch_ok:
            raise ValueError("muon_impl='torch': torch.optim.Muon is missing or cannot express this recipe "
                             f"(shape scale {recipe.muon_scale!r}; it always applies sqrt(max(1, r/c)) and takes "
                             "2-D parameters only); use muon_impl='records'")
        use_torch = muon_impl == "torch" or (muon_impl == "auto" and torch_ok and recipe.muon_momentum == "ema"
                                               and all(p.is_cuda for p in mats))
        if use_torch:
            opt = torch.optim.Muon(mats, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True,
                                   adjust_lr_fn="original")
        else:
            opt = Muon(mats, lr=lr, momentum=0.95, shape_scale=recipe.muon_scale,
                       momentum_form=recipe.muon_momentum)
    for g in opt.param_groups:
        g["base_lr"], g["name"] = lr, "matrix"
    opts.append(opt)
    return opts


def lr_multiplier(recipe: Recipe, step: int, steps: int) -> float:
    """LR multiplier at 0-based ``step`` of ``steps``: warm-up min(1, (s+1)/W), then flat with a linear
    cool-down to ``final_lr_frac`` over the last ``cooldown_frac``, or a cosine to it.

    W = ``warmup_frac * steps`` is fractional unless ``steps`` is the record's; the cap keeps the
    last warm-up step at the peak rate instead of above it."""
    warm, cool, floor = recipe.warmup_frac * steps, recipe.cooldown_frac * steps, recipe.final_lr_frac
    if step < warm:
        return min(1.0, (step + 1) / warm)
    if recipe.decay == "cosine":
        t = min((step - warm) / max(steps - warm, 1e-12), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cool > 0 and step > steps - cool:
        t = (steps - step) / cool  # 1 -> 0 across the cool-down
        return t + (1 - t) * floor
    return 1.0


def muon_momentum(recipe: Recipe, step: int) -> float:
    """Muon momentum at ``step``: 0.85 -> 0.95 over ``momentum_warmup_steps``, else 0.95."""
    if recipe.momentum_warmup_steps <= 0:
        return 0.95
    f = min(step / recipe.momentum_warmup_steps, 1.0)
    return 0.85 * (1 - f) + 0.95 * f


def apply_schedule(optimizers: list[torch.optim.Optimizer], recipe: Recipe, step: int, steps: int) -> float:
    """Set every group's lr (and Muon momentum) for ``step`` of ``steps``; returns the LR multiplier."""
    mult = lr_multiplier(recipe, step, steps)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
            if "ns_steps" in g:  # a Muon group (ours or torch's)
                g["momentum"] = muon_momentum(recipe, step)
    return mult
