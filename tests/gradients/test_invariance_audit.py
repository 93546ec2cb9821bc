"""Measurement invariance on training setups found by the invariance audit: each test failed before its fix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe

W_O = "transformer.h.1.attn.c_proj.weight"


class UsedElsewhere(nn.Module):
    """W_O also used outside its module (so the fast engine's check differentiates it directly)."""

    def __init__(self, gpt):
        super().__init__()
        self.g = gpt

    def forward(self, x):
        extra = F.linear(self.g.transformer.wte(x), self.g.transformer.h[1].attn.c_proj.weight)
        return self.g(x) + 0.01 * extra.sum(-1, keepdim=True)


@pytest.mark.parametrize("engine, elsewhere", [("loop", False), ("auto", False), ("auto", True)])
def test_user_parameter_hooks_are_not_called_and_do_not_change_the_rows(gpt, helpers, engine, elsewhere):
    """A user's gradient hook on the probed weight (``register_hook``: clipping, counting) belongs to
    training. Before the fix the loop engine called it once per sample and measured its clipped output
    (rows off by 6% of their scale); the fast engine's elsewhere-check called it once."""
    model = gpt()
    name = W_O
    if elsewhere:
        model, name = UsedElsewhere(model).eval(), "g." + W_O
    x, y = helpers.lm_batch(m=5)
    ref = helpers.reference_rows(copy.deepcopy(model), [name], (x, y), helpers.lm_sample_loss)[name]
    weight = dict(model.named_parameters())[name]
    calls = []
    handle = weight.register_hook(lambda g: calls.append(1) or g.clamp(-1e-3, 1e-3))
    hooks = weight._backward_hooks

    probe = PerSampleGradientProbe(model, name, engine=engine, keep_matrix=True, chunk_size=2)
    probe.update((x, y))

    assert calls == []
    assert torch.allclose(probe.matrix().double(), torch.from_numpy(ref), rtol=1e-10, atol=1e-12)
    assert weight._backward_hooks is hooks and list(hooks) == [handle.id]
    # training afterwards: the hook fires once per backward and still clips .grad; its handle still removes it
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    assert calls == [1] and weight.grad.abs().max() <= 1e-3
    handle.remove()
    assert not weight._backward_hooks
