"""SpectralLens and PerSampleGradientProbe on Hugging Face PEFT (LoRA) models.

Tiny config-built GPT-2 (``Conv1D`` layers, ``fan_in_fan_out``) and Llama (``nn.Linear``) wrapped by
``get_peft_model``; no download. Spectra are compared with float64 references computed by hand on the
same model (block outputs over every position; one autograd gradient per sequence on a copy);
measuring leaves outputs, ``.grad``, adapters, the active adapter, merged state, modes, ``requires_grad``
and RNG streams as they were.
"""

from __future__ import annotations

import copy
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
peft = pytest.importorskip("peft", reason="the hf extra installs peft")

V, T = 61, 10
PREFIX = "base_model.model."


def gpt2(dropout=0.0, targets=("c_attn", "c_proj", "c_fc")):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg).double()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout,
                           fan_in_fan_out=True, init_lora_weights=False)  # random lora_B: non-zero gradients
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is set for Conv1D anyway
        return peft.get_peft_model(base, lora)


def llama(adapters=("default",), targets=("q_proj", "v_proj", "o_proj"), save=None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).double()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                           modules_to_save=save)
    model = peft.get_peft_model(base, lora, adapter_name=adapters[0])
    for name in adapters[1:]:
        torch.manual_seed(len(name))
        model.add_adapter(name, peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets),
                                                init_lora_weights=False, modules_to_save=save))
    return model.double()


def pool(n_batches=2, m=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, V, (m, T), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def ref_activations(model, block, batches):
    rows = []
    hook = model.get_submodule(block).register_forward_hook(lambda mod, a, out: rows.append(out.detach()))
    was = model.training
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    hook.remove()
    model.train(was)
    x = torch.cat(rows).flatten(0, 1).double().numpy()
    return np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1], 0, None)


def ref_grads(model, param, batches):
    """(M, P) float64: each sequence's gradient of its mean next-token loss, autograd on a copy in eval mode."""
    model = copy.deepcopy(model).eval()
    weight = model.get_parameter(param).requires_grad_(True)
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            logits = model(input_ids=b["input_ids"][i : i + 1]).logits[0, :-1]
            (g,) = torch.autograd.grad(F.cross_entropy(logits, b["labels"][i, 1:]), weight)
            rows.append(g.flatten().double())
    return torch.stack(rows)


def spectrum(G):
    return np.clip(np.linalg.eigvalsh((G @ G.T).numpy())[::-1], 0, None)


def close(got, ref, tol=1e-9):
    got = np.asarray(got)[: len(ref)]
    assert np.abs(got - ref).max() <= tol * ref[0], (got[:4], ref[:4])


