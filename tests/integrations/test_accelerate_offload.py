"""Models dispatched by Hugging Face Accelerate: CPU and disk offload, ``device_map`` dispatch, meta weights.

Accelerate's ``AlignDevicesHook`` (``module._hf_hook``, ``forward`` replaced) keeps an offloaded module's
parameters on the ``meta`` device between forwards and materializes them from its ``weights_map`` (CPU
memory, or the offload folder) inside the module's forward only, putting new meta placeholders back after
it. Each case builds a tiny float64 GPT-2 locally (no download), dispatches it four ways
(``cpu_offload``, ``disk_offload``, ``from_pretrained(device_map=..., offload_folder=...)`` with block 1 on
disk, ``init_empty_weights`` + ``load_checkpoint_and_dispatch`` likewise) and compares with the plain model
(float64, the same weights).

Before the fixes: ``SpectralLens`` on a ``cpu_offload``-ed model crashed in its autocast setup (the first
parameter's device, ``meta``); the probe of an offloaded weight failed at ``update`` with a "never
materialized" message (batches would have gone to ``meta``); the probe of a weight that is not offloaded
left every offloaded parameter with ``requires_grad=False`` (Accelerate replaces the placeholders in each
forward, the probe restored the flags of the old objects); ``weight_spectra`` raised torch's
``NotImplementedError`` on the placeholder. Now the fast engine measures offloaded weights exactly (it never
reads the weight), the ``vmap``/``loop`` engines are refused on them, and ``weight_spectra`` reads the
offload store.
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
    from accelerate import (
        cpu_offload,
        disk_offload,
        init_empty_weights,
        load_checkpoint_and_dispatch,
    )

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


@pytest.mark.parametrize("how", HOWS)
def test_lens_defaults_on_an_offloaded_model_equal_the_plain_model(how, tmp_path):
    """Activations of block 1 and the default probe (block 1's attention output projection, offloaded in every
    dispatch here) equal the plain float64 model's, bit for bit: the fast engine forms the rows from the module's
    input and output gradient inside Accelerate's materialized forward. Measuring leaves the placeholders, their
    flags and ``.grad``, Accelerate's hooks, the RNG streams and eval mode as they were."""
    ref, model = dispatched(how, tmp_path)
    batches = pool()
    before = accelerate_state(model)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    got = sl.SpectralLens(model, batches, progress=False).measure(0, 0).spectra
    want = sl.SpectralLens(ref, batches, progress=False).measure(0, 0).spectra
    assert set(got) == set(want) == {f"act:{BLOCK}", f"grad:{OFFLOADED}"}
    for k in got:
        assert rel(got[k].values, want[k].values) <= 1e-12, k
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    after = accelerate_state(model)
    assert after[1] == before[1] and not model.training
    assert all(after[0][n][0] is before[0][n][0] and after[0][n][2:] == before[0][n][2:] for n in before[0])


@pytest.mark.parametrize("how, kw", [("disk_offload", dict(chunk_size=2)),
                                     ("cpu_offload", dict(chunk_size=2, max_resident_samples=3))])
def test_probe_of_offloaded_weights_equals_the_plain_model(how, kw, tmp_path):
    """Two offloaded matrices in one probe, several chunks, and the bounded-memory mode (which recomputes
    earlier chunks and took each new placeholder Accelerate puts back after a forward for a replaced weight)."""
    ref, model = dispatched(how, tmp_path)
    names = [OFFLOADED, f"{FC}.weight"]
    batches = pool(3)
    probe, want = sl.PerSampleGradientProbe(model, params=names, **kw), sl.PerSampleGradientProbe(ref, params=names, **kw)
    assert probe.engines_ == {n: "fast" for n in names} and probe.device == torch.device("cpu")
    for b in batches:
        probe.update(b)
        want.update(b)
    got, ref_spectra = probe.compute(), want.compute()
    for n in names:
        assert got[n].n_rows == 3 * M and rel(got[n].values, ref_spectra[n].values) <= 1e-12, n
    assert all(p.device.type == "meta" and p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_probe_of_an_offloaded_weight_on_another_engine_is_refused_naming_it(engine, tmp_path):
    _, model = dispatched("cpu_offload", tmp_path)
    match = (rf"PerSampleGradientProbe: the parameter\(s\) {FC}.weight \(engine 'loop'; in the offload store of the "
             rf"AlignDevicesHook on '{FC}', execution_device cpu\) are offloaded by Accelerate" if engine == "loop" else
             "engine='vmap' impossible for GPT2LMHeadModel: Accelerate offloads the weights of")
    with pytest.raises(ValueError, match=match):
        sl.PerSampleGradientProbe(model, params=f"{FC}.weight", engine=engine)
    probe = sl.PerSampleGradientProbe(params=f"{FC}.weight", engine=engine)  # bound later: refused when attached
    with pytest.raises(ValueError, match=match):
        probe.attach(model)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_probe_of_an_offloaded_tied_weight_is_refused(how, tmp_path):
    """GPT-2's ``lm_head.weight`` is tied to ``transformer.wte.weight``; ``cpu_offload``/``disk_offload`` give each
    module its own placeholder, so the probe's identity check saw no tie and took the fast path, which reads
    ``lm_head``'s use only: 0.38 relative off the tied gradient, silently. Now the tie is read from the model's
    ``all_tied_weights_keys`` (and from a store holding one tensor under both names) and the probe refused."""
    _, model = dispatched(how, tmp_path)
    assert model.lm_head.weight is not model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"lm_head.weight \(engine 'loop'; tied to \['transformer.wte.weight'\]; in "
                                         r"the offload store of the AlignDevicesHook on 'lm_head'"):
        sl.PerSampleGradientProbe(model, params="lm_head.weight")


