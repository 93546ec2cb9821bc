"""Fast path for ``nn.Linear``: ``g_m = sum_t dY[m, t]^T X[m, t]`` from one ordinary backward.

For ``y = x W^T + b`` the loss gradient of sample ``m`` is ``dL_m/dW = sum_t dy_{m,t} x_{m,t}^T``
(a sum over every token position, and over any extra leading dimensions), ``dL_m/db = sum_t dy_{m,t}``.
Both are one batched contraction over the token axis, done in float32 (float64 for float64 inputs)
whatever the autocast dtype of the forward, so bf16 activations lose no further precision here.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_fast_path

__all__ = ["linear_per_sample_grad"]


def _contraction_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def linear_per_sample_grad(module: nn.Module, name: str, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of ``module.weight`` (M, d_out, d_in) or ``module.bias`` (M, d_out)."""
    m = dy.shape[0]
    dt = _contraction_dtype(x, dy)
    dy = dy.reshape(m, -1, dy.shape[-1]).to(dt)
    if name == "bias":
        return dy.sum(1)
    x = x.reshape(m, -1, x.shape[-1]).to(dt)
    return torch.bmm(dy.transpose(1, 2), x)


# exact-type registry: NonDynamicallyQuantizableLinear (nn.MultiheadAttention.out_proj) has Linear's forward
for _t in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
    register_fast_path(_t, linear_per_sample_grad, params=("weight", "bias"))
