"""Run-granular resume of the shared pipeline: complete runs are kept, interrupted ones redone."""
import io
import json
from pathlib import Path

import pytest

from examples.replicate.runs import run_id, train_runs


def _record_files(run_dir: Path) -> None:
    """The two JSONL files every finished record holds (empty here: these fakes measure nothing)."""
    (run_dir / "log.jsonl").write_text("")
    (run_dir / "measurements.jsonl").write_text("")


class FakeWorkload:
    name = "fake"
    unit = "examples"
    families = ("A", "B")
    tiers = (1, 2)
    reference_tier = 1
    target_loss = 1.0
    budget = 10

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def run(self, family, tier, lrs, run_dir: Path) -> Path:
        self.calls.append((family, tier))
        run_dir.mkdir(parents=True)
        (run_dir / "half.txt").write_text("started")
        if (family, tier) == self.fail_on:
            raise KeyboardInterrupt  # an interruption in the middle of a run
        (run_dir / "run.json").write_text(json.dumps({"lrs": lrs, "name": run_dir.name}))
        _record_files(run_dir)
        return run_dir


LRS = {(f, t): {"lr": 0.1 * t} for f in "AB" for t in (1, 2)}


def test_interrupted_run_is_redone_and_complete_runs_kept(tmp_path):
    w = FakeWorkload(fail_on=("B", 1))
    with pytest.raises(KeyboardInterrupt):
        train_runs(w, LRS, tmp_path, stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a-b1", "a-b2"]
    assert (tmp_path / ".partial" / "b-b1" / "half.txt").exists()  # the interrupted run stays out of sight
    w2 = FakeWorkload()
    log = io.StringIO()
    dirs = train_runs(w2, LRS, tmp_path, stream=log)
    assert w2.calls == [("B", 1), ("B", 2)]
    assert [d.name for d in dirs] == ["a-b1", "a-b2", "b-b1", "b-b2"]
    assert json.loads((tmp_path / "b-b1" / "run.json").read_text()) == {"lrs": {"lr": 0.1}, "name": "b-b1"}
    assert not (tmp_path / ".partial").exists()
    assert "2 of 4 runs already complete" in log.getvalue() and "ETA" in log.getvalue()
    w3 = FakeWorkload()
    train_runs(w3, LRS, tmp_path, stream=io.StringIO())
    assert w3.calls == []


def test_missing_rates_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"no learning rates for \(family, tier\) \[\('B', 2\)\]"):
        train_runs(FakeWorkload(), {k: v for k, v in LRS.items() if k != ("B", 2)}, tmp_path)


def test_run_id():
    assert run_id(FakeWorkload(), "RoPE", 64) == "rope-b64"


def test_a_tier_without_a_choice_says_how_to_tune_again(tmp_path):
    # Every candidate of tier 2 diverges: the tuner writes no choice for it. The error's advice must
    # work: deleting only choices.json resumes the finished study and writes the same choices again.
    pytest.importorskip("optuna")
    import math

    from examples.replicate.tuning import TunerSettings, choose_rates
    from examples.tune.synthetic import SyntheticTrainable

    class Tunable(FakeWorkload):
        families, tiers, reference_tier = ("A",), (1, 2), 1

        def __init__(self, nan_above):
            super().__init__()
            self.nan_above = nan_above

        def reference_lrs(self, family):
            return {"lr": 1e-3}

        def trainable(self):
            return SyntheticTrainable(nan_above=self.nan_above)

    settings = TunerSettings(rungs=(10,), multipliers=(1.0,))
    with pytest.raises(ValueError, match="no choice for family 'A', tier 2") as e:
        choose_rates(Tunable(nan_above=1.2), tmp_path / "tune", settings, stream=False)
    (tmp_path / "tune" / "choices.json").unlink()
    # the finished study is resumed, not retrained: another trainable is refused (its rung losses would
    # mix with the study's), the same one gives the same outcome again
    with pytest.raises(ValueError, match="started with another trainable"):
        choose_rates(Tunable(nan_above=math.inf), tmp_path / "tune", settings, stream=False)
    with pytest.raises(ValueError, match="no choice for family 'A', tier 2"):   # only the file: the same again
        choose_rates(Tunable(nan_above=1.2), tmp_path / "tune", settings, stream=False)
    assert str(tmp_path / "tune") in str(e.value) and "tune.journal" in str(e.value)
    import shutil

    shutil.rmtree(tmp_path / "tune")                                              # what the message says
    assert set(choose_rates(Tunable(nan_above=math.inf), tmp_path / "tune", settings, stream=False)) == {("A", 1), ("A", 2)}


class RecordingWorkload(FakeWorkload):
    """Writes run.json as RunWriter does: the rates under extras."""

    def run(self, family, tier, lrs, run_dir: Path) -> Path:
        self.calls.append((family, tier))
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "extras": {"lrs": dict(lrs)}}))
        _record_files(run_dir)
        return run_dir


def test_a_finished_run_with_other_rates_is_refused(tmp_path):
    """After a new tuning (tune/ deleted and run again), finished runs trained with the old rates were
    kept beside new ones: one sweep mixed learning rates without a word."""
    train_runs(RecordingWorkload(), LRS, tmp_path, stream=io.StringIO())
    retuned = {**LRS, ("B", 2): {"lr": 0.3}}
    w = RecordingWorkload()
    with pytest.raises(ValueError, match=r"b-b2: this finished run was trained with learning rates lr=0\.2, but the "
                                         r"tuner's choices are now lr=0\.3; delete the run directory"):
        train_runs(w, retuned, tmp_path, stream=io.StringIO())
    assert w.calls == []
    train_runs(w, LRS, tmp_path, stream=io.StringIO())  # the same rates: every run kept
    assert w.calls == []


def test_a_finished_run_missing_a_record_file_is_refused(tmp_path):
    """Runs are renamed into place only when complete, so a final directory without measurements.jsonl
    was changed by hand; it counted as complete, and its run ranked as if it never reached the target."""
    train_runs(FakeWorkload(), LRS, tmp_path, stream=io.StringIO())
    (tmp_path / "b-b1" / "measurements.jsonl").unlink()
    w = FakeWorkload()
    with pytest.raises(ValueError, match=r"b-b1: this finished run is missing measurements.jsonl; delete the run "
                                         r"directory to train it again"):
        train_runs(w, LRS, tmp_path, stream=io.StringIO())
    assert w.calls == []
