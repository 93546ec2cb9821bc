"""Models dispatched by Hugging Face Accelerate: CPU and disk offload, ``device_map`` dispatch, meta weights.

Accelerate's ``AlignDevicesHook`` (``module._hf_hook``, ``forward`` replaced) keeps an offloaded module's
parameters on the ``meta`` device between forwards and materializes them from its ``weights_map`` (CPU
memory, or the offload folder) inside the module's forward only, putting new meta placeholders back after
it. Each case builds a tiny float64 GPT-2 locally (no download), dispatches it four ways
(``cpu_offload``, ``disk_offload``, ``from_pretrained(device_map=..., offload_folder=...)`` with block 1 on
disk, ``init_empty_weights`` + ``load_checkpoint_and_dispatch`` likewise) and compares with the plain model
(float64, the same weights).

Before the fixes: ``SpectralLens`` on a ``cpu_offload``-ed model crashed in its autocast setup (the first
parameter's device, ``meta``); the probe of an offloaded weight was accepted and failed at ``update`` with a
"never materialized" message; the probe of a weight that is not offloaded left every offloaded parameter
with ``requires_grad=False`` (Accelerate replaces the placeholders in each forward, the probe restored the
flags of the old objects); ``weight_spectra`` raised torch's ``NotImplementedError`` on the placeholder.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

import spectral_lens as sl
from spectral_lens.weights import weight_spectra, weight_spectrum

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
accelerate = pytest.importorskip("accelerate", reason="the hf extra installs accelerate")

V, T, M = 53, 12, 3
BLOCK = "transformer.h.1"
FC = "transformer.h.1.mlp.c_fc"  # offloaded in every dispatch below
OFFLOADED = "transformer.h.1.attn.c_proj.weight"  # the lens's default probe: offloaded
KEPT = "transformer.h.0.attn.c_proj.weight"  # on the CPU in the device_map dispatches
DEVICE_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
              "transformer.ln_f": "cpu", "lm_head": "cpu"}


def config():
    return transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=T, bos_token_id=0,
                                   eos_token_id=0)


def plain():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config()).double().eval()


def pool(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, V, (M, T), generator=g)), "labels": ids} for _ in range(n)]


def dispatched(how, tmp_path):
    """``(reference, dispatched)``: the plain float64 model and a copy dispatched by Accelerate ``how``."""
    from accelerate import cpu_offload, disk_offload, init_empty_weights, load_checkpoint_and_dispatch

    ref = plain()
    if how == "cpu_offload":
        model = cpu_offload(copy.deepcopy(ref), execution_device="cpu")
    elif how == "disk_offload":
        model = disk_offload(copy.deepcopy(ref), offload_dir=str(tmp_path / "disk"), execution_device="cpu")
    else:
        ref.save_pretrained(tmp_path / "ckpt")
        if how == "from_pretrained":
            model = transformers.GPT2LMHeadModel.from_pretrained(
                tmp_path / "ckpt", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "off"), dtype=torch.float64)
        else:  # init_empty_weights + load_checkpoint_and_dispatch
            with init_empty_weights():
                model = transformers.GPT2LMHeadModel(config()).double()
            model.tie_weights()
            model = load_checkpoint_and_dispatch(model, str(tmp_path / "ckpt"), device_map=DEVICE_MAP,
                                                 offload_folder=str(tmp_path / "off"), dtype=torch.float64)
    model.eval()
    assert model.get_parameter(OFFLOADED).device.type == "meta"
    return ref, model


HOWS = ["cpu_offload", "disk_offload", "from_pretrained", "load_checkpoint_and_dispatch"]


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def accelerate_state(model):
    """What Accelerate set up and measuring must leave as it was: each hooked module's hook object, its
    replaced forward, its torch hooks, and which parameters are meta placeholders (with their flags)."""
    return (
        {n: (m._hf_hook, m.forward.func if hasattr(m.forward, "func") else m.forward, dict(m._forward_hooks),
             dict(m._forward_pre_hooks)) for n, m in model.named_modules() if hasattr(m, "_hf_hook")},
        {n: (p.device.type, p.requires_grad, p.grad) for n, p in model.named_parameters()},
    )


def activations(model, target, batches):
    with sl.attach(model, target, precision="float64") as capture, torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    return capture.compute()[target]


@pytest.mark.parametrize("how", HOWS)
def test_attach_on_offloaded_modules_equals_the_plain_model_and_leaves_accelerate_intact(how, tmp_path):
    ref, model = dispatched(how, tmp_path)
    batches = pool()
    before = accelerate_state(model)
    for target in (BLOCK, FC):  # a block whose submodules are offloaded, and an offloaded Conv1D itself
        got, want = activations(model, target, batches), activations(ref, target, batches)
        assert got.n_rows == want.n_rows == 2 * M * T  # the hook fired on real rows
        assert rel(got.values, want.values) <= 1e-12, (how, target)
    after = accelerate_state(model)
    assert after[0].keys() == before[0].keys()
    for n in before[0]:
        assert after[0][n][0] is before[0][n][0] and after[0][n][1] is before[0][n][1], n  # hook and forward
        assert after[0][n][2:] == before[0][n][2:], n  # no torch hook left behind
    assert after[1] == before[1]  # still offloaded, flags as they were


@pytest.mark.parametrize("how", ["cpu_offload", "from_pretrained"])
def test_lens_activations_on_an_offloaded_model_and_its_default_probe_refused(how, tmp_path):
    ref, model = dispatched(how, tmp_path)
    batches = pool()
    # the default probe (block 1's attention output projection) is offloaded: refused when the lens is built,
    # naming the parameter and the hook that holds it, before any pass
    with pytest.raises(ValueError, match=rf"{OFFLOADED} \(in the offload store of the AlignDevicesHook on "
                                         r"'transformer.h.1.attn.c_proj'.*offloaded by Accelerate.*params=\(\)"):
        sl.SpectralLens(model, batches, progress=False)
    before = accelerate_state(model)
    rng = torch.get_rng_state()
    got = sl.SpectralLens(model, batches, params=(), progress=False).measure(0, 0).spectra
    want = sl.SpectralLens(ref, batches, params=(), progress=False).measure(0, 0).spectra
    assert set(got) == set(want) == {f"act:{BLOCK}"}
    assert rel(got[f"act:{BLOCK}"].values, want[f"act:{BLOCK}"].values) <= 1e-12
    assert torch.equal(torch.get_rng_state(), rng)
    assert accelerate_state(model)[1] == before[1] and not model.training


@pytest.mark.parametrize("how", ["from_pretrained", "load_checkpoint_and_dispatch"])
def test_gradient_protocol_on_a_kept_weight_equals_the_plain_model_and_keeps_requires_grad(how, tmp_path):
    """The probed weight is on the CPU, block 1 is offloaded to disk: the per-sample gradient spectrum is
    the plain model's, and every offloaded placeholder keeps its ``requires_grad`` (before the fix: all False
    after the pass), stays on meta, and gets no ``.grad``."""
    ref, model = dispatched(how, tmp_path)
    batches = pool()
    before = accelerate_state(model)
    x = batches[0]["input_ids"]
    with torch.no_grad():
        out = model(input_ids=x).logits
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    got = sl.SpectralLens(model, batches, params=KEPT, progress=False).measure(0, 0).spectra
    want = sl.SpectralLens(ref, batches, params=KEPT, progress=False).measure(0, 0).spectra
    assert set(got) == set(want) == {f"act:{BLOCK}", f"grad:{KEPT}"}
    for k in got:
        assert rel(got[k].values, want[k].values) <= 1e-12, k
    assert accelerate_state(model)[1] == before[1]
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, out)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_probe_of_an_offloaded_weight_is_refused_naming_it(how, tmp_path):
    _, model = dispatched(how, tmp_path)
    with pytest.raises(ValueError, match=rf"PerSampleGradientProbe: the parameter\(s\) {FC}.weight \(in the offload "
                                         rf"store of the AlignDevicesHook on '{FC}', execution_device cpu\) are "
                                         "offloaded by Accelerate"):
        sl.PerSampleGradientProbe(model, params=f"{FC}.weight")
    probe = sl.PerSampleGradientProbe(params=f"{FC}.weight")  # bound later: refused when attached
    with pytest.raises(ValueError, match="offloaded by Accelerate"):
        probe.attach(model)


@pytest.mark.parametrize("how", HOWS)
def test_weight_spectra_read_offloaded_weights_from_the_store(how, tmp_path):
    ref, model = dispatched(how, tmp_path)
    names = [OFFLOADED, f"{FC}.weight", KEPT]
    got, want = weight_spectra(model, names), weight_spectra(ref, names)
    assert list(got) == list(want) == sorted(names)  # model order
    for n in names:
        assert torch.equal(got[n].values, want[n].values), n  # the same float64 matrix: bit-equal
    assert model.get_parameter(OFFLOADED).device.type == "meta"  # nothing materialized, nothing kept
    with pytest.raises(ValueError, match=f"{OFFLOADED}: shape \\(16, 16\\) is on the meta device"):
        weight_spectrum(model.get_parameter(OFFLOADED), OFFLOADED)


def test_weight_spectra_refuse_meta_weights_never_loaded():
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformers.GPT2LMHeadModel(config())
    with pytest.raises(ValueError, match=f"weight_spectra: {KEPT} \\(shape \\(16, 16\\)\\) is on the meta device and "
                                         "in no Accelerate offload store"):
        weight_spectra(model, KEPT)
