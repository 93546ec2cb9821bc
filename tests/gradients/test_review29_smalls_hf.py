"""Review 29: the HF callback warns once when the probe smooths and the trainer does not (before: silent, since
the check ran only for a smoothing trainer); the warning is given at rank 0's next agreed work (``warn_on_rank0``), so
under ``-W error`` every rank raises there alike (a warning raised on rank 0 alone left the others waiting)."""
from __future__ import annotations

import warnings

import pytest

from spectral_lens import PerSampleGradientProbe, SpectralLens
from spectral_lens._warnings import SpectralLensWarning
from support.models import TinyGPT, lm_batch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402

PARAM = "transformer.h.1.attn.c_proj.weight"


@pytest.mark.parametrize("own, warned", [(0.05, True), (0.0, False)])
def test_the_callback_warns_once_when_only_the_probe_smooths(own, warned):
    model = TinyGPT()
    probe = PerSampleGradientProbe(model, PARAM, label_smoothing=own)
    callback = SpectralLensCallback(SpectralLens(model, [lm_batch(m=2)], probe=probe))
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)  # no smoothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with callback._trained_loss(None, args):
                assert probe._label_smoothing == own  # the probe's own value is measured
    assert not [w for w in caught if issubclass(w.category, SpectralLensWarning)]  # given at the next agreed work:
    got = [m for m in callback.driver._pending_warnings if "label_smoothing" in m]  # rank 0's (here: this process)
    assert len(got) == (1 if warned else 0), got
    if warned:
        assert "label_smoothing_factor=0" in got[0] and "built with label_smoothing=0.05" in got[0]
        with pytest.warns(SpectralLensWarning, match="built with label_smoothing=0.05"):
            callback.driver._agreed_on_rank0(lambda: None, "a test's work")  # the measurement's sinks, in a run
