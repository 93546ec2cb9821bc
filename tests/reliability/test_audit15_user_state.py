"""Audit 15: the user's global torch state and model configurations.

Training and evaluation scripts set global torch state (default dtype and device, anomaly detection,
deterministic algorithms, thread count, a global ``set_grad_enabled(False)``, ``inference_mode``,
autocast) and build models in ways the other tests rarely use (TorchScript submodules, dynamic
quantization, outputs that are dataclasses or dicts, bf16 weights). ``SpectralLens.measure`` must give
the float64 references' spectra in every such state and leave the state as it found it."""

from __future__ import annotations

import contextlib
import dataclasses
import typing
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_lens as sl
from support.models import TinyGPT, lm_batch

W_O = "transformer.h.1.attn.c_proj.weight"


def _default_device_name() -> str:
    """``torch.get_default_device()``; torch 2.4's raises AttributeError once ``set_default_device(None)``
    has run (its device context is left as None), which means the CPU (tools/check_floors.sh)."""
    try:
        return str(torch.get_default_device())
    except AttributeError:
        return "cpu"


def global_state() -> dict:
    return dict(
        default_dtype=torch.get_default_dtype(), default_device=_default_device_name(),
        anomaly=torch.is_anomaly_enabled(), anomaly_nan=torch.is_anomaly_check_nan_enabled(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        deterministic_warn=torch.is_deterministic_algorithms_warn_only_enabled(),
        threads=torch.get_num_threads(), grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled(),
        autocast=torch.is_autocast_enabled("cpu"), autocast_dtype=torch.get_autocast_dtype("cpu"),
        matmul=torch.get_float32_matmul_precision(), rng=torch.get_rng_state(),
    )


def same_state(a: dict, b: dict) -> list[str]:
    return [k for k in a if not (torch.equal(a[k], b[k]) if k == "rng" else a[k] == b[k])]


def references(model, batch, name=W_O):
    """Float64 references: the covariance eigenvalues of the deepest block's output rows (numpy) and
    the squared singular values of parameter ``name``'s per-sample gradients (one ``autograd.grad``
    per sequence)."""
    rows = []
    h = model.transformer.h[1].register_forward_hook(lambda m, a, out: rows.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(batch[0])
    h.remove()
    act = np.linalg.eigvalsh(np.cov(torch.cat(rows).numpy(), rowvar=False))[::-1]
    w = dict(model.named_parameters())[name]
    grads = []
    with torch.enable_grad():
        for i in range(batch[0].shape[0]):
            loss = F.cross_entropy(model(batch[0][i : i + 1])[0], batch[1][i])
            grads.append(torch.autograd.grad(loss, w)[0].reshape(-1).numpy())
    grad = np.linalg.svd(np.stack(grads), compute_uv=False) ** 2
    return act, grad


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b[: len(a)]).max() / np.abs(b).max())


def _default_dtype(stack):
    torch.set_default_dtype(torch.float64)
    stack.callback(torch.set_default_dtype, torch.float32)


def _default_device(stack):
    torch.set_default_device("cpu")
    stack.callback(torch.set_default_device, None)


def _deterministic(stack):
    torch.use_deterministic_algorithms(True)
    stack.callback(torch.use_deterministic_algorithms, False)


def _threads(stack):
    stack.callback(torch.set_num_threads, torch.get_num_threads())
    torch.set_num_threads(1)


def _grad_off(stack):
    torch.set_grad_enabled(False)  # an evaluation script's global switch, not a context
    stack.callback(torch.set_grad_enabled, True)


