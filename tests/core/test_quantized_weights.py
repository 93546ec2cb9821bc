"""Weight spectra and gradient probes on low-precision and quantized weights.

``weight_spectra`` skipped the weights of ``torch.ao`` dynamically quantized Linears (no parameter:
a packed weight), and read bitsandbytes ``Int8Params`` (int8 rows without their scales) and
``Params4bit`` (a packed ``(n, 1)`` uint8 column) as raw integers: spectra of the wrong matrix, without
a word. They are dequantized now; other integer weights raise ``ValueError``. The gradient probe
refuses a bitsandbytes weight with a ``ValueError`` naming it, its type and the remedy (before: torch's
``RuntimeError: only Tensors of floating point dtype can require gradients``); a LoRA adapter on top
of a 4-bit layer is measured. bitsandbytes tests are skipped when it is not installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from spectral_lens import PerSampleGradientProbe
from spectral_lens.weights import weight_spectra, weight_spectrum


def _sq_singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.to(torch.float64)) ** 2


def _dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_low_precision_weights_are_read_exactly(dtype):
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    s = weight_spectrum(w, "w")
    ref = _sq_singular_values(w)
    assert torch.allclose(s.values, ref, rtol=1e-12, atol=0)
    assert "dequantized" not in s.metadata


def test_dynamically_quantized_weights_are_dequantized_in_model_order():
    torch.manual_seed(0)
    model = _dynamic(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Embedding(5, 3)))
    spectra = weight_spectra(model)
    assert list(spectra) == ["0.weight", "2.weight", "3.weight"]  # before: only ["3.weight"]
    for i in (0, 2):
        ref = _sq_singular_values(model[i].weight().dequantize())
        assert torch.allclose(spectra[f"{i}.weight"].values, ref, rtol=1e-12, atol=0)
        assert spectra[f"{i}.weight"].metadata["dequantized"] == "torch.ao qint8, dequantized"
    assert list(weight_spectra(model, "2.weight")) == ["2.weight"]
    # a fully quantized MLP: before, "no matrix parameter matches None; matrix parameters: []"
    only = _dynamic(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    assert list(weight_spectra(only)) == ["0.weight", "1.weight"]


def test_integer_weight_without_a_scale_is_refused():
    w = torch.randint(-100, 100, (4, 6), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"blk\.w: a Tensor of dtype torch\.int8 and shape \(4, 6\).*dequantize"):
        weight_spectrum(w, "blk.w")


def test_probe_refuses_a_dynamically_quantized_weight():
    model = _dynamic(nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30)))
    with pytest.raises(ValueError, match=r"quantized module.*probe the floating-point model"):
        PerSampleGradientProbe(model, params="1.weight")


# ------------------------------------------------------------------------------------ bitsandbytes


def _bnb_model(kind: str):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = (bnb.nn.Linear4bit(8, 30, compute_dtype=torch.float32) if kind == "4bit"
               else bnb.nn.Linear8bitLt(8, 30, has_fp16_weights=False))
        original = lin.weight.data.clone()
        model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), lin).to("cpu")  # .to quantizes
    return bnb, model, original


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_weights_are_dequantized(kind):
    bnb, model, original = _bnb_model(kind)
    w = model[2].weight
    assert w.dtype in (torch.uint8, torch.int8)  # really quantized
    s = weight_spectra(model)["2.weight"]
    if kind == "4bit":
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    else:
        deq = w.data.to(torch.float64) * w.SCB.to(torch.float64)[:, None] / 127
    assert s.metadata["shape"] == [30, 8] and s.dim == 8  # before: [120, 1] (4-bit) and 1 value
    assert torch.allclose(s.values, _sq_singular_values(deq), rtol=1e-5, atol=0)
    # and close to the weight before quantization (NF4: ~10% of the spectrum, int8: ~0.5%)
    ref = _sq_singular_values(original)
    assert ((s.values - ref).abs() <= (0.2 if kind == "4bit" else 0.01) * ref[0]).all()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("params", ["2.weight", "2", "*.weight"])
def test_probe_refuses_a_bitsandbytes_weight(kind, params):
    _, model, _ = _bnb_model(kind)
    cls = "Params4bit" if kind == "4bit" else "Int8Params"
    with pytest.raises(ValueError, match=rf"'2\.weight' is a {cls} of dtype torch\.u?int8.*LoRA"):
        PerSampleGradientProbe(model, params=params)  # before: RuntimeError from requires_grad_


def test_lora_on_a_4bit_layer_is_measured_exactly():
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(30, 16)
            self.proj = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32)
            self.head = nn.Linear(16, 30)

        def forward(self, x):
            return self.head(torch.tanh(self.proj(self.wte(x))))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Model().to("cpu"),
                                    peft.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    ids = torch.randint(0, 30, (6, 10), generator=torch.Generator().manual_seed(1))
    name = "base_model.model.proj.lora_B.default.weight"
    w = dict(model.named_parameters())[name]
    rows = []
    for i in range(6):
        logits = model(ids[i:i + 1, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 30), ids[i:i + 1, 1:].reshape(-1))
        rows.append(torch.autograd.grad(loss, w)[0].reshape(-1).double())
    g = torch.stack(rows)
    ref = torch.linalg.eigvalsh(g @ g.T).flip(0)
    for engine in ("fast", "loop"):
        probe = PerSampleGradientProbe(model, params=name, engine=engine, chunk_size=3)
        probe.update((ids[:, :-1], ids[:, 1:]))
        got = probe.compute().values
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6 * float(ref[0])), engine
        probe.detach()


# ------------------------------------------------------------------ narrow storage and autocast dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_probe_refuses_rows_stored_in_float16_or_float8(dtype):
    # float16 storage flushed the entries of small per-sample gradients: TinyLM with weights x 0.01,
    # rows of h.0.attn.c_attn.weight, lost 13% of the largest eigenvalue against float32 storage
    # (bfloat16 storage: 2e-4); float8 storage crashed in a CPU kernel ("max_values_cpu")
    with pytest.raises(ValueError, match=rf"storage_dtype={dtype} is not supported.*torch\.bfloat16"):
        PerSampleGradientProbe(params="h.0.attn.c_attn.weight", storage_dtype=dtype)


def test_float16_storage_loses_small_per_sample_gradients():
    """Why float16 storage is refused: the same rows through a float16 round trip."""
    from support.models import TinyLM, lm_pool

    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=32, layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.01)
    probe = PerSampleGradientProbe(model, params="h.0.attn.c_attn.weight", keep_matrix=True)
    for batch in lm_pool(2, 3, 16, 64):
        probe.update(batch)
    g = probe.matrix("h.0.attn.c_attn.weight").double()
    ref = torch.linalg.eigvalsh(g @ g.T).flip(0)
    for dtype, lost in ((torch.float16, True), (torch.bfloat16, False)):
        r = g.to(dtype).double()
        err = float(((torch.linalg.eigvalsh(r @ r.T).flip(0) - ref).abs() / ref[0]).max())
        assert (err > 0.05) if lost else (err < 2e-3), (dtype, err)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_autocast_to_float8_is_refused(dtype):
    import spectral_lens as sl

    # before: CPU autocast disabled itself with a UserWarning and the probe measured in float32
    with pytest.raises(ValueError, match=rf"autocast_dtype={dtype} is not supported"):
        PerSampleGradientProbe(params="w", autocast_dtype=dtype)
    with pytest.raises(ValueError, match=rf"SpectralLens: autocast_dtype={dtype} is not supported"):
        sl.SpectralLens(pool=[torch.zeros(2, 3, dtype=torch.long)], autocast_dtype=dtype)
