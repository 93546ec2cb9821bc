"""TensorBoardSink against a real SummaryWriter, read back with TensorBoard's EventAccumulator."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import spectral_lens as sl

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
pytest.importorskip("matplotlib", reason="spectrum figures need matplotlib (plot extra)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from spectral_lens.integrations import TensorBoardSink  # noqa: E402


def power_law(d: int, alpha: float) -> sl.Spectrum:
    r = np.arange(1, d + 1, dtype=np.float64)
    return sl.Spectrum(torch.from_numpy(r**-alpha), n_rows=10 * d, dim=d)


def read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_figures_round_trip(tmp_path):
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        sink = TensorBoardSink(writer)
        for step, alpha in ((5, 1.25), (9, 0.75)):
            m = sl.LensMeasurement(step, 10 * step, {"act:h.1": power_law(64, alpha)},
                                   {"noise_scale": math.inf if step == 9 else 3.5})
            sink.log_measurement(m, tail=(10, 40), head=(2, 8))
    acc = read(tmp_path)
    tags = acc.Tags()
    alpha = acc.Scalars("spectral_lens/act:h.1/alpha_tail")
    assert [e.step for e in alpha] == [5, 9]
    assert [e.value for e in alpha] == pytest.approx([1.25, 0.75], abs=1e-5)  # float32 in the event file
    noise = acc.Scalars("spectral_lens/noise_scale")
    assert noise[0].value == pytest.approx(3.5) and noise[1].value == math.inf  # logged as is, no crash
    for key in ("alpha_head", "rankme", "stable_rank"):
        assert f"spectral_lens/act:h.1/{key}" in tags["scalars"]
    images = acc.Images("spectral_lens/act:h.1/spectrum")
    assert [e.step for e in images] == [5, 9] and images[0].width > 100 and images[0].height > 100


def test_unresolvable_window_is_logged_as_nan(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb", figures=False)
    with sink:
        sink.log_measurement(sl.LensMeasurement(1, 1, {"act:x": power_law(20, 1.0)}, {}))  # (100, 200) > 20
    acc = read(tmp_path / "tb")
    assert math.isnan(acc.Scalars("spectral_lens/act:x/alpha_tail")[0].value)
    assert acc.Tags()["images"] == []


def test_rejects_what_is_not_a_writer():
    with pytest.raises(TypeError, match="SummaryWriter or a log directory"):
        TensorBoardSink(42)


def test_resumed_hides_what_was_logged_after_the_checkpoint(tmp_path):
    m = lambda step: sl.LensMeasurement(step, step, {}, {"noise_scale": float(step)})  # noqa: E731
    with TensorBoardSink(tmp_path / "tb", figures=False) as sink:
        for step in (2, 4, 6):
            sink.log_measurement(m(step))
    time.sleep(1.1)  # TensorBoard reads event files in name order, whose first key is the second of creation
    with TensorBoardSink(tmp_path / "tb", figures=False) as sink:  # the resumed process, checkpoint at 4
        sink.resumed(4)
        for step in (6, 8):
            sink.log_measurement(m(step))
    assert [e.step for e in read(tmp_path / "tb").Scalars("spectral_lens/noise_scale")] == [2, 4, 6, 8]


def test_resumed_leaves_a_writer_passed_in_as_it_is(tmp_path):
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        sink = TensorBoardSink(writer, figures=False)
        sink.resumed(4)
        assert sink.writer is writer
