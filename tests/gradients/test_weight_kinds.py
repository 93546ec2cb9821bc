"""Per-sample gradients of the kinds of weights users probe, against a float64 per-sample autograd loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens.gradients import EngineFallbackWarning, PerSampleGradientProbe

TOL = 1e-10


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def loop_gram(model, name, x, y) -> np.ndarray:
    """Float64 reference: one forward, one backward per sequence, the dense gradient flattened."""
    p = dict(model.named_parameters())[name]
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1])[0], y[i]), p)[0]
        rows.append((g.to_dense() if g.is_sparse else g).reshape(-1).numpy())
    g = np.stack(rows)
    return g @ g.T


class _SparseEmbeddingLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, sparse=True)
        self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(torch.cumsum(torch.tanh(self.lin(self.emb(ids))), 1))


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_sparse_embedding_weight(engine):
    """nn.Embedding(sparse=True): autograd gives its weight a sparse gradient. torch.func cannot trace
    the model ('auto' falls back to the loop), and the loop engine crashed flattening the sparse
    gradient ('reshape is not implemented for sparse tensors'); now it densifies it."""
    torch.manual_seed(0)
    model = _SparseEmbeddingLM().double().eval()
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)
        probe = PerSampleGradientProbe(model, "emb.weight", engine=engine, chunk_size=2)
        probe.update((ids[:3], y[:3])).update((ids[3:], y[3:]))
    assert probe.engines_ == {"emb.weight": "loop"}
    assert rel(probe.gram().numpy(), loop_gram(model, "emb.weight", ids, y)) <= TOL


class _LowRank(nn.Module):
    """A LoRA-like parametrization: ``W + B A``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.A, self.B = nn.Parameter(0.3 * torch.randn(2, d)), nn.Parameter(0.3 * torch.randn(d, 2))

    def forward(self, w):
        return w + self.B @ self.A


class _LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(torch.cumsum(torch.tanh(self.lin(self.emb(ids))), 1))


@pytest.mark.parametrize("how", ["lora", "weight_norm"])
def test_parametrized_weight_is_named_by_its_sources(how):
    """A parametrized weight is not a parameter. Naming it (or its module) said only "no parameter
    'lin'; closest names: ['lin.bias']"; now the error lists the parameters it is computed from, and
    each of those is exact against the float64 loop on every engine that can run it."""
    torch.manual_seed(0)
    model = _LM().double().eval()
    if how == "lora":
        nn.utils.parametrize.register_parametrization(model.lin, "weight", _LowRank(6).double())
        sources = ["lin.parametrizations.weight.original", "lin.parametrizations.weight.0.A"]
    else:
        nn.utils.parametrizations.weight_norm(model.lin)
        sources = ["lin.parametrizations.weight.original0", "lin.parametrizations.weight.original1"]
    for name in ("lin.weight", "lin"):
        with pytest.raises(ValueError, match=r"lin\.weight is computed by a parametrization.*" + sources[0]):
            PerSampleGradientProbe(model, name)
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))
    for engine in ("auto", "vmap", "loop"):
        probe = PerSampleGradientProbe(model, sources, engine=engine, chunk_size=2).update((ids, y))
        for s in sources:
            assert rel(probe.gram(s).numpy(), loop_gram(model, s, ids, y)) <= TOL, (engine, s)
    with pytest.raises(ValueError, match="no fast path is registered for ParametrizationList"):
        PerSampleGradientProbe(model, sources[0], engine="fast")


def _bn_net(track: bool) -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, track_running_stats=track)
    return nn.Sequential(nn.Linear(8, 8), bn, nn.Flatten(), nn.Linear(32, 3)).double().eval()


def _sq(out, batch):
    return out.pow(2).mean(-1)


