"""SpectralLens measurement invariance on training setups found by the invariance audit: each test
failed before its fix."""

from __future__ import annotations

import copy

import torch
from torch import nn

from spectral_lens import PerSampleGradientProbe, SpectralLens

from support.models import lm_batch


class GrowingCache(nn.Module):
    """A position table grown on demand, its length kept in a plain int (GPT-NeoX-style rotary caches,
    Hugging Face's rotary embeddings before transformers 4.38)."""

    def __init__(self):
        super().__init__()
        self.max_cached = 0
        self.register_buffer("table", torch.zeros(0, 1), persistent=False)

    def forward(self, h):
        t = h.shape[1]
        if t > self.max_cached:
            self.table = torch.linspace(0, 1, t, dtype=h.dtype).unsqueeze(1)
            self.max_cached = t
        return h + self.table[:t]


class CachedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(37, 8)
        self.pos = GrowingCache()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 37)

    def forward(self, x):
        h = self.pos(self.wte(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


def test_a_cache_grown_during_measurement_stays_consistent_with_its_length():
    """Training at length 8, a held-out pool at length 16. The activation pass grew the cache to 16
    rows; before the fix the buffer was restored to 8 rows but ``max_cached`` stayed 16, so the
    gradient pass crashed inside ``measure`` (16 positions against 8 table rows), and so would the
    next training forward of a length between 8 and 16."""
    torch.manual_seed(0)
    model = CachedLM().double()
    x8, _ = lm_batch(m=4, t=8)
    x12, _ = lm_batch(m=4, t=12)
    x16, y16 = lm_batch(m=4, t=16)
    model(x8)
    table = model.pos.table
    untouched = copy.deepcopy(model)

    lens = SpectralLens(model, [(x16, y16)], layers="blocks.1", params="blocks.1.weight", progress=False)
    m = lens.measure(step=0, tokens=0)
    assert m.spectra["grad:blocks.1.weight"].n_rows == 4 and m.spectra["act:blocks.1"].n_rows == 64

    assert model.pos.max_cached == 8 and model.pos.table is table
    assert torch.equal(model(x12), untouched(x12))  # the next training forward, as without the measurement

    probe = PerSampleGradientProbe(model, "blocks.1.weight")
    probe.update((x16, y16))
    assert model.pos.max_cached == 12 and torch.equal(model(x12), untouched(x12))


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, h):
        return self.down(torch.relu(self.up(h)))


class MoEBlock(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.router = nn.Linear(8, experts)
        self.experts = nn.ModuleList(Expert() for _ in range(experts))

    def forward(self, h):
        w = torch.softmax(self.router(h), -1)
        return h + sum(w[..., i : i + 1] * e(h) for i, e in enumerate(self.experts))


class MoELM(nn.Module):
    """Experts in a ModuleList per layer (transformers 4 Mixtral, Qwen2-MoE, OLMoE, DeepSeek; custom MoE code)."""

    def __init__(self, layers=3, experts=8):
        super().__init__()
        self.wte = nn.Embedding(37, 8)
        self.layers = nn.ModuleList(MoEBlock(experts) for _ in range(layers))
        self.head = nn.Linear(8, 37)

    def forward(self, x):
        h = self.wte(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_the_default_layer_of_a_mixture_of_experts_model_is_its_last_block():
    """More experts per layer than layers: before the fix the lens measured ``layers.0.experts.7``
    (the longest homogeneous ModuleList) instead of the last block, and ``"all"`` gave the experts."""
    from spectral_lens.lens import all_blocks

    torch.manual_seed(0)
    model = MoELM().double()
    assert all_blocks(model) == ["layers.0", "layers.1", "layers.2"]
    x, y = lm_batch(m=4, t=6)
    m = SpectralLens(model, [(x, y)], params="layers.2.router.weight", progress=False).measure(step=0, tokens=0)
    assert list(k for k in m.spectra if k.startswith("act:")) == ["act:layers.2"]
    # the measured spectrum is that of the last block's output (float64 reference)
    outs = []
    handle = model.layers[2].register_forward_hook(lambda mod, a, o: outs.append(o.detach().reshape(-1, 8)))
    with torch.no_grad():
        model(x)
    handle.remove()
    ref = torch.linalg.eigvalsh(torch.cov(outs[0].t())).flip(0)
    got = torch.as_tensor(m.spectra["act:layers.2"].values, dtype=torch.float64)
    assert torch.allclose(got, ref[: got.numel()], rtol=1e-9, atol=1e-12)
