"""The measured run's checkpoint schedule (ToyWorkload.run)."""
import dataclasses

from examples.toy.presets import PRESETS
from examples.toy.workload import ToyWorkload
from spectral_lens.records import RunRecord


def test_validation_every_5_percent_lands_on_exact_steps(tmp_path):
    # 40 steps of 4 examples: 5% is 2 steps, so every validation is at a multiple of 8 examples.
    # In float64 k * 0.05 * 40 is 6.000000000000001 for k = 3 (and off for k = 6, 7, 12, 14 too):
    # a plain ceil put those validations one step late (the old code validated at 28, not 24, examples).
    preset = dataclasses.replace(PRESETS["smoke"], tiers=(4,), reference_tier=4, budget=160, gradient_samples=8,
                                 measure_fractions=(0.0, 0.5, 1.0), eval_every=0.05)
    run_dir = ToyWorkload(preset).run("Muon", 4, {"embed": 3e-3, "hidden": 0.02}, tmp_path / "muon-b4")
    tokens, losses = RunRecord.open(run_dir).val_curve()
    assert tokens.tolist() == [8.0 * k for k in range(21)]
    assert len(losses) == 21
