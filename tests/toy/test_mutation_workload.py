"""Mutation audit (workload.py): a budget that is not a whole number of batches (the ``cpu`` preset's
16,000 examples at B = 512) still validates and measures at the run's last step, with progress 1.

Written because mutants that counted ``budget // tier`` steps (the last step then neither validated
nor measured) or recorded progress past 1 passed tests/toy/test_workload.py (whose budget divides).
"""
import dataclasses

import pytest

from examples.toy.presets import PRESETS
from examples.toy.workload import ToyWorkload
from spectral_lens.records import RunRecord


def test_a_budget_between_batches_ends_with_a_validation_and_a_measurement(tmp_path):
    # 60 examples in batches of 8: 8 steps (the last passes the budget, at 64 examples)
    preset = dataclasses.replace(PRESETS["smoke"], tiers=(8,), reference_tier=8, budget=60, gradient_samples=8,
                                 measure_fractions=(0.0, 1.0), eval_every=0.25,
                                 task=dataclasses.replace(PRESETS["smoke"].task, n_examples=600, heldout=120))
    rec = RunRecord.open(ToyWorkload(preset).run("Muon", 8, {"embed": 3e-3, "hidden": 0.02}, tmp_path / "muon-b8"))
    tokens, _ = rec.val_curve()
    # every 25% of 8 steps: steps 2, 4, 6, 8 (a budget // batch count of 7 steps gave 2, 4, 6, 7)
    assert tokens.tolist() == [0.0, 16.0, 32.0, 48.0, 64.0]
    assert [m.tokens for m in rec.measurements] == [0, 64]
    assert rec.progress(rec.measurements[-1]) == pytest.approx(1.0)
    assert rec.progress(rec.measurements[0]) == pytest.approx(0.0)
