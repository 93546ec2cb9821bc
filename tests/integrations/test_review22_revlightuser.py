"""Review of the Lightning callback's refusal of a module without ``forward`` (review 22): modules that do reach
a ``forward`` of their own are accepted (a mixin's after ``LightningModule``, one set on the instance, a base of
the user's named ``LightningModule``), in both Lightning packages; the refusals stand where the lens would call
``nn.Module``'s placeholder (also after ``torch.compile``); and the lens's options decide alike."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from support import lightning_user
from support.lightning_user import pool
from torch import nn

import spectral_lens as sl
from spectral_lens.gradients import PerSampleGradientProbe

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from spectral_lens.integrations._lightning_hooks import _defines_forward

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


def package(name):
    """The Lightning package and the callback made for it (skip when that package is not installed)."""
    pl = pytest.importorskip(name, reason=f"{name} is not installed")
    callbacks = importlib.import_module(
        "spectral_lens.integrations." + ("lightning" if name == "lightning.pytorch" else "pytorch_lightning"))
    return pl, callbacks.SpectralLensLightningCallback


def modules(pl):
    """Module classes for the package ``pl``: ``Base`` defines no forward (Lightning needs none)."""

    Base = lightning_user.no_forward_module(pl)

    class ForwardMixin(nn.Module):
        def forward(self, x):
            return self.net(x)

    class MixinAfter(Base, ForwardMixin):  # MRO: ..., LightningModule, ..., ForwardMixin, Module
        pass

    class OnInstance(Base):
        def __init__(self) -> None:
            super().__init__()
            self.forward = self.net.forward

    class LightningModule(Base):  # a base of the user's own, named so
        def forward(self, x):
            return self.net(x)

    class UserSub(LightningModule):
        pass

    class WithForward(Base):
        def forward(self, x):
            return self.net(x)

    return {"base": Base, "mixin-after": MixinAfter, "on-instance": OnInstance, "user-named-base": UserSub,
            "with-forward": WithForward}


def fit(pl, callback_class, module, lens, **kw):
    return lightning_user.fit(pl, callback_class, module, lens, max_steps=2, batches=4, **kw)


def lens_for(module=None, **kw):
    kw.setdefault("schedule", sl.Schedule.every(1))
    return sl.SpectralLens(module, pool(), tail_window=(2, 8), **kw) if module is not None else \
        sl.SpectralLens(pool=pool(), tail_window=(2, 8), **kw)


@pytest.mark.parametrize("pkg", PACKAGES)
@pytest.mark.parametrize("kind", ["mixin-after", "on-instance", "user-named-base", "with-forward"])
def test_a_module_that_reaches_a_forward_of_its_own_is_measured(pkg, kind):
    # before: "mixin-after", "on-instance" and "user-named-base" were refused with the TypeError, although
    # calling the module works (the first forward in the MRO was LightningModule's pass-through, or a class
    # named LightningModule, and a forward set on the instance was not looked at)
    pl, callback = package(pkg)
    module = modules(pl)[kind]()
    module(torch.zeros(2, 12, dtype=torch.long))  # calling it works
    lens = lens_for()
    fit(pl, callback, module, lens)
    assert [m.step for m in lens.history] == [1, 2]


@pytest.mark.parametrize("pkg", PACKAGES)
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_a_module_without_forward_is_still_refused(pkg, compiled):
    # trainer.fit(torch.compile(module)) sets an instance forward wrapping LightningModule's pass-through
    pl, callback = package(pkg)
    module = modules(pl)["base"]()
    lens = lens_for()
    with pytest.raises(TypeError, match=r"Base defines no forward"):
        fit(pl, callback, torch.compile(module, backend="eager") if compiled else module, lens)
    assert module.steps_run == 0 and lens.model is None


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_a_compiled_module_with_forward_is_measured(compiled):
    pl, callback = package("lightning.pytorch")
    module = modules(pl)["with-forward"]()
    lens = lens_for(params=())
    fit(pl, callback, torch.compile(module, backend="eager") if compiled else module, lens)
    assert [m.step for m in lens.history] == [1, 2]


def test_defines_forward_on_instance_callables():
    pl, _ = package("lightning.pytorch")
    kinds = modules(pl)
    module = kinds["base"]()
    assert not _defines_forward(module)
    module.forward = lambda x: module.net(x)  # a function of the user's
    assert _defines_forward(module)
    module.forward = module.training_step  # another method of the module's: not the placeholder
    assert _defines_forward(module)
    module.forward = pl.LightningModule.forward.__get__(module)  # LightningModule's pass-through, bound
    assert not _defines_forward(module)
    assert _defines_forward(nn.Linear(2, 2)) and not _defines_forward(nn.ModuleList())


@pytest.mark.parametrize("params", [[], ()], ids=["list", "tuple"])
def test_no_gradients_and_a_forward_fn_need_no_forward(params):
    pl, callback = package("lightning.pytorch")
    module = modules(pl)["base"]()
    lens = lens_for(params=params, forward_fn=lambda m, b: m.net(b[0]))
    fit(pl, callback, module, lens)
    assert [m.step for m in lens.history] == [1, 2]


def test_an_explicit_probe_decides_by_its_own_forward_fn():
    pl, callback = package("lightning.pytorch")
    kinds = modules(pl)
    custom = {"forward_fn": lambda m, b: m.net(b[0])}
    # the probe with the default forward on a module without one: refused
    module = kinds["base"]()
    lens = lens_for(probe=PerSampleGradientProbe(params="net.lm_head.weight"), **custom)
    with pytest.raises(TypeError, match="defines no forward"):
        fit(pl, callback, module, lens)
    # both with forward_fn: measured; the probe with the default forward on a module with one: measured
    for kind, probe_kw in (("base", custom), ("with-forward", {})):
        module = kinds[kind]()
        lens = lens_for(probe=PerSampleGradientProbe(params="net.lm_head.weight", **probe_kw), **custom)
        fit(pl, callback, module, lens)
        assert [m.step for m in lens.history] == [1, 2], kind


def test_a_lens_the_user_attached_before_fit_is_refused_and_stays_attached():
    pl, callback = package("lightning.pytorch")
    module = modules(pl)["base"]()
    lens = lens_for()
    handle = lens.attach(module)
    with pytest.raises(TypeError, match="Base defines no forward"):
        fit(pl, callback, module, lens)
    assert module.steps_run == 0 and lens.model is module  # the user's attachment is the user's to remove
    handle.remove()
    assert lens.model is None


@pytest.mark.parametrize("run", ["validate", "test"])
def test_validate_and_test_without_fit_neither_refuse_nor_measure(run):
    pl, callback = package("lightning.pytorch")
    kinds = modules(pl)

    class Evaluated(kinds["base"]):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x).flatten(0, 1), y.flatten()))

        test_step = validation_step

    module = Evaluated()
    lens = lens_for()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback(lens, on_validation=True)])
    getattr(trainer, run)(module, torch.utils.data.DataLoader(pool(), batch_size=None))
    assert lens.history == [] and lens.model is None
