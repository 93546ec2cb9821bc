"""Review 24 (rev-probe2): the audit's ``offload+loha`` model is deterministic and its forward is the model's.

Its plain forward (and ``offload+loha+bn_running``'s) gave non-finite outputs in ~6 of 40 builds:
``accelerate.cpu_offload`` hooks PEFT LoHa's ``hada_*`` ParameterDicts, which the LoHa layer reads but never calls,
so their factors stayed meta placeholders in its forward, and ``F.linear`` of a CPU input and a meta weight
returns uninitialised memory (torch 2.13) instead of raising: the adapter's term was garbage in every build. Not the library's: the plain forward alone shows it.
The audit now preloads the LoHa layer's submodules (``preload_module_classes``); checked against the float64
model without offloading.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _audit():
    spec = importlib.util.spec_from_file_location("review24_probe_audit_rp2", Path(__file__).with_name(
        "test_review24_probe_audit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AUDIT = _audit()


def _reference(setting="loha"):
    """The float64 model of the audit's ``setting`` without offloading, and its output on the audit's batch."""
    model, _ = AUDIT.build(setting)
    with torch.no_grad():
        return model, model(AUDIT.BATCH)


def test_offload_loha_forward_is_the_models():
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    ref_model, ref = _reference()
    with torch.no_grad(), ref_model.disable_adapter():
        base = ref_model(AUDIT.BATCH)
    assert (ref - base).abs().max() > 1e-3  # the adapter contributes: a lost adapter term would show
    model, _ = AUDIT.build("offload+loha")
    with torch.no_grad():
        out = model(AUDIT.BATCH)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert all(p.device.type == "meta" for p in model.parameters())  # offloaded again after the forward


@pytest.mark.parametrize("setting", ["loha", "loha+bn_running"])
def test_offload_loha_builds_are_finite_and_equal(setting):
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    _, ref = _reference(setting)
    for _ in range(40):  # main gave non-finite outputs in 6 (offload+loha) and 7 (+bn_running) of 40 builds
        model, _ = AUDIT.build(f"offload+{setting}")
        with torch.no_grad():
            out = model(AUDIT.BATCH)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("param", ["o.weight", "head.weight"])
def test_the_probe_on_the_offloaded_loha_model_gives_the_models_rows(param):
    """The fast engine on the offloaded model (``head.weight`` in the store of the hook that places the LoHa
    layer's submodules) against the loop on the float64 model without offloading."""
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    import spectral_lens as sl

    rows = {}
    for setting, engine in (("loha", "loop"), ("offload+loha", "auto")):
        model, _ = AUDIT.build(setting)
        probe = sl.PerSampleGradientProbe(model, params=param, engine=engine, keep_matrix=True, **AUDIT.KW)
        probe.update(AUDIT.BATCH)
        rows[setting] = probe.matrix().double()
        assert set(probe.engines_.values()) == {engine if setting == "loha" else "fast"}
    torch.testing.assert_close(rows["offload+loha"], rows["loha"], rtol=1e-12, atol=1e-14)
