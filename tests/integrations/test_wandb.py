"""WandbSink with a real, offline W&B run (WANDB_MODE=offline: nothing leaves the machine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectral_lens as sl

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
from spectral_lens.integrations import WandbSink  # noqa: E402


def test_offline_run_receives_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = np.arange(1, 65, dtype=np.float64)
    spectrum = sl.Spectrum(torch.from_numpy(r**-1.5), n_rows=640, dim=64)
    run = wandb.init(project="spectral-lens-test", dir=str(tmp_path), mode="offline")
    try:
        sink = WandbSink(run)
        sink.log_measurement(sl.LensMeasurement(4, 40, {"act:h.0": spectrum}, {"noise_scale": math.inf}),
                             tail=(10, 40), head=(2, 8))
        summary = dict(run.summary)
    finally:
        run.finish()
    assert summary["spectral_lens/step"] == 4
    assert summary["spectral_lens/act:h.0/alpha_tail"] == pytest.approx(1.5, abs=1e-9)
    assert summary["spectral_lens/noise_scale"] == math.inf
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))  # written to the offline store


def test_needs_a_run(monkeypatch):
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(ValueError, match="no active W&B run"):
        WandbSink()
