"""The lens's activation pass and a ``train()`` override: the pass switches the model to eval mode with
``model.eval()`` (the override runs) and used to set every flag back directly on exit, so state an override
derives from the mode stayed as it was for the measurement. Hugging Face's LeViT caches its attention biases in
eval-mode forwards and clears the cache only in ``train(True)``: a training LeViT measured by the lens then
evaluated, after its next optimizer step, with the attention biases of the measurement."""

from __future__ import annotations

import copy

import torch
from support.models import step_attention_biases, tiny_levit
from torch import nn

from spectral_lens import SpectralLens


class ModeCache(nn.Module):
    """A module whose eval forwards cache a value derived from its weight, cleared by ``train(True)`` (LeViT's
    pattern, without transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cache: torch.Tensor | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = None
        return self

    def forward(self, x):
        if self.training:
            return self.lin(x)
        if self.cache is None:
            self.cache = self.lin.weight.detach().clone()
        return x @ self.cache.T + self.lin.bias


def _step(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def test_a_training_model_measured_by_the_lens_evaluates_with_its_weights_of_then():
    torch.manual_seed(0)
    model = nn.Sequential(ModeCache(), nn.Linear(4, 4)).train()
    ref = copy.deepcopy(model)
    pool = [torch.randn(3, 4)]
    lens = SpectralLens(model, pool, layers=["0"], params=(), progress=False)
    lens.measure(1, 10)
    lens.detach()
    assert [m.training for m in model.modules()] == [True, True, True, True]
    for m in (model, ref):
        _step(m)
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pool[0]), ref(pool[0]), rtol=0, atol=0)


def test_frozen_submodules_keep_their_eval_mode_and_an_eval_model_is_not_switched_back():
    torch.manual_seed(0)
    model = nn.Sequential(ModeCache(), nn.Dropout(0.5), nn.Linear(4, 4)).train()
    model[1].eval()  # frozen by the user
    lens = SpectralLens(model, [torch.randn(3, 4)], layers=["0"], params=(), progress=False)
    lens.measure(1, 10)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    model.eval()
    calls = []
    model[0].train = lambda mode=True: calls.append(mode) or ModeCache.train(model[0], mode)
    lens.measure(2, 20)
    lens.detach()
    assert True not in calls  # a model in eval mode is not put through train(True)
    assert not any(m.training for m in model.modules())


def test_a_training_levit_measured_by_the_lens():
    model = tiny_levit()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    lens = SpectralLens(model, [x], layers=["levit.encoder.stages.0"], params=(), progress=False,
                        forward_fn=lambda m, b: m(pixel_values=b).logits, pick=lambda out: out[0] if isinstance(out, tuple) else out)
    lens.measure(1, 10)
    lens.detach()
    step_attention_biases(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=0, atol=0)
