"""Gaps found by mutation testing of the gradient engines, each against the float64 per-sample
reference of ``conftest.reference_rows`` (one ``torch.autograd.grad`` per sequence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe


class _LinearTwice(nn.Module):
    """One ``nn.Linear`` called twice per forward (a weight-shared residual step): ``g_m`` is the sum
    of both calls' contributions."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + torch.tanh(self.lin(x))
        x = x + torch.tanh(self.lin(x))
        return self.head(x)


@pytest.mark.parametrize("engine", ["fast", "auto", "vmap", "loop"])
def test_module_called_twice_sums_both_calls(helpers, engine):
    torch.manual_seed(0)
    model = _LinearTwice().double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (5, 8), generator=g)
    batch = (ids[:, :-1], ids[:, 1:])
    names = ["lin.weight", "lin.bias"]
    probe = PerSampleGradientProbe(model, names, engine=engine, keep_matrix=True, chunk_size=2).update(batch)
    ref = helpers.reference_rows(model, names, batch, helpers.lm_sample_loss)
    for n in names:
        assert np.abs(probe.matrix(n).numpy() - ref[n]).max() <= 1e-12 * np.abs(ref[n]).max(), n
    if engine in ("fast", "auto"):
        assert set(probe.engines_.values()) == {"fast"}


class _InplaceAfter(nn.Module):
    """``nn.Linear`` followed by ``nn.ReLU(inplace=True)``, the common MLP idiom: the fast engine's
    output leaf must not be rewritten in place (a leaf that requires grad cannot be)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.act(self.lin(self.emb(idx))))


def _batch(m=5, t=7, vocab=11, seed=1):
    ids = torch.randint(0, vocab, (m, t + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("engine", ["fast", "loop"])
def test_inplace_op_after_the_probed_module(helpers, engine):
    torch.manual_seed(0)
    model = _InplaceAfter().double().eval()
    batch = _batch()
    probe = PerSampleGradientProbe(model, "lin.weight", engine=engine, keep_matrix=True).update(batch)
    ref = helpers.reference_rows(model, ["lin.weight"], batch, helpers.lm_sample_loss)["lin.weight"]
    assert np.abs(probe.matrix().numpy() - ref).max() <= 1e-12 * np.abs(ref).max()


class _InputRewritten(nn.Module):
    """The probed layer's input is scaled in place after the layer ran: the fast path, which reads the
    saved input, must refuse rather than contract the rewritten values."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        out = self.lin(x)
        x.mul_(3.0)
        return out


def test_input_modified_in_place_after_the_call_is_refused():
    torch.manual_seed(0)
    model = _InputRewritten().double().eval()
    with pytest.raises(RuntimeError, match=r"lin.weight: the input of Linear was modified in place after the call"):
        PerSampleGradientProbe(model, "lin.weight", engine="fast").update(_batch())


@pytest.mark.parametrize("which", ["fast", "loop", "vmap"])
def test_engines_called_directly_restore_requires_grad(which):
    """``fast_engine`` / ``loop_engine`` / ``vmap_engine`` are public: each restores every flag."""
    from spectral_lens.gradients import default_forward, fast_engine, loop_engine, vmap_engine
    from spectral_lens.gradients.losses import causal_lm_loss

    torch.manual_seed(0)
    model = _InplaceAfter().double().eval()
    model.emb.weight.requires_grad_(False)  # a frozen embedding stays frozen, the rest stays trainable
    before = [p.requires_grad for p in model.parameters()]
    batch = _batch()
    if which == "fast":
        fast_engine(model, {"lin.weight": (model.lin, "weight")}, batch, 5, default_forward, causal_lm_loss)
    else:
        fn = loop_engine if which == "loop" else vmap_engine
        fn(model, {"lin.weight": model.lin.weight}, batch, 5, default_forward, causal_lm_loss)
    assert [p.requires_grad for p in model.parameters()] == before


@pytest.mark.parametrize("engine", ["vmap", "loop", "auto"])
def test_train_mode_draws_a_dropout_mask_per_sample(engine):
    """With ``train_mode=True`` each sequence gets its own dropout masks on every engine (the loop
    draws one per forward; vmap must use ``randomness="different"``): identical sequences then get
    different gradients."""
    from support.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(dropout=0.5).double()
    x, y = _batch(m=1, vocab=37, t=9)
    batch = (x.repeat(4, 1), y.repeat(4, 1))
    probe = PerSampleGradientProbe(model, "transformer.h.1.attn.c_proj.weight", engine=engine, train_mode=True,
                                   keep_matrix=True).update(batch)
    g = probe.matrix()
    assert all(not torch.equal(g[i], g[j]) for i in range(4) for j in range(i))


class _SeqFirstOut(nn.Module):
    """Batch-first input (M, T, d), sequence-first output (T, M, o): a registered fast path that reads
    ``dy`` with the sample index in dimension 0 cannot serve it."""

    def __init__(self, d=6, o=5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, d))

    def forward(self, x):
        return (x @ self.weight.t()).transpose(0, 1)


class _SeqFirstModel(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.mid = _SeqFirstOut()
        self.head = nn.Linear(5, vocab)

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))).transpose(0, 1))


def test_registered_fast_path_is_not_given_an_output_gradient_without_samples_in_dim_0(helpers):
    from spectral_lens.gradients.registry import FAST_PATHS, register_fast_path

    register_fast_path(_SeqFirstOut, lambda mod, name, x, dy: torch.einsum("mto,mti->moi", dy, x), params=("weight",))
    try:
        torch.manual_seed(0)
        model = _SeqFirstModel().double().eval()
        batch = _batch(m=4, t=7)
        probe = PerSampleGradientProbe(model, "mid.weight", keep_matrix=True).update(batch)
        assert probe.engines_["mid.weight"] == "vmap"
        ref = helpers.reference_rows(model, ["mid.weight"], batch, helpers.lm_sample_loss)["mid.weight"]
        assert np.abs(probe.matrix().numpy() - ref).max() <= 1e-12 * np.abs(ref).max()
        with pytest.raises(ValueError, match=r"engine='fast' impossible for mid.weight: _SeqFirstOut saw an input"):
            PerSampleGradientProbe(model, "mid.weight", engine="fast").update(batch)
    finally:
        FAST_PATHS.pop(_SeqFirstOut, None)


class _Affine(nn.Module):
    def __init__(self, d=6, o=11):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, d))
        self.bias = nn.Parameter(torch.randn(o))

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class _AffineModel(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.out = _Affine(6, vocab)

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


def test_fast_path_registered_for_the_weight_only_leaves_the_bias_to_vmap(helpers):
    """``register_fast_path(T, fn, params=("weight",))``: the bias of a ``T`` is not the fast path's."""
    from spectral_lens.gradients.registry import FAST_PATHS, register_fast_path

    register_fast_path(_Affine, lambda mod, name, x, dy: torch.einsum("mto,mti->moi", dy, x), params=("weight",))
    try:
        torch.manual_seed(0)
        model = _AffineModel().double().eval()
        batch = _batch(m=4, t=7)
        names = ["out.weight", "out.bias"]
        probe = PerSampleGradientProbe(model, names, keep_matrix=True).update(batch)
        assert probe.engines_ == {"out.weight": "fast", "out.bias": "vmap"}
        ref = helpers.reference_rows(model, names, batch, helpers.lm_sample_loss)
        for n in names:
            assert np.abs(probe.matrix(n).numpy() - ref[n]).max() <= 1e-12 * np.abs(ref[n]).max(), n
    finally:
        FAST_PATHS.pop(_Affine, None)
