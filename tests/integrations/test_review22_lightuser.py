"""A Lightning user's first day (review 22): a LightningModule without ``forward``, the common Lightning style."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.models import TinyGPT, lm_pool

import spectral_lens as sl

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from spectral_lens.integrations import SpectralLensLightningCallback


class NoForwardLit(pl.LightningModule):
    """Calls its network in the steps and defines no ``forward`` (Lightning does not need one)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def fit(module, lens, max_steps=4):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[SpectralLensLightningCallback(lens)])
    trainer.fit(module, torch.utils.data.DataLoader(lm_pool(6, batch=4, t=12, vocab=37, seed=0), batch_size=None))
    return trainer


def pool():
    return lm_pool(2, batch=4, t=12, vocab=37, seed=9)


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
