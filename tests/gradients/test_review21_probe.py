"""Review of the probe's one walk per update (``_isolation.module_list`` / ``set_training``): the mode switch
set every flag directly where no module's class overrides ``train``, ``__setattr__`` or ``children``. A module
whose *instance* overrides ``train`` (``encoder.train = disabled_train``: latent-diffusion and BLIP-2 code keep
a frozen encoder in eval mode so) or whose class overrides ``named_children`` (which ``nn.Module.train``
recurses through) was switched to the probe's mode anyway: its dropout drew during a ``train_mode=True``
measurement, which ``model.train(True)`` (the code before the walk) does not do."""

from __future__ import annotations

import copy

import pytest
import torch
from support.models import step_attention_biases, tiny_levit
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients._isolation import module_list, parameter_list, set_training


def disabled_train(self, mode=True):
    """The latent-diffusion / LAVIS idiom: assigned as ``module.train``, so ``.train()`` leaves its modes alone."""
    return self


class _SkipsSecond(nn.Sequential):
    """``named_children`` leaves out child ``"1"``, so ``train()`` does not reach it."""

    def named_children(self):
        return ((n, c) for n, c in super().named_children() if n != "1")


def _frozen_by_instance() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 2)))
    model[1].eval()
    model[1].train = disabled_train.__get__(model[1])
    return model


def _frozen_children_by_instance() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 2)))
    model[1].eval()
    model[1].children = lambda: iter(())
    return model


def _skipped_by_class() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), _SkipsSecond(nn.Linear(3, 3), nn.Dropout(0.5)))
    model[1][1].eval()
    return model


@pytest.mark.parametrize("build", [_frozen_by_instance, _frozen_children_by_instance, _skipped_by_class],
                         ids=["instance train", "instance children", "class named_children"])
@pytest.mark.parametrize("mode", [True, False])
def test_set_training_leaves_the_modes_model_train_leaves(build, mode):
    model, ref = build(), build()
    for start in (not mode, mode):
        model[0].training = ref[0].training = start
        set_training(model, module_list(model), mode)
        ref.train(mode)
        assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]


def test_a_frozen_encoder_stays_in_eval_mode_in_a_train_mode_measurement():
    """``train_mode=True`` on a model whose frozen encoder's instance overrides ``train``: the encoder's dropout
    stays off during the passes (as under ``model.train(True)``), so the rows are the float64 reference's
    without dropout; every mode is as before afterwards."""
    torch.manual_seed(0)
    model = _frozen_by_instance()
    seen = []
    model[1][0].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    before = [m.training for m in model.modules()]
    probe = PerSampleGradientProbe(model, "0.weight", keep_matrix=True, train_mode=True, engine="loop",
                                   forward_fn=lambda m, b: m(b[0]),
                                   loss_fn=lambda out, b: ((out - b[1]) ** 2).sum(1))
    rows = probe.update((x, y)).matrix()
    assert seen and not any(seen), "the frozen encoder's dropout was in train mode during the measurement"
    assert [m.training for m in model.modules()] == before
    ref = copy.deepcopy(model).double()
    ref[1].training = False
    want = []
    for i in range(6):
        ref.zero_grad()
        ((ref(x[i : i + 1].double()) - y[i : i + 1].double()) ** 2).sum().backward()
        want.append(ref[0].weight.grad.flatten().clone())
    torch.testing.assert_close(rows.double(), torch.stack(want), rtol=1e-5, atol=1e-6)


def _per_sample_reference(model: nn.Module, param: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).double().eval()
    w = ref.get_parameter(param)
    rows = []
    for i in range(len(x)):
        (g,) = torch.autograd.grad(((ref(x[i : i + 1].double()) - y[i : i + 1].double()) ** 2).sum(), w)
        rows.append(g.flatten())
    return torch.stack(rows)


