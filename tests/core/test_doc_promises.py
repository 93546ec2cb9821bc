"""Concrete promises of the API docs and docstrings, checked one by one (docs audit)."""

from __future__ import annotations

import math

import spectral_lens as sl


def test_at_fractions_maps_decimal_fractions_to_their_documented_step():
    """``min(ceil(f * total_steps), total_steps - 1)`` with f the decimal fraction: 0.07 of 100 steps is
    step 7 (float round-off made it 8: 0.07 * 100 == 7.000000000000001), 0.14 of 5000 is step 700."""
    for total in (10, 100, 1000, 5000, 123457):
        for k in range(0, 101):
            want = min(-(-k * total // 100), total - 1)  # exact integer ceiling of k/100 * total
            s = sl.Schedule.at_fractions(total, [k / 100])
            assert s.steps == {want}, (total, k / 100, sorted(s.steps), want)
    assert sorted(sl.Schedule.at_fractions(100, [0.07, 0.14, 0.28, 0.55]).steps) == [7, 14, 28, 55]
    assert sl.Schedule.at_fractions(3, [1 / 3]).steps == {1}
    assert sl.Schedule.at_fractions(1000, [0.2005]).steps == {201}  # a true fraction of a step still rounds up
    assert math.isclose(0.07 * 100, 7.000000000000001)
