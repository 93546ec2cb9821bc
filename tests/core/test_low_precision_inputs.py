"""Low-precision and quantized activations, and ``SpectralLens`` on a bfloat16 model.

References are float64 computations on the *same* low-precision values (upcast exactly): the rounding
of the activations is the model's, not the measurement's. float8 rows (``float8_e4m3fn``,
``float8_e5m2``) are converted exactly to bfloat16 before any arithmetic (CPU kernels cannot do most
arithmetic on them: ``nonfinite="skip"`` raised ``NotImplementedError``); ``torch.ao`` quantized
tensors (``quint8`` outputs of a statically quantized module) are dequantized (before: a
``TypeError``); plain integer rows are refused with a message saying to dequantize them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from support.models import TinyLM, lm_pool
from torch import nn

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _reference(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([r.reshape(-1, r.shape[-1]).to(torch.float64) for r in rows])
    xc = x - x.mean(0)
    return torch.linalg.eigvalsh(xc.T @ xc / (x.shape[0] - 1)).flip(0)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert ref[0] > 0, "degenerate test data: every row equal"
    big = ref > ref[0] * 1e-6
    err = ((got[big] - ref[big]).abs() / ref[big]).max()
    assert err <= rtol, f"largest relative eigenvalue error {float(err):.3g} > {rtol}"


def _rows(g: torch.Generator, n: int, d: int, offset: float, spread: float, dtype: torch.dtype) -> torch.Tensor:
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d, dtype=torch.float64) * spread
    mean = offset * (1 + 0.5 * torch.rand(d, generator=g, dtype=torch.float64))
    x = z + mean
    if dtype.itemsize == 1:  # saturated as newer torch converts; torch 2.4 made float8_e4m3fn's out-of-range values NaN
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return x.to(dtype)


# float8: the spread must exceed the spacing of float8 values near the offset (3 or 2 mantissa bits)
@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("precision", ["exact", "fast", "float64"])
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (8.0, 4.0), (200.0, 100.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_float8_activations_match_float64_of_the_same_values(dtype, precision, offset, spread, masked):
    g = torch.Generator().manual_seed(7)
    acc = ActivationCovarianceAccumulator(precision=precision)
    kept = []
    for _ in range(3):
        x = _rows(g, 400, 12, offset, spread, dtype).reshape(20, 20, 12)
        mask = torch.rand(20, 20, generator=g) < 0.7 if masked else None
        acc.update(x, mask=mask)
        kept.append(x.to(torch.float64)[mask] if masked else x)
    s = acc.compute()
    assert s.n_rows == sum(k.reshape(-1, 12).shape[0] for k in kept)
    _assert_close(s.values, _reference(kept), 2e-5 if precision != "float64" else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1e3, 3e4])
def test_half_activations_fast_precision_with_a_large_offset(dtype, offset):
    # the existing grid (tests/gradients/test_fp16_activations.py) covers "exact" and "float64"
    g = torch.Generator().manual_seed(3)
    acc = ActivationCovarianceAccumulator(precision="fast")
    xs = [_rows(g, 300, 16, offset, 0.05 * max(offset, 1.0) ** 0.5 + 0.1, dtype) for _ in range(3)]
    for x in xs:
        acc.update(x)
    _assert_close(acc.compute().values, _reference(xs), 2e-5)


@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_nonfinite_skip_drops_the_rows(dtype):
    g = torch.Generator().manual_seed(1)
    x = _rows(g, 200, 6, 3.0, 2.0, torch.float64)
    x[5, 2] = float("nan")  # before the conversion: torch 2.4 cannot fill float8 tensors
    x[17, 0] = float("nan")
    x = x.to(dtype)
    acc = ActivationCovarianceAccumulator(nonfinite="skip")
    acc.update(x)  # before: NotImplementedError "mul_cpu_reduced_float" not implemented for 'Float8_...'
    with pytest.warns(sl.NonFiniteRowsWarning):
        s = acc.compute()
    keep = torch.ones(200, dtype=torch.bool)
    keep[[5, 17]] = False
    assert s.n_rows == 198 and s.metadata["skipped_rows"] == 2
    _assert_close(s.values, _reference([x.to(torch.float64)[keep]]), 2e-5)
    raising = ActivationCovarianceAccumulator()
    raising.update(x)
    with pytest.raises(sl.NonFiniteError, match="update #0"):
        raising.compute()


def test_float8_rows_are_not_changed_by_update():
    x = (torch.randn(50, 4) + 2).to(torch.float8_e4m3fn)
    before = x.view(torch.uint8).clone()
    ActivationCovarianceAccumulator().update(x)
    assert x.dtype == torch.float8_e4m3fn and torch.equal(x.view(torch.uint8), before)


def _quint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates quantized tensor creation
        return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)


@pytest.mark.parametrize("precision", ["exact", "float64"])
def test_quantized_tensor_rows_are_dequantized(precision):
    g = torch.Generator().manual_seed(2)
    q = _quint8(torch.randn(300, 8, generator=g) * torch.linspace(0.2, 2, 8) + 5, 0.05, 3)
    acc = ActivationCovarianceAccumulator(precision=precision)
    acc.update(q)  # before: TypeError "rows must be floating point, got dtype torch.quint8"
    _assert_close(acc.compute().values, _reference([q.dequantize()]), 2e-5 if precision == "exact" else 1e-10)


class _Static(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.fc = nn.Linear(6, 10)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(10, 5)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc2(self.relu(self.fc(self.quant(x)))))


def _statically_quantized() -> nn.Module:
    torch.manual_seed(0)
    m = _Static().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        torch.ao.quantization.prepare(m, inplace=True)
        m(torch.randn(200, 6))
        torch.ao.quantization.convert(m, inplace=True)
    return m


def test_statically_quantized_module_outputs_are_dequantized_by_attach():
    m = _statically_quantized()
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(4))
    seen = {}
    handles = [getattr(m, k).register_forward_hook(lambda mod, i, o, k=k: seen.setdefault(k, o)) for k in ("fc", "fc2")]
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    assert seen["fc"].dtype == torch.quint8
    # float64 products: the quantized outputs' covariance is ill-conditioned (fc's smallest eigenvalues
    # are ~1e-5 of its largest), which float32 products would resolve only to ~1e-3 relative
    cap = sl.attach(m, ["fc", "fc2"], precision="float64")
    with torch.no_grad():
        m(x)  # before: TypeError naming fc and torch.quint8
    got = cap.compute()
    cap.remove()
    for k in ("fc", "fc2"):
        _assert_close(got[k].values, _reference([seen[k].dequantize()]), 1e-9)


def test_integer_rows_are_refused_with_a_remedy():
    acc = ActivationCovarianceAccumulator(name="blocks.0")
    with pytest.raises(TypeError, match=r"blocks\.0.*torch\.int8.*\(5, 4\).*dequantize"):
        acc.update(torch.randint(-100, 100, (5, 4), dtype=torch.int8))
    assert not acc.initialized


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no packed float4 dtype in this torch")
def test_packed_float4_rows_are_refused():
    x = torch.zeros(5, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(TypeError, match=r"float4_e2m1fn_x2.*\(5, 4\).*two values"):
        ActivationCovarianceAccumulator().update(x)


def test_dynamically_quantized_model_is_captured():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                                                   {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(5)) + 4
    cap = sl.attach(m, ["0", "2"], precision="float64")
    with torch.no_grad():
        m(x)
    got = cap.compute()
    cap.remove()
    with torch.no_grad():
        h0 = m[0](x)
        h2 = m[2](m[1](h0))
    _assert_close(got["0"].values, _reference([h0]), 1e-9)
    _assert_close(got["2"].values, _reference([h2]), 1e-9)


# --------------------------------------------------------------------------- SpectralLens on bf16


def _per_sample_reference(model: nn.Module, pool, name: str, vocab: int) -> torch.Tensor:
    """Squared singular values of the per-sample gradients in float64 (same bf16-rounded weights)."""
    m64 = copy.deepcopy(model).double().eval()
    w = dict(m64.named_parameters())[name]
    rows = []
    for x, y in pool:
        for i in range(x.shape[0]):
            loss = nn.functional.cross_entropy(m64(x[i:i + 1]).reshape(-1, vocab), y[i:i + 1].reshape(-1))
            rows.append(torch.autograd.grad(loss, w)[0].reshape(-1))
    g = torch.stack(rows)
    return torch.linalg.eigvalsh(g @ g.T).flip(0)


def test_spectral_lens_end_to_end_on_a_bfloat16_model():
    torch.manual_seed(0)
    model = TinyLM(vocab=64, d=32, layers=2).to(torch.bfloat16).train()
    pool = lm_pool(4, 3, 16, 64)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    lens = sl.SpectralLens(model, pool, layers="h.1", params="h.1.attn.c_proj.weight", progress=False)
    meas = lens.measure(10, 1000)
    # nothing of the model changed
    assert model.training
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    # activations: the same bf16 outputs of h.1 (eval mode: dropout off), covariance in float64
    outs = []
    h = model.h[1].register_forward_hook(lambda mod, i, o: outs.append(o.detach()))
    model.eval()
    with torch.no_grad():
        for x, _ in pool:
            model(x)
    h.remove()
    model.train()
    _assert_close(meas.spectra["act:h.1"].values, _reference(outs), 1e-5)
    # gradients: the bf16 forward and backward round at 2^-8; measured 5.9e-3 on the top values
    ref = _per_sample_reference(model, pool, "h.1.attn.c_proj.weight", 64)
    got = meas.spectra["grad:h.1.attn.c_proj.weight"].values
    assert got.shape == ref.shape
    assert ((got - ref).abs() <= 2e-2 * ref[0]).all()
    assert ((got[:3] - ref[:3]).abs() <= 2e-2 * ref[:3]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", FLOAT8 + [torch.bfloat16])
@pytest.mark.parametrize("precision,rtol", [("exact", 2e-5), ("fast", 2e-3), ("float64", 1e-10)])
def test_low_precision_activations_on_cuda(dtype, precision, rtol):
    # "fast": the centred rows enter bf16 tensor-core products (gpu-anchors.md: ~1e-4 at d = 768)
    g = torch.Generator().manual_seed(11)
    acc = ActivationCovarianceAccumulator(precision=precision)
    xs = [_rows(g, 2000, 12, 200.0, 100.0, dtype) for _ in range(2)]
    for x in xs:
        acc.update(x.cuda())
    _assert_close(acc.compute().values, _reference(xs), rtol)


def test_complex_rows_are_refused_naming_the_real_view():
    """Complex rows were refused as "integer rows ... dequantize them": the message now says what they are
    and how to measure them (real and imaginary parts as features); that reading matches float64."""
    x = torch.randn(6, 4, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    acc = ActivationCovarianceAccumulator(precision="float64")
    with pytest.raises(TypeError, match=r"real floating point, got dtype torch.complex128.*view_as_real"):
        acc.update(x)
    assert acc.n_rows == 0
    real = torch.view_as_real(x).flatten(-2)
    acc.update(real)
    xc = real - real.mean(0)
    want = torch.linalg.eigvalsh(xc.T @ xc / (len(real) - 1)).flip(0).clamp_min(0)
    torch.testing.assert_close(acc.compute().values, want, rtol=1e-10, atol=1e-12)
