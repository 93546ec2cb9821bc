"""SpectralLens.measure leaves every global RNG stream (torch, Python ``random``, numpy) and every
buffer as it was: also when the pool is a DataLoader (whose iterator draws a base seed and shuffles)
and when the model or the dataset draws from Python's or numpy's generator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spectral_lens import PerSampleGradientProbe, SpectralLens
from spectral_lens.gradients._isolation import forked_rng

from support.models import TinyLM


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def _same(a, b):
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


class Augmented(Dataset):
    """Token sequences with 'augmentation' drawn from Python's and numpy's global generators."""

    def __init__(self, n=8, t=16, vocab=64):
        self.ids = torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(1))
        self.vocab = vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        shift = random.randrange(2) + int(np.random.randint(2))
        seq = (self.ids[i] + shift) % self.vocab
        return seq[:-1], seq[1:]


def _model():
    torch.manual_seed(0)
    return TinyLM(tied=False, dropout=0.1).double().train()


@pytest.mark.parametrize("where", ["pool", "gradient_pool"])
def test_a_shuffling_dataloader_pool_leaves_every_rng_stream_unchanged(where):
    model = _model()
    loader = DataLoader(Augmented(), batch_size=4, shuffle=True)
    lists = [(x, y) for x, y in DataLoader(Augmented(), batch_size=4)]
    kw = {"pool": loader} if where == "pool" else {"pool": lists, "gradient_pool": loader}
    lens = SpectralLens(model, layers="h.2", params="h.2.attn.c_proj.weight", progress=False, **kw)
    torch.manual_seed(1234), random.seed(5), np.random.seed(6)
    before = _rng_states()
    lens.measure(1, 1)
    assert _same(before, _rng_states())
    # the training loop's next dropout mask is the one it would have drawn without measuring
    x = lists[0][0]
    torch.manual_seed(1234)
    want = model(x)
    torch.manual_seed(1234)
    lens.measure(2, 2)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


class LayerDropBlock(nn.Module):
    """Draws from Python's (the Hugging Face LayerDrop pattern) and numpy's generator on every forward,
    eval mode included."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        p = random.uniform(0, 1) + float(np.random.random())
        if self.training and p < 0.1:
            return x
        return x + self.lin(x)


class LayerDropNet(nn.Module):
    def __init__(self, d=8, vocab=5):
        super().__init__()
        self.blocks = nn.ModuleList([LayerDropBlock(d), LayerDropBlock(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _ce(out, batch):
    return nn.functional.cross_entropy(out, batch[1], reduction="none")


def test_python_and_numpy_rng_unchanged_by_the_lens_and_the_probe():
    torch.manual_seed(0)
    net = LayerDropNet().train()
    pool = [(torch.randn(4, 8), torch.randint(0, 5, (4,)))]
    probe = PerSampleGradientProbe(params="blocks.1.lin.weight", loss_fn=_ce)
    lens = SpectralLens(net, pool, layers="blocks.1", probe=probe, progress=False)
    random.seed(0), np.random.seed(0)
    before = _rng_states()
    lens.measure(1, 1)
    assert _same(before, _rng_states())
    probe.update(pool[0])
    assert _same(before, _rng_states())


class Counted(nn.Linear):
    """A Linear with a buffer written on every forward, eval mode included (observers, EMA, caches)."""

    def __init__(self, *a, fail_at=None):
        super().__init__(*a)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fail_at = fail_at

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and int(self.calls) == self.fail_at:
            raise RuntimeError("boom")
        return super().forward(x)


def test_the_activation_pass_restores_buffers_also_when_it_raises():
    net = nn.Sequential(Counted(8, 8), nn.ReLU(), nn.Linear(8, 4))
    calls = net[0].calls
    pool = [torch.randn(4, 8) for _ in range(3)]
    SpectralLens(net, pool, layers="1", params=(), progress=False).measure(0, 0)
    assert net[0].calls is calls and int(calls) == 0
    net[0].fail_at = 2
    with pytest.raises(RuntimeError, match="boom"):
        SpectralLens(net, pool, layers="1", params=(), progress=False).measure(0, 0)
    assert net[0].calls is calls and int(calls) == 0


def test_forked_rng_restores_every_stream_on_an_exception():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = _rng_states()
    with pytest.raises(KeyboardInterrupt):
        with forked_rng():
            random.random(), np.random.random(), torch.rand(3)
            raise KeyboardInterrupt
    assert _same(before, _rng_states())


def test_no_hook_is_left_when_the_activation_pass_fails_before_its_first_forward(monkeypatch):
    """The capture's hooks are registered first; a failure while setting up the pass (autocast, the
    pool's length, the progress bar) must take them away too."""
    import spectral_lens.lens as lens_module

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lens = SpectralLens(model, pool=[torch.randn(8, 4)], layers=["0"], params=())

    def broken(pool):
        raise RuntimeError("setup failed")

    monkeypatch.setattr(lens_module, "sized_total", broken)
    with pytest.raises(RuntimeError, match="setup failed"):
        lens.measure(0, 0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
