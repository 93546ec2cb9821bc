"""Review 22 (rng): the probe keeps NumPy's global generator, whatever bit generator is installed and whoever
installs one.

The probe's bounded-memory mode replays each non-resident chunk's RNG state when it recomputes the chunk's rows
(``gram()``/``compute()``). That state held NumPy's global generator's state dictionary only, which
``np.random.set_state`` refuses for another bit generator: a user who installed another global bit generator
(``np.random.set_bit_generator(np.random.PCG64())``) between ``update()`` and ``gram()`` got numpy's
``ValueError: state must be for a PCG64 RNG``. A forward that installs its own bit generator left it installed
after the measurement (the user's generator and its stream gone). The isolation now forks the global generator
itself: the installed bit generator object and its state, both restored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.models import TinyGPT
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients._isolation import forked_rng, rng_state, set_rng_state

W = "gpt.transformer.h.1.attn.c_proj.weight"


class _NumpyNoise(nn.Module):
    """TinyGPT whose output gets noise drawn from NumPy's global generator (an augmentation-style layer);
    ``install``: a bit generator the forward installs as the global one first (as some seeding helpers do)."""

    def __init__(self, install=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(d=16, layers=2, ctx=8)
        self.install = install

    def forward(self, idx):
        if self.install is not None:
            np.random.set_bit_generator(self.install())
        return self.gpt(idx) + 1e-2 * float(np.random.random())


def _batch(seed: int = 0, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 37, (b, 8), generator=g), torch.randint(0, 37, (b, 8), generator=g)


def _np_state():
    st = np.random.get_state(legacy=False)
    inner = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st["state"].items()}
    return st["bit_generator"], inner, st.get("has_gauss"), st.get("gauss")


def test_gram_after_the_user_installs_another_bit_generator(global_bit_generator):
    """update() under MT19937, then the user installs PCG64, then gram(): the recomputation replays the chunks'
    draws (rows equal the all-resident probe's, to float64 rounding) and the user's PCG64, its state, is back.
    Before: ``ValueError: state must be for a PCG64 RNG`` from ``np.random.set_state``."""
    np.random.set_bit_generator(np.random.MT19937(1))
    batch = _batch()
    model = _NumpyNoise().double()
    ref = PerSampleGradientProbe(model, W, chunk_size=2)
    bounded = PerSampleGradientProbe(model, W, chunk_size=2, max_resident_samples=2)
    start = np.random.get_state(legacy=False)
    ref.update(batch)
    np.random.set_state(start)
    bounded.update(batch)
    user = np.random.PCG64(5)
    np.random.set_bit_generator(user)
    np.random.random()
    before = _np_state()
    got = bounded.gram()
    assert np.random.get_bit_generator() is user
    assert _np_state() == before
    torch.testing.assert_close(got, ref.gram(), rtol=1e-12, atol=1e-14)
    assert np.random.get_bit_generator() is user


@pytest.mark.parametrize("bounded", [False, True])
def test_a_forward_installing_its_own_bit_generator_leaves_the_users(global_bit_generator, bounded):
    """A forward that calls ``np.random.set_bit_generator``: after update() and gram() the user's bit generator
    object is installed again, with its state (before: the forward's Philox stayed installed)."""
    user = np.random.PCG64(11)
    np.random.set_bit_generator(user)
    np.random.random()
    before = _np_state()
    probe = PerSampleGradientProbe(_NumpyNoise(install=lambda: np.random.Philox(3)), W, chunk_size=2,
                                   max_resident_samples=2 if bounded else None)
    probe.update(_batch())
    assert np.random.get_bit_generator() is user and _np_state() == before
    probe.gram()
    assert np.random.get_bit_generator() is user and _np_state() == before


def test_forked_rng_restores_the_installed_bit_generator(global_bit_generator):
    """The isolation itself: a block that installs another bit generator and draws from it finds the user's
    generator object back afterwards (also on an exception), the same next draw; and set_rng_state of a state
    captured under MT19937 works under PCG64 (a replay draws from a copy of the MT19937 object; with
    ``reinstall``, a fork's exit, the object itself is installed)."""
    user = np.random.MT19937(4)
    np.random.set_bit_generator(user)
    np.random.randn()  # a cached Gaussian too
    expected = np.random.get_state(legacy=False)
    want = np.random.randn(), np.random.randn()
    np.random.set_state(expected)
    with pytest.raises(RuntimeError, match="inside"), forked_rng():
        np.random.set_bit_generator(np.random.PCG64(1))
        np.random.random()
        raise RuntimeError("inside")
    assert np.random.get_bit_generator() is user
    assert (np.random.randn(), np.random.randn()) == want
    np.random.set_state(expected)
    state = rng_state()
    np.random.set_bit_generator(np.random.PCG64(2))
    set_rng_state(state)
    assert np.random.get_bit_generator() is not user and type(np.random.get_bit_generator()) is type(user)
    assert (np.random.randn(), np.random.randn()) == want
    np.random.set_bit_generator(np.random.PCG64(3))
    set_rng_state(state, reinstall=True)
    assert np.random.get_bit_generator() is user
    assert (np.random.randn(), np.random.randn()) == want
