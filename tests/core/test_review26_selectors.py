"""Each entry of a user's target list must match: a typo in one entry of a list was dropped silently while
another entry matched (``sl.attach(model, ["0", "typo"])`` measured ``"0"`` alone, no word)."""
import re

import pytest
import torch
import torch.nn as nn

import spectral_lens as sl
from spectral_lens.weights import select_parameters, weight_spectra


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_attach_refuses_a_list_entry_matching_no_module_and_leaves_no_hook():
    m = _model()
    with pytest.raises(ValueError, match=r"Sequential: entry 'typo' of target \['0', 'typo'\] matches no module") as e:
        sl.attach(m, ["0", "typo"])
    assert "'0'" in str(e.value)  # what did match, and the closest / some names
    assert _hooks(m) == 0


def test_a_glob_regex_or_callable_entry_matching_nothing_is_refused_too():
    m = _model()
    for bad in ("2*x", re.compile(r"9+"), lambda n, mod: n == "nope"):
        with pytest.raises(ValueError, match="matches no module"):
            sl.select_modules(m, ["0", bad])
    with pytest.raises(ValueError, match=r"entries 'x', 'y' of target .* match no module"):
        sl.select_modules(m, ["0", "x", "y"])
    with pytest.raises(ValueError, match="closest names: \\['2'\\]"):
        sl.select_modules(m, ["0", "2*x"])  # the closest names of the missing entry


def test_valid_lists_still_select_as_before():
    m = _model()
    assert [n for n, _ in sl.select_modules(m, ["0", "2"])] == ["0", "2"]
    assert [n for n, _ in sl.select_modules(m, ["*", re.compile("0")])] == ["0", "1", "2"]  # overlap is fine
    assert [n for n, _ in sl.select_modules(m, [m[2], "0"])] == ["0", "2"]
    assert [n for n, _ in sl.select_modules(m, re.compile("0|typo"))] == ["0"]  # alternatives: one regex


def test_accumulator_attach_refuses_a_list_with_a_missing_entry():
    m = _model()
    acc = sl.ActivationCovarianceAccumulator(6)
    with pytest.raises(ValueError, match="entry 'typo'.*matches no module"):
        acc.attach(m, ["0", "typo"])
    assert _hooks(m) == 0
    acc.attach(m, "0").remove()  # not claimed by the refused attach


def test_lens_refuses_a_missing_layer_entry_at_construction_and_at_attach():
    pool = [torch.randn(4, 6)]
    m = _model()
    with pytest.raises(ValueError, match=r"SpectralLens layers=\['0', 'typo'\]: Sequential: entry 'typo'"):
        sl.SpectralLens(m, pool, layers=["0", "typo"], params=())
    lens = sl.SpectralLens(pool=pool, layers=["0", "typo"], params=())  # no model yet: checked when it is known
    with pytest.raises(ValueError, match="entry 'typo'"):
        lens.attach(m)
    assert lens.model is None and _hooks(m) == 0


def test_lens_with_a_probe_refuses_before_binding_the_probe():
    pool = [torch.randn(4, 6)]
    m = _model()
    probe = sl.PerSampleGradientProbe(params=["0.weight"], forward_fn=lambda mod, b: mod(b),
                                      loss_fn=lambda out, b: out.pow(2).mean())
    lens = sl.SpectralLens(pool=pool, layers=["2", "typo"], probe=probe)
    with pytest.raises(ValueError, match="entry 'typo'"):
        lens.attach(m)
    assert probe.model is None and _hooks(m) == 0


def test_probe_refuses_a_missing_param_entry():
    m = _model()
    with pytest.raises(ValueError, match="has no parameter 'typo.weight'"):
        sl.PerSampleGradientProbe(m, ["0.weight", "typo.weight"])
    with pytest.raises(ValueError, match="has no parameter 'x.\\*'"):
        sl.PerSampleGradientProbe(m, ["0.weight", "x.*"])


def test_weight_spectra_refuses_a_list_entry_choosing_no_matrix():
    m = _model()
    with pytest.raises(ValueError, match=r"entry 'nonexistent.weight' of target .* matches no matrix parameter"):
        weight_spectra(m, ["0.weight", "nonexistent.weight"])
    with pytest.raises(ValueError, match=r"entries '2.bias', 'x\*' .*'2.bias' matches only \['2.bias'\]"):
        select_parameters(m, ["0.weight", "2.bias", "x*"])  # a bias gives no spectrum: named, not dropped
    with pytest.raises(ValueError, match="matches no matrix parameter"):
        select_parameters(m, ["0.weight", re.compile("9")])


def test_weight_spectra_of_a_valid_list_equal_the_float64_reference():
    m = _model()
    got = weight_spectra(m, ["0.weight", "2.*"])
    assert list(got) == ["0.weight", "2.weight"]
    for name in got:
        ref = torch.linalg.svdvals(dict(m.named_parameters())[name].detach().double()) ** 2
        assert torch.allclose(torch.as_tensor(got[name].values, dtype=torch.float64)[: len(ref)], ref, rtol=1e-6)


def test_a_framework_callback_binding_a_lens_with_a_missing_layer_entry_raises_and_binds_nothing():
    from spectral_lens.integrations._driver import LensDriver

    m = _model()
    lens = sl.SpectralLens(pool=[torch.randn(4, 6)], layers=["0", "typo"], params=())
    driver = LensDriver(lens, [], None)
    with pytest.raises(ValueError, match="SpectralLens layers=.*entry 'typo'"):
        driver.bind(m, "on_train_begin")
    assert lens.model is None and driver.handle is None and _hooks(m) == 0
