"""The gradient spectrum's metadata says when its rows are gradients of the label-smoothed default loss (the Hugging
Face callback's ``_trained_loss``): before, a smoothed measurement's record could not be told from a plain one's."""

from __future__ import annotations

import torch

from spectral_lens import SpectralLens
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


# --- PerSampleGradientProbe(label_smoothing=): a plain PyTorch user's smoothed loss, in both head losses -------------

import functools  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spectral_lens.gradients import causal_lm_loss  # noqa: E402


@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
def test_label_smoothing_argument_measures_the_smoothed_loss(monkeypatch, head_loss):
    """Rows and losses equal those of ``loss_fn=partial(causal_lm_loss, label_smoothing=eps)`` (float64), on the
    materialized and the chunked head loss; the losses equal ``F.cross_entropy(label_smoothing=eps)``'s per-sequence
    mean; the metadata says so."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    x, y = lm_batch(m=4)
    y[1, :3] = -100
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    ref = PerSampleGradientProbe(model, PARAM, loss_fn=functools.partial(causal_lm_loss, label_smoothing=0.3),
                                 keep_matrix=True).update((x, y))
    probe = PerSampleGradientProbe(model, PARAM, label_smoothing=0.3, head_loss=head_loss, keep_matrix=True)
    probe.update((x, y))
    assert probe.head_loss_.startswith(head_loss)
    torch.testing.assert_close(probe.losses_, ref.losses_, rtol=1e-12, atol=0)
    assert float((probe.matrix() - ref.matrix()).abs().max()) <= 1e-10 * float(ref.matrix().abs().max())
    with torch.no_grad():  # the default targets of a (x, y) batch are y itself, position by position
        tok = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none", label_smoothing=0.3,
                              ignore_index=-100).view(y.shape)
    torch.testing.assert_close(probe.losses_, tok.sum(1) / (y != -100).sum(1), rtol=1e-12, atol=0)
    assert probe.compute().metadata["label_smoothing"] == 0.3
    plain = PerSampleGradientProbe(model, PARAM, head_loss=head_loss).update((x, y))
    assert not torch.allclose(plain.losses_, probe.losses_)  # the smoothing is not a no-op here


def test_label_smoothing_argument_is_checked_and_refused_with_a_loss_fn():
    model = TinyGPT()
    for bad in (-0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="PerSampleGradientProbe: label_smoothing must be a number in"):
            PerSampleGradientProbe(model, PARAM, label_smoothing=bad)
    with pytest.raises(ValueError, match="smooth inside your loss_fn"):
        PerSampleGradientProbe(model, PARAM, label_smoothing=0.1, loss_fn=causal_lm_loss)


def test_a_probe_with_its_own_label_smoothing_keeps_it_in_an_integrations_block():
    x, y = lm_batch(m=4)
    torch.manual_seed(0)
    probe = PerSampleGradientProbe(TinyGPT().double().eval(), PARAM, head_loss="materialized", label_smoothing=0.05)
    with probe._trained_loss(0.2):
        probe.update((x, y))
    assert probe.compute().metadata["label_smoothing"] == 0.05


def test_the_hf_callback_warns_once_when_the_probes_own_smoothing_differs_from_the_trainers():
    """A probe built with ``label_smoothing=0.05`` keeps it inside the callback's measurements (by design); a trainer
    smoothing by another factor is then told once, not silently measured against another loss."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    import warnings

    from spectral_lens._warnings import SpectralLensWarning
    from spectral_lens.integrations import SpectralLensCallback

    model = TinyGPT()
    for own, warned in ((0.05, True), (0.1, False), (0.0, False)):
        probe = PerSampleGradientProbe(model, PARAM, label_smoothing=own)
        lens = SpectralLens(model, [lm_batch(m=2)], probe=probe)
        callback = SpectralLensCallback(lens)
        args = transformers.TrainingArguments(output_dir="unused", label_smoothing_factor=0.1, report_to=[],
                                              use_cpu=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with callback._trained_loss(None, args):
                    assert probe._label_smoothing == (own or 0.1)
        assert not [w for w in caught if issubclass(w.category, SpectralLensWarning)]  # at the next agreed work (review 29)
        got = [m for m in callback.driver._pending_warnings if "label_smoothing_factor=0.1" in m]
        assert len(got) == (1 if warned else 0), got
        if warned:
            assert "built with label_smoothing=0.05" in got[0]
