"""Review 29: Thm. 7's recruitment time beyond the float64 range is inf (``R**q`` raised OverflowError), and values
near the edge stay exact (checked against the same formula in exact rational/log arithmetic)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from examples.toy import theory as th


def _exact(R, delta, eta, q):
    """log(1/delta) R^q / eta in log space with math.fsum (q integer: R^q exact as a Fraction)."""
    return float(Fraction(-math.log(delta)) * Fraction(R) ** q / Fraction(eta))


@pytest.mark.parametrize("R, q, eta", [(1e10, 40, 1.0), (10.0, 400, 1.0), (2.0, 2000, 1e-10)])
def test_recruitment_time_beyond_float64_is_inf(R, q, eta):
    assert th.recruitment_time(R, 0.1, eta, q) == math.inf


@pytest.mark.parametrize("R, q, delta, eta", [
    (10.0, 310, 0.5, 1e6),       # R**q overflows, the time does not (a large eta)
    (10.0, 309, 1 - 1e-12, 1.0),  # a tiny log(1/delta) brings it back
    (10.0, 300, 0.1, 1.0),        # R**q in range: the direct formula
    (3.0, 7, 0.01, 0.25),
])
def test_recruitment_time_in_range_matches_exact_arithmetic(R, q, delta, eta):
    got, ref = th.recruitment_time(R, delta, eta, q), _exact(R, delta, eta, q)
    assert math.isfinite(got) and abs(got - ref) <= 1e-12 * ref, (got, ref)
