"""Both sinks log one figure per spectrum under the same tag, the same image (``_figure.measurement_images``).

WandbSink's figures had no test; a fake run stands in for W&B (``wandb.Image`` kept as the array it wraps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectral_lens as sl

pytest.importorskip("matplotlib", reason="the plot extra is not installed")
wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
from spectral_lens.integrations import TensorBoardSink, WandbSink
from spectral_lens.integrations._figure import spectrum_image


class _Run:
    def define_metric(self, *args, **kwargs):
        pass

    def log(self, data):
        self.data = data


class _Writer:
    def __init__(self):
        self.images = {}

    def add_scalar(self, *args, **kwargs):
        pass

    def add_image(self, tag, image, global_step, dataformats):
        self.images[tag] = (image, global_step, dataformats)

    def flush(self):
        pass


def test_both_sinks_log_the_same_figures(monkeypatch):
    monkeypatch.setattr(wandb, "Image", lambda image: image)
    r = np.arange(1, 33, dtype=np.float64)
    spectra = {"act:h.0": sl.Spectrum(torch.from_numpy(r**-1.5), n_rows=320, dim=32),
               "grad:h.0.w": sl.Spectrum(torch.from_numpy(r**-1.0), n_rows=32, dim=32, kind="gradient")}
    m = sl.LensMeasurement(7, 70, spectra, {})
    run, writer = _Run(), _Writer()
    WandbSink(run, figures=True, prefix="p/").log_measurement(m, tail=(4, 16), head=(1, 4))
    TensorBoardSink(writer, figures=True, prefix="p/").log_measurement(m, tail=(4, 16), head=(1, 4))
    tags = ["p/act:h.0/spectrum", "p/grad:h.0.w/spectrum"]
    assert sorted(k for k in run.data if k.endswith("/spectrum")) == tags
    assert sorted(writer.images) == tags
    for name, spectrum in spectra.items():
        want = spectrum_image(spectrum, f"{name} @ step 7", (4, 16), (1, 4))
        image, step, formats = writer.images[f"p/{name}/spectrum"]
        assert (step, formats) == (7, "HWC")
        np.testing.assert_array_equal(image, want)
        np.testing.assert_array_equal(run.data[f"p/{name}/spectrum"], want)
