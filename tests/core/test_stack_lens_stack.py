"""SpectralLens fitting the user's stack: progress bars (auto, correct totals), summaries on each
measurement, an infinite noise scale kept as such, and ``Schedule.at_fractions`` reaching 1.0."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

import spectral_lens as sl
from spectral_lens import Schedule, SpectralLens, ZeroGradientWarning
from spectral_lens._progress import progress_enabled
from spectral_lens.records import RunInfo, RunRecord, RunWriter, spectrum_summaries

from support.models import TinyLM, lm_pool


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyLM(tied=False, dropout=0.0).double().eval()


class _Recorder:
    """Stands in for ``tqdm``: records each bar's total and how far it got."""

    bars: list = []

    def __init__(self, total=None, desc=None, **kw):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        _Recorder.bars.append(self)

    def update(self, k=1):
        self.n += k

    def close(self):
        self.closed = True


@pytest.fixture
def recorder(monkeypatch):
    import tqdm.auto

    _Recorder.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _Recorder)
    return _Recorder


@pytest.mark.parametrize("cap, want", [(6, 6), (7, 7), (None, 12), (100, 12)])
def test_progress_totals_match_what_is_measured(recorder, cap, want):
    pool = lm_pool(n_batches=4, batch=3)  # 12 sequences
    lens = SpectralLens(_model(), pool, gradient_samples=cap, progress=True)
    lens.measure(0, 0)
    bars = {b.desc: b for b in recorder.bars}
    assert bars["activations"].total == 4 and bars["activations"].n == 4
    assert bars["gradients"].total == want and bars["gradients"].n == want  # was 3/6: batches against samples
    assert all(b.closed for b in recorder.bars)
    assert lens.history[-1].spectra[f"grad:{next(iter(lens.probe.params))}"].n_rows == want


def test_progress_auto_is_on_in_a_terminal_only(monkeypatch, recorder):
    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", Tty(True))
    assert progress_enabled(None) is True and progress_enabled(False) is False
    monkeypatch.setenv("CI", "true")
    assert progress_enabled(None) is False and progress_enabled(True) is True
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys, "stderr", Tty(False))
    assert progress_enabled(None) is False
    SpectralLens(_model(), lm_pool(2), params=()).measure(0, 0)  # default progress=None: no bar here
    assert recorder.bars == []


def test_measurement_carries_the_records_summaries(tmp_path):
    pool = lm_pool()
    writer = RunWriter(tmp_path / "r", RunInfo("r", total_tokens=100, n_layer=3), fsync=False,
                       tail_window=(3, 12), head_window=(1, 4))
    lens = SpectralLens(_model(), pool, writer=writer, precision="float64", progress=False)
    m = lens.measure(2, 20, val_loss=3.0)
    writer.close()
    stored = RunRecord.open(tmp_path / "r").measurements[0].summaries
    assert set(m.summaries) == set(m.spectra) == set(stored)
    for name, spec in m.spectra.items():
        want = spectrum_summaries(spec, tail=(3, 12), head=(1, 4))
        assert m.summaries[name] == pytest.approx(want, rel=1e-12)
        assert m.summaries[name] == pytest.approx(stored[name], rel=1e-9)
    act = m.summaries["act:h.2"]
    assert {"alpha_tail", "alpha_head", "rankme", "stable_rank"} <= set(act)
    flat = m.flat()
    assert flat["act:h.2/alpha_tail"] == act["alpha_tail"] and flat["val_loss"] == 3.0
    assert flat["noise_scale"] == m.scalars["noise_scale"]


def test_default_windows_without_a_writer_follow_the_model_depth():
    lens = SpectralLens(_model(), lm_pool(), params=(), progress=False)
    assert lens._windows() == (sl.tail_window(3), (10, 40))
    m = lens.measure(0, 0)  # 32-wide: the (100, 200) tail window cannot be resolved and is left out
    assert "alpha_tail" not in m.summaries["act:h.2"] and "rankme" in m.summaries["act:h.2"]


def test_zero_mean_gradient_gives_an_infinite_noise_scale_that_crashes_nothing(tmp_path):
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # nothing upstream of the head gets a gradient
    writer = RunWriter(tmp_path / "z", RunInfo("z", total_tokens=100), fsync=False)
    lens = SpectralLens(model, lm_pool(), writer=writer, progress=False)
    with pytest.warns(ZeroGradientWarning):
        m = lens.measure(1, 10)
    writer.close()
    assert m.scalars["noise_scale"] == math.inf
    assert m.summaries[f"grad:{next(iter(lens.probe.params))}"] == {}  # an all-zero spectrum has no summaries
    assert math.isinf(m.flat()["noise_scale"])
    back = RunRecord.open(tmp_path / "z").measurements[0]
    assert back.scalars["noise_scale"] == math.inf


def test_at_fractions_measures_the_last_step_of_range():
    total = 50
    s = Schedule.at_fractions(total, [0.1, 0.2, 0.5, 1.0])
    measured = [step for step in range(total) if step in s]
    assert measured == [5, 10, 25, 49]
    assert Schedule.at_fractions(1, [0.0, 1.0]).steps == {0}
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        Schedule.at_fractions(0, [0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 999 in Schedule.at_fractions(1000, [1.0])


def test_attention_mask_default_mask_fn():
    ids = torch.zeros(2, 3, dtype=torch.long)
    am = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = sl.attention_mask({"input_ids": ids, "attention_mask": am})
    assert got.dtype == torch.bool and got.tolist() == [[True, True, False], [True, False, False]]
    assert sl.attention_mask({"input_ids": ids}) is None
    assert sl.attention_mask({"input_ids": ids, "attention_mask": None}) is None
    assert sl.attention_mask((ids, ids)) is None and sl.attention_mask(ids) is None
    assert SpectralLens(_model(), lm_pool(), params=()).mask_fn is sl.attention_mask
