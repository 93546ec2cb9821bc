"""Every variant builds at every profile; parameter counts equal the paper's Table 4."""
import dataclasses

import pytest
import torch

from examples.nanogpt.model import GPT, GPTConfig, count_params
from examples.nanogpt.params import TABLE4, fmt_count, param_count
from examples.nanogpt.variants import CHAIN, PROFILES, VARIANTS, build_config, build_recipe


@pytest.mark.parametrize("family,variant,profile,paper", TABLE4, ids=[f"{v}@{p}" for _, v, p, _ in TABLE4])
def test_table4_count(family, variant, profile, paper):
    assert fmt_count(param_count(variant, profile)) == paper


def test_exact_counts_from_the_records():
    # exact integers derived in zoo-spec.md section 6 (all tables 50,304 rows)
    assert param_count("Baseline", "d12") == 38_633_472 + 786_432 + 84_934_656
    assert param_count("Untied", "d12") == 162_201_600
    assert param_count("U-Net", "d12") == 162_201_642
    assert param_count("VTE", "d12") == 625_803_306
    assert param_count("BetterWin", "d12") == 394_002_486
    assert param_count("SoftCap", "d12") == 275_742_772


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_variant_builds(profile):
    counts = []
    for v in VARIANTS:
        with torch.device("meta"):
            m = GPT(build_config(v, profile))
        counts.append(count_params(m))
        assert counts[-1] > 0
    assert len(counts) == 16


def test_chain_is_cumulative():
    """Each variant's config equals its predecessor's plus exactly the fields it declares."""
    assert len(CHAIN) == 16 and VARIANTS[0] == "Baseline" and VARIANTS[-1] == "AttnScale"
    for prev, cur in zip(VARIANTS, VARIANTS[1:]):
        a, b = dataclasses.asdict(build_config(prev, "d12")), dataclasses.asdict(build_config(cur, "d12"))
        changed = {k for k in a if a[k] != b[k]}
        declared = set(CHAIN[VARIANTS.index(cur)].model)
        assert changed <= declared, (cur, changed - declared)
        assert changed or cur in ("Muon",), f"{cur} changes no model field"


def test_recipes_follow_the_paper_reference_rates():
    assert build_recipe("Baseline").matrix_optimizer == "adamw" and build_recipe("Baseline").matrix_lr == 6e-4
    m = build_recipe("Muon")
    assert (m.matrix_optimizer, m.embed_lr, m.matrix_lr, m.muon_scale) == ("muon", 3.6e-3, 3.6e-4, "sqrt_max")
    u = build_recipe("Untied")
    assert (u.embed_lr, u.head_lr, u.matrix_lr, u.muon_scale) == (0.3, 0.002, 0.02, "sqrt_ratio")
    t = build_recipe("FlexWin")
    assert (t.embed_lr, t.head_lr, t.matrix_lr, t.scalar_lr, t.betas) == (0.6, 0.008, 0.04, 0.04, (0.8, 0.95))
    assert build_recipe("AttnScale").eps == 1e-10 and build_recipe("FP8Head").final_lr_frac == 0.1


def test_layouts_at_d12():
    cfg = build_config("SparseV", "d12")
    with torch.device("meta"):
        m = GPT(cfg)
    assert cfg.no_attn_layers == (7,) and m.blocks[7].attn is None
    assert m.ve_of == [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    with torch.device("meta"):
        half = GPT(build_config("BetterWin", "d12"))
        lswa = GPT(build_config("LSWA", "d12"))
    assert half.ve_of == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]
    assert [i for i, long in enumerate(lswa.long_layer) if long] == [0, 4, 7, 11]  # 7 has no attention


def test_bad_names_and_configs():
    with pytest.raises(KeyError, match="unknown variant"):
        build_config("NoSuchVariant")
    with pytest.raises(KeyError, match="unknown profile"):
        build_config("RoPE", "d99")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="window"):
        GPTConfig(attn_mask="window")
    assert build_config("unet", "tiny") == build_config("U-Net", "tiny")


@pytest.mark.parametrize("bad", [dict(logit_softcap=0.0), dict(attn_scale=float("nan")), dict(attn_scale=-0.12),
                                 dict(rope_base=0.0), dict(seq_len=0)])
def test_config_refuses_values_that_make_the_model_nan(bad):
    """logit_softcap=0 and attn_scale=NaN built a model whose logits were all NaN; rope_base=0 rotated
    nothing (0^x); seq_len=0 failed only at the first forward."""
    (name,) = bad
    with pytest.raises(ValueError, match=f"GPTConfig: {name}="):
        build_config("AttnScale", "tiny", **bad)
