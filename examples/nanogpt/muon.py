"""Muon as the speedrun records use it: Nesterov momentum, then a quintic Newton-Schulz iteration.

Per hidden matrix W (rows x cols) with gradient G, momentum mu:

1. momentum: "classical" B = mu*B + G, U = G + mu*B (records up to 12-04), or "ema"
   B = mu*B + (1-mu)*G, U = (1-mu)*G + mu*B (12-08 on); with constant mu these differ by a
   factor (1-mu) that step 3 normalizes away;
2. X = U in ``ns_dtype`` (bf16 on GPUs; on CPU by default the parameter's dtype, at least fp32),
   transposed when rows > cols;
3. X = X / (||X||_F + 1e-7), so the spectral norm is at most 1;
4. five steps of X = a*X + (b*A + c*A@A) @ X with A = X @ X.T and (a, b, c) = (3.4445, -4.7750, 2.0315);
5. W = W - lr * s(W) * X with the era's shape factor s: "none" = 1 (10-04), "sqrt_max" =
   sqrt(max(r, c)) (10-10 to 10-18), "sqrt_ratio" = sqrt(max(1, r/c)) (11-03 on).

Tensors with more than two dims are treated as batches of matrices over the last two dims (the
01-16 "batched Muon"). No weight decay (none of the records uses it). Momentum warm-up is the
caller's job: set ``group["momentum"]`` before each step, as the records do.
"""
from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SHAPE_SCALES = ("none", "sqrt_max", "sqrt_ratio")


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate orthogonalization U S' V^T of G (..., r, c): singular values >= 1% of ||G||_F end in
    [0.682, 1.135], smaller ones anywhere in [0, 1.203] (the five-step map's range; a square Gaussian
    matrix has some).

    Computed in ``dtype`` (default: G's dtype) and returned in it. The singular values follow
    sigma -> a*sigma + b*sigma^3 + c*sigma^5 per step, starting from sigma / ||G||_F.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz5: expected a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or G.dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def shape_scale(shape: torch.Size, rule: str) -> float:
    """The update scale s(W) of ``rule`` for a matrix (or batch of matrices) of ``shape``."""
    r, c = shape[-2], shape[-1]
    if rule == "none":
        return 1.0
    if rule == "sqrt_max":
        return math.sqrt(max(r, c))
    if rule == "sqrt_ratio":
        return math.sqrt(max(1.0, r / c))
    raise ValueError(f"Muon shape scale {rule!r}, expected one of {SHAPE_SCALES}")


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices, record-faithful (see the module docstring for the algorithm).

    ``ns_dtype=None`` runs the iteration in bf16 on CUDA and elsewhere in the parameter's dtype,
    at least fp32 (an fp64 model is orthogonalized in fp64, not rounded to fp32).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 shape_scale: str = "sqrt_ratio", momentum_form: str = "ema", ns_dtype: torch.dtype | None = None):
        if shape_scale not in SHAPE_SCALES:
            raise ValueError(f"Muon shape_scale={shape_scale!r}, expected one of {SHAPE_SCALES}")
        if momentum_form not in ("classical", "ema"):
            raise ValueError(f"Muon momentum_form={momentum_form!r}, expected 'classical' or 'ema'")
        if not (math.isfinite(lr) and lr >= 0 and 0 <= momentum < 1):  # NaN fails every comparison
            raise ValueError(f"Muon: need lr >= 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        shape_scale=shape_scale, momentum_form=momentum_form, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)} "
                                     "(give embeddings, heads and scalars to Adam)")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, ema = group["momentum"], group["momentum_form"] == "ema"
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                if ema:
                    buf.lerp_(g, 1 - mu)
                    u = g.lerp(buf, mu) if group["nesterov"] else buf
                else:
                    buf.mul_(mu).add_(g)
                    u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                dtype = group["ns_dtype"] or (
                    torch.bfloat16 if p.is_cuda else torch.promote_types(p.dtype, torch.float32))
                x = newton_schulz5(u, steps=group["ns_steps"], dtype=dtype)
                p.add_(x.to(p.dtype), alpha=-group["lr"] * shape_scale(p.shape, group["shape_scale"]))
        return loss
