"""Audit 15, the probe in users' model configurations: frozen weights (LoRA's base), a model evaluated
under ``torch.inference_mode()``, a ``torch.jit.script``ed submodule, ``torch.nn.utils.prune``, dynamic
quantization, bf16 / fp16 weights. Every result against a float64 per-sample ``torch.autograd.grad``
loop (``conftest.reference_rows``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from spectral_lens.gradients import EngineFallbackWarning, PerSampleGradientProbe

W_O = "transformer.h.1.attn.c_proj.weight"
C_FC = "transformer.h.1.mlp.c_fc.weight"
KINDS = [dict(engine="auto"), dict(engine="vmap"), dict(engine="loop"), dict(chunk_size=2, max_resident_samples=2)]


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b[: len(a)]).max() / np.abs(b).max())


def reference(helpers, model, name, batch):
    return helpers.sq_singular_values(helpers.reference_rows(model, [name], batch, helpers.lm_sample_loss)[name])


def measured(model, name, batch, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)
        return PerSampleGradientProbe(model, name, **kw).update(batch).compute().values.numpy()


@pytest.mark.parametrize("kw", KINDS, ids=["auto", "vmap", "loop", "bounded"])
def test_a_frozen_model_is_measured_and_stays_frozen(gpt, helpers, kw):
    """LoRA fine-tuning freezes the base weights; an evaluation script freezes the whole model. The
    probed weight's gradients are those of the trainable weight, and every flag and ``.grad`` is as before."""
    model, batch = gpt(), helpers.lm_batch()
    ref = reference(helpers, model, W_O, batch)
    model.requires_grad_(False)
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)  # one trainable (a LoRA-like adapter)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert rel(measured(model, W_O, batch, **kw), ref) <= 1e-10
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kw", KINDS, ids=["auto", "vmap", "loop", "bounded"])
def test_inside_inference_mode_it_measures_as_inside_no_grad(gpt, helpers, kw):
    """An evaluation loop under ``torch.inference_mode()`` calling the probe (or ``lens.measure``): the old
    code refused ("cannot differentiate inside torch.inference_mode()"). The probe's state is made of
    normal tensors, so an update outside the block afterwards works (in-place writes to inference
    tensors are refused outside it)."""
    model = gpt()
    b1, b2 = helpers.lm_batch(m=4, seed=1), helpers.lm_batch(m=3, seed=2)
    both = tuple(torch.cat(p) for p in zip(b1, b2))
    ref = reference(helpers, model, W_O, both)
    probe = PerSampleGradientProbe(model, W_O, **kw)
    with torch.inference_mode():
        probe.update(tuple(t.clone() for t in b1))  # inference-tensor batches, as an eval loader makes them
        probe.compute()
    probe.update(b2)
    with torch.inference_mode():
        inside = probe.compute().values.numpy()
        assert torch.is_inference_mode_enabled()
    assert rel(inside, ref) <= 1e-10
    assert rel(probe.compute().values.numpy(), ref) <= 1e-10


def test_a_model_built_in_inference_mode_is_named(helpers):
    with torch.inference_mode():
        model = helpers.TinyGPT()
    with pytest.raises(RuntimeError, match=r"\['transformer.h.1.attn.c_proj.weight'\] are inference tensors"):
        PerSampleGradientProbe(model).update(helpers.lm_batch())


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_a_scripted_submodule(gpt, helpers, engine):
    """A ``torch.jit.script``ed MLP: re-reading the probed parameter crashed (``'OrderedModuleDict' object
    has no attribute 'get'``), and the loop engine's checkpoint guard registered a forward hook the
    scripted module refuses. Its weight is now measured exactly; a parameter outside it as before."""
    model, batch = gpt(), helpers.lm_batch()
    model.transformer.h[1].mlp = torch.jit.script(model.transformer.h[1].mlp)
    for name in (C_FC, W_O):
        assert rel(measured(model, name, batch, engine=engine), reference(helpers, model, name, batch)) <= 1e-10


def test_a_scripted_model_is_refused_with_what_to_do(gpt, helpers):
    """A whole model through ``torch.jit.script``: PyTorch's "get_submodule is not supported on
    ScriptModules" came from deep inside ``attach``; now a ``TypeError`` says to probe the eager model."""
    scripted = torch.jit.script(helpers.TinyCNN().double().eval())
    with pytest.raises(TypeError, match="the model is a TorchScript module .*torch.jit.script.*probe the eager model"):
        PerSampleGradientProbe(scripted, "head.weight", loss_fn=lambda out, b: out.sum(1), forward_fn=lambda m, b: m(b[0]))
    # a whole model through torch.jit.trace is refused alike, and the message says trace, not script
    traced = torch.jit.trace(helpers.TinyCNN().double().eval(), torch.randn(2, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="TorchScript module .*from torch.jit.trace.*probe the eager model"):
        PerSampleGradientProbe(traced, "head.weight", loss_fn=lambda out, b: out.sum(1), forward_fn=lambda m, b: m(b[0]))


def test_a_pruned_weight_is_named_and_its_source_is_measured(gpt, helpers):
    """``prune.l1_unstructured`` makes ``weight`` a tensor recomputed by a forward pre-hook from
    ``weight_orig * weight_mask``. Naming ``weight`` gave "has no parameter" with a list of close names;
    now the error names the hook and the parameter to probe, whose gradients go through the mask."""
    model, batch = gpt(), helpers.lm_batch()
    prune.l1_unstructured(model.transformer.h[1].attn.c_proj, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"forward pre-hook \(L1Unstructured.*\['transformer.h.1.attn.c_proj.weight_orig'\]"):
        PerSampleGradientProbe(model, W_O)
    with pytest.raises(ValueError, match="torch.nn.utils.prune"):
        PerSampleGradientProbe(model)  # the default matrix
    model.transformer.h[0].mlp.c_fc.scale = torch.ones(3)  # neither a parameter nor computed by a hook
    with pytest.raises(ValueError, match="c_fc.scale is a plain tensor attribute of Linear, not a parameter"):
        PerSampleGradientProbe(model, "transformer.h.0.mlp.c_fc.scale")
    name = W_O + "_orig"
    got, ref = measured(model, name, batch), reference(helpers, model, name, batch)
    assert rel(got, ref) <= 1e-10
    rows = helpers.reference_rows(model, [name], batch, helpers.lm_sample_loss)[name]
    mask = model.transformer.h[1].attn.c_proj.weight_mask.reshape(-1).numpy()
    assert np.all(rows[:, mask == 0] == 0)  # the reference sees the mask: the comparison could fail


def test_a_quantized_model_is_refused_with_what_to_do(helpers):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(helpers.TinyGPT().eval(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match="quantized module .*probe the floating-point model"):
        PerSampleGradientProbe(q, W_O)
    with pytest.raises(ValueError, match=r"Quantized modules \['transformer.h.0.attn.c_attn'"):
        PerSampleGradientProbe(q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(helpers, dtype):
    """``model.to(torch.bfloat16)`` on the CPU: rows in the weights' dtype, the Gram in float64. Against the
    float64 loop over the same (rounded) weights, the error is the low-precision forward's."""
    torch.manual_seed(0)
    model, batch = helpers.TinyGPT().eval().to(dtype), helpers.lm_batch()
    with torch.no_grad():
        ref64 = helpers.TinyGPT().eval().double()
        ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    got = measured(model, W_O, batch)
    assert rel(got, reference(helpers, ref64, W_O, batch)) <= (2e-2 if dtype == torch.bfloat16 else 5e-3)
    assert all(p.dtype == dtype and p.grad is None for p in model.parameters())
