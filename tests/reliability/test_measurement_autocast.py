"""``autocast_dtype=None`` measures in the model's own precision also when ``measure`` / ``update`` is
called inside the caller's ``torch.autocast`` block (the training step's): the ambient autocast used to
leak into the measurement (bf16 products: relative errors ~1e-3 instead of ~1e-8 against float64).
With ``autocast_dtype`` given, that dtype is used, whatever the caller's state."""

from __future__ import annotations

import torch

import spectral_lens as sl
from support.models import TinyLM, lm_pool


def _measure(lens, ambient: bool):
    if ambient:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m = lens.measure(1, 10)
            assert torch.is_autocast_enabled("cpu")  # the caller's state is back after the measurement
        return m
    return lens.measure(1, 10)


def test_a_callers_autocast_does_not_reach_the_measurement():
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0)
    lens = sl.SpectralLens(model, lm_pool(), layers="h.1", params=["h.2.attn.c_proj.weight"], progress=False)
    plain, inside = _measure(lens, False), _measure(lens, True)
    for name in plain.spectra:
        assert torch.equal(plain.spectra[name].values, inside.spectra[name].values), name
    # the dtype asked for is still used inside or outside the caller's block: bf16 changes the activation
    # spectra (the lens's autocast_dtype is its activation pass's)
    cast = sl.SpectralLens(model, lm_pool(), layers="h.1", params=["h.2.attn.c_proj.weight"], progress=False,
                           autocast_dtype=torch.bfloat16)
    a, b = _measure(cast, False), _measure(cast, True)
    for name in plain.spectra:
        assert torch.equal(a.spectra[name].values, b.spectra[name].values), name
    act = "act:h.1"
    rel = (a.spectra[act].values - plain.spectra[act].values).abs().max() / plain.spectra[act].values[0]
    assert rel > 1e-5  # bf16 products differ, so the first comparison could fail


def test_a_callers_autocast_does_not_reach_the_probe():
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0)
    batch = lm_pool()[0]
    probe = sl.PerSampleGradientProbe(model, params=["h.2.attn.c_proj.weight"])
    plain = probe.update(batch).compute().values
    probe.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = probe.update(batch).compute().values
    assert torch.equal(plain, inside)


def test_a_non_finite_model_under_the_lens_gets_a_remedy_the_lens_has():
    """The accumulator's error suggests ``nonfinite='skip'``, an option SpectralLens does not take; under
    the lens the error says so and names where the option is (``sl.attach``)."""
    import pytest

    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0)
    token = int(lm_pool()[0][0][0, 5])  # a NaN embedding row: positions from its first use on are NaN (causal)
    with torch.no_grad():
        model.wte.weight[token] = float("nan")
    lens = sl.SpectralLens(model, lm_pool(), layers="h.1", params=(), progress=False)
    with pytest.raises(sl.NonFiniteError, match=r"h\.1.*SpectralLens has no nonfinite= option.*"
                                                r"sl\.attach\(model, layers, nonfinite='skip'\)"):
        lens.measure(1, 10)
    # and the remedy it names works
    with sl.attach(model, "h.1", nonfinite="skip") as capture, torch.no_grad():
        for x, _ in lm_pool():
            model(x)
    with pytest.warns(sl.NonFiniteRowsWarning):
        capture.compute()
