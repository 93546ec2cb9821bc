"""The report's "spectra at matched loss" figures for runs whose measurements carry no val_loss.

The Hugging Face and Lightning callbacks measure at the schedule's steps without a validation loss
(it is in log.jsonl), as does a plain loop that logs its evaluations with ``RunWriter.log``. Before,
``plot_spectra`` listed every such run as "not reached" (an empty panel) and
``plot_gradient_spectra`` silently drew the last measurement under a "matched loss" caption, while
the taxonomy already matched them through the log's validation curve."""

from __future__ import annotations

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.records import RunInfo, RunRecord, RunWriter

R = np.arange(1, 61, dtype=np.float64)


def _run(root, run_id, tier, speed):
    """Measurements at steps 1..8 without val_loss; the val loss 4 - speed * step / 10 in log.jsonl."""
    info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=800)
    with RunWriter(root / run_id, info, fsync=False, tail_window=(10, 30)) as w:
        for step in range(1, 9):
            w.log(step, step * 100, val_loss=4 - speed * step / 10)
            w.log_measurement(step, step * 100, {"act:h": Spectrum(R ** -(1 + step / 50), n_rows=1000, dim=60),
                                                 "grad:w": Spectrum(R ** -(2 + step / 50), n_rows=100, dim=60,
                                                                    kind="gradient")})
    return RunRecord.open(root / run_id)


def test_measurement_at_loss_follows_the_logged_validation_curve(tmp_path):
    from spectral_lens.analysis import measurement_at_loss

    a = _run(tmp_path, "a", 1, 1.0)  # reaches 3.4 at step 6
    assert measurement_at_loss(a, 3.4).step == 6
    assert measurement_at_loss(a, 3.4, spectrum="grad:w").step == 6
    assert measurement_at_loss(a, 1.0) is None  # never reached


def _labels(fig):
    return [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_spectra_figures_match_runs_by_their_logged_loss(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    from spectral_lens.plot import plot_gradient_spectra, plot_spectra

    runs = [_run(tmp_path, "a", 1, 1.0), _run(tmp_path, "b", 2, 2.0)]  # 3.4 reached at steps 6 and 3
    fig = plot_spectra(runs, target_loss=3.4)
    assert not any("not reached" in t for t in _texts(fig))
    assert [label for label in _labels(fig) if "step" in label] == ["B=1 (step 6)", "B=2 (step 3)"]
    grads = _labels(plot_gradient_spectra(runs, target_loss=3.4))
    assert grads == ["B=1 (step 6)", "B=2 (step 3)"]