def state(model):
    return dict(
        modes=[m.training for m in model.modules()],
        flags={k: p.requires_grad for k, p in model.named_parameters()},
        tensors={k: v.clone() for k, v in model.state_dict().items()},
        grads={k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        rng=(torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
        hooks=sum(len(getattr(m, a)) for m in model.modules()
                  for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")),
        active=model.active_adapters, merged=[getattr(m, "merged", None) for m in model.modules()],
        disabled=[getattr(m, "disable_adapters", None) for m in model.modules()],
    )


def assert_same(before, after):
    assert before["modes"] == after["modes"] and before["flags"] == after["flags"]
    assert before["hooks"] == after["hooks"] and before["active"] == after["active"]
    assert before["merged"] == after["merged"] and before["disabled"] == after["disabled"]
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])


@pytest.mark.parametrize("build, block, wo", [
    (gpt2, "transformer.h.1", "transformer.h.1.attn.c_proj"),
    (llama, "model.layers.1", "model.layers.1.self_attn.o_proj"),
])
def test_lens_defaults_on_a_lora_model_equal_float64_references(build, block, wo):
    """The default block and W_O are found through the PeftModel and its LoRA-wrapped projection (the
    frozen base weight: its gradient is the gradient of the effective W + s B A); both spectra equal the
    references, and equal those of the merge_and_unload() model's plain W_O, under the same record keys (the
    names of the model before get_peft_model; Spectrum.source keeps the PeftModel's own). Before: 'no
    attention output projection found' (the wrapped W_O is <module>.base_layer.weight); then keys with
    base_model.model. and base_layer, which no key of the merged model's record matched."""
    model, batches = build(), pool()
    lens = sl.SpectralLens(model, batches, precision="float64", progress=False)
    param = f"{PREFIX}{wo}.base_layer.weight"
    assert (lens.layers, list(lens.probe.params)) == (PREFIX + block, [param])
    model.train()  # as in a training loop (GPT-2's dropout: outputs compared in eval mode)
    with torch.no_grad():
        out = model.eval()(input_ids=batches[0]["input_ids"]).logits
    before = state(model.train())
    m = lens.measure(step=1, tokens=60)
    assert_same(before, state(model))
    with torch.no_grad():
        assert torch.equal(out, model.eval()(input_ids=batches[0]["input_ids"]).logits)
    assert model.get_parameter(param).requires_grad is False  # frozen, stays frozen
    act, grad = m.spectra[f"act:{block}"], m.spectra[f"grad:{wo}.weight"]
    assert (act.source, grad.source) == (PREFIX + block, param)
    assert set(m.scalars) == {"noise_scale", f"noise_scale:{wo}.weight"}
    close(act.values, ref_activations(model, PREFIX + block, batches))
    close(grad.values, spectrum(ref_grads(model, param, batches)))
    merged = copy.deepcopy(model).merge_and_unload()
    m2 = sl.SpectralLens(merged, batches, precision="float64", progress=False).measure(step=1, tokens=60)
    assert set(m2.spectra) == set(m.spectra) and set(m2.scalars) == set(m.scalars) and set(m2.summaries) == set(m.summaries)
    close(m2.spectra[f"act:{block}"].values, act.values.numpy(), 1e-8)
    close(m2.spectra[f"grad:{wo}.weight"].values, grad.values.numpy(), 1e-8)


def test_names_as_a_user_types_them():
    """layers= and params= take the PeftModel's names and the names of the model it wraps (without
    base_model.model., a wrapped weight without .base_layer, a module for its weight); globs too. The probe
    and lens.layers keep the model's own names, the record those of the model before get_peft_model. Before:
    'no module matches' / 'has no parameter'."""
    model = gpt2()
    wo = f"{PREFIX}transformer.h.1.attn.c_proj.base_layer.weight"
    for layers in ("transformer.h.1", f"{PREFIX}transformer.h.1", "transformer.h.*"):
        lens = sl.SpectralLens(model, pool(), layers=layers, params=(), progress=False)
        assert "act:transformer.h.1" in lens.measure(0, 0).spectra
    for spelling in ("transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn.c_proj.base_layer.weight",
                     "transformer.h.1.attn.c_proj", f"{PREFIX}transformer.h.1.attn.c_proj",
                     f"{PREFIX}transformer.h.1.attn.c_proj.weight", wo):
        assert list(sl.PerSampleGradientProbe(model, params=spelling).params) == [wo], spelling
    probe = sl.PerSampleGradientProbe(model, params=["transformer.h.*.attn.c_proj.weight", "lm_head",
                                                     "transformer.h.1.attn.c_proj.lora_B.default.weight"])
    assert list(probe.params) == [f"{PREFIX}transformer.h.0.attn.c_proj.base_layer.weight", wo,
                                  f"{PREFIX}lm_head.weight", f"{PREFIX}transformer.h.1.attn.c_proj.lora_B.default.weight"]
    with pytest.raises(ValueError, match="no parameter 'transformer.h.1.attn.c_proj.lora_C'"):
        sl.PerSampleGradientProbe(model, params="transformer.h.1.attn.c_proj.lora_C")
    # the base model (get_base_model(), LoRA layers inside, no prefix) takes the same spellings
    inner = model.get_base_model()
    assert list(sl.PerSampleGradientProbe(inner).params) == ["transformer.h.1.attn.c_proj.base_layer.weight"]
    assert list(sl.PerSampleGradientProbe(inner, params="transformer.h.1.attn.c_proj.weight").params) == [
        "transformer.h.1.attn.c_proj.base_layer.weight"]


def test_record_keeps_full_names_where_short_names_collide():
    """Two different matrices whose short names would be one record key (a model of its own with a submodule
    named base_layer next to a weight: c_fc.weight and c_fc.base_layer.weight both shorten to c_fc.weight)
    keep their full names in the record; the other keys are short, and each spectrum equals its reference.
    Modules too: a base model's child named base_model shortens to the PeftModel's own base_model."""
    from transformers.pytorch_utils import Conv1D

    from spectral_lens.capture import record_names

    model, batches = gpt2(targets=("c_attn", "c_proj")), pool(1)
    fc = f"{PREFIX}transformer.h.1.mlp.c_fc"
    model.get_submodule(fc).register_module("base_layer", Conv1D(4, 16).double())  # not in the forward
    wo = "transformer.h.1.attn.c_proj"
    m = sl.SpectralLens(model, batches, layers="transformer.h.1", params=[f"{fc}.weight", f"{wo}.weight"],
                        precision="float64", progress=False).measure(0, 0)
    assert sorted(m.spectra) == sorted(["act:transformer.h.1", f"grad:{fc}.weight", f"grad:{wo}.weight"])
    close(m.spectra[f"grad:{fc}.weight"].values, spectrum(ref_grads(model, f"{fc}.weight", batches)))
    close(m.spectra[f"grad:{wo}.weight"].values,
          spectrum(ref_grads(model, f"{PREFIX}{wo}.base_layer.weight", batches)))
    assert record_names(model, [f"{fc}.base_layer.weight", f"{PREFIX}{wo}.base_layer.weight"], params=True) == {
        f"{fc}.base_layer.weight": f"{fc}.base_layer.weight", f"{PREFIX}{wo}.base_layer.weight": f"{wo}.weight"}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.base_model(x))

    net = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["head"]))
    assert record_names(net, [f"{PREFIX}base_model", f"{PREFIX}head", f"{PREFIX}head.base_layer"], params=False) == {
        f"{PREFIX}base_model": f"{PREFIX}base_model", f"{PREFIX}head": "head", f"{PREFIX}head.base_layer": "head.base_layer"}
    assert record_names(net, [f"{PREFIX}head.base_layer.weight"], params=True) == {f"{PREFIX}head.base_layer.weight": "head.weight"}


