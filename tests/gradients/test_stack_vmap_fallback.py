"""The vmap engine falls back to the loop engine, with a warning naming the cause, on models that
``torch.func.vmap`` cannot trace; other errors still propagate."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from spectral_lens import EngineFallbackWarning, PerSampleGradientProbe
from spectral_lens.gradients.fallback import is_untraceable


class Branchy(nn.Module):
    """Data-dependent Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, idx):
        h = self.emb(idx)
        if h.sum() > 0:  # vmap: data-dependent control flow
            h = torch.tanh(h)
        return self.head(self.lin(h))


class Itemy(Branchy):
    def forward(self, idx):
        h = self.emb(idx)
        return self.head(self.lin(h)) * (1.0 + 0.0 * h.mean().item())  # vmap: .item()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    return ids, torch.randint(0, 11, (5, 7), generator=g)


@pytest.mark.parametrize("cls", [Branchy, Itemy])
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_fallback_warns_and_equals_the_loop_engine(cls, engine):
    torch.manual_seed(0)
    model = cls().double()
    params = "emb.weight"  # nn.Embedding has no fast path: "auto" picks vmap
    probe = PerSampleGradientProbe(model, params, engine=engine, keep_matrix=True)
    assert probe.engines_[params] == "vmap"
    with pytest.warns(EngineFallbackWarning, match=r"vmap cannot trace (Branchy|Itemy) \(vmap: .*\); using engine='loop'"):
        probe.update(_batch())
    assert probe.engines_[params] == "loop"
    with warnings.catch_warnings():  # later batches go straight to the loop: no second warning
        warnings.simplefilter("error", EngineFallbackWarning)
        probe.update(_batch())
    loop = PerSampleGradientProbe(model, params, engine="loop", keep_matrix=True)
    loop.update(_batch()).update(_batch())
    torch.testing.assert_close(probe.matrix(), loop.matrix(), rtol=0, atol=0)
    assert model.emb.weight.grad is None


def test_other_errors_are_not_swallowed():
    assert is_untraceable(RuntimeError("vmap: It looks like you're calling .item() on a Tensor"))
    assert not is_untraceable(RuntimeError("CUDA out of memory"))
    assert not is_untraceable(ValueError("vmap: not a RuntimeError"))

    class Broken(Branchy):
        def forward(self, idx):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    probe = PerSampleGradientProbe(Broken().double(), "emb.weight", engine="vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            probe.update(_batch())
    assert probe.engines_["emb.weight"] == "vmap" and probe.n_samples_ == 0
