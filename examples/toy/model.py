"""A compact transformer for the toy task, with the zoo's switch names (``pos``, ``tied_head``).

Pre-norm blocks (parameter-free RMSNorm, causal multi-head attention, ReLU^2 MLP), as the variant
zoo's Baseline; ``pos="rope"`` swaps the learned absolute position table for rotary embeddings (the
zoo's :class:`~examples.nanogpt.model.Rotary`), ``tied_head=False`` adds a separate zero-initialized
readout. The forward pass pools the last position: ``model(x)`` returns logits ``(B, vocab)`` of
the token after the context. The optimizer switch (AdamW or Muon) lives in :mod:`examples.toy.train`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from examples.nanogpt.model import Rotary, norm

__all__ = ["ToyConfig", "ToyTransformer"]


@dataclass(frozen=True)
class ToyConfig:
    """Shape and switches of the toy transformer (paper App. F: 2 layers, 4 heads, context 64)."""

    vocab_size: int = 1024
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    seq_len: int = 64
    pos: str = "learned"      # "learned" absolute table (Baseline) | "rope" (RoPE and later)
    tied_head: bool = True    # Untied: separate readout, zero-initialized

    def __post_init__(self) -> None:
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"ToyConfig.pos={self.pos!r}, expected 'learned' or 'rope'")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"ToyConfig: n_embd={self.n_embd} must split into {self.n_head} heads of even size")


class Attention(nn.Module):
    """Causal multi-head self-attention (separate q, k, v projections and an output projection c_proj)."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.n_head, self.hd = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, self.hd) for f in (self.c_q, self.c_k, self.c_v))
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        x = x + self.attn(norm(x), rotary)
        return x + self.c_out(self.c_fc(norm(x)).relu_().square())  # in place: one large temporary fewer


class ToyTransformer(nn.Module):
    """Token (+ learned position) embedding, ``n_layer`` blocks, final norm, readout of the last position.

    ``blocks`` is the layer stack SpectralLens measures (its default probe is ``blocks[-1]``, whose
    output holds every position; the toy measures the last one, see :mod:`examples.toy.measure`).
    """

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.seq_len, 10000.0, False) if cfg.pos == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = None if cfg.tied_head else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, 1) (scaled by 1/sqrt(d) when tied, so initial logits are O(1));
        linear weights ~ N(0, 1/fan_in); output projections scaled by 1/sqrt(2 n_layer); untied head zero."""
        std = 1.0 / math.sqrt(self.cfg.n_embd) if self.cfg.tied_head else 1.0
        nn.init.normal_(self.wte.weight, std=std)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, std=std)
        for name, p in self.blocks.named_parameters():
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("c_proj.weight", "c_out.weight")) else 1.0
            nn.init.normal_(p, std=scale / math.sqrt(p.shape[1]))
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block, every position: ``(B, T, n_embd)``."""
        if idx.ndim != 2 or idx.size(1) > self.cfg.seq_len:
            raise ValueError(f"ToyTransformer: input must be (batch, T <= {self.cfg.seq_len}), got {tuple(idx.shape)}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[: idx.size(1)]
        for block in self.blocks:
            x = block(x, self.rotary)
        return x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, vocab)`` of the token after the context (last-token pooling)."""
        h = norm(self.hidden(idx)[:, -1])
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return h @ w.T