def test_probe_on_lora_factors_base_weight_and_lm_head_equals_float64_references():
    """One probe, four matrices of a LoRA Llama: lora_A and lora_B (trainable), the frozen base weight and
    the untied lm head, named as a user would; every per-sample gradient row equals the autograd reference
    (keep_matrix) and the stale .grad of the trainable factors is left as it was."""
    model, batches = llama(), pool()
    o = "model.layers.1.self_attn.o_proj"
    names = {f"{o}.lora_A.default.weight": f"{PREFIX}{o}.lora_A.default.weight",
             f"{o}.lora_B.default.weight": f"{PREFIX}{o}.lora_B.default.weight",
             f"{o}.weight": f"{PREFIX}{o}.base_layer.weight",
             "lm_head": f"{PREFIX}lm_head.weight"}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    before = state(model)
    probe = sl.PerSampleGradientProbe(model, params=list(names), keep_matrix=True, chunk_size=4)
    assert list(probe.params) == list(names.values())
    for b in batches:
        probe.update(b)
    spectra = probe.compute()
    assert_same(before, state(model))
    for full in names.values():
        G = ref_grads(model, full, batches)
        assert torch.allclose(probe.matrix(full).double(), G, rtol=1e-9, atol=1e-12 * G.abs().max()), full
        close(spectra[full].values, spectrum(G))


def loha(targets=("q_proj", "o_proj")):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(cfg).double()
    return peft.get_peft_model(base, peft.LoHaConfig(r=4, target_modules=list(targets), init_weights=False)).double()


