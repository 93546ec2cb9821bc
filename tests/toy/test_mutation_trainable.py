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
