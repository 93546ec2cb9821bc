"""Every variant's forward pass against a float64 re-derivation written from zoo-spec.md.

The reference below shares no code with ``model.py`` except ``window_at`` (tested on its own in
test_zoo_attention.py): RMSNorm, rotary (exact float64 angles), value mixing, x/x0 mixing, U-Net skips,
the per-layer LSWA window, attention masks (a per-entry predicate), ReLU^2 and soft-capping are
spelled out here. Zero-initialized weights are randomized and scalars moved off their initial values,
so no branch is vacuous.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from examples.nanogpt.model import GPT, window_at
from examples.nanogpt.variants import VARIANTS, Profile, build_config

# 8 layers, so that the LSWA pattern (L,S,S,S | S,S,S,L), the 3+3 sparse value tables and four U-Net
# pairs are all distinguishable; blocks of 8 tokens so that 64-token rows span several window blocks
REF = Profile("ref8", n_layer=8, n_head=2, n_embd=64, vocab_size=320, eot_id=256, short_ctx=64, long_ctx=64,
              attn_block=8)


def _rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


def reference_forward(m: GPT, idx: torch.Tensor, frac: float) -> torch.Tensor:
    c, P = m.config, dict(m.named_parameters())
    L, d, H = c.n_layer, c.n_embd, c.n_head
    hd, half, (B, T) = d // H, L // 2, idx.shape
    x = P["wte.weight"][idx]
    if c.pos == "learned":
        x = x + P["wpe.weight"][:T]
    if c.embed_norm:
        x = _rms(x)
    x0, v1, skips = x, None, []
    n_ve = {"full": L, "half": half, "sparse": max(1, min(3, (L - 1) // 2))}.get(c.value_embeds, 0)  # 3 at L = 8
    vmap = {"full": lambda i: i, "half": lambda i: min(i, L - 1 - i),
            "sparse": lambda i: i if i < n_ve else (i - (L - n_ve) if i >= L - n_ve else None)}.get(
        c.value_embeds, lambda i: None)
    if c.trunc_rope:  # hd/4 frequencies (1/1024)^(j/(hd/4-1)), then hd/4 zeros
        q4 = hd // 4
        w = [(1 / 1024) ** (j / (q4 - 1)) for j in range(q4)] + [0.0] * (hd // 2 - q4)
    else:
        w = [c.rope_base ** (-2 * j / hd) for j in range(hd // 2)]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(w, dtype=torch.float64)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rotate(t):  # y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (rotate-half pairing)
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], -1)

    docs, win = (idx == c.eot_id).cumsum(1), window_at(c, frac)

    def visible(b, i, j, long):
        if j > i:
            return False
        if c.attn_mask == "causal":
            return True
        size = win.long if long else win.short
        near = i - j < size if win.unit == "token" else i // c.attn_block - j // c.attn_block < size
        return bool(docs[b, i] == docs[b, j]) and near

    for i in range(L):
        pre = f"blocks.{i}."
        if c.unet_skips and i >= half:  # encoder layer L-1-i feeds decoder layer i
            x = x + P["skip_weights"][i - half] * skips.pop()
        if c.x0_mix:
            a, b = P[pre + "lambdas"]
            x = a * x + b * x0
        if i not in c.no_attn_layers:
            h = _rms(x)
            if c.qkv_fused:
                q, k, v = (h @ P[pre + "attn.c_attn.weight"].T).split(d, -1)
            else:
                q, k, v = (h @ P[pre + f"attn.c_{n}.weight"].T for n in "qkv")
            q, k, v = (t.reshape(B, T, H, hd) for t in (q, k, v))
            v_raw = v
            ve = None if vmap(i) is None else P[f"value_embeds.{vmap(i)}.weight"][idx].reshape(B, T, H, hd)
            if c.value_mix == "lerp":
                lam = P[pre + "attn.value_lambdas"][0]
                src = ve if ve is not None else (v1 if v1 is not None else v)
                v = (1 - lam) * v + lam * src
            elif c.value_mix == "affine":
                a, b = P[pre + "attn.value_lambdas"]
                v = a * v if ve is None else a * v + b * ve
            if c.qk_norm:
                q, k = _rms(q), _rms(k)
            if c.pos == "rope":
                q, k = rotate(q), rotate(k)
            scale = c.attn_scale if c.attn_scale is not None else hd ** -0.5
            long = (min(i, L - 1 - i) % 4 == 0) if c.lswa else True  # L,S,S,S,L,S.. mirrored
            mask = torch.tensor([[[visible(b, qi, kj, long) for kj in range(T)] for qi in range(T)] for b in range(B)])
            s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
            y = torch.einsum("bhij,bjhd->bihd", s.masked_fill(~mask[:, None], -math.inf).softmax(-1), v)
            out = y.reshape(B, T, d) @ P[pre + "attn.c_proj.weight"].T
            x = x + (1 / math.sqrt(2 * L) if c.scaled_attn_branch else 1.0) * out
            if i == 0:
                v1 = v_raw
        u = _rms(x) @ P[pre + "mlp.c_fc.weight"].T
        u = F.relu(u) ** 2 if c.activation == "relu2" else F.gelu(u, approximate="tanh")
        x = x + u @ P[pre + "mlp.c_proj.weight"].T
        if c.unet_skips and i < half:
            skips.append(x)
    logits = _rms(x) @ (P["wte.weight"] if c.tied_head else P["lm_head.weight"]).T
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits


@pytest.mark.parametrize("frac", [0.05, 0.6])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_float64_reference(variant, frac):
    torch.manual_seed(0)
    cfg = build_config(variant, REF)
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("c_proj" in name or "lm_head" in name):
                p.normal_(std=0.05)
            elif p.ndim < 2:
                p.uniform_(0.3, 1.5)
    idx = torch.randint(0, 256, (2, 64))
    idx[0, 5], idx[1, 30], idx[1, 31] = cfg.eot_id, cfg.eot_id, cfg.eot_id
    with torch.no_grad():
        got = model(idx, window=window_at(cfg, frac))
        ref = reference_forward(model, idx, frac)
    # the rotary tables are fp32 (as in the records): ~1e-7 relative; everything else is float64
    tol = 1e-6 if cfg.pos == "rope" else 1e-12
    assert (got - ref).abs().max() <= tol * ref.abs().max(), (variant, frac)