def test_an_uninitialized_lazy_module_is_refused_by_name_and_measured_once_run():
    """A model with an ``nn.LazyLinear`` that has not run: ``update`` raises an error naming its parameters
    (was torch's ``requires_grad_`` error from inside the engine and again from the flag restore) and changes
    nothing; once the model has run, the rows are the float64 reference's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.LazyLinear(2))
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    probe = PerSampleGradientProbe(model, "0.weight", keep_matrix=True, forward_fn=lambda m, b: m(b[0]),
                                   loss_fn=lambda out, b: ((out - b[1]) ** 2).sum(1))
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=r"\['2.weight', '2.bias'\] are uninitialized.*run the model once"):
        probe.update((x, y))
    assert [m.training for m in model.modules()] == modes and [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng) and probe.n_samples_ == 0
    assert isinstance(model[2], nn.LazyLinear)  # not run by the refused update
    model(x[:1])
    rows = probe.update((x, y)).matrix()
    torch.testing.assert_close(rows.double(), _per_sample_reference(model, "0.weight", x, y), rtol=1e-5, atol=1e-6)


class _Kernelized(nn.Module):
    """A model whose ``train`` override keeps state derived from the mode, as a Hugging Face
    ``PreTrainedModel`` with ``use_kernels`` re-kernelizes its layers for training or inference on a change
    of mode (and PEFT's DoRA layer clears its cache on ``train(True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.norm, self.b = nn.Linear(4, 4), nn.Dropout(0.5), nn.LayerNorm(4), nn.Linear(4, 2)
        self.kernels, self.seen = "training", []

    def train(self, mode: bool = True):
        changed = self.training != mode
        out = super().train(mode)
        if changed:
            self.kernels = "training" if mode else "inference"
        return out

    def forward(self, x):
        self.seen.append((self.kernels, self.training))
        return self.b(self.norm(self.drop(self.a(x))))


@pytest.mark.parametrize("train_mode", [False, True])
def test_a_train_override_is_undone_by_the_override_after_the_measurement(train_mode):
    """The measurement switched the mode through the model's ``train`` override (its side effects ran), and
    set the flags back directly on exit, so the override's state was left for the measured mode: a training
    model with ``use_kernels`` went on training with its inference kernels. Now the override is called with
    the model's own mode again, and every flag (a normalization frozen by hand included) is as before."""
    torch.manual_seed(0)
    model = _Kernelized()
    model.train(not train_mode)
    model.norm.train(train_mode)  # set by hand: not what model.train() gives
    before = [m.training for m in model.modules()]
    probe = PerSampleGradientProbe(model, "a.weight", train_mode=train_mode, forward_fn=lambda m, b: m(b[0]),
                                   loss_fn=lambda out, b: ((out - b[1]) ** 2).sum(1))
    probe.update((torch.randn(4, 4), torch.randn(4, 2)))
    want = "training" if train_mode else "inference"
    assert model.seen and set(model.seen) == {(want, train_mode)}
    assert model.kernels == ("inference" if train_mode else "training")
    assert [m.training for m in model.modules()] == before


def _parametrized() -> nn.Module:
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    parametrizations.weight_norm(model[0])  # the weight lives in parametrizations.weight.original0/1
    parametrizations.spectral_norm(model[1])
    model[3].weight = model[2].weight  # tied
    return model


def _containers() -> nn.Module:
    model = nn.Module()
    model.plist = nn.ParameterList([nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))])
    model.pdict = nn.ParameterDict({"x": nn.Parameter(torch.ones(1)), "y": nn.Parameter(torch.ones(1))})
    model.again = model.plist  # shared: visited once
    return model


def _wrapped_children() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))),
                         torch.compile(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's
@pytest.mark.parametrize("build", [_parametrized, _containers, _wrapped_children],
                         ids=["parametrizations and tied", "parameter containers", "scripted and compiled children"])
def test_module_list_and_parameter_list_are_the_torch_ones_on_other_containers(build):
    """``module_list`` / ``parameter_list`` give ``model.modules()`` / ``model.parameters()`` (the same objects in
    the same order) where parameters live in parametrizations, parameter containers, a scripted or a compiled
    submodule; ``set_training`` leaves the flags ``model.train`` leaves (a script module's ``__setattr__`` and the
    compiled wrapper's ``training`` property: ``model.train`` itself)."""
    model, ref = build(), build()
    mods = module_list(model)
    assert [id(m) for m in mods] == [id(m) for m in model.modules()]
    assert [id(p) for p in parameter_list(mods)] == [id(p) for p in model.parameters()]
    for mode in (False, True, False):
        set_training(model, module_list(model), mode)
        ref.train(mode)
        assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]


def test_a_training_levit_measured_in_eval_mode_evaluates_with_its_weights_of_then():
    """Hugging Face's LeViT caches its attention biases in eval-mode forwards and clears the cache only in
    ``train(True)``. Measured in eval mode while training, the probe's eval forwards filled the cache and its
    exit set the flags back without ``train(True)``: after the next optimizer step, ``model.eval()`` ran with
    the attention biases of the measurement (outputs unlike those of the same model never measured)."""
    model = tiny_levit()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    probe = PerSampleGradientProbe(model, "classifier.linear.weight", forward_fn=lambda m, b: m(pixel_values=b[0]).logits,
                                   loss_fn=lambda out, b: nn.functional.cross_entropy(out, b[1], reduction="none"))
    probe.update((x, y))
    step_attention_biases(model, ref)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=0, atol=0)