SETTINGS = {
    "set_default_dtype(float64)": _default_dtype,
    "set_default_device('cpu')": _default_device,
    "with torch.device('cpu')": lambda s: s.enter_context(torch.device("cpu")),
    "detect_anomaly": lambda s: s.enter_context(torch.autograd.set_detect_anomaly(True)),
    "use_deterministic_algorithms": _deterministic,
    "set_num_threads(1)": _threads,
    "set_grad_enabled(False)": _grad_off,
    "no_grad": lambda s: s.enter_context(torch.no_grad()),
    "enable_grad": lambda s: s.enter_context(torch.enable_grad()),
    "inference_mode": lambda s: s.enter_context(torch.inference_mode()),
    "autocast(cpu, bfloat16)": lambda s: s.enter_context(torch.autocast("cpu", dtype=torch.bfloat16)),
    "fork_rng": lambda s: s.enter_context(torch.random.fork_rng()),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_measure_under_the_callers_global_settings(setting):
    """Each setting around ``lens.measure`` (a float64 model): spectra equal to the float64 references,
    every global setting and the RNG stream as before. Inside ``torch.inference_mode()`` (an evaluation
    loop) the old code raised "PerSampleGradientProbe cannot differentiate inside torch.inference_mode()"."""
    torch.manual_seed(0)
    model, batch = TinyGPT().double().eval(), lm_batch(m=6, t=10)
    act, grad = references(model, batch)
    lens = sl.SpectralLens(model, [batch], progress=False)
    with contextlib.ExitStack() as stack:
        SETTINGS[setting](stack)
        before = global_state()
        m = lens.measure(0, 0)
        assert same_state(before, global_state()) == []
    assert rel(m.spectra["act:transformer.h.1"].values, act) <= 1e-10
    assert rel(m.spectra[f"grad:{W_O}"].values, grad) <= 1e-10
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_the_default_dtype_does_not_reach_a_float32_measurement():
    """A float32 model measured under ``set_default_dtype(float64)``: bit for bit the measurement under
    float32 (no tensor of the library takes the default dtype), accumulators included."""
    torch.manual_seed(0)
    model, batch = TinyGPT().eval(), lm_batch(m=6, t=10)
    x = torch.randn(60, 7, generator=torch.Generator().manual_seed(1))
    results = []
    for dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
        try:
            m = sl.SpectralLens(model, [batch], progress=False).measure(0, 0)
            acc = sl.ActivationCovarianceAccumulator()
            acc.update(x)
        finally:
            torch.set_default_dtype(torch.float32)
        results.append((m, acc.compute().values))
    (a, va), (b, vb) = results
    assert set(a.spectra) == set(b.spectra)
    for k in a.spectra:
        assert torch.equal(a.spectra[k].values, b.spectra[k].values), k
    assert torch.equal(va, vb)


def test_a_scripted_module_is_refused_when_attaching_with_its_name():
    """``torch.jit.script``ed modules take no forward hook: PyTorch's "register_forward_hook is not
    supported on ScriptModules" named neither the module nor a remedy, and came at ``lens.attach``
    only through the capture. Now ``attach`` and the lens name it; its unscripted parent is measured."""
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    model.transformer.h[1].mlp = torch.jit.script(model.transformer.h[1].mlp)
    for target in ("transformer.h.1.mlp", "transformer.h.1.mlp.c_fc"):
        with pytest.raises(ValueError, match=f"'{target}' is a TorchScript module .*measure the module before scripting"):
            sl.attach(model, target)
        with pytest.raises(ValueError, match="TorchScript module"):
            sl.ActivationCovarianceAccumulator().attach(model, target)
    with pytest.raises(ValueError, match="TorchScript module"):
        sl.SpectralLens(model, [lm_batch()], layers="transformer.h.1.mlp", progress=False)
    assert not any(m._forward_hooks for m in model.modules() if not isinstance(m, torch.jit.ScriptModule))
    batch = lm_batch(m=6, t=10)
    act, grad = references(model, batch)
    m = sl.SpectralLens(model, [batch], progress=False).measure(0, 0)  # the block holding it
    assert rel(m.spectra["act:transformer.h.1"].values, act) <= 1e-10
    assert rel(m.spectra[f"grad:{W_O}"].values, grad) <= 1e-10


def test_a_dynamically_quantized_model_is_captured():
    """Activation capture of a ``quantize_dynamic`` model: its quantized Linear's output rows, as numpy's
    float64 covariance of the same outputs gives them."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(TinyGPT().eval(), {nn.Linear}, dtype=torch.qint8)
    x = lm_batch(m=6, t=10)[0]
    rows = []
    h = q.transformer.h[1].attn.c_proj.register_forward_hook(lambda m, a, out: rows.append(out.reshape(-1, 16)))
    with torch.no_grad():
        q(x)
    h.remove()
    ref = np.linalg.eigvalsh(np.cov(torch.cat(rows).double().numpy(), rowvar=False))[::-1]
    with sl.attach(q, "transformer.h.1.attn.c_proj", precision="float64") as cap, torch.no_grad():
        q(x)
    assert rel(cap.compute()["transformer.h.1.attn.c_proj"].values, ref) <= 1e-10
    with pytest.raises(ValueError, match=r"params=\(\)\) measures the quantized model's activations only"):
        sl.SpectralLens(q, [lm_batch(m=6, t=10)], progress=False)
    m = sl.SpectralLens(q, [lm_batch(m=6, t=10)], layers="transformer.h.1.attn.c_proj", params=(), progress=False,
                        precision="float64").measure(0, 0)
    assert rel(m.spectra["act:transformer.h.1.attn.c_proj"].values, ref) <= 1e-10


@dataclasses.dataclass
class _Out:
    hidden: torch.Tensor
    aux: torch.Tensor


class _NT(typing.NamedTuple):
    hidden: torch.Tensor
    aux: torch.Tensor


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin, self.kind = nn.Linear(6, 6).double(), kind

    def forward(self, x):
        h = self.lin(x)
        return {"dataclass": _Out, "namedtuple": _NT, "dict": lambda a, b: {"hidden": a, "aux": b}}[self.kind](h, h.sum(-1))


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "dict"])
def test_structured_outputs_are_picked_and_the_errors_say_how(kind):
    """A dataclass, NamedTuple or dict output: ``pick="hidden"`` (and a NamedTuple's ``pick=0``) measure
    the field exactly. The errors' hints were wrong: a dict's suggested ``pick=0`` ("for the first"),
    which then raised "cannot pick 0 from an output of type dict", and a dataclass's ``pick=0`` / "dict
    entry" hint, which named none of its fields."""
    torch.manual_seed(0)
    model, x = _Returns(kind), torch.randn(40, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = np.linalg.eigvalsh(np.cov(model.lin(x).numpy(), rowvar=False))[::-1]
    for pick in ["hidden", 0] if kind == "namedtuple" else ["hidden"]:
        with sl.attach(model, "", pick=pick) as cap, torch.no_grad():
            model(x)
        assert rel(cap.compute()[""].values, ref) <= 1e-10
    with sl.attach(model, ""), torch.no_grad(), pytest.raises(TypeError) as none:
        model(x)
    hint = str(none.value)
    assert ("['hidden', 'aux']" in hint) and ("pick='hidden'" in hint or "pick='key'" in hint or "pick='field'" in hint)
    if kind != "namedtuple":
        assert "pick=0" not in hint  # an index does not pick from a dict or a dataclass
        with sl.attach(model, "", pick=0), torch.no_grad(), pytest.raises(TypeError, match=r"\['hidden', 'aux'\]"):
            model(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_is_measured(dtype):
    """``model.to(torch.bfloat16)`` on the CPU: the lens's activation rows are the model's (rounded)
    outputs, whose float64 covariance the accumulator reproduces exactly with ``precision="float64"``;
    the gradient spectrum is the low-precision forward's, against float64 over the same weights."""
    torch.manual_seed(0)
    model, batch = TinyGPT().eval().to(dtype), lm_batch(m=6, t=10)
    rows = []
    h = model.transformer.h[1].register_forward_hook(lambda m, a, out: rows.append(out.detach().reshape(-1, 16)))
    with torch.no_grad():
        model(batch[0])
    h.remove()
    act = np.linalg.eigvalsh(np.cov(torch.cat(rows).double().numpy(), rowvar=False))[::-1]
    ref64 = TinyGPT().eval().double()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, grad = references(ref64, batch)
    m = sl.SpectralLens(model, [batch], precision="float64", progress=False).measure(0, 0)
    assert rel(m.spectra["act:transformer.h.1"].values, act) <= 1e-10
    assert rel(m.spectra[f"grad:{W_O}"].values, grad) <= 2e-2
    assert all(p.dtype == dtype for p in model.parameters())


class _LowRank(nn.Module):
    """A LoRA-like parametrization, ``W + B A``."""

    def __init__(self) -> None:
        super().__init__()
        self.B = nn.Parameter(torch.randn(16, 2, dtype=torch.float64) * 0.1)
        self.A = nn.Parameter(torch.randn(2, 16, dtype=torch.float64) * 0.1)

    def forward(self, w):
        return w + self.B @ self.A


def _lora_gpt():
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    nn.utils.parametrize.register_parametrization(model.transformer.h[1].attn.c_proj, "weight", _LowRank())
    return model


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_a_callers_parametrize_cached_block(engine):
    """``measure`` inside the caller's ``torch.nn.utils.parametrize.cached()`` block (a training step that
    caches its parametrized weights). The old code read the weight the caller's forward had cached,
    graph and all: every per-sample gradient of the LoRA factor was zero (``auto``, relative error 1.0)
    or the loop engine backpropagated through the caller's freed graph (``RuntimeError: Trying to
    backward through the graph a second time``). And a measurement before the caller's forward left
    its own no-grad weight in the cache, so the caller's backward reached no LoRA parameter
    (``B.grad`` stayed ``None``)."""
    name = "transformer.h.1.attn.c_proj.parametrizations.weight.0.B"
    batch = lm_batch(m=6, t=10)
    model = _lora_gpt()
    act, grad = references(model, batch, name)
    expected = torch.autograd.grad(model(batch[0]).sum(), dict(model.named_parameters())[name])[0]

    def lens(m):
        probe = sl.PerSampleGradientProbe(params=[name], engine=engine)
        return sl.SpectralLens(m, [batch], probe=probe, progress=False)

    with nn.utils.parametrize.cached():
        model(batch[0]).sum().backward()  # the caller's step: its weight (and freed graph) in the cache
        m = lens(model).measure(0, 0)
    assert rel(m.spectra[f"grad:{name}"].values, grad) <= 1e-10
    assert rel(m.spectra["act:transformer.h.1"].values, act) <= 1e-10
    fresh = _lora_gpt()
    with nn.utils.parametrize.cached():
        lens(fresh).measure(0, 0)  # measured first, then the caller's forward and backward in the block
        fresh(batch[0]).sum().backward()
    got = dict(fresh.named_parameters())[name].grad
    assert got is not None and torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_a_default_device_elsewhere_leaves_cpu_work_on_the_cpu(tmp_path):
    """``torch.set_default_device("cuda")`` is common in LLM scripts; every tensor the library makes
    without an explicit device then lands there. With a CPU model or CPU rows, the accumulator's CPU
    scratch (``torch.empty(n, d)``), its non-finite row counts and ``Spectrum``'s values went to the
    default device: a crash (cross-device ``torch.sub``), or on CUDA a round trip per spectrum (the
    pinned host staging of ``compute_async`` and ``offload_rows`` now names the CPU too; that path
    needs a GPU and is not exercised here). The meta
    device stands in for a GPU here (this machine has none): a tensor made there has no data, so any
    such leak fails. Every result equals the one made without the setting."""
    torch.manual_seed(0)
    model, batch = TinyGPT().eval(), lm_batch(m=6, t=10)
    x = torch.randn(50, 4)
    bad = x.clone()
    bad[3, 1] = float("nan")
    mask = torch.rand(50) > 0.3

    def measure():
        m = sl.SpectralLens(model, [batch], layers="all", progress=False,
                            probe=sl.PerSampleGradientProbe(params=[W_O], chunk_size=2, max_resident_samples=3)).measure(0, 0)
        acc = sl.ActivationCovarianceAccumulator(nonfinite="skip")
        acc.update(x.bfloat16())
        acc.update(bad, mask=mask)
        acc.save(tmp_path / "acc.npz")
        loaded = sl.ActivationCovarianceAccumulator.load(tmp_path / "acc.npz", name="loaded")
        wide = sl.ActivationCovarianceAccumulator(precision="float64")
        wide.update(x)
        merged = sl.ActivationCovarianceAccumulator(precision="float64").merge(wide)
        merged.update(x[:20])
        probe = sl.PerSampleGradientProbe(model, W_O)
        return dict(
            **{k: s.values for k, s in m.spectra.items()},
            acc=acc.compute().values, skipped=torch.tensor(acc.compute().metadata["skipped_rows"], device="cpu"),
            future=acc.compute_async().result().values, loaded=loaded.compute().values,
            merged=merged.compute().values, cov=merged.covariance(), mean=merged.mean,
            spectrum=sl.Spectrum(np.array([3.0, 1.0]), n_rows=5, dim=2).values, losses=probe.losses_,
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sl.NonFiniteRowsWarning)
        plain = measure()
        torch.set_default_device("meta")
        try:
            moved = measure()
        finally:
            torch.set_default_device(None)
    assert set(plain) == set(moved)
    for k in plain:
        assert moved[k].device.type == "cpu" and torch.equal(moved[k], plain[k]), k


def test_a_shared_block_is_named_when_its_second_name_is_selected():
    """Blocks sharing one module object (ALBERT: ``h[1] = h[0]``): ``named_modules()`` lists it once, so
    the lens's default layer (the deepest block, ``transformer.h.1``) matched nothing, and the error
    offered ``transformer.h.0`` as a "closest name" without saying that a hook there sees both calls.
    Now the error says so; the shared module's own name measures the rows of all its calls, and the
    shared weight is probed exactly (its gradient sums both uses)."""
    torch.manual_seed(0)
    model, batch = TinyGPT().double().eval(), lm_batch(m=6, t=10)
    model.transformer.h[1] = model.transformer.h[0]
    for make in (lambda: sl.attach(model, "transformer.h.1"), lambda: sl.SpectralLens(model, [batch], progress=False)):
        with pytest.raises(ValueError, match="'transformer.h.1' is the module 'transformer.h.0' again .*sees every call"):
            make()
    rows = []
    h = model.transformer.h[0].register_forward_hook(lambda m, a, out: rows.append(out.detach().reshape(-1, 16)))
    with torch.no_grad():
        model(batch[0])
    h.remove()
    act = np.linalg.eigvalsh(np.cov(torch.cat(rows).numpy(), rowvar=False))[::-1]
    shared = "transformer.h.0.attn.c_proj.weight"  # the default matrix: the shared block's W_O, used twice
    _, grad = references(model, batch, shared)
    m = sl.SpectralLens(model, [batch], layers="transformer.h.0", progress=False).measure(0, 0)
    assert m.spectra["act:transformer.h.0"].n_rows == 2 * 6 * 10
    assert rel(m.spectra["act:transformer.h.0"].values, act) <= 1e-10
    assert rel(m.spectra[f"grad:{shared}"].values, grad) <= 1e-10
