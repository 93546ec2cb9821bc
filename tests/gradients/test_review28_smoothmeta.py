"""The gradient spectrum's metadata says when its rows are gradients of the label-smoothed default loss (the Hugging
Face callback's ``_trained_loss``): before, a smoothed measurement's record could not be told from a plain one's."""

from __future__ import annotations

import torch

from spectral_lens.gradients import PerSampleGradientProbe
from support.models import TinyGPT, lm_batch

PARAM = "transformer.h.1.attn.c_proj.weight"


def _probe() -> PerSampleGradientProbe:
    torch.manual_seed(0)
    return PerSampleGradientProbe(TinyGPT().double().eval(), PARAM, head_loss="materialized")


def test_a_smoothed_measurement_records_its_label_smoothing():
    x, y = lm_batch(m=4)
    probe = _probe()
    with probe._trained_loss(0.1):
        probe.update((x, y))
        inside = probe.compute()
    outside = probe.compute()  # the rows are still the smoothed loss's after the block
    assert inside.metadata["label_smoothing"] == 0.1
    assert outside.metadata["label_smoothing"] == 0.1


def test_a_plain_measurement_has_no_label_smoothing_key_and_reset_forgets_it():
    x, y = lm_batch(m=4)
    probe = _probe()
    probe.update((x, y))
    assert "label_smoothing" not in probe.compute().metadata
    with probe._trained_loss(0.2):
        probe.update((x, y))  # mixed with the plain rows
    assert probe.compute().metadata["label_smoothing"] == [0.0, 0.2]
    probe.reset()
    probe.update((x, y))
    assert "label_smoothing" not in probe.compute().metadata
