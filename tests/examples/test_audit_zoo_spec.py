"""Audit of the zoo against shared/design/zoo-spec.md: every variant's full recipe (no carry-over or
omission between neighbours), the window and LR schedules at every step of each record's N against the
records' formulas in exact rational arithmetic, and the rotary tables against a hand float64 rebuild.

Where docs/examples-zoo.md documents a deliberate deviation from the records it is encoded here as such
(Baseline/RoPE/Muon rates are the paper's reference rates; Muon rate stays 0.04 from FlexWin on).
"""
import math
from fractions import Fraction as Fr

import pytest
import torch

from examples.nanogpt.model import Rotary, window_at
from examples.nanogpt.optim import lr_multiplier
from examples.nanogpt.variants import VARIANTS, build_config, build_recipe

# (matrix opt, matrix lr, embed, head, scalar, betas, eps, wd, muon scale, momentum form, momentum warm-up,
#  warmup steps, cooldown steps (None: last 40%), LR floor, decay, record N)
_LC = (0.04, 0.6, 0.008, 0.04)
SPEC = {
    "Baseline": ("adamw", 6e-4, 6e-4, 6e-4, 6e-4, (0.9, 0.95), 1e-8, 0.1, None, None, 0, 700, 0, 0.0, "cosine", 19560),
    "RoPE": ("adamw", 6e-4, 6e-4, 6e-4, 6e-4, (0.9, 0.95), 1e-8, 0.1, None, None, 0, 256, 2048, 0.0, "linear", 9536),
    "Muon": ("muon", 3.6e-4, 3.6e-3, None, None, (0.9, 0.95), 1e-8, 0.0, "sqrt_max", "classical", 0, 0, 1450, 0.0,
             "linear", 5100),
    "Untied": ("muon", 0.02, 0.3, 0.002, None, (0.9, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 0, 0, 1308, 0.0,
               "linear", 4578),
    "ValueMix": ("muon", 0.02, 0.3, 0.002, 0.02, (0.9, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 500, 0, 914, 0.0,
                 "linear", 3200),
    "U-Net": ("muon", *_LC, (0.9, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 500, 0, 900, 0.0, "linear", 3000),
    "FixedWin": ("muon", *_LC, (0.9, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 500, 0, 562, 0.0, "linear", 1875),
    "FlexWin": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 300, 0, 640, 0.0, "linear", 1750),
    "VTE": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "classical", 300, 0, 600, 0.0, "linear", 1530),
    "BetterWin": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, 600, 0.0, "linear", 1480),
    "SparseV": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, 600, 0.0, "linear", 1490),
    "TruncRoPE": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, 600, 0.0, "linear", 1490),
    "SoftCap": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, None, 0.0, "linear", 1390),
    "FP8Head": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, None, 0.1, "linear", 1395),
    "LSWA": ("muon", *_LC, (0.8, 0.95), 1e-8, 0.0, "sqrt_ratio", "ema", 300, 0, None, 0.1, "linear", 1393),
    "AttnScale": ("muon", *_LC, (0.8, 0.95), 1e-10, 0.0, "sqrt_ratio", "ema", 300, 0, None, 0.1, "linear", 1393),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_recipe_is_the_spec_row(variant):
    (opt, m_lr, e_lr, h_lr, s_lr, betas, eps, wd, scale, form, mwarm, warm, cool, floor, decay, n) = SPEC[variant]
    r = build_recipe(variant)
    assert (r.matrix_optimizer, r.matrix_lr, r.embed_lr, r.betas, r.eps, r.weight_decay, r.momentum_warmup_steps,
            r.final_lr_frac, r.decay, r.record_steps) == (opt, m_lr, e_lr, betas, eps, wd, mwarm, floor, decay, n)
    if h_lr is not None:  # tied variants have no head group; groups without parameters are not checked
        assert r.head_lr == h_lr
    if s_lr is not None:
        assert r.scalar_lr == s_lr
    if scale is not None:
        assert (r.muon_scale, r.muon_momentum) == (scale, form)
    assert r.warmup_frac * n == pytest.approx(warm)
    assert r.cooldown_frac * n == pytest.approx(0.4 * n if cool is None else cool)


