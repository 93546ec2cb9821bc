"""Review 22 (rev-rng): replaying a captured RNG state reinstalls the bit generator object captured then; where
another one is installed now, that object's state was overwritten and never put back.

The probe's bounded-memory mode captures each non-resident chunk's RNG state at ``update()`` (with the bit
generator object installed then) and replays it at ``gram()``. A user who installed another global bit generator
in between but still draws from the first one (``np.random.Generator(first)``, or installs it again later) found
the first one's stream rewound by ``gram()``: the replay set its state to the one of the ``update()`` and the
recomputation drew from it, and the isolation put back only the object installed when the measurement began.
A replay now draws from a copy of that object; a fork's exit reinstalls the user's own object.
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
    """TinyGPT whose output gets noise drawn from NumPy's global generator."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(d=16, layers=2, ctx=8)

    def forward(self, idx):
        return self.gpt(idx) + 1e-2 * float(np.random.random())


def _state(bg) -> tuple:
    """A bit generator's state, comparable with ``==``."""
    st = bg.state
    return st["bit_generator"], {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st["state"].items()}


def test_gram_leaves_the_bit_generator_installed_at_update(global_bit_generator):
    """update() under the user's MT19937, the user installs a PCG64 and keeps drawing from the MT19937 through a
    ``Generator``, gram() recomputes: both of the user's bit generators hold their states afterwards (before: the
    MT19937's was the one of the update() plus the recomputation's draws), and the rows are the resident ones."""
    first = np.random.MT19937(1)
    np.random.set_bit_generator(first)
    batch = torch.randint(0, 37, (6, 8), generator=torch.Generator().manual_seed(0))
    batch = (batch, batch.roll(1, 1))
    model = _NumpyNoise().double()
    ref = PerSampleGradientProbe(model, W, chunk_size=2)
    bounded = PerSampleGradientProbe(model, W, chunk_size=2, max_resident_samples=2)
    start = np.random.get_state(legacy=False)
    for probe in (ref, bounded):  # an update per chunk: gram() recomputes the pairs between updates
        np.random.set_state(start)
        for s in range(0, 6, 2):
            probe.update((batch[0][s : s + 2], batch[1][s : s + 2]))
    second = np.random.PCG64(5)
    np.random.set_bit_generator(second)
    np.random.Generator(first).random(3)  # the user goes on with the first one
    before = _state(first), _state(second)
    got = bounded.gram()
    assert np.random.get_bit_generator() is second
    assert (_state(first), _state(second)) == before
    torch.testing.assert_close(got, ref.gram(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fail", [False, True])
def test_forked_rng_puts_back_a_bit_generator_a_replay_installed(global_bit_generator, fail):
    """The isolation itself: inside a fork, set_rng_state of a state captured under another bit generator
    object (a replay) installs a copy of that object with the captured state, so the object itself keeps its
    state; on exit (also on an exception) the fork's own object is installed with its state. Nested forks too."""
    old = np.random.MT19937(2)
    np.random.set_bit_generator(old)
    captured = rng_state()
    old.random_raw(5)
    now = np.random.PCG64(3)
    np.random.set_bit_generator(now)
    before = _state(old), _state(now)
    with pytest.raises(RuntimeError, match="inside") if fail else _nothing(), forked_rng():
        with forked_rng():  # an inner fork that replays nothing: the outer one still records what follows
            pass
        with forked_rng():
            set_rng_state(captured)
            copied = np.random.get_bit_generator()
            assert copied is not old and type(copied) is type(old)
            assert _state(copied) == (captured[3][1]["bit_generator"],
                                      {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                       for k, v in captured[3][1]["state"].items()})
            np.random.random(4)
        set_rng_state(captured)
        np.random.random(2)
        if fail:
            raise RuntimeError("inside")
    assert np.random.get_bit_generator() is now
    assert (_state(old), _state(now)) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_forks_own_restore_is_not_recorded_by_the_enclosing_fork(global_bit_generator):
    """An inner fork's exit reinstalls its own bit generator (a forward swapped it out): that restore is not a
    replay, so the enclosing fork leaves that object as the block left it (it does not set it back to the state
    it had when the forward swapped it out)."""
    outer = np.random.PCG64(1)
    np.random.set_bit_generator(outer)
    inner = np.random.MT19937(2)
    with forked_rng():
        np.random.set_bit_generator(inner)  # as a forward of the enclosing measurement might
        with forked_rng():
            np.random.random(3)
            np.random.set_bit_generator(np.random.Philox(3))
        np.random.random(2)  # from inner, put back by the inner fork
        left = _state(inner)
    assert np.random.get_bit_generator() is outer
    assert _state(inner) == left
