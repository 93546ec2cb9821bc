"""The early statistic (``early_value``): interpolation weight, jitter and bracket edges, against
float64 references computed here (found by hand mutation testing: the suite interpolated only at
the midpoint ``w = 0.5``, measured sigma only at a measurement (no propagation) and on exactly
``noise_neighbors`` points, and never put the first measurement at the fraction, so a mirrored
weight, a dropped ``sqrt((1-w)^2 + w^2)``, "first k" instead of "nearest k" and ``>=`` for ``>``
all passed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from spectral_lens.analysis.early import FractionNotReachedError, early_value
from spectral_lens.records import RunInfo, RunRecord


def _run():
    return RunRecord(Path("."), RunInfo("r", family="f", batch_tier=4), [], [], {})


def test_interpolation_weight_is_measured_from_the_earlier_measurement():
    pts = [(0.1, 1.0, 10), (0.4, 4.0, 40)]
    s = early_value(_run(), 0.2, pts, "x", 5)
    assert s.weight == pytest.approx(1 / 3) and s.value == pytest.approx(2.0) and s.steps == (10, 40)


def test_sigma_uses_the_nearest_points_and_is_propagated_through_the_interpolation():
    f = np.array([0.02, 0.05, 0.1, 0.15, 0.25, 0.3, 0.6, 0.9])
    y = 1.0 + 2.0 * f + np.array([0.3, -0.4, 0.05, -0.1, 0.12, -0.03, 0.5, -0.6])
    pts = [(float(a), float(b), i) for i, (a, b) in enumerate(zip(f, y))]
    frac = 0.2
    s = early_value(_run(), frac, pts[::-1], "x", 5)  # input order does not matter
    near = np.argsort(np.abs(f - frac), kind="stable")[:5]
    assert sorted(near.tolist()) == [1, 2, 3, 4, 5]  # 0.05..0.3, not the first five
    coef = np.polyfit(f[near], y[near], 1)
    resid = y[near] - np.polyval(coef, f[near])
    w = (frac - 0.15) / (0.25 - 0.15)
    ref = math.sqrt((resid**2).sum() / (5 - 2)) * math.sqrt((1 - w) ** 2 + w**2)
    assert s.n_noise == 5 and s.weight == pytest.approx(w)
    assert s.value == pytest.approx((1 - w) * y[3] + w * y[4])
    assert s.sigma == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_measurement_exactly_at_the_fraction_is_used_as_is(where):
    pts = [(0.2, 5.0, 1), (0.3, 6.0, 2), (0.4, 7.0, 3)] if where == "first" else \
          [(0.0, 3.0, 1), (0.1, 4.0, 2), (0.2, 5.0, 3)]
    s = early_value(_run(), 0.2, pts, "x", 5)
    assert s.value == 5.0 and s.weight == 0.0 and s.steps[0] == s.steps[1]
    with pytest.raises(FractionNotReachedError):
        early_value(_run(), 0.2 + 1e-9, [(0.0, 3.0, 1), (0.2, 5.0, 3)], "x", 5)
    with pytest.raises(ValueError, match="first measurement"):
        early_value(_run(), 0.2 - 1e-9, [(0.2, 5.0, 1), (0.3, 6.0, 2)], "x", 5)
