"""Mutation audit (workload.ToyTrainable): the tuner promotes on the held-out loss of the model at the rung.

Written because a mutant that reported the training-set loss at the rung passed tests/toy/test_train.py
(which compares reports with each other, never with the held-out loss of the saved model).
"""
import pytest

from examples.toy.presets import PRESETS
from examples.toy.train import ToyRun, evaluate
from examples.toy.workload import ToyTrainable
from examples.tune import Candidate


def test_rung_report_is_the_heldout_loss_of_the_checkpointed_model(tmp_path):
    preset = PRESETS["smoke"]
    trainable = ToyTrainable(preset)
    cand = Candidate("Muon", 32, 1.0, {"embed": 4e-3, "hidden": 0.03})
    reports = []
    trainable(cand, 64, horizon=128, workdir=tmp_path, report=lambda r, v: reports.append((r, v)))
    run = ToyRun("Muon", 32, cand.lrs, preset.model, seed=preset.seed)
    run.load(tmp_path / "checkpoint.pt")
    d = preset.task.split()
    assert run.seen == 64 and reports[-1][0] == 64
    assert reports[-1][1] == pytest.approx(evaluate(run.model, d.x_heldout, d.y_heldout), rel=1e-12)
    assert reports[-1][1] != pytest.approx(evaluate(run.model, d.x_train, d.y_train), rel=1e-6)


class _Stop(Exception):
    pass


def test_measured_runs_and_trials_use_the_preset_seed(tmp_path, monkeypatch):
    # every preset has seed 0, so a run hard-wired to seed 0 passed every test; the seed follow-ups
    # (docs/replication-toy.md) replace the preset's seed and must get other initializations
    import dataclasses

    from examples.toy import workload as wmod

    seeds = []

    def fake_run(family, batch, lrs, config, seed=0):
        seeds.append(seed)
        raise _Stop

    monkeypatch.setattr(wmod, "ToyRun", fake_run)
    preset = dataclasses.replace(PRESETS["smoke"], seed=3)
    with pytest.raises(_Stop):
        wmod.ToyWorkload(preset).run("Muon", 16, {"embed": 4e-3, "hidden": 0.03}, tmp_path / "muon-b16")
    with pytest.raises(_Stop):
        wmod.ToyTrainable(preset)(Candidate("Muon", 16, 1.0, {"embed": 4e-3, "hidden": 0.03}), 64, horizon=128,
                                  workdir=tmp_path / "t", report=lambda r, v: None)
    assert seeds == [3, 3]
