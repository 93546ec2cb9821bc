"""Fast path for ``nn.Linear``: ``g_m = sum_t dY[m, t]^T X[m, t]`` from one ordinary backward.

For ``y = x W^T + b`` the loss gradient of sample ``m`` is ``dL_m/dW = sum_t dy_{m,t} x_{m,t}^T``
(a sum over every token position, and over any extra leading dimensions), ``dL_m/db = sum_t dy_{m,t}``.
Both are one batched contraction over the token axis with a float32 result (float64 for float64
inputs) whatever the autocast dtype of the forward, so bf16 activations lose no further precision
here: the contraction runs with autocast off (:func:`~spectral_lens._matmul.bmm_fp32`; bf16 operands
on CUDA stay bf16 on the tensor cores with a float32 result). Under the probe's autocast it used to
run as a bf16 ``bmm`` whose result was rounded to bf16 before it was stored in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .._matmul import bmm_fp32
from .registry import register_fast_path

__all__ = ["linear_per_sample_grad"]


def _contraction_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def linear_per_sample_grad(module: nn.Module, name: str, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of ``module.weight`` (M, d_out, d_in) or ``module.bias`` (M, d_out)."""
    m = dy.shape[0]
    dy = dy.reshape(m, -1, dy.shape[-1])
    if name == "bias":
        return dy.sum(1, dtype=_contraction_dtype(x, dy))
    return bmm_fp32(dy.transpose(1, 2), x.reshape(m, -1, x.shape[-1]))


# exact-type registry: NonDynamicallyQuantizableLinear (nn.MultiheadAttention.out_proj) has Linear's forward
for _t in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
    register_fast_path(_t, linear_per_sample_grad, params=("weight", "bias"))