@pytest.mark.parametrize("how", ["from_pretrained", "load_checkpoint_and_dispatch"])
def test_probe_beside_offloaded_modules_takes_the_loop_where_vmap_cannot_trace_them(how, tmp_path):
    """The tied head (on the CPU, one object) has no fast path; the vmap engine's functional_call failed inside
    Accelerate's hooks of the offloaded block (``Cannot access data pointer of Tensor that doesn't have
    storage``). Now ``"auto"`` takes the per-sample loop there (exact), and ``engine="vmap"`` is refused."""
    ref, model = dispatched(how, tmp_path)
    b = pool()[0]
    probe, want = sl.PerSampleGradientProbe(model, params="lm_head.weight"), sl.PerSampleGradientProbe(ref, params="lm_head.weight")
    assert probe.engines_ == {"lm_head.weight": "loop"} and want.engines_ == {"lm_head.weight": "vmap"}
    assert rel(probe.update(b).compute().values, want.update(b).compute().values) <= 1e-12
    with pytest.raises(ValueError, match="engine='vmap' impossible for GPT2LMHeadModel: Accelerate offloads the weights of"):
        sl.PerSampleGradientProbe(model, params=KEPT, engine="vmap")


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


def test_rng_of_the_execution_device_is_forked_where_every_weight_is_offloaded(tmp_path):
    """``cpu_offload(model, execution_device="cuda:0")`` leaves no parameter on a CUDA device; the measurement
    forks the CUDA generators of the devices holding parameters, which were none: a dropout inside the
    offloaded modules (train_mode=True) drew from cuda:0's generator unforked. The execution devices of
    Accelerate's hooks are forked too (no GPU here: the hook's device is read, not used)."""
    from spectral_lens.gradients._isolation import cuda_devices

    _, model = dispatched("cpu_offload", tmp_path)
    assert cuda_devices(model) == []  # execution device: the CPU
    for m in model.modules():
        if hasattr(m, "_hf_hook") and getattr(m._hf_hook, "execution_device", None) is not None:
            m._hf_hook.execution_device = 0  # as cpu_offload(model, execution_device=0) sets it
    assert cuda_devices(model) == [0]


def test_lens_defaults_on_a_disk_offloaded_llama_equal_the_plain_model(tmp_path):
    """``nn.Linear`` projections (the default probe: the last layer's ``o_proj``), grouped-query attention."""
    from accelerate import disk_offload

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ref = transformers.LlamaForCausalLM(cfg).double().eval()
    model = disk_offload(copy.deepcopy(ref), offload_dir=str(tmp_path / "disk"), execution_device="cpu").eval()
    batches = pool()
    got = sl.SpectralLens(model, batches, progress=False).measure(0, 0).spectra
    want = sl.SpectralLens(ref, batches, progress=False).measure(0, 0).spectra
    assert set(got) == set(want) == {"act:model.layers.1", "grad:model.layers.1.self_attn.o_proj.weight"}
    for k in got:
        assert rel(got[k].values, want[k].values) <= 1e-12, k
    assert all(p.device.type == "meta" and p.requires_grad and p.grad is None for p in model.parameters())
