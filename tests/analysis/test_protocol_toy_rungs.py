"""Protocol section 8 (paper App. B.3): promotion at a rung rests on the validation loss observed *at
that rung*. The tuner takes a trial's last report at or before the rung budget; the toy trains in
whole batches, so a rung that is not a multiple of the tier made the final report land past the
budget (1,024 examples for a 1,000-example rung at B = 64), and promotion used the report from
halfway through the rung (512 examples) instead."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from examples.toy.presets import PRESETS, REFERENCE_LRS
from examples.toy.workload import ToyTrainable, ToyWorkload
from examples.tune.candidates import candidate_set


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_toy_rung_is_whole_batches_of_every_tier(name):
    p = PRESETS[name]
    bad = [(r, t) for r in p.tuner.rungs for t in p.tiers if r % t]
    assert not bad, f"preset {name!r}: rung budgets not multiples of the tier (rung, tier): {bad}"
    ToyWorkload(p)  # accepted


def test_workload_and_trainable_refuse_a_rung_between_batches(tmp_path):
    p = PRESETS["smoke"]
    bad = dataclasses.replace(p, tuner=dataclasses.replace(p.tuner, rungs=(100, 256)))
    with pytest.raises(ValueError, match=r"rung budget 100 .* tier 16"):
        ToyWorkload(bad)
    cand = candidate_set("Muon", 32, reference_tier=p.reference_tier, reference_lrs=REFERENCE_LRS["Muon"])[0]
    with pytest.raises(ValueError, match=r"rung budget 100 .* tier 32"):
        ToyTrainable(p)(cand, 100, horizon=256, workdir=tmp_path, report=lambda r, l: None)


def test_rung_loss_is_the_loss_at_the_rung_budget(tmp_path):
    torch.set_num_threads(1)
    p = PRESETS["smoke"]
    cand = candidate_set("Muon", 32, reference_tier=p.reference_tier, reference_lrs=REFERENCE_LRS["Muon"])[0]
    reports = []
    ToyTrainable(p)(cand, 128, horizon=256, workdir=tmp_path, report=lambda r, l: reports.append((r, l)))
    # the tuner's rule (examples/tune/worker.py): the last report at or before the budget
    assert max(r for r, _ in reports if r <= 128) == 128