def test_loha_engines():
    """LoHa's forward runs peft's HadaWeight, a torch.autograd.Function without setup_context, which
    torch.func.vmap cannot trace. engine="vmap" is refused when the probe is built (ValueError naming the layer
    and engine='auto'/'fast'/'loop'); "auto" takes the fast path for the base weight and the loop for the LoHa
    factor at once, without an EngineFallbackWarning, and both matrices' rows equal the float64 reference;
    engine="fast" on the factor suggests 'loop', not 'vmap'. A LoRA model keeps vmap. Before: vmap raised a
    RuntimeError at the first update naming PeftModel only, and "auto" warned after a failed vmap attempt."""
    model, batches = loha(), pool(1)
    o = "model.layers.1.self_attn.o_proj"
    wo, factor = f"{PREFIX}{o}.base_layer.weight", f"{PREFIX}{o}.hada_w1_a.default"
    with pytest.raises(ValueError, match=r"engine='vmap' impossible for PeftModel: its peft layer "
                                         rf"'{PREFIX}model\.layers\.0\.self_attn\.q_proj' \(peft\.tuners\.loha\.layer\.Linear, "
                                         r"whose module defines HadaWeight.*; 3 more.*engine='auto'.*engine='fast' "
                                         r".*o_proj\.base_layer\.weight has a fast path\) or engine='loop'"):
        sl.PerSampleGradientProbe(model, params=f"{o}.weight", engine="vmap")
    with pytest.raises(ValueError, match=r"engine='vmap' impossible.*engine='auto' \(.*\) or engine='loop'"):
        sl.PerSampleGradientProbe(model, params=factor, engine="vmap")
    with pytest.raises(ValueError, match=r"engine='fast' impossible for .*hada_w1_a.*use engine='auto' or 'loop'$"):
        sl.PerSampleGradientProbe(model, params=factor, engine="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.EngineFallbackWarning)
        probe = sl.PerSampleGradientProbe(model, params=[f"{o}.weight", factor], keep_matrix=True).update(batches[0])
    assert probe.engines_ == {wo: "fast", factor: "loop"}
    for name in (wo, factor):
        G = ref_grads(model, name, batches)
        assert G.abs().max() > 0 and torch.allclose(probe.matrix(name).double(), G, rtol=1e-9,
                                                     atol=1e-12 * G.abs().max()), name
    lora = sl.PerSampleGradientProbe(llama(), params=f"{o}.lora_B.default.weight", engine="vmap").update(batches[0])
    assert list(lora.engines_.values()) == ["vmap"] and lora.n_samples_ == 3


@pytest.mark.parametrize("kind", ["ia3", "oft", "dora"])
def test_scaling_adapters_measure_the_base_weights_own_gradient(kind):
    """IA3 (scales outputs), OFT (rotates) and DoRA (rescales by its magnitude, here 1.5x its initial value):
    the rows of "<layer>.weight" (the frozen base_layer.weight) are that weight's own per-sample gradient
    (float64 autograd through the PeftModel), not the effective matrix's: they differ from the gradient of the
    merge_and_unload() model's weight, which computes the same outputs. IA3's and DoRA's spectra differ too;
    an exact rotation (OFT with use_cayley_neumann=False) keeps the spectrum. As docs/guide-attach.md says."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    config = {"ia3": lambda: peft.IA3Config(target_modules=["o_proj"], feedforward_modules=[], init_ia3_weights=False),
              "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["o_proj"], init_weights=False,
                                         use_cayley_neumann=False),
              "dora": lambda: peft.LoraConfig(r=4, target_modules=["o_proj"], use_dora=True, init_lora_weights=False)}
    model, batches = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).double(), config[kind]()).double(), pool(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    o = "model.layers.1.self_attn.o_proj"
    probe = sl.PerSampleGradientProbe(model, params=f"{o}.weight", keep_matrix=True).update(batches[0])
    G = ref_grads(model, f"{PREFIX}{o}.base_layer.weight", batches)
    assert torch.allclose(probe.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-9, atol=1e-12)
    effective = ref_grads(merged, f"{o}.weight", batches)
    assert ((G - effective).norm() / effective.norm()).item() > 0.1
    own, eff = spectrum(G), spectrum(effective)
    assert (np.abs(own - eff).max() / eff[0] < 1e-9) if kind == "oft" else (np.abs(own - eff).max() / eff[0] > 0.1)


def test_modules_to_save_head_is_its_trained_copy():
    """LoraConfig(modules_to_save=["lm_head"]) trains a copy of the head, which the forward uses: "lm_head"
    names that copy (lm_head.modules_to_save.default.weight), whose rows equal the reference; the frozen
    original keeps its own name. Before: 'has no parameter 'lm_head''."""
    model, batches = llama(save=["lm_head"]), pool(1)
    copy_ = f"{PREFIX}lm_head.modules_to_save.default.weight"
    with torch.no_grad():
        model.get_parameter(copy_).mul_(1.5)  # the copy differs from the original: the rows tell them apart
    for spelling in ("lm_head", "lm_head.weight", f"{PREFIX}lm_head.weight", copy_):
        assert list(sl.PerSampleGradientProbe(model, params=spelling).params) == [copy_], spelling
    original = f"{PREFIX}lm_head.original_module.weight"
    assert list(sl.PerSampleGradientProbe(model, params="lm_head.original_module.weight").params) == [original]
    probe = sl.PerSampleGradientProbe(model, params="lm_head", keep_matrix=True)
    probe.update(batches[0])
    G = ref_grads(model, copy_, batches)
    assert G.abs().max() > 0 and torch.allclose(probe.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())


def test_modules_to_save_head_follows_set_adapter():
    """Two adapters, each with its own trained lm_head copy: "lm_head" names the copy the forward runs at each
    measurement (set_adapter between two), the record key is the head's (grad:lm_head.weight, the key a full
    fine-tune's record has), Spectrum.source names the copy, and its spectrum equals the float64
    reference; inside disable_adapter(), and with an adapter that has no copy, the forward runs the frozen
    original, which is then measured (same key, source the original). A probe
    holding samples refuses to add another copy's rows (ValueError) until reset(). Before: "lm_head" stayed
    adapter a's copy, which the forward no longer ran: all zero rows and a ZeroGradientWarning."""
    model, batches = llama(adapters=("a", "b"), save=["lm_head"]), pool(1)
    head = f"{PREFIX}lm_head"
    with torch.no_grad():  # the copies differ from each other and from the original: the rows tell them apart
        model.get_parameter(f"{head}.modules_to_save.a.weight").mul_(1.5)
        model.get_parameter(f"{head}.modules_to_save.b.weight").mul_(0.5)
    lens = sl.SpectralLens(model, batches, layers="model.layers.1", params="lm_head", precision="float64",
                           progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.ZeroGradientWarning)
        for adapter in ("a", "b", "a"):
            model.set_adapter(adapter)
            before = state(model)
            m = lens.measure(0, 0)
            assert_same(before, state(model))
            name = f"{head}.modules_to_save.{adapter}.weight"
            assert [k for k in m.spectra if k.startswith("grad:")] == ["grad:lm_head.weight"], adapter
            assert m.spectra["grad:lm_head.weight"].source == name
            close(m.spectra["grad:lm_head.weight"].values, spectrum(ref_grads(model, name, batches)))
        with model.disable_adapter():
            m = lens.measure(1, 0)
            ref = spectrum(ref_grads(model, f"{head}.original_module.weight", batches))
        assert m.spectra["grad:lm_head.weight"].source == f"{head}.original_module.weight"
        close(m.spectra["grad:lm_head.weight"].values, ref)
        model.add_adapter("c", peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
        model.double()
        model.set_adapter("c")  # no copy of the head: the forward runs the original
        m = lens.measure(2, 0)
        ref = spectrum(ref_grads(model, f"{head}.original_module.weight", batches))
        assert m.spectra["grad:lm_head.weight"].source == f"{head}.original_module.weight"
        close(m.spectra["grad:lm_head.weight"].values, ref)
        model.set_adapter("a")
    probe = sl.PerSampleGradientProbe(model, params="lm_head").update(batches[0])  # adapter a's copy
    model.set_adapter("b")
    with pytest.raises(ValueError, match=r"active adapter or its peft layers changed .* 3 samples.*modules_to_save\.b\.weight"):
        probe.update(batches[0])
    assert list(probe.reset().update(batches[0]).params) == [f"{head}.modules_to_save.b.weight"]


def test_modules_to_save_wrapper_added_after_binding():
    """add_adapter with modules_to_save after the probe (or lens) was bound wraps lm_head: at the next update
    "lm_head" names the new adapter's copy, which the forward runs, and its rows equal the float64 reference;
    so do a chunked head's rows (the head decided again: the copy); a probe bound to get_base_model() (no
    adapter names to compare) follows its probed head too; a probe holding samples refuses (ValueError) until
    reset(). Before: KeyError "attribute 'weight' already exists" (the probe took the wrapper's weight), and
    'without_head: ... must be an nn.Linear head, got ModulesToSaveWrapper' for the chunked head."""
    o = "model.layers.1.self_attn.o_proj"

    def add_b(model):
        model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False,
                                               modules_to_save=["lm_head"]))
        model.double().set_adapter("b")
        with torch.no_grad():  # the copy differs from the original: the rows tell them apart
            model.get_parameter(f"{PREFIX}lm_head.modules_to_save.b.weight").mul_(1.5)

    model, batches = llama(), pool(1)
    copy_ = f"{PREFIX}lm_head.modules_to_save.b.weight"
    probe = sl.PerSampleGradientProbe(model, params=["lm_head", f"{o}.weight"], keep_matrix=True)
    chunked = sl.PerSampleGradientProbe(model, params=f"{o}.weight", head_loss="chunked",
                                        keep_matrix=True).update(batches[0])
    held = sl.PerSampleGradientProbe(model, params="lm_head").update(batches[0])
    lens = sl.SpectralLens(model, batches, layers="model.layers.1", params="lm_head", precision="float64", progress=False)
    lens.measure(0, 0)
    inner = sl.PerSampleGradientProbe(model.get_base_model(), params="lm_head", keep_matrix=True)
    add_b(model)
    probe.update(batches[0])
    assert list(probe.params) == [copy_, f"{PREFIX}{o}.base_layer.weight"]
    m = lens.measure(1, 0)
    assert m.spectra["grad:lm_head.weight"].source == copy_
    G = ref_grads(model, copy_, batches)
    assert torch.allclose(probe.matrix(copy_).double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())
    close(m.spectra["grad:lm_head.weight"].values, spectrum(G))
    assert list(inner.update(batches[0]).params) == ["lm_head.modules_to_save.b.weight"]
    assert torch.allclose(inner.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())
    chunked.reset().update(batches[0])
    assert chunked.head_loss_ == f"chunked ({PREFIX}lm_head.modules_to_save.b)"
    G = ref_grads(model, next(iter(chunked.params)), batches)
    assert torch.allclose(chunked.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())
    with pytest.raises(ValueError, match=r"peft layers changed \(.*add_adapter.*3 samples.*modules_to_save\.b\.weight"):
        held.update(batches[0])
    assert list(held.reset().update(batches[0]).params) == [copy_]


