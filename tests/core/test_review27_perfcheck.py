"""Review 27 CPU check: ``Schedule.__contains__`` with a plain ``int`` step (every training step of an
integration) takes no conversion; other steps still go through ``_whole``."""

import numpy as np
import pytest
import torch

import spectral_lens.schedule as schedule_mod
from spectral_lens import Schedule


def _no_conversion(step):
    raise AssertionError(f"_whole called for {step!r}: a plain int step must skip the conversion")


@pytest.mark.parametrize("sched", [Schedule.every(10), Schedule(frozenset({3, 7})), Schedule.every(10) | Schedule(frozenset({3}))])
def test_int_step_skips_whole(monkeypatch, sched):
    expected = {s: s in sched for s in range(25)}  # with the conversion
    monkeypatch.setattr(schedule_mod, "_whole", _no_conversion)
    assert {s: s in sched for s in range(25)} == expected
    assert any(expected.values()) and not all(expected.values())


def test_other_steps_still_converted():
    sched = Schedule.every(10) | Schedule(frozenset({1}))
    assert True not in sched and False not in sched  # bools are not steps 1 / 0
    assert torch.tensor(10) in sched and np.int64(20) in sched and 30.0 in sched
    assert 2.5 not in sched and torch.tensor([10, 20]) not in sched
