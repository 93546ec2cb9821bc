"""Review 22 (rng): what the measurement's RNG isolation forks, stream by stream, for the lens and the probe.

Forked (as before afterwards, also when a forward re-seeds or replaces it): torch's CPU generator (a forward
calling ``torch.manual_seed``), Python's ``random`` (a forward calling ``random.seed``), numpy's global
generator: its state, and the bit generator object installed (a forward calling ``np.random.set_bit_generator``
left its own generator installed before this review; the lens's ``measure`` then raised numpy's ``state must
be for a ... RNG``). Under ``torch.use_deterministic_algorithms(True)`` the streams are forked as without it. With
no CUDA parameter, no CUDA generator is read or set (the fork is free of CUDA calls). Generators the user
creates (``torch.Generator()``, ``np.random.default_rng()``) are the user's objects, not global: a forward
drawing from one advances it, measurement included (documented in docs/reliability.md, pinned here).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from support.models import TinyLM, lm_pool

from spectral_lens import PerSampleGradientProbe, SpectralLens
from spectral_lens.gradients import _isolation
from spectral_lens.gradients._isolation import forked_rng

P = "h.2.attn.c_proj.weight"


@pytest.fixture(autouse=True)
def _keep_global_streams():
    """Every global stream (and numpy's installed bit generator) as before the test, whatever the test did."""
    bg, npy = np.random.get_bit_generator(), np.random.get_state(legacy=False)
    cpu, py, det = torch.get_rng_state(), random.getstate(), torch.are_deterministic_algorithms_enabled()
    yield
    np.random.set_bit_generator(bg)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    random.setstate(py)
    torch.use_deterministic_algorithms(det)


def _model(side_effect=None):
    """A TinyLM in train mode (dropout draws from torch's CPU generator) whose every forward first runs
    ``side_effect`` (a forward pre-hook: what a model's own forward might do to a global stream)."""
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.1).double().train()
    if side_effect is not None:

        def hook(module, args):
            side_effect()  # returns None: a pre-hook's return value would replace the inputs

        model.register_forward_pre_hook(hook)
    return model


def _states():
    npy = np.random.get_state(legacy=False)
    inner = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in npy["state"].items()}
    return (torch.get_rng_state().tolist(), random.getstate(), np.random.get_bit_generator(), npy["bit_generator"],
            inner, npy.get("has_gauss"), npy.get("gauss"))


def _next_draws():
    return torch.rand(3).tolist(), random.random(), np.random.random()


def _measure(kind, model):
    if kind == "lens":
        lens = SpectralLens(model, layers="h.2", params=P, pool=lm_pool(2), progress=False,
                           tail_window=(2, 10))
        lens.measure(1, 1)
    else:
        PerSampleGradientProbe(model, P, train_mode=True, chunk_size=2).update(lm_pool(1, batch=4)[0])


SIDE_EFFECTS = {
    "torch.manual_seed": lambda: torch.manual_seed(99),
    "random.seed": lambda: random.seed(99),
    "np.random.seed": lambda: np.random.seed(99),
    "np.random.set_bit_generator": lambda: np.random.set_bit_generator(np.random.Philox(99)),
}


@pytest.mark.parametrize("kind", ["lens", "probe"])
@pytest.mark.parametrize("effect", list(SIDE_EFFECTS))
def test_a_forward_reseeding_a_global_stream_leaves_the_users(kind, effect):
    """The user's next draws from every global stream are the ones without the measurement. Before this review
    the ``set_bit_generator`` case raised numpy's ``ValueError: state must be for a Philox PRNG`` on exit
    (failing-first verified)."""
    model = _model(SIDE_EFFECTS[effect])
    user = np.random.PCG64(3)
    np.random.set_bit_generator(user)
    torch.manual_seed(5), random.seed(5), np.random.random()
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state(legacy=False)
    before = _states()
    want = _next_draws()  # what the user draws next without a measurement
    torch.set_rng_state(saved[0]), random.setstate(saved[1]), np.random.set_state(saved[2])
    _measure(kind, model)
    assert np.random.get_bit_generator() is user
    assert _states() == before
    assert _next_draws() == want


@pytest.mark.parametrize("kind", ["lens", "probe"])
def test_deterministic_algorithms_on(kind):
    """Under ``torch.use_deterministic_algorithms(True)`` the streams are forked as without it and the setting
    stays on (a setting, not a stream: the measurement does not change it)."""
    torch.use_deterministic_algorithms(True)
    model = _model()
    torch.manual_seed(7)
    before = _states()
    _measure(kind, model)
    assert _states() == before
    assert torch.are_deterministic_algorithms_enabled()


def test_no_cuda_parameter_means_no_cuda_call(monkeypatch):
    """A CPU model: the fork reads and sets no CUDA generator (none is listed; it would initialize CUDA on a CUDA
    machine and cost a device call per update)."""

    def refuse(*a, **k):
        raise AssertionError("a CUDA generator was touched for a CPU model")

    monkeypatch.setattr(torch.cuda, "get_rng_state", refuse)
    monkeypatch.setattr(torch.cuda, "set_rng_state", refuse)
    model = _model()
    assert _isolation.cuda_devices(model) == []
    with forked_rng(_isolation.cuda_devices(model)):
        torch.rand(1)
    _measure("probe", model)
    _measure("lens", model)


def test_generators_the_user_owns_are_not_forked():
    """A ``torch.Generator()`` and an ``np.random.default_rng()`` are the user's objects, not global: a forward
    drawing from them advances them during a measurement as during training (documented, pinned)."""
    g, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    model = _model(lambda: (torch.rand(1, generator=g), rng.random()))
    g0, r0 = g.get_state(), rng.bit_generator.state
    with forked_rng():
        model(lm_pool(1)[0][0])
    assert not torch.equal(g.get_state(), g0) and rng.bit_generator.state != r0
