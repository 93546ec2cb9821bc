"""An ``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up in place on every forward, so a
measurement's own forwards used to rewrite the user's weights. The lens and the probe now leave them
bit-identical (also when a forward raises), and the spectrum is that of the model as the user holds it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spectral_lens import SpectralLens
from spectral_lens.gradients import PerSampleGradientProbe

V = 40


class EmbNet(nn.Module):
    def __init__(self, fail_at=None):
        super().__init__()
        self.emb = nn.Embedding(V, 12, max_norm=1.0)
        self.lin = nn.Linear(12, 12)
        self.head = nn.Linear(12, V)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.head(torch.tanh(self.lin(self.emb(x))))


def _model(**kw):
    torch.manual_seed(0)
    m = EmbNet(**kw)
    with torch.no_grad():
        m.emb.weight.mul_(4.0)  # every row longer than max_norm: each lookup renormalizes it
    return m


def _ids(seed, n=6, t=7):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_gram(model, batches):
    """float64 per-sequence gradients of lin.weight (next-token CE, mean over positions) on a copy."""
    ref = copy.deepcopy(model).double()
    rows = []
    for ids in batches:
        for x in ids:
            ref.zero_grad()
            logits = ref(x[None, :-1])
            F.cross_entropy(logits[0], x[1:]).backward()
            rows.append(ref.lin.weight.grad.flatten().clone())
    g = torch.stack(rows)
    return g @ g.T


@pytest.mark.parametrize("engine", ["auto", "loop"])  # vmap refuses the in-place renorm, naming it
@pytest.mark.parametrize("bounded", [False, True])
def test_probe_leaves_max_norm_weights_bit_identical_and_measures_the_users_model(engine, bounded):
    model = _model()
    w0 = model.emb.weight.detach().clone()
    version = model.emb.weight._version
    probe = PerSampleGradientProbe(model, "lin.weight", engine=engine, chunk_size=4,
                                   max_resident_samples=4 if bounded else None)
    batches = [_ids(1), _ids(2)]
    for ids in batches:
        probe.update(ids)
        assert torch.equal(model.emb.weight, w0)
    gram = probe.gram().double()
    assert torch.equal(model.emb.weight, w0)
    ref = _reference_gram(model, batches)
    assert torch.allclose(gram, ref, rtol=1e-4, atol=1e-6 * ref.abs().max())
    # a user's own in-place change between updates is still caught in bounded-memory mode
    if bounded:
        assert model.emb.weight._version != version  # the restore is visible to autograd, as any write
        with torch.no_grad():
            model.lin.weight.add_(0.0)
        with pytest.raises(RuntimeError, match="modified in place"):
            probe.update(_ids(3))


def test_probe_restores_max_norm_weights_when_a_forward_raises():
    model = _model(fail_at=2)
    w0 = model.emb.weight.detach().clone()
    probe = PerSampleGradientProbe(model, "lin.weight", engine="loop", chunk_size=2)
    with pytest.raises(RuntimeError, match="boom"):
        probe.update(_ids(1))
    assert torch.equal(model.emb.weight, w0)


def test_lens_measure_leaves_max_norm_weights_bit_identical():
    model = _model()
    w0 = model.emb.weight.detach().clone()
    pool = [_ids(5), _ids(6)]
    lens = SpectralLens(model, pool, layers="lin", params="lin.weight", progress=False)
    lens.measure(1, 1)
    assert torch.equal(model.emb.weight, w0)
    # the activation spectrum is that of the user's model: float64 hidden states of a copy (unbiased covariance)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        h = torch.cat([ref.lin(ref.emb(x)).reshape(-1, 12) for x in pool])
    h = h - h.mean(0)
    ev = torch.linalg.eigvalsh(h.T @ h / (h.shape[0] - 1)).flip(0)
    assert torch.allclose(lens.history[-1].spectra["act:lin"].values, ev, rtol=1e-5, atol=1e-7 * float(ev[0]))
