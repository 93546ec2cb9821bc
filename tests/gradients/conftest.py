"""Tiny models and an independent per-sample gradient reference for the gradient-probe tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.act = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * d, d)
        self.mlp.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT in miniature: learned positions, pre-LN blocks, SDPA causal attention, optional tying."""

    def __init__(self, vocab=37, d=16, heads=2, layers=2, ctx=12, tie=False, dropout=0.0) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, d),
                wpe=nn.Embedding(ctx, d),
                h=nn.ModuleList(Block(d, heads, dropout) for _ in range(layers)),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = block(x)
        return self.lm_head(tr.ln_f(x))


class TinyCNN(nn.Module):
    """A non-LM model: conv + LayerNorm + linear classifier, for a user-supplied loss_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.LayerNorm([4, 5, 5])
        self.head = nn.Linear(4 * 25, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


def lm_batch(m=6, t=10, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (m, t + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def reference_rows(model, params, batch, loss_of_sample) -> dict[str, np.ndarray]:
    """Independent reference: one forward and one ``torch.autograd.grad`` per sample, float64 numpy."""
    named = dict(model.named_parameters(remove_duplicate=False))
    ps = [named[n] for n in params]
    n = batch[0].shape[0]
    rows = {k: [] for k in params}
    for i in range(n):
        sample = tuple(x[i : i + 1] for x in batch)
        gs = torch.autograd.grad(loss_of_sample(model, sample), ps)
        for k, g in zip(params, gs):
            rows[k].append(g.detach().reshape(-1).double().numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def lm_sample_loss(model, sample):
    x, y = sample
    return F.cross_entropy(model(x)[0], y[0], ignore_index=-100)


def sq_singular_values(g: np.ndarray) -> np.ndarray:
    return np.linalg.svd(g, compute_uv=False) ** 2


@pytest.fixture
def gpt():
    """Factory: a float64 TinyGPT in eval mode with a fixed seed."""

    def make(seed=0, **kw):
        torch.manual_seed(seed)
        return TinyGPT(**kw).double().eval()

    return make


@pytest.fixture
def helpers():
    """The module-level helpers, reachable from tests without importing conftest."""

    class H:
        pass

    h = H()
    h.lm_batch, h.reference_rows, h.lm_sample_loss = lm_batch, reference_rows, lm_sample_loss
    h.sq_singular_values, h.TinyGPT, h.TinyCNN = sq_singular_values, TinyGPT, TinyCNN
    return h