@pytest.mark.parametrize("track, train_mode", [(True, True), (False, False)])
@pytest.mark.parametrize("name", ["0.weight", "3.weight"])
def test_batch_statistics_keep_nn_linear_off_the_fast_path(track, train_mode, name):
    """A BatchNorm that normalizes by batch statistics (train_mode=True, or track_running_stats=False
    even in eval mode) mixes the samples of a pass. The Linear fast path (below or above it) took the
    chunk's statistics: rows depended on chunk_size (diagonal 3.1 vs 1.2 at chunk 5 vs 2 for the
    first sequence; the per-sample reference gives 2.7). Now such weights go to vmap (loop where
    torch.func refuses the running-statistics update), which normalize each sequence by its own
    statistics, as the one-sample-at-a-time reference does; engine='fast' says why."""
    model = _bn_net(track)
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = dict(model.named_parameters())[name]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(train_mode)
    rows = [torch.autograd.grad(_sq(model(x[i : i + 1]), None).sum(), p)[0].reshape(-1) for i in range(5)]
    model.load_state_dict(state)
    model.eval()
    g = torch.stack(rows).numpy()
    for chunk in (2, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EngineFallbackWarning)
            probe = PerSampleGradientProbe(model, name, loss_fn=_sq, train_mode=train_mode, chunk_size=chunk)
            probe.update(x)
        assert probe.engines_[name] == ("loop" if train_mode else "vmap")
        assert rel(probe.gram().numpy(), g @ g.T) <= TOL, chunk
    with pytest.raises(ValueError, match=r"engine='fast' impossible for .*BatchNorm layer\(s\) \['1'\] normalize"):
        PerSampleGradientProbe(model, name, loss_fn=_sq, train_mode=train_mode, engine="fast")


class _AlsoElsewhere(nn.Module):
    """``lin`` is called as a module, and its weight also reaches the loss another way."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.emb, self.lin, self.head, self.how = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11), how

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.tanh(self.lin(h))
        if self.how == "functional":  # e.g. a weight shared with a functional projection
            h = h + F.linear(h, self.lin.weight)
        elif self.how == "direct_forward":  # bypasses the module's hooks
            h = h + self.lin.forward(h)
        return self.head(torch.cumsum(h, 1))


@pytest.mark.parametrize("how", ["functional", "direct_forward"])
def test_weight_used_outside_its_module_call_leaves_the_fast_path(how):
    """The fast path reads only the module's own calls. A second use of the weight outside them
    (F.linear(h, lin.weight), lin.forward(h)) was silently left out: 'auto' stayed on the fast path and
    the Gram was 87% off the per-sample reference. Now the probed weight requires grad outside its
    module's calls, a use elsewhere reaches it in the backward the fast path already runs, and the
    parameter moves to vmap ('fast' says why)."""
    torch.manual_seed(0)
    model = _AlsoElsewhere(how).double().eval()
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))
    probe = PerSampleGradientProbe(model, ["lin.weight", "head.weight"], chunk_size=2).update((ids, y))
    assert probe.engines_ == {"lin.weight": "vmap", "head.weight": "fast"}
    for name in probe.params:
        assert rel(probe.gram(name).numpy(), loop_gram(model, name, ids, y)) <= TOL, name
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    with pytest.raises(ValueError, match=r"engine='fast' impossible for lin\.weight: the weight also reaches the loss"):
        PerSampleGradientProbe(model, "lin.weight", engine="fast").update((ids, y))


class _RNNLM(nn.Module):
    def __init__(self, cls) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(11, 6), cls(6, 6, batch_first=True), nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_fall_back_to_the_loop(cls):
    """torch.func.vmap cannot run nn.LSTM / nn.GRU / nn.RNN's fused kernels; the refusal reads "output
    with shape [1, 24] doesn't match the broadcast shape [3, 1, 24]", which the fallback did not
    recognize: engine='auto' crashed with it for any vmap-routed weight of a recurrent LM. Now it falls
    back to the loop (exact) with an EngineFallbackWarning naming the layer; 'vmap' says so too."""
    torch.manual_seed(0)
    model = _RNNLM(cls).double().eval()
    ids, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))
    with pytest.warns(EngineFallbackWarning, match=r"likely cause: nn\.LSTM / nn\.GRU / nn\.RNN \(\['rnn'\]\)"):
        probe = PerSampleGradientProbe(model, "rnn.weight_hh_l0", chunk_size=3).update((ids, y))
    assert probe.engines_ == {"rnn.weight_hh_l0": "loop"}
    assert rel(probe.gram().numpy(), loop_gram(model, "rnn.weight_hh_l0", ids, y)) <= TOL
    with pytest.raises(RuntimeError, match=r"engine='vmap' cannot trace .*Likely cause: nn\.LSTM.*engine='loop'"):
        PerSampleGradientProbe(model, "rnn.weight_hh_l0", engine="vmap").update((ids, y))
