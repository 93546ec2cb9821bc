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


@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "parametrizations.spectral_norm", "utils.weight_norm"])
def test_default_matrix_computed_by_a_parametrization_is_named_not_replaced_by_an_earlier_block(gpt, how):
    """Only the final block's W_O normalized (weight_norm / spectral_norm): before the fix the default
    heuristic silently probed block 0's plain W_O instead of the final block's, which the docs promise."""
    model = gpt(layers=2)
    last = model.transformer.h[1].attn.c_proj
    if how == "utils.weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(last)
        sources = ["weight_g", "weight_v"]
    else:
        getattr(torch.nn.utils.parametrizations, how.split(".")[1])(last)
        sources = ["parametrizations.weight.original0", "parametrizations.weight.original1"]
        sources = sources if how.endswith("weight_norm") else ["parametrizations.weight.original"]
    with pytest.raises(ValueError, match="final block's attention output projection") as err:
        PerSampleGradientProbe(model)
    msg = str(err.value)
    assert f"'{W_O}'" in msg and "computed from other parameters" in msg
    assert all(f"transformer.h.1.attn.c_proj.{s}" in msg for s in sources)
    # a normalized earlier block does not matter: the final block's plain W_O is the default
    model = gpt(layers=2)
    torch.nn.utils.parametrizations.weight_norm(model.transformer.h[0].attn.c_proj)
    assert list(PerSampleGradientProbe(model).params) == [W_O]


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_batch_made_under_inference_mode_is_measured(gpt, helpers, engine):
    """Held-out batches prepared under ``torch.inference_mode()`` (evaluation data): before the fix the
    fast and loop engines (and so SpectralLens's gradient pass) raised torch's 'Inference tensors cannot
    be saved for backward'; vmap measured them."""
    from spectral_lens import SpectralLens

    model = gpt()
    x, y = helpers.lm_batch(m=4)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    assert xi.is_inference()
    ref = helpers.reference_rows(model, [W_O], (x, y), helpers.lm_sample_loss)[W_O]
    probe = PerSampleGradientProbe(model, W_O, engine=engine, keep_matrix=True)
    probe.update((xi, yi))
    assert torch.allclose(probe.matrix().double(), torch.from_numpy(ref), rtol=1e-10, atol=1e-12)
    if engine == "auto":
        m = SpectralLens(model, [(xi, yi)], params=W_O, progress=False).measure(step=0, tokens=0)
        assert m.spectra[f"grad:{W_O}"].n_rows == 4
