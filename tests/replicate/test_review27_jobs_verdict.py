"""Review 27 (jobs): the printed verdict names the runs stopped unmeasured. A run the lens could not measure at a
finite loss is kept as ``status: "diverged"`` and read by the verdict as cut short (a missed target); the report
and the progress line named it, but the verdict the toy and the speedrun print (and ``verdict.txt``) did not, so
a reader of the printed verdict saw a tier miss the target for no stated reason."""
import io
from types import SimpleNamespace

import importlib.util
from pathlib import Path

import examples.replicate.pipeline as pipeline
from examples.replicate.verdict import verdict
from spectral_lens.records import open_runs

_spec = importlib.util.spec_from_file_location("_revjobsig", Path(__file__).with_name("test_review26_revjobsig.py"))
_revjobsig = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_revjobsig)
_run = _revjobsig._run  # a hand-written Muon run, kept unmeasured (or diverged: nan=True) from stop_at on
VALS = (4.0, 3.0, 2.5, 2.3, 2.2, 2.1, 2.05)


def _runs(tmp_path):
    return open_runs([_run(tmp_path, 16, VALS), _run(tmp_path, 32, VALS, stop_at=4),
                      _run(tmp_path, 64, VALS, stop_at=4, nan=True)])


def test_the_verdict_lines_name_the_runs_stopped_unmeasured(tmp_path):
    runs = _runs(tmp_path)
    v = verdict(runs, target=2.0, families=("Muon",), unit="examples", window=(10, 40))
    assert v.unmeasured == ("muon-b32",)
    named = [line for line in v.lines if "muon-b32" in line]
    assert len(named) == 1 and named[0].startswith("Stopped unmeasured (kept, not retrained): muon-b32:"), v.lines
    assert "not as diverged" in named[0] and "muon-b64" not in named[0]  # the NaN run is diverged, not unmeasured
    clean = verdict(runs[:1], target=2.0, families=("Muon",), unit="examples", window=(10, 40))
    assert clean.unmeasured == () and not any("unmeasured" in line for line in clean.lines)


def test_the_pipeline_prints_them_and_records_them(tmp_path, monkeypatch):
    runs_dir = tmp_path / "out" / "runs"
    runs_dir.mkdir(parents=True)
    paths = [_run(runs_dir, 16, VALS), _run(runs_dir, 32, VALS, stop_at=4)]
    rates = {("Muon", 16): {"lr": 1e-3}, ("Muon", 32): {"lr": 1e-3}}
    monkeypatch.setattr(pipeline, "choose_rates", lambda *a, **k: rates)
    monkeypatch.setattr(pipeline, "train_runs", lambda *a, **k: paths)
    workload = SimpleNamespace(name="toy", families=("Muon",), tiers=(16, 32), budget=1000, unit="examples",
                               target_loss=2.0, reference_tier=16, window=(10, 40))
    printed = io.StringIO()
    v = pipeline.replicate(workload, tmp_path / "out", pipeline.TunerSettings(rungs=(100,)), stream=printed)
    text = printed.getvalue().split("\nVerdict:\n", 1)[1]
    assert "  Stopped unmeasured (kept, not retrained): muon-b32:" in text, text
    assert "muon-b32" in (tmp_path / "out" / "report" / "verdict.txt").read_text()
    import json

    assert json.loads((tmp_path / "out" / "report" / "verdict.json").read_text())["unmeasured"] == ["muon-b32"]
    assert v.unmeasured == ("muon-b32",)
