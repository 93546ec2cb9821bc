"""An independent per-sample gradient reference and fixtures for the gradient-probe tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.models import TinyCNN, TinyGPT, lm_batch


def reference_rows(model, params, batch, loss_of_sample) -> dict[str, np.ndarray]:
    """Independent reference: one forward and one ``torch.autograd.grad`` per sample, float64 numpy."""
    named = dict(model.named_parameters(remove_duplicate=False))
    ps = [named[n] for n in params]
    n = batch[0].shape[0]
    rows = {k: [] for k in params}
    for i in range(n):
        sample = tuple(x[i : i + 1] for x in batch)
        gs = torch.autograd.grad(loss_of_sample(model, sample), ps)
        for k, g in zip(params, gs):
            rows[k].append(g.detach().reshape(-1).double().numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def lm_sample_loss(model, sample):
    x, y = sample
    return F.cross_entropy(model(x)[0], y[0], ignore_index=-100)


def sq_singular_values(g: np.ndarray) -> np.ndarray:
    return np.linalg.svd(g, compute_uv=False) ** 2


@pytest.fixture
def gpt():
    """Factory: a float64 TinyGPT in eval mode with a fixed seed."""

    def make(seed=0, **kw):
        torch.manual_seed(seed)
        return TinyGPT(**kw).double().eval()

    return make


@pytest.fixture
def helpers():
    """The module-level helpers, reachable from tests without importing conftest."""

    class H:
        pass

    h = H()
    h.lm_batch, h.reference_rows, h.lm_sample_loss = lm_batch, reference_rows, lm_sample_loss
    h.sq_singular_values, h.TinyGPT, h.TinyCNN = sq_singular_values, TinyGPT, TinyCNN
    return h


@pytest.fixture
def global_bit_generator():
    """Restores NumPy's global bit generator (and its state) after the test."""
    saved_bg = np.random.get_bit_generator()
    saved = np.random.get_state(legacy=False)
    yield
    np.random.set_bit_generator(saved_bg)
    np.random.set_state(saved)