def test_get_peft_model_after_binding():
    """get_peft_model wraps the bound model's layers in place (LoHa here): at the next update a probe follows
    the probed projection into its base_layer.weight (rows equal the float64 reference), and a probe with
    engine="vmap" raises the LoHa ValueError. Before: AttributeError "property 'weight' of 'Linear' object has
    no setter" from both (the probe took the LoHa layer's weight property for the parameter)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    base, batches = transformers.LlamaForCausalLM(cfg).double(), pool(1)
    o = "model.layers.1.self_attn.o_proj"
    probe = sl.PerSampleGradientProbe(base, params=[f"{o}.weight", "lm_head"], keep_matrix=True)
    vmap = sl.PerSampleGradientProbe(base, params=f"{o}.weight", engine="vmap")
    peft.get_peft_model(base, peft.LoHaConfig(r=4, target_modules=["o_proj"], init_weights=False)).double()
    probe.update(batches[0])
    assert list(probe.params) == [f"{o}.base_layer.weight", "lm_head.weight"]
    for name in probe.params:
        G = ref_grads(base, name, batches)
        assert torch.allclose(probe.matrix(name).double(), G, rtol=1e-9, atol=1e-12 * G.abs().max()), name
    with pytest.raises(ValueError, match=r"engine='vmap' impossible for LlamaForCausalLM: its peft layer "
                                         r"'model\.layers\.0\.self_attn\.o_proj' \(peft\.tuners\.loha"):
        vmap.update(batches[0])


def test_chunked_head_loss_follows_set_adapter():
    """The chunked head loss through a modules_to_save head (forced here; the CUDA default with Triton) is
    decided again after set_adapter: the active adapter's copy is the head, and the rows equal the reference.
    Before: the head stayed adapter a's copy, bypassed while the forward ran b's (wrong shapes)."""
    model, batches = llama(adapters=("a", "b"), save=["lm_head"]), pool(1)
    with torch.no_grad():
        model.get_parameter(f"{PREFIX}lm_head.modules_to_save.b.weight").mul_(0.5)
    probe = sl.PerSampleGradientProbe(model, params="model.layers.1.self_attn.o_proj.weight", head_loss="chunked",
                                      keep_matrix=True)
    for adapter in ("a", "b"):
        model.set_adapter(adapter)
        probe.reset().update(batches[0])
        assert probe.head_loss_ == f"chunked ({PREFIX}lm_head.modules_to_save.{adapter})"
        G = ref_grads(model, next(iter(probe.params)), batches)
        assert torch.allclose(probe.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max()), adapter


@pytest.mark.parametrize("save", [None, ["lm_head"]])
def test_chunked_head_loss_through_a_peft_model(save):
    """The head-loss path CUDA users get by default (forced here with head_loss="chunked"): the head is found
    through the PeftModel (the modules_to_save copy when the head is one) and the rows equal the reference."""
    model, batches = llama(save=save), pool(1)
    probe = sl.PerSampleGradientProbe(model, params="model.layers.1.self_attn.o_proj.lora_B.default.weight",
                                      head_loss="chunked", keep_matrix=True)
    probe.update(batches[0])
    head = f"{PREFIX}lm_head" + (".modules_to_save.default" if save else "")
    assert probe.head_loss_ == f"chunked ({head})"
    G = ref_grads(model, next(iter(probe.params)), batches)
    assert torch.allclose(probe.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())


def test_chunked_head_loss_refuses_a_lora_wrapped_head():
    """LoRA on the head itself (target_modules with "lm_head"): the logits are no single nn.Linear's output,
    so head_loss="chunked" is refused with the reason, and "auto" keeps the materialized logits (exact)."""
    model, batches = llama(targets=("o_proj", "lm_head")), pool(1)
    name = "model.layers.1.self_attn.o_proj.lora_B.default.weight"
    with pytest.raises(ValueError, match=r"head_loss='chunked' impossible for PeftModel.*lm_head\.base_layer"):
        sl.PerSampleGradientProbe(model, params=name, head_loss="chunked").update(batches[0])
    probe = sl.PerSampleGradientProbe(model, params=name, keep_matrix=True).update(batches[0])
    assert probe.head_loss_.startswith("materialized")
    G = ref_grads(model, next(iter(probe.params)), batches)
    assert torch.allclose(probe.matrix().double(), G, rtol=1e-9, atol=1e-12 * G.abs().max())


def test_gradient_checkpointing_with_input_require_grads():
    """The usual PEFT memory setup (gradient_checkpointing_enable() and enable_input_require_grads(), whose
    forward hook on the embeddings makes their output require grad; train mode): the spectra equal the
    references, and the hook, the checkpointing flags and everything else are as before."""
    model, batches = llama(), pool(1)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    wo = f"{PREFIX}model.layers.1.self_attn.o_proj.base_layer.weight"
    before = state(model)
    flags = [getattr(mod, "gradient_checkpointing", None) for mod in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: use_cache=True is incompatible with checkpointing
        m = sl.SpectralLens(model, batches, precision="float64", progress=False).measure(0, 0)
    assert_same(before, state(model))
    assert flags == [getattr(mod, "gradient_checkpointing", None) for mod in model.modules()]
    close(m.spectra["grad:model.layers.1.self_attn.o_proj.weight"].values, spectrum(ref_grads(model, wo, batches)))
    close(m.spectra["act:model.layers.1"].values, ref_activations(model, f"{PREFIX}model.layers.1", batches))


def test_set_adapter_and_disable_adapter():
    """The active adapter is the one measured, and stays active (set_adapter also sets requires_grad:
    restored); inside disable_adapter() the base model is measured (its lora_B gradients are zero: a
    ZeroGradientWarning) and the adapters are enabled again on leaving the context."""
    model, batches = llama(adapters=("a", "b")), pool(1)
    o = f"{PREFIX}model.layers.1.self_attn.o_proj"
    model.set_adapter("b")
    before = state(model)
    lens = sl.SpectralLens(model, batches, params=[f"{o}.base_layer.weight", f"{o}.lora_B.b.weight"],
                           precision="float64", progress=False)
    m = lens.measure(0, 0)
    assert_same(before, state(model))
    assert model.active_adapter == "b"
    short = o[len(PREFIX):]
    for p, key in ((f"{o}.base_layer.weight", f"{short}.weight"), (f"{o}.lora_B.b.weight", f"{short}.lora_B.b.weight")):
        close(m.spectra[f"grad:{key}"].values, spectrum(ref_grads(model, p, batches)))
    plain = copy.deepcopy(model)
    with plain.disable_adapter():  # the base model: the reference, without any LoRA branch
        block_ref = ref_activations(plain, f"{PREFIX}model.layers.1", batches)
        wo_ref = spectrum(ref_grads(plain, f"{o}.base_layer.weight", batches))
    with model.disable_adapter():
        with pytest.warns(sl.ZeroGradientWarning, match="lora_B.b.weight"):
            m = lens.measure(1, 0)
        assert model.get_submodule(o).disable_adapters
    assert not model.get_submodule(o).disable_adapters
    close(m.spectra["act:model.layers.1"].values, block_ref)
    close(m.spectra[f"grad:{short}.weight"].values, wo_ref)
    assert float(m.spectra[f"grad:{short}.lora_B.b.weight"].values.max()) == 0.0


def test_merged_adapter_stays_merged():
    """merge_adapter() (in place, still a PeftModel): measured as merged, left merged with the same weights;
    the base-weight spectrum equals the unmerged model's (the merged base weight is W + s B A)."""
    model, batches = gpt2(), pool(1)
    wo = "transformer.h.1.attn.c_proj.weight"
    unmerged = sl.SpectralLens(model, batches, precision="float64", progress=False).measure(0, 0)
    model.merge_adapter()
    before = state(model)
    assert any(before["merged"])
    merged = sl.SpectralLens(model, batches, precision="float64", progress=False).measure(0, 0)
    assert_same(before, state(model))
    close(merged.spectra[f"grad:{wo}"].values, unmerged.spectra[f"grad:{wo}"].values.numpy(), 1e-8)


