"""Review 22: the probe's fixed per-update cost on the CPU (issue 13) without weakening its isolation.

NumPy's global generator may be another bit generator than MT19937 (``np.random.set_bit_generator``): the
isolation takes and restores its state without a warning, and a draw inside the pass is undone. A cached
Gaussian of the legacy generator (consumed by one ``randn`` inside the pass without touching the MT19937 key)
comes back. The FSDP refusal reads the update's module list: no walk over the model per update, and a model
sharded in place after binding is still refused.
"""

from __future__ import annotations

import importlib
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from support.models import TinyGPT
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe

W = "transformer.h.1.attn.c_proj.weight"


class _NumpyNoise(nn.Module):
    """TinyGPT whose forward adds noise drawn from NumPy's global generator (a data-augmentation style layer)."""

    def __init__(self, gauss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(d=16, layers=2, ctx=8)
        self.gauss = gauss

    def forward(self, idx):
        out = self.gpt(idx)
        draw = np.random.randn() if self.gauss else np.random.random()
        return out + 1e-3 * float(draw)


def _batch(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 37, (b, 8), generator=g), torch.randint(0, 37, (b, 8), generator=g)


def _np_state():
    st = np.random.get_state(legacy=False)
    inner = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st["state"].items()}
    return st["bit_generator"], inner, st.get("has_gauss"), st.get("gauss"), st.get("has_uint32"), st.get("uinteger")


@pytest.fixture
def global_bit_generator():
    """Restores NumPy's global bit generator (and its state) after the test."""
    saved_bg = np.random.get_bit_generator()
    saved = np.random.get_state(legacy=False)
    yield
    np.random.set_bit_generator(saved_bg)
    np.random.set_state(saved)


@pytest.mark.parametrize("bg", ["PCG64", "Philox"])
def test_another_global_bit_generator_is_forked_without_a_warning(global_bit_generator, bg):
    """With ``np.random.set_bit_generator(PCG64())`` the old isolation's ``np.random.get_state()`` (legacy tuple)
    warned ("get_state and legacy can only be used with the MT19937 BitGenerator") at every update: an error
    under ``-W error``. Now no warning, and the pass's own draw from that generator is undone."""
    np.random.set_bit_generator(getattr(np.random, bg)(7))
    model = _NumpyNoise()
    probe = PerSampleGradientProbe(model, "gpt." + W)
    before = _np_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.update(_batch())
    assert _np_state() == before
    assert type(np.random.get_bit_generator()).__name__ == bg


def test_a_cached_gaussian_consumed_inside_the_pass_comes_back(global_bit_generator):
    """One ``np.random.randn()`` inside the pass with a cached Gaussian takes the cache and leaves the MT19937
    key and position as they were: the isolation must restore ``has_gauss`` / ``gauss`` too (a fingerprint of
    the key and position alone would miss it). The user's next Gaussian is the one it would have drawn."""
    np.random.seed(3)
    np.random.randn()  # draws a pair: one returned, one cached
    assert np.random.get_state()[3] == 1
    before = _np_state()
    expected = np.random.get_state()
    np.random.randn()  # what the user's next draw is without a measurement
    want = np.random.randn()
    np.random.set_state(expected)
    probe = PerSampleGradientProbe(_NumpyNoise(gauss=True), "gpt." + W)
    probe.update(_batch())
    assert _np_state() == before
    np.random.randn()
    assert np.random.randn() == want


def _count_walks(monkeypatch, model: nn.Module) -> list:
    walks, real = [], nn.Module.named_modules

    def counting(self, *a, **k):
        if self is model:
            walks.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return walks


def test_the_fsdp_refusal_walks_nothing_once_fsdp_is_imported(monkeypatch):
    """Once ``torch.distributed.fsdp`` is imported (by any training script that can shard), the old per-update
    FSDP check walked the model through ``named_modules`` (~30 us an update on this model); now it reads the
    update's module list. Not a timing: the walks are counted."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    importlib.import_module("torch.distributed.fsdp")
    assert "torch.distributed.fsdp" in sys.modules
    model = TinyGPT(d=16, layers=2, ctx=8)
    probe = PerSampleGradientProbe(model, W)
    probe.update(_batch(1))
    walks = _count_walks(monkeypatch, model)
    probe.update(_batch(2))
    assert walks == [], f"{len(walks)} named_modules walks in one update"


def test_an_fsdp_module_added_after_binding_is_still_refused(monkeypatch):
    """The module-list check still finds a module sharded after the probe was bound (here an instance made an
    ``FSDPModule`` by its class, as ``fully_shard`` does in place) and refuses the vmap engine before any pass."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from spectral_lens.gradients import _measurable

    importlib.import_module("torch.distributed.fsdp")
    classes = _measurable._fsdp_classes()
    model = TinyGPT(d=16, layers=2, ctx=8)
    probe = PerSampleGradientProbe(model, W, engine="vmap")
    probe.update(_batch(1))
    block = model.transformer.h[0]
    block.__class__ = type("FSDPBlock", (classes[0], type(block)), {})  # what fully_shard does to the module
    rng = torch.get_rng_state(), random.getstate()
    with pytest.raises(ValueError, match="sharded with FSDP"):
        probe.update(_batch(2))
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert probe.n_samples_ == 3
