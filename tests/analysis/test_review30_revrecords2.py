"""Review 30 (revrecords2): adversarial review of the records2 follow-ups (a resume's RunInfo compared with the
record, the spectra directory's one fsync, empty crash leftovers, temp files beside symlink targets).

Each test failed before the fix it guards (see docs/reliability.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter


from .test_review30_records2 import _info, _spectrum  # the records2 tests' spectrum and RunInfo


def test_extras_that_json_records_as_given_are_no_difference(tmp_path):
    # the extras were compared with ==: a tuple given read back as a list, a NaN, a NumPy array (its == no bool),
    # a NumPy float32 warned "differ" on every resume with the RunInfo the run was created with (the toy
    # example's ``task`` holds tuples), and under -W error refused the resume
    def info() -> RunInfo:
        return _info(batch_tier=np.float32(0.1), seed=np.int64(3), total_tokens=2e9,
                     extras={"task": {"shape": (2, 8), "lrs": [(0.1, 0.2)]}, "nan": float("nan"),
                             "arr": np.arange(3), "f32": np.float32(0.1), "lr": 3e-4, "n": np.int64(5), 1: "int key"})
    run = tmp_path / "run"
    with RunWriter(run, info(), fsync=False) as w:
        w.log_measurement(1, 1000, {"act:a": _spectrum()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunWriter(run, info(), resume=True, fsync=False).close()
    with pytest.warns(RecordWarning, match=r"shape': \[2, 9\]"):  # a real difference is still said
        RunWriter(run, _info(batch_tier=np.float32(0.1), seed=3, total_tokens=2e9,
                             extras={"task": {"shape": (2, 9)}}), resume=True, fsync=False).close()
    assert RunRecord.open(run).info.extras["task"]["shape"] == [2, 8]


def test_a_failed_fsync_of_the_spectra_directory_leaves_no_spectrum_file(tmp_path, monkeypatch):
    # the directory's one fsync (after the renames, before the line) ran outside the cleanup: an EIO there left
    # the measurement's spectrum files, which no line refers to, until a resume removed them
    import spectral_lens.records.writer as writer_module

    w = RunWriter(tmp_path / "run", _info())
    real = writer_module._fsync_dir

    def failing(path):
        if Path(path).name == "spectra":
            raise OSError(5, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(writer_module, "_fsync_dir", failing)
    with pytest.raises(OSError, match="Input/output"):
        w.log_measurement(1, 1000, {"act:a": _spectrum(), "act:b": _spectrum(1)})
    assert list((tmp_path / "run" / "spectra").iterdir()) == []
    assert (tmp_path / "run" / "measurements.jsonl").read_bytes() == b""
    monkeypatch.setattr(writer_module, "_fsync_dir", real)
    w.log_measurement(1, 1000, {"act:a": _spectrum()})  # the writer goes on
    w.close()
    assert [m.step for m in RunRecord.open(tmp_path / "run").measurements] == [1]


def test_a_resume_refused_for_one_field_says_nothing_of_a_budget_it_did_not_write(tmp_path):
    # the budget's warning ("total_tokens changed", nothing measured yet) was said before another field's refusal,
    # for a budget never written; under -W error it was raised instead of the ValueError naming the field
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log(1, 1000, train_loss=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="batch_size: recorded 16, given 32"):
            RunWriter(run, _info(total_tokens=2 * 10**6, batch_size=32), resume=True, fsync=False)
        with pytest.raises(ValueError, match="tail_window"):
            RunWriter(run, _info(total_tokens=2 * 10**6), resume=True, fsync=False, tail_window=(3, 9))
    assert RunRecord.open(run).info.total_tokens == 10**6


def test_an_emptied_run_json_of_a_measured_run_says_which_windows_it_records(tmp_path):
    # run.json emptied (a crash, or an editor that truncates in place) beside measurements: the resume writes it
    # again from the RunInfo with the default windows, while the stored summaries used the recorded ones; the
    # analyses read run.json's windows, and nothing said which it wrote
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False, tail_window=(2, 8)) as w:
        w.log_measurement(1, 1000, {"act:a": _spectrum()})
    (run / "run.json").write_bytes(b"")
    with pytest.warns(RecordWarning, match=r"holds measurements.*tail_window=\(100, 200\)") as got:
        RunWriter(run, _info(), resume=True, fsync=False).close()
    assert [g.filename for g in got if "is empty" in str(g.message)] == [__file__]
    (run / "run.json").write_bytes(b"")
    with pytest.warns(RecordWarning, match="is empty") as got:  # the recorded window given: said as written
        RunWriter(run, _info(), resume=True, fsync=False, tail_window=(2, 8)).close()
    assert "tail_window=(2, 8)" in " ".join(str(g.message) for g in got)
    assert RunRecord.open(run).summary_windows["tail"] == (2, 8)


@pytest.mark.parametrize("given", [dict(batch_size=16.0, total_tokens=1e6),
                                   dict(batch_size=np.int64(16), seed=np.int64(0), batch_tier=np.float64(8.0),
                                        n_layer=np.int32(12))])
def test_numbers_equal_to_the_recorded_ones_are_no_difference(tmp_path, given):
    # a regression guard on the new refusal: the fields compare by value, as the record reads them back
    run = tmp_path / "run"
    with RunWriter(run, _info(), fsync=False) as w:
        w.log_measurement(1, 1000, {"act:a": _spectrum()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunWriter(run, _info(**given), resume=True, fsync=False).close()
    with pytest.raises(ValueError, match="batch_size: recorded 16, given 16.5"):
        RunWriter(run, _info(batch_size=16.5), resume=True, fsync=False)
