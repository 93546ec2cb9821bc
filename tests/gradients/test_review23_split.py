"""Review 23 (probe.py split): the engine choice, moved to the private ``_engine_choice.py`` as pure functions of
the model and the probe's settings, decides as the probe's engines say, called without a probe; and the names
other tests and users reach through ``spectral_lens.gradients.probe`` are still there and still used."""

from __future__ import annotations

import pytest
import torch
from support.models import TinyGPT
from torch import nn

import spectral_lens.gradients.probe as probe_module
from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients._engine_choice import batch_statistics, choose_engine, shared_names

PROJ = "transformer.h.1.attn.c_proj.weight"
HEAD = "lm_head.weight"


def _site(model: nn.Module, name: str):
    path, _, local = name.rpartition(".")
    return model.get_submodule(path), local


def _choose(model, name, engine="auto", train_mode=False, untraceable=None, offloading=None):
    return choose_engine(engine, model, name, _site(model, name), model.get_parameter(name), train_mode=train_mode,
                         untraceable=untraceable or {}, offloading=offloading or [])


def test_choose_engine_matches_the_probes_engines():
    """Tied head: vmap (auto) and refused (fast); an untied Linear: fast; the loop engine: loop. The probe's
    ``engines_`` are the function's answers."""
    model = TinyGPT(tie=True)
    assert shared_names(model, model.lm_head.weight) == ["transformer.wte.weight", HEAD]
    assert _choose(model, PROJ) == "fast" and _choose(model, HEAD) == "vmap"
    assert _choose(model, PROJ, engine="loop") == _choose(model, HEAD, engine="loop") == "loop"
    assert _choose(model, HEAD, engine="vmap") == "vmap"
    with pytest.raises(ValueError, match=r"engine='fast' impossible for lm_head.weight: it is shared by .*'vmap'"):
        _choose(model, HEAD, engine="fast")
    probe = PerSampleGradientProbe(model, [PROJ, HEAD])
    assert probe.engines_ == {PROJ: "fast", HEAD: "vmap"}


def test_choose_engine_batch_statistics_and_untraceable_layers():
    """BatchNorm normalizing by the batch keeps a Linear off the fast path (train_mode, or no running
    statistics); a vmap-untraceable layer (PEFT LoHa) makes auto take the loop and refuses engine='vmap' with
    the layer's name and the fast-path hint; Accelerate offloading refuses engine='vmap' too."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert batch_statistics(model, False) == [] and batch_statistics(model, True) == ["1"]
    assert _choose(model, "0.weight") == "fast"
    assert _choose(model, "0.weight", train_mode=True) == "loop"  # review 24: running statistics, vmap cannot trace
    with pytest.raises(ValueError, match=r"BatchNorm layer\(s\) \['1'\] normalize .*train_mode=True"):
        _choose(model, "0.weight", engine="fast", train_mode=True)
    untraceable = {"peft.layer": "LoHa layer"}
    assert _choose(model, "0.weight", train_mode=True, untraceable=untraceable) == "loop"
    with pytest.raises(ValueError, match=r"its peft layer 'peft.layer' \(LoHa layer\).*engine='fast' \(0.weight has a "
                                         r"fast path\) or engine='loop'"):
        _choose(model, "0.weight", engine="vmap", untraceable=untraceable)
    with pytest.raises(ValueError, match=r"runs a torch.autograd.Function.*elsewhere\) or engine='loop'"):
        _choose(model, "0.weight", engine="vmap", train_mode=True, untraceable=untraceable)  # no fast-path hint
    with pytest.raises(ValueError, match=r"Accelerate offloads the weights of \['a', 'b', 'c'\] and more"):
        _choose(model, "0.weight", engine="vmap", offloading=["a", "b", "c", "d"])
    assert _choose(model, "2.weight", offloading=["x"]) == "fast"


@pytest.mark.parametrize("name", ["chunked_is_faster", "rng_state", "gram_against", "finite_rows", "fill_gram",
                                  "fill_gram_by_columns", "grow_square", "block_rows_for", "CPU_SLAB_ELEMENTS",
                                  "GRAM_BLOCK_ELEMENTS", "ATTENTION_OUTPUT_PATTERNS", "default_gradient_param"])
def test_the_names_reached_through_the_probe_module_stay_there(name):
    """Tests monkeypatch these on ``spectral_lens.gradients.probe`` (and users import the public ones from it):
    each is still a module attribute, and the probe's code still reads it there (a split that moved its caller
    would leave the monkeypatches without effect)."""
    assert hasattr(probe_module, name)
    source = open(probe_module.__file__, encoding="utf-8").read()
    body = source.split("class PerSampleGradientProbe", 1)[1]
    assert name in body or name in probe_module.__all__


def test_a_monkeypatched_gram_helper_on_the_probe_module_reaches_the_probe(monkeypatch):
    """The Gram completion still calls the probe module's ``fill_gram_by_columns`` (the CPU path; what test_gradient_gram and
    test_review20_probe rely on)."""
    calls = []
    real = probe_module.fill_gram_by_columns
    monkeypatch.setattr(probe_module, "fill_gram_by_columns", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = TinyGPT(d=8, layers=1, ctx=6).double()
    probe = PerSampleGradientProbe(model, "transformer.h.0.attn.c_proj.weight", chunk_size=2)
    g = torch.Generator().manual_seed(0)
    probe.update((torch.randint(0, 37, (3, 6), generator=g), torch.randint(0, 37, (3, 6), generator=g)))
    probe.gram()
    assert calls
