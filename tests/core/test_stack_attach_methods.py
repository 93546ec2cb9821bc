"""attach() as a method on every composable piece: accumulator, probe (also built before the model)
and SpectralLens; each returns a context-manager handle with remove()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator, PerSampleGradientProbe, SpectralLens

from support.models import TinyLM, lm_pool


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyLM(tied=False, dropout=0.0).double().eval()


def _hook_counts(model):
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def test_top_level_exports():
    from spectral_lens.analysis import SweepController, TailPredictor

    assert sl.TailPredictor is TailPredictor and sl.SweepController is SweepController
    for name in ("TailPredictor", "SweepController", "Attachment", "EngineFallbackWarning"):
        assert name in sl.__all__


def test_accumulator_attach_measures_the_module_output_and_removes_its_hook():
    model, pool = _model(), lm_pool()
    before = _hook_counts(model)
    acc = ActivationCovarianceAccumulator(precision="float64")
    outs = []
    ref_hook = model.h[1].register_forward_hook(lambda m, a, o: outs.append(o.detach().reshape(-1, o.shape[-1])))
    with acc.attach(model, "h.1") as handle:
        assert handle.active and handle.accumulators == {"h.1": acc}
        with torch.no_grad():
            for x, _ in pool:
                model(x)
    ref_hook.remove()
    assert not handle.active and _hook_counts(model) == before
    assert acc.name == "h.1"
    rows = torch.cat(outs).numpy()
    assert acc.n_rows == rows.shape[0]
    want = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
    np.testing.assert_allclose(acc.compute().values.numpy(), want, rtol=1e-10, atol=1e-13 * want[0])
    with torch.no_grad():  # removed: no more rows
        model(pool[0][0])
    assert acc.n_rows == rows.shape[0]


def test_accumulator_attach_needs_exactly_one_module():
    acc = ActivationCovarianceAccumulator()
    with pytest.raises(ValueError, match=r"selects 3 modules .*spectral_lens.attach"):
        acc.attach(_model(), "h.*")


def test_probe_built_before_the_model_equals_the_direct_form():
    model, pool = _model(), lm_pool()
    direct = PerSampleGradientProbe(model, "h.2.attn.c_proj.weight", keep_matrix=True)
    late = PerSampleGradientProbe(params="h.2.attn.c_proj.weight", keep_matrix=True)
    assert late.model is None and late.params == {}
    with pytest.raises(RuntimeError, match=r"not attached .*probe.attach\(model\)"):
        late.update(pool[0])
    before = _hook_counts(model)
    with late.attach(model) as handle:
        assert isinstance(handle, sl.Attachment) and "active=True" in repr(handle)
        assert handle.active and late.model is model and list(late.params) == ["h.2.attn.c_proj.weight"]
        for b in pool:
            direct.update(b)
            late.update(b)
        torch.testing.assert_close(late.matrix(), direct.matrix(), rtol=0, atol=0)
        torch.testing.assert_close(late.compute().values, direct.compute().values, rtol=0, atol=0)
    assert not handle.active and late.model is None and late.n_samples_ == 0
    assert _hook_counts(model) == before
    handle.remove()  # idempotent


def test_probe_attach_to_a_second_model_needs_remove_first():
    a, b = _model(0), _model(1)
    probe = PerSampleGradientProbe(params="h.0.attn.c_proj.weight")
    h = probe.attach(a)
    with pytest.raises(ValueError, match="attached to another TinyLM"):
        probe.attach(b)
    h.remove()
    probe.attach(b)
    assert probe.model is b and probe.params["h.0.attn.c_proj.weight"] is b.h[0].attn.c_proj.weight


def test_probe_attach_resolves_params_in_the_model():
    probe = PerSampleGradientProbe(params="h.9.attn.c_proj.weight")
    with pytest.raises(ValueError, match=r"TinyLM has no parameter 'h.9.attn.c_proj.weight'"):
        probe.attach(_model())
    assert probe.model is None


def test_lens_attach_later_equals_the_direct_form():
    model, pool = _model(), lm_pool()
    direct = SpectralLens(model, pool, precision="float64", progress=False).measure(3, 30)
    lens = SpectralLens(pool=pool, precision="float64", progress=False)
    with pytest.raises(RuntimeError, match=r"lens.attach\(model\)"):
        lens.measure(3, 30)
    with lens.attach(model) as handle:
        assert lens.layers == "h.2" and list(lens.probe.params) == ["h.2.attn.c_proj.weight"]
        late = lens.measure(3, 30)
    assert not handle.active and lens.model is None and lens.probe.model is None
    assert late.spectra.keys() == direct.spectra.keys()
    for k in direct.spectra:
        torch.testing.assert_close(late.spectra[k].values, direct.spectra[k].values, rtol=0, atol=0)
    with lens.attach(model):  # re-attachable
        assert lens.measure(4, 40).step == 4


def test_hf_llama_decoder_layer_returns_a_tensor_and_pick_none_works():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 6))
    with sl.attach(model, "model.layers.1") as cap, torch.no_grad():  # pick=None: transformers 5 layers
        model(input_ids=ids)
    assert cap.accumulators["model.layers.1"].n_rows == 12
    with pytest.raises(TypeError, match=r"pick=0 indexes a tuple output, but this module returns a tensor .*pick=None"):
        with sl.attach(model, "model.layers.1", pick=0), torch.no_grad():
            model(input_ids=ids)


def test_module_objects_as_targets_of_the_accumulator_and_the_lens():
    model, pool = _model(), lm_pool()
    acc = ActivationCovarianceAccumulator(precision="float64")
    with acc.attach(model, model.h[1]), torch.no_grad():
        model(pool[0][0])
    assert acc.name == "h.1" and acc.n_rows == pool[0][0].numel()
    by_name = SpectralLens(model, pool, layers="h.2", params=(), precision="float64", progress=False).measure(0, 0)
    lens = SpectralLens(model, pool, layers=model.h[-1], params=(), precision="float64", progress=False)
    assert lens.layers == "h.2"
    got = lens.measure(0, 0)
    torch.testing.assert_close(got.spectra["act:h.2"].values, by_name.spectra["act:h.2"].values, rtol=0, atol=0)
    assert SpectralLens(model, pool, layers=[model.h[0], model.h[2]], params=(), progress=False).layers == ["h.0", "h.2"]
    with pytest.raises(ValueError, match=r"TinyLM: the Block module given as a target is not a submodule"):
        SpectralLens(_model(), pool, layers=model.h[-1], params=(), progress=False)


def test_attaching_an_attached_accumulator_again_is_refused_and_leaks_nothing():
    model, pool = _model(), lm_pool()
    before = _hook_counts(model)
    acc = ActivationCovarianceAccumulator()
    handle = acc.attach(model, "h.1")
    with pytest.raises(ValueError, match=r"ActivationCovarianceAccumulator 'h.1' is already attached to module 'h.1' "
                                         r"of TinyLM.*remove\(\) on the handle of the first attach"):
        acc.attach(model, "h.1")  # a re-run notebook cell
    with pytest.raises(ValueError, match="already attached"):
        acc.attach(model, "h.2")  # one accumulator fed by two modules
    capture = sl.attach(model, "h.0")  # the accumulators sl.attach makes are attached too
    with pytest.raises(ValueError, match="already attached to module 'h.0'"):
        capture.accumulators["h.0"].attach(model, "h.2")
    with torch.no_grad():
        model(pool[0][0])
    assert acc.n_rows == pool[0][0].numel()  # counted once
    handle.remove()
    capture.remove()
    assert _hook_counts(model) == before
    with acc.attach(model, "h.1"):  # free again after remove()
        pass
    assert _hook_counts(model) == before


def test_attaching_an_attached_probe_again_is_refused_and_stale_handles_are_harmless():
    model, pool = _model(), lm_pool()
    probe = PerSampleGradientProbe(params="h.2.attn.c_proj.weight")
    h1 = probe.attach(model)
    probe.update(pool[0])
    with pytest.raises(ValueError, match=r"already attached to this TinyLM .*3 samples.*remove\(\) on the first handle"):
        probe.attach(model)
    assert probe.n_samples_ == 3 and h1.active  # nothing was reset
    probe.detach()
    h2 = probe.attach(model)
    assert not h1.active and h2.active
    h1.remove()  # stale: must not unbind the newer attachment
    assert probe.model is model and h2.active
    h2.remove()
    assert probe.model is None
    lens = SpectralLens(model, pool, params=(), progress=False)
    with pytest.raises(ValueError, match=r"SpectralLens is already attached to this TinyLM"):
        lens.attach(model)
    lens.detach()
    g1 = lens.attach(model)
    lens.detach()
    g2 = lens.attach(model)
    g1.remove()
    assert lens.model is model and g2.active and not g1.active
