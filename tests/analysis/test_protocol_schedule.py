"""Protocol section 8 (paper App. B.3): in the successive-halving sweep, validation loss is evaluated
every 20M tokens. The `paper-d12` speedrun preset is documented as the paper's d12 protocol, so its
tuner (and its measured runs, which share the spacing) must validate every 20M tokens, in whole
optimizer steps of each tier."""
from __future__ import annotations

import dataclasses

import pytest

from examples.speedrun.presets import get_preset
from examples.speedrun.workload import ZooWorkload

PAPER_VALIDATION_SPACING = 20_000_000  # tokens (App. B.3: "validation loss evaluated every 20M tokens")


def test_paper_d12_validates_every_20m_tokens():
    # on the CPU with the bundled corpus: the trainable checks its device and data when built, and the
    # spacing depends on neither
    w = ZooWorkload(dataclasses.replace(get_preset("paper-d12"), device="cpu", data="stdlib"), verbose=False)
    every = w.trainable().eval_every_tokens
    assert every == PAPER_VALIDATION_SPACING
    for family in w.families:
        for tier in w.tiers:
            per_step = w.tokens_per_step(family, tier)
            # the trainer validates every round(every / per_step) steps (examples/nanogpt/train.py)
            spacing = max(1, round(every / per_step)) * per_step
            assert abs(spacing - PAPER_VALIDATION_SPACING) <= per_step / 2, (family, tier, spacing)


def test_paper_d12_rung_budgets_are_50m_150m_500m_in_whole_steps():
    # the rung budgets themselves (App. B.3), within one step of tier 32 (2^21 tokens)
    p = get_preset("paper-d12")
    for rung, paper in zip(p.rungs, (50e6, 150e6, 500e6)):
        assert abs(rung - paper) <= 2**21
    assert len(p.rungs) == 3 and p.budget == pytest.approx(500e6, rel=0.01)