def test_lora_dropout_in_train_mode():
    """lora_dropout > 0 and a model in train mode: the probe measures in eval mode by default (dropout off:
    the eval-mode reference) and leaves train mode and the RNG as they were; with train_mode=True the
    dropout is active (other rows), draws from a fork of the RNG (untouched after, so the same masks at
    every measurement) and the frozen base weight stays frozen."""
    model, batches = gpt2(dropout=0.5), pool(1)
    model.train()
    wo = f"{PREFIX}transformer.h.1.attn.c_proj.base_layer.weight"
    b = f"{PREFIX}transformer.h.1.attn.c_proj.lora_B.default.weight"
    before = state(model)
    probe = sl.PerSampleGradientProbe(model, params=[wo, b], keep_matrix=True)
    probe.update(batches[0])
    assert_same(before, state(model))
    for p in (wo, b):
        assert torch.allclose(probe.matrix(p), ref_grads(model, p, batches), rtol=1e-9, atol=1e-13)
    rows = []
    for _ in range(2):
        train = sl.PerSampleGradientProbe(model, params=[wo, b], keep_matrix=True, train_mode=True)
        train.update(batches[0])
        assert_same(before, state(model))
        rows.append(train.matrix(b))
    assert torch.equal(rows[0], rows[1])  # the same fork of the same RNG state: the same dropout masks
    assert not torch.allclose(rows[0], probe.matrix(b))  # dropout was on
    assert model.get_parameter(wo).requires_grad is False and model.training


