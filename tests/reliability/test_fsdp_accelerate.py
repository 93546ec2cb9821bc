"""``SpectralLens`` and ``PerSampleGradientProbe`` on a model prepared by Hugging Face Accelerate, one CPU process.

``Accelerator().prepare(model, optimizer)`` in a single process returns the model itself (no DDP/FSDP
wrapper), so the lens measures it as it would the plain model. With ``mixed_precision="bf16"`` Accelerate
wraps ``model.forward`` in ``torch.autocast``: the measurements then run under it too (the lens's
``autocast_dtype=None`` cannot switch off an autocast inside the model's forward), as
docs/guide-multi-gpu.md says.
"""

from __future__ import annotations

import pytest
import torch

from spectral_lens import SpectralLens

from support.models import TinyGPT, lm_pool

accelerate = pytest.importorskip("accelerate")

PARAM = "transformer.h.1.attn.c_proj.weight"


def _model():
    torch.manual_seed(0)
    return TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12, dropout=0.1)


def _pool():
    return lm_pool(2, batch=4, t=12, vocab=37, seed=1)


@pytest.fixture
def accelerator_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)  # the next Accelerator may pick another mixed precision
    GradientState._reset_state()


def _spectra(model, **kw):
    return SpectralLens(model, _pool(), params=PARAM, precision="float64", progress=False, **kw).measure(1, 1).spectra


def test_prepared_model_measures_as_the_plain_model(accelerator_state):
    model = _model().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prepared, prepared_opt = accelerate.Accelerator(cpu=True).prepare(model, opt)
    assert prepared is model  # one process: no wrapper
    x, y = lm_pool(1, batch=4, t=12, vocab=37, seed=2)[0]
    torch.nn.functional.cross_entropy(prepared(x).flatten(0, 1), y.flatten()).backward()
    prepared_opt.step()  # optimizer state to keep
    plain = _model().double()
    plain.load_state_dict(model.state_dict())  # the same weights, never prepared
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    state = [v.clone() for s in opt.state.values() for v in s.values()]
    rng = torch.get_rng_state()

    got = _spectra(prepared)
    after_rng = torch.get_rng_state()
    want = _spectra(plain)
    assert sorted(got) == sorted(want) == ["act:transformer.h.1", f"grad:{PARAM}"]
    for name, spectrum in want.items():
        assert (got[name].values - spectrum.values).abs().max() <= 1e-12 * spectrum.values.max(), name
    assert all(torch.equal(params[n], p) and torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(state, [v for s in opt.state.values() for v in s.values()]))
    assert torch.equal(rng, after_rng) and model.training


def test_mixed_precision_forward_runs_the_measurement_under_its_autocast(accelerator_state):
    prepared = accelerate.Accelerator(cpu=True, mixed_precision="bf16").prepare(_model())
    got = _spectra(prepared)  # autocast_dtype=None: yet Accelerate's autocast inside forward applies
    under_bf16 = _spectra(_model(), autocast_dtype=torch.bfloat16)
    in_fp32 = _spectra(_model())
    act = "act:transformer.h.1"
    assert torch.equal(got[act].values, under_bf16[act].values)
    assert not torch.allclose(got[act].values, in_fp32[act].values, rtol=1e-5, atol=0)
