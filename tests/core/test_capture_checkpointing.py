"""A capture attached to training forwards under activation checkpointing counts each row once.

The backward of a checkpointed segment runs its forward again (reentrant ``torch.utils.checkpoint``
inside the backward's graph task, non-reentrant when a saved tensor is unpacked); the capture's hooks
fired there too and counted the segment's rows twice (64 of 32), so the spectrum weighted each
training batch by how often it was recomputed. Forwards inside a backward pass now read nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import spectral_lens as sl


class Net(nn.Module):
    """Embedding, two residual blocks, a head; ``ckpt``: None (plain), False (non-reentrant) or True
    (reentrant checkpointing of every block)."""

    def __init__(self, ckpt) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.emb = nn.Embedding(32, 12)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)) for _ in range(2))
        self.head = nn.Linear(12, 32)
        with torch.no_grad():
            self.emb.weight.add_(5.0)  # a large mean offset in every captured row

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = h + (b(h) if self.ckpt is None else checkpoint(b, h, use_reentrant=self.ckpt))
        return self.head(h)


TARGETS = ["blocks.0", "blocks.0.0", "blocks.1.1", "head"]


def train_and_capture(ckpt, batches):
    torch.manual_seed(0)
    model = Net(ckpt).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sl.attach(model, TARGETS) as capture:
        for x in batches:
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return capture.compute(), model


def reference(batches, targets):
    """float64 covariance spectra of the plain model's outputs at ``targets``, recorded by hand."""
    torch.manual_seed(0)
    model = Net(None).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = {t: [] for t in targets}
    handles = [model.get_submodule(t).register_forward_hook(
        lambda m, a, out, t=t: rows[t].append(out.detach().reshape(-1, out.shape[-1]))) for t in targets]
    for x in batches:
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    out = {}
    for t, r in rows.items():
        X = torch.cat(r)
        Xc = X - X.mean(0)
        out[t] = (len(X), torch.linalg.eigvalsh(Xc.T @ Xc / (len(X) - 1)).flip(0).clamp_min(0))
    return out


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_training_counts_each_row_once(reentrant):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (3, 5), generator=g) for _ in range(3)]
    spectra, _ = train_and_capture(reentrant, batches)
    ref = reference(batches, TARGETS)
    for t in TARGETS:
        n, eig = ref[t]
        assert spectra[t].n_rows == n == 45, (t, spectra[t].n_rows)
        torch.testing.assert_close(spectra[t].values, eig, rtol=1e-8, atol=1e-10)


def test_a_forward_run_inside_a_backward_hook_reads_nothing():
    """The rule is "inside a backward pass": a forward the user runs from a tensor hook is skipped
    too (documented), and the forward before it is counted."""
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    with sl.attach(lin, "") as capture:
        y = lin(x)
        y.register_hook(lambda g: (lin(torch.randn(7, 4)), None)[1])
        y.sum().backward()
    assert capture.compute()[""].n_rows == 5


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_hugging_face_gradient_checkpointing(reentrant):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    spectra = {}
    for on in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).double()
        if on:
            with warnings.catch_warnings():  # transformers 5: renamed activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model.config.use_cache = False
        x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(3))
        with sl.attach(model, ["transformer.h.0", "transformer.h.1.mlp"]) as capture:
            model(x, labels=x).loss.backward()
        spectra[on] = capture.compute()
    for name, s in spectra[False].items():
        assert s.n_rows == spectra[True][name].n_rows == 16
        torch.testing.assert_close(spectra[True][name].values, s.values, rtol=1e-9, atol=1e-12)
