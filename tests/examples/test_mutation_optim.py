"""Mutation audit of the zoo's optimizer groups and schedule application (examples/nanogpt/optim.py).

The promises checked (``Recipe``'s and ``build_optimizers``' docstrings): ``embed`` holds the token, position
and value embeddings, ``head`` the untied LM head, ``scalar`` every parameter with ndim < 2 and ``matrix``
the 2-D block weights; weight decay applies to the 2-D Adam tensors only; ``lr_scale`` multiplies every
group's rate; ``apply_schedule`` sets lr = base rate x the step's multiplier (never compounding) and the Muon
momentum of the step on Muon groups only.
"""
import dataclasses
import math

import pytest
import torch

from examples.nanogpt.model import GPT
from examples.nanogpt.optim import apply_schedule, build_optimizers, lr_multiplier, muon_momentum
from examples.nanogpt.variants import build_config, build_recipe, get_profile


def _model(variant):
    torch.manual_seed(0)
    return GPT(build_config(variant, get_profile("tiny"), seq_len=64))


def _groups_by_param(opts):
    out = {}
    for opt in opts:
        for g in opt.param_groups:
            for p in g["params"]:
                assert id(p) not in out, "a parameter in two groups"
                out[id(p)] = g
    return out


@pytest.mark.parametrize("variant", ["RoPE", "Untied", "VTE"])
def test_every_parameter_is_in_the_documented_group(variant):
    model = _model(variant)
    opts = build_optimizers(model, build_recipe(variant), muon_impl="records")
    groups = _groups_by_param(opts)
    names = dict(model.named_parameters())
    assert set(groups) == {id(p) for p in names.values()}
    expect = {}
    for name, p in names.items():
        if p.ndim < 2:
            expect[name] = "scalar"
        elif name.split(".")[0] in ("wte", "wpe", "value_embeds"):
            expect[name] = "embed"
        elif name.startswith("lm_head."):
            expect[name] = "head"
        else:
            assert name.startswith("blocks."), name
            expect[name] = "matrix"
    assert {n: groups[id(p)]["name"] for n, p in names.items()} == expect
    if variant == "VTE":
        assert expect["value_embeds.0.weight"] == "embed"
    if variant == "Untied":
        assert expect["lm_head.weight"] == "head"


@pytest.mark.parametrize("variant", ["RoPE", "FlexWin"])
def test_weight_decay_only_on_2d_adam_tensors_and_lr_scale_on_every_group(variant):
    # no shipped recipe has both weight decay and scalar parameters: give FlexWin (all four groups) a decay
    model = _model(variant)
    r = dataclasses.replace(build_recipe(variant), weight_decay=0.1)
    opts = build_optimizers(model, r, lr_scale=3.0, muon_impl="records")
    base = {"embed": r.embed_lr, "head": r.head_lr, "scalar": r.scalar_lr, "matrix": r.matrix_lr}
    seen = set()
    for opt in opts:
        for g in opt.param_groups:
            seen.add(g["name"])
            assert g["lr"] == pytest.approx(3.0 * base[g["name"]]) and g["base_lr"] == g["lr"], g["name"]
            if isinstance(opt, torch.optim.AdamW):
                two_d = all(p.ndim == 2 for p in g["params"])
                assert g["weight_decay"] == (0.1 if two_d else 0.0), g["name"]
    assert seen == ({"embed", "matrix"} if variant == "RoPE" else {"embed", "head", "scalar", "matrix"})


def test_apply_schedule_sets_base_rate_times_the_steps_multiplier():
    variant, steps = "FlexWin", 20  # warm-up of Muon momentum, linear cool-down of the rates
    model = _model(variant)
    r = build_recipe(variant)
    opts = build_optimizers(model, r, muon_impl="records")
    for step in (0, 3, 15, 19, 5):
        mult = apply_schedule(opts, r, step, steps)
        assert mult == lr_multiplier(r, step, steps)
        for opt in opts:
            for g in opt.param_groups:
                assert g["lr"] == pytest.approx(g["base_lr"] * mult)
                if g["name"] == "matrix":
                    assert g["momentum"] == pytest.approx(muon_momentum(r, step))
    assert muon_momentum(r, 3) != muon_momentum(r, 5) and lr_multiplier(r, 19, steps) < lr_multiplier(r, 15, steps) < 1


def test_cosine_runs_from_the_end_of_warmup_to_the_last_step():
    # Baseline (llm.c): warm-up 700 of 19,560 steps, then a cosine to 0 over steps 700..19,560,
    # so the midpoint 10,130 is at half the peak and the multiplier reaches the floor only at `steps`
    b = build_recipe("Baseline")
    assert b.decay == "cosine" and b.final_lr_frac == 0.0
    assert lr_multiplier(b, 10130, 19560) == pytest.approx(0.5, abs=1e-9)
    assert lr_multiplier(b, 19559, 19560) == pytest.approx(0.5 * (1 + math.cos(math.pi * 18859 / 18860)), abs=1e-12)
    assert lr_multiplier(b, 19559, 19560) > 0
