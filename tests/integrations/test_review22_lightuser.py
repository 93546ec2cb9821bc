"""A Lightning user's first day (review 22): a LightningModule without ``forward``, the common Lightning style."""

from __future__ import annotations

import pytest
from support import lightning_user
from support.lightning_user import pool

import spectral_lens as sl

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from spectral_lens.integrations import SpectralLensLightningCallback

NoForwardLit = lightning_user.no_forward_module(pl, "NoForwardLit")  # calls its network in the steps


def fit(module, lens):
    return lightning_user.fit(pl, SpectralLensLightningCallback, module, lens, max_steps=4, batches=6)


@pytest.mark.parametrize("on_module", [False, True], ids=["lens-without-model", "lens-on-the-module"])
def test_a_module_without_forward_is_refused_at_fit_start_naming_the_fix(on_module):
    # before: a bare NotImplementedError ('Module [NoForwardLit] is missing the required "forward" function')
    # from inside the first scheduled measurement, after training up to it, saying nothing of the lens
    module = NoForwardLit()
    lens = sl.SpectralLens(module, pool()) if on_module else sl.SpectralLens(pool=pool())
    lens.schedule = sl.Schedule.every(2)
    with pytest.raises(TypeError, match=r"NoForwardLit defines no forward.*SpectralLens\(module\.net"):
        fit(module, lens)
    assert module.steps_run == 0  # refused before any training
    assert lens.model is (module if on_module else None)  # a lens the callback would attach stays unattached


def test_the_lens_on_the_network_it_trains_measures():
    module = NoForwardLit()
    lens = sl.SpectralLens(module.net, pool(), schedule=sl.Schedule.every(2), tail_window=(2, 8))
    fit(module, lens)
    assert [m.step for m in lens.history] == [2, 4]


def test_a_forward_fn_is_enough():
    module = NoForwardLit()
    lens = sl.SpectralLens(pool=pool(), schedule=sl.Schedule.every(2), params=(), tail_window=(2, 8),
                           forward_fn=lambda m, batch: m.net(batch[0]))
    fit(module, lens)
    assert [m.step for m in lens.history] == [2, 4]


def test_a_forward_fn_for_the_activations_alone_is_refused_while_the_lens_builds_a_probe():
    # the probe SpectralLens builds for params=None calls model.forward whatever the lens's forward_fn
    module = NoForwardLit()
    lens = sl.SpectralLens(pool=pool(), schedule=sl.Schedule.every(2), tail_window=(2, 8),
                           forward_fn=lambda m, batch: m.net(batch[0]))
    with pytest.raises(TypeError, match=r"defines no forward.*gradient probe"):
        fit(module, lens)
    assert module.steps_run == 0