def _record_mult(variant, s, n):
    """The record's LR multiplier at 0-based step s of n, exact."""
    _, _, _, _, _, _, _, _, _, _, _, warm, cool, floor, decay, _ = SPEC[variant]
    if decay == "cosine":  # llm.c
        if s < warm:
            return Fr(s + 1, warm)
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / (n - warm)))
    if s < warm:
        return Fr(s + 1, warm)
    if cool is None:  # t = 1 - s/N; w = min(t/0.4, 1); w + (1-w)*floor
        w = min((1 - Fr(s, n)) / Fr(2, 5), 1)
        return w + (1 - w) * Fr(floor).limit_denominator(10)
    return Fr(1) if s < n - cool else Fr(n - s, cool)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lr_multiplier_matches_the_record_formula_at_every_step(variant):
    r = build_recipe(variant)
    n = r.record_steps
    bad = [s for s in range(n + 1) if abs(lr_multiplier(r, s, n) - float(_record_mult(variant, s, n))) > 1e-12]
    assert not bad, f"{variant}: {len(bad)} steps differ, first {bad[:5]}"


_WINDOW = {  # zoo-spec section 5, d12 (128-token blocks); tokens for token windows, blocks for block windows
    "FixedWin": lambda s, n: 1024,
    "FlexWin": lambda s, n: 64 * math.floor((64 + Fr(1728 * s, n)) / 64),
    "VTE": lambda s, n: 64 * math.floor((64 + Fr(1728 * s, n)) / 64),
    "BetterWin": lambda s, n: math.floor(((1 - Fr(s, n)) * 64 + Fr(s, n) * 1792 + 64) / 128),
    "SparseV": lambda s, n: math.floor(((1 - Fr(s, n)) * 64 + Fr(s, n) * 1792 + 64) / 128),
    "TruncRoPE": lambda s, n: math.floor(((1 - Fr(s, n)) * 64 + Fr(s, n) * 1792 + 64) / 128),
    "SoftCap": lambda s, n: math.floor(((1 - Fr(s, n)) * 128 + Fr(s, n) * 1856) / 128),
    "FP8Head": lambda s, n: max(1, math.ceil(Fr(1728 * s, n) / 128)),
    "LSWA": lambda s, n: max(1, math.ceil(Fr(1728 * s, n) / 128)),
    "AttnScale": lambda s, n: max(1, math.ceil(Fr(1728 * s, n) / 128)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_matches_the_record_formula_at_every_step(variant):
    cfg = build_config(variant, "d12")
    n = build_recipe(variant).record_steps
    if variant not in _WINDOW:
        assert window_at(cfg, 0.5) is None and cfg.attn_mask == "causal"
        return
    want = _WINDOW[variant]
    for s in range(n + 1):
        w = window_at(cfg, s / n)
        long = want(s, n)
        short = max(long // 2, 1) if variant in ("LSWA", "AttnScale") else long
        assert (w.long, w.short) == (long, short), (variant, s)
        assert w.unit == ("token" if variant in ("FixedWin", "FlexWin", "VTE") else "block")


@pytest.mark.parametrize("variant, hd", [("RoPE", 128), ("SparseV", 128), ("TruncRoPE", 128), ("TruncRoPE", 64)])
def test_rotary_matches_a_float64_rebuild(variant, hd):
    """V2: w_j = 10000^(-2j/hd), rotate-half, y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. V12: (1/1024)^(j/(hd/4-1))
    for j < hd/4, then hd/4 zeros (those pairs are not rotated)."""
    cfg = build_config(variant, "d12")
    rot = Rotary(hd, 64, cfg.rope_base, cfg.trunc_rope)
    half = hd // 2
    if cfg.trunc_rope:
        q = hd // 4
        w = [(1 / 1024) ** (j / (q - 1)) for j in range(q)] + [0.0] * (half - q)
    else:
        w = [10000.0 ** (-2 * j / hd) for j in range(half)]
    x = torch.randn(1, 64, 2, hd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(64, dtype=torch.float64)[None, :, None, None]
    ang = pos * torch.tensor(w, dtype=torch.float64)
    x1, x2 = x[..., :half], x[..., half:]
    ref = torch.cat([x1 * ang.cos() + x2 * ang.sin(), -x1 * ang.sin() + x2 * ang.cos()], dim=-1)
    torch.testing.assert_close(rot(x), ref, rtol=0, atol=2e-5)  # tables are fp32 (as in the records)
    if cfg.trunc_rope:
        torch.testing.assert_close(rot(x)[..., hd // 4: half], x[..., hd // 4: half], rtol=0, atol=0)
