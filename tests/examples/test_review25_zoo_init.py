"""Review 25 (zoo): each variant's initialization, pinned by computation against zoo-spec.md.

Linear weights ~ U(-a, a) with a = 1/sqrt(fan_in) (PyTorch's default; every record up to 01-04) and
a = 0.5*sqrt(3)/sqrt(fan_in) from FP8Head (01-13); output projections and the untied head start at
zero from Untied (10-14 / 11-03); the tied table and positions N(0, 0.02) (Baseline), the untied
token table and every value table N(0, 1); value-mix scalars 0.5 (or (0.5, 0.5)), x/x0 mix (1, 0),
U-Net skip weights 1. Soft-capped logits stay inside [-15, 15].
"""
import math

import pytest
import torch

from examples.nanogpt.model import GPT
from examples.nanogpt.variants import VARIANTS, build_config

FP8_ON = VARIANTS.index("FP8Head")
UNTIED_ON = VARIANTS.index("Untied")


def _model(variant):
    torch.manual_seed(0)
    return GPT(build_config(variant, "tiny"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_initialization_is_the_records(variant):
    m, i = _model(variant), VARIANTS.index(variant)
    zero = {"mlp.c_proj", "attn.c_proj"} if i >= UNTIED_ON else set()
    for name, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach().double()
        if name == "lm_head" or any(name.endswith(z) for z in zero):
            assert not w.any(), f"{variant}: {name} should start at zero"
            continue
        a = (0.5 * math.sqrt(3) if i >= FP8_ON else 1.0) / math.sqrt(mod.in_features)
        assert w.abs().max() <= a and w.abs().max() > 0.99 * a, (variant, name, float(w.abs().max()), a)
        assert w.std().item() == pytest.approx(a / math.sqrt(3), rel=0.05), (variant, name)
    assert (m.lm_head is None) == (i < UNTIED_ON)
    assert m.wte.weight.std().item() == pytest.approx(0.02 if i < UNTIED_ON else 1.0, rel=0.05)
    if m.wpe is not None:
        assert variant == "Baseline" and m.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for e in m.value_embeds:
        assert e.weight.std().item() == pytest.approx(1.0, rel=0.05)
    for b in m.blocks:
        if b.lambdas is not None:
            assert b.lambdas.tolist() == [1.0, 0.0]
        if b.attn is not None and b.attn.value_lambdas is not None:
            assert b.attn.value_lambdas.tolist() == ([0.5] if m.config.value_mix == "lerp" else [0.5, 0.5])
    if m.skip_weights is not None:
        assert m.skip_weights.tolist() == [1.0] * (m.config.n_layer // 2)


@pytest.mark.parametrize("variant", ["SoftCap", "AttnScale"])
def test_soft_capped_logits_stay_inside_the_cap(variant):
    m = _model(variant)
    with torch.no_grad():
        m.lm_head.weight.normal_(std=100.0)  # raw logits in the thousands
        logits = m(torch.randint(0, 256, (1, 64)))
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.9  # tanh saturates to 1 in fp32
