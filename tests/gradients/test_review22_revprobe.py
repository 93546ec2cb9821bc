"""Review 22 (adversarial): the probe's isolation after the per-update cost cut.

``set_training`` sets a Hugging Face model's flags directly where its ``train`` is transformers' own
``PreTrainedModel.train`` without ``use_kernels`` (that method is ``nn.Module.train`` then). Anything else
named ``PreTrainedModel.train`` must still be taken for an override (``model.train(mode)``, the override
deciding the modes measured): a function patched onto the class (the ``disabled_train`` idiom of
latent-diffusion / BLIP-2 code) and a class whose MRO puts a ``train`` of its own between ``PreTrainedModel``
and ``nn.Module`` (a mixin that ``PreTrainedModel.train``'s ``super().train`` reaches).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients import _isolation

NAME = "model.layers.1.self_attn.o_proj.weight"


def _llama():
    pytest.importorskip("transformers")
    from support.models import tiny_hf_llama

    return tiny_hf_llama(37)


def _modes_measured(model: nn.Module) -> set[bool]:
    """The ``training`` flags a decoder layer has during the probe's passes on a train-mode model."""
    seen: list[bool] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    try:
        PerSampleGradientProbe(model, NAME, engine="loop").update({"input_ids": ids, "labels": ids})
    finally:
        handle.remove()
    assert seen
    return set(seen)


def disabled_train(self, mode=True):
    """Overwrite ``model.train`` with this to make sure the train/eval mode does not change anymore
    (latent-diffusion's ``ldm.models.diffusion.ddpm.disabled_train``)."""
    return self


def test_a_train_patched_onto_pretrainedmodel_is_an_override(monkeypatch):
    """``PreTrainedModel.train = disabled_train`` (the frozen-encoder idiom, on the class): the merged check took
    any function whose global names are a subset of the transformers method's for it (``disabled_train`` uses
    none) and set the flags directly, measuring in eval mode a model that stays in train mode. Now it is an
    override: ``model.train(False)`` is called, changes nothing, and the probe measures the mode it leaves."""
    from transformers import PreTrainedModel

    model = _llama().train()
    monkeypatch.setattr(PreTrainedModel, "train", disabled_train)
    mods = _isolation.module_list(model)
    assert _isolation.set_training(model, mods, False) is True
    assert all(m.training for m in model.modules())
    assert _modes_measured(model) == {True}
    assert all(m.training for m in model.modules())


class _KeepsTraining(nn.Module):
    """A mixin after ``PreTrainedModel`` in a model class's MRO: ``PreTrainedModel.train``'s ``super().train``
    calls this, which keeps the model training (as a frozen-mode mixin decides the mode)."""

    def train(self, mode: bool = True):
        return super().train(True)


def test_a_train_between_pretrainedmodel_and_module_in_the_mro_is_an_override():
    """``class MyLlama(LlamaForCausalLM, _KeepsTraining)``: ``type(model).train`` is transformers' own method,
    but its ``super().train`` is the mixin's, not ``nn.Module.train``. The merged check set the flags directly
    (eval mode measured); now ``model.train`` is called and the mixin keeps the model training."""
    model = _llama()
    model.__class__ = type("MyLlama", (type(model), _KeepsTraining), {})
    mro = type(model).__mro__
    assert mro.index(_KeepsTraining) < mro.index(nn.Module)
    model.train()
    assert _isolation.set_training(model, _isolation.module_list(model), False) is True
    assert all(m.training for m in model.modules())
    assert _modes_measured(model) == {True}
    assert all(m.training for m in model.modules())


def test_transformers_own_train_still_sets_the_flags_directly():
    """The plain Llama (transformers' ``PreTrainedModel.train``, no ``use_kernels``) keeps the fast path."""
    model = _llama().train()
    assert _isolation.set_training(model, _isolation.module_list(model), False) is False
    assert not any(m.training for m in model.modules())
    model.train()
    assert _modes_measured(model) == {False}


def test_use_kernels_on_an_inner_pretrainedmodel_only_gets_model_train(monkeypatch):
    """``use_kernels`` set on the inner ``LlamaModel`` alone (not on the ``LlamaForCausalLM``): that module's
    ``train`` re-kernelizes, so ``model.train`` is called (on entry and exit) and the flags come back."""
    model = _llama().train()
    inner = model.model
    kernelized = []
    inner._use_kernels = True
    monkeypatch.setattr(inner, "set_use_kernels", lambda on: kernelized.append(inner.training), raising=False)
    assert _modes_measured(model) == {False}
    assert kernelized == [False, True]
    assert all(m.training for m in model.modules())