def test_trainer_with_a_peft_model(tmp_path):
    """SpectralLensCallback with a PeftModel passed to transformers.Trainer (the lens attached by the
    callback, names as the user types them): it measures at its schedule, the record's spectra and scalars
    use the names of the model before get_peft_model, the base weights stay frozen and only LoRA weights train."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo, RunWriter, open_runs

    model = llama().float()
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    lora = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    writer = RunWriter(tmp_path / "run", RunInfo("peft", family="llama", batch_tier=4), fsync=False)
    lens = sl.SpectralLens(pool=pool(), layers="model.layers.1", writer=writer, schedule=sl.Schedule.every(2),
                           params=["model.layers.1.self_attn.o_proj.weight",
                                   "model.layers.1.self_attn.o_proj.lora_B.default.weight"], progress=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    SpectralLensCallback(lens, tokens_per_step=4 * T).attach(trainer)
    trainer.train()
    writer.close()
    (run,) = open_runs([tmp_path / "run"])
    assert [m.step for m in run.measurements] == [2, 4]
    o = "model.layers.1.self_attn.o_proj"
    assert set(run.measurements[-1].spectra) == {"act:model.layers.1", f"grad:{o}.weight", f"grad:{o}.lora_B.default.weight"}
    assert set(run.measurements[-1].scalars) == {"noise_scale", f"noise_scale:{o}.weight",
                                                 f"noise_scale:{o}.lora_B.default.weight"}
    assert lens.model is None  # the callback detached the lens it attached
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) and not params[k].requires_grad for k, v in frozen.items())
    assert all(not torch.equal(params[k], v) for k, v in lora.items() if "layers.1.self_attn.o_proj" in k)
