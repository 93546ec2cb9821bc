"""Shared pieces of the wrapper tests (DDP, FSDP1, PEFT, compile around a small model).

``Net``/``net()``: a three-layer float64 MLP (``a``, ``b``, ``head``); ``svd_ref``: the float64 reference of a weight
matrix's spectrum. The one-process gloo group these tests need is the ``one_rank`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def svd_ref(w: torch.Tensor) -> np.ndarray:
    """float64 reference: squared singular values of ``w`` (numpy)."""
    return np.linalg.svd(w.detach().double().numpy(), compute_uv=False) ** 2
