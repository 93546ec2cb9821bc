"""Fast path for ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections), registered by name.

``Conv1D`` is a linear layer whose weight is stored transposed: ``weight`` has shape ``(in, out)``
and ``y = x W + b``. The per-sample gradient of sample ``m`` is therefore
``dL_m/dW = sum_t x_{m,t} dy_{m,t}^T`` (shape ``(in, out)``, the weight's own layout) and
``dL_m/db = sum_t dy_{m,t}``. Both are one batched contraction over the token axis, in float32
(float64 for float64 inputs), as for ``nn.Linear``.

The class is matched by ``(__module__, __qualname__)``, so ``transformers`` is never imported here.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import linear_per_sample_grad
from .registry import register_fast_path_by_name

__all__ = ["conv1d_per_sample_grad", "HF_CONV1D"]

#: Where ``transformers`` defines ``Conv1D``: ``(module, qualname)``.
HF_CONV1D = ("transformers.pytorch_utils", "Conv1D")


def conv1d_per_sample_grad(module: nn.Module, name: str, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of ``module.weight`` (M, d_in, d_out) or ``module.bias`` (M, d_out).

    ``Conv1D`` is ``nn.Linear`` with the weight stored transposed, so its gradient is the transpose
    of :func:`~spectral_lens.gradients.linear.linear_per_sample_grad`'s.
    """
    g = linear_per_sample_grad(module, name, x, dy)
    return g if name == "bias" else g.transpose(1, 2)


register_fast_path_by_name(*HF_CONV1D, conv1d_per_sample_grad, params=("weight", "bias"))
