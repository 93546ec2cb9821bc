"""Concrete promises of the API docs and docstrings, checked one by one (docs audit)."""

from __future__ import annotations

import math

import spectral_lens as sl


def test_at_fractions_maps_decimal_fractions_to_their_documented_step():
    """``min(ceil(f * total_steps), total_steps - 1)`` with f the decimal fraction: 0.07 of 100 steps is
    step 7 (float round-off made it 8: 0.07 * 100 == 7.000000000000001), 0.14 of 5000 is step 700."""
    for total in (10, 100, 1000, 5000, 123457):
        for k in range(0, 101):
            want = min(-(-k * total // 100), total - 1)  # exact integer ceiling of k/100 * total
            s = sl.Schedule.at_fractions(total, [k / 100])
            assert s.steps == {want}, (total, k / 100, sorted(s.steps), want)
    assert sorted(sl.Schedule.at_fractions(100, [0.07, 0.14, 0.28, 0.55]).steps) == [7, 14, 28, 55]
    assert sl.Schedule.at_fractions(3, [1 / 3]).steps == {1}
    assert sl.Schedule.at_fractions(1000, [0.2005]).steps == {201}  # a true fraction of a step still rounds up
    assert math.isclose(0.07 * 100, 7.000000000000001)


def test_run_writer_refuses_windows_its_reader_would_refuse_or_never_fit(tmp_path):
    """RunWriter(tail_window=(100.0, 200.0)) wrote a run.json that RunRecord.open refused
    ('summary_windows' must map names to [lo, hi] integer pairs); (200, 100) or (0, 5) were stored and
    silently left every measurement without alpha_tail. Now a ValueError naming the argument, before
    anything is written; NumPy integers are fine."""
    import numpy as np
    import pytest
    import torch

    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    for what in ("tail_window", "head_window"):
        for bad in ((100.0, 200.0), (200, 100), (0, 5), (10, 40, 80), "ab", 100):
            path = tmp_path / f"{what}-{len(list(tmp_path.iterdir()))}"
            with pytest.raises(ValueError, match=rf"RunWriter: {what} must be a pair of integer ranks"):
                RunWriter(path, RunInfo("r"), fsync=False, **{what: bad})
            assert not path.exists()
    spectrum = sl.Spectrum(torch.tensor(np.arange(1, 301.0) ** -1.2), n_rows=1000, dim=300)
    with RunWriter(tmp_path / "ok", RunInfo("r"), tail_window=(np.int64(100), np.int64(200)), fsync=False) as w:
        m = w.log_measurement(1, 10, {"a": spectrum})
    assert m.summaries["a"]["alpha_tail"] == pytest.approx(1.2, rel=1e-12)
    assert RunRecord.open(tmp_path / "ok").summary_windows == {"tail": (100, 200), "head": (10, 40)}


def test_resume_refuses_another_tail_window(tmp_path):
    """RunWriter(resume=True, tail_window=X) silently kept the recorded window when X differed."""
    import pytest

    from spectral_lens.records import RunInfo, RunWriter

    RunWriter(tmp_path / "r", RunInfo("r"), tail_window=(50, 100), fsync=False).close()
    with pytest.raises(ValueError, match=r"recorded with tail_window=\(50, 100\) with tail_window=\(100, 200\)"):
        RunWriter(tmp_path / "r", resume=True, tail_window=(100, 200), fsync=False)
    for same in ((50, 100), None):
        with RunWriter(tmp_path / "r", resume=True, tail_window=same, fsync=False) as w:
            assert w.tail_window == (50, 100)


def test_accumulator_configuration_errors_are_clear():
    """``dim=True`` was taken as d = 1 and ``max_chunk_rows="8"`` raised a bare "'<' not supported
    between instances of 'str' and 'int'"; 2.5 was silently truncated to 2. Now each is a ValueError
    naming the argument and the value; NumPy integers are fine."""
    import numpy as np
    import pytest

    for bad in (True, 0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"dim must be a positive int or None, got {bad!r}"):
            sl.ActivationCovarianceAccumulator(dim=bad)
    for bad in ("8", 2.5, 0, True, None):
        with pytest.raises(ValueError, match=rf"max_chunk_rows must be an int >= 1, got {bad!r}"):
            sl.ActivationCovarianceAccumulator(max_chunk_rows=bad)
    assert sl.ActivationCovarianceAccumulator(max_chunk_rows=np.int64(64)).max_chunk_rows == 64


def test_run_writer_log_refuses_what_the_reader_refuses(tmp_path):
    """``w.log(step, tokens, val_loss="3.2")`` (or True, or [3.2]) was written, and then
    ``RunRecord.open`` (errors="raise", the default) refused the whole run: "['val_loss'] must be
    numbers". Now the writer raises TypeError naming the key and writes nothing; numbers, NumPy
    scalars, one-element tensors and None are written as before."""
    import numpy as np
    import pytest
    import torch

    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False) as w:
        for key in ("val_loss", "train_loss", "tokens_per_s"):
            for bad in ("3.2", True, [3.2], torch.ones(2), {"x": 1}):
                with pytest.raises(TypeError, match=rf"RunWriter.log: {key} must be a number or None"):
                    w.log(1, 10, **{key: bad})
        w.log(1, 10, val_loss=3.5, train_loss=np.float32(4.0), tokens_per_s=torch.tensor(1000.0), lr=None)
        w.log(2, 20, val_loss=None, train_loss=3, note="text is fine elsewhere")
    events = RunRecord.open(tmp_path / "r").events
    assert [(e["step"], e.get("val_loss"), e.get("train_loss"), e.get("tokens_per_s")) for e in events] == [
        (1, 3.5, 4.0, 1000.0), (2, None, 3, None)]


def test_an_empty_update_fixes_the_width():
    """An update with zero rows left ``dim`` unset, so rows of another width were accepted next."""
    import pytest
    import torch

    acc = sl.ActivationCovarianceAccumulator()
    acc.update(torch.empty(0, 7))
    assert acc.dim == 7
    with pytest.raises(ValueError, match="expected last dim d=7"):
        acc.update(torch.randn(10, 5))
    acc.update(torch.randn(10, 7, dtype=torch.float64))
    assert acc.n_rows == 10
