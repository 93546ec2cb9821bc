"""Tiny models for tests: nanoGPT-like causal LMs in two naming layouts, a small CNN, LM batches.

``TinyGPT`` names its parameters as nanoGPT does (``transformer.h.N.attn.c_proj.weight``), ``TinyLM``
puts the blocks at the top level (``h.N.attn.c_proj.weight``); both use the same ``Block``.
"""

from __future__ import annotations

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


class TinyLM(nn.Module):
    """The flat layout (``wte``, ``h``, ``ln_f``, ``lm_head`` at the top level), tied head by default."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 3, ctx: int = 32,
                 tied: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_pool(n_batches: int = 4, batch: int = 3, t: int = 16, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        seq = torch.randint(0, vocab, (batch, t + 1), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def tiny_hf_llama(vocab: int):
    """A two-layer Hugging Face Llama of width 16 (transformers imported here: a test that uses it skips
    without the hf extra first), float64, eval mode, seeded."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def tiny_levit():
    """Hugging Face's LeViT in miniature (32 x 32 images, two stages, 3 labels), in training mode; skips the
    test without transformers. Its attention modules cache their biases in eval-mode forwards and clear the
    cache only in ``train(True)``."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LevitConfig(image_size=32, kernel_size=3, stride=2, padding=1, patch_size=16,
                                   hidden_sizes=[16, 24], num_attention_heads=[1, 2], depths=[1, 1],
                                   key_dim=[4, 4], drop_path_rate=0, mlp_ratio=[2, 2], attention_ratio=[2, 2],
                                   num_labels=3, down_ops=[["Subsample", 4, 16 // 4, 4, 2, 2]])
    return transformers.LevitForImageClassification(cfg).train()


def step_attention_biases(*models) -> None:
    """An optimizer step on each LeViT's attention biases (not a constant: softmax ignores one), then eval mode."""
    for m in models:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("attention_biases"):
                    p.add_(torch.linspace(-1, 1, p.numel()).view_as(p))
        m.eval()
