"""Review of review 29's small fixes (smalls29): Thm. 7's recruitment time at the edge of float64, against exact
rational arithmetic (``Fraction``: ``R^q`` exact for integer ``q``)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from examples.toy import theory as th


def _exact(R, delta, eta, q):
    """``log(1/delta) R^q / eta`` in exact rational arithmetic, rounded once (inf past float64)."""
    t = Fraction(-math.log(delta)) * Fraction(R) ** q / Fraction(eta)
    return math.inf if t > Fraction(th.np.finfo(float).max) else float(t)


@pytest.mark.parametrize("R, q, delta, eta", [
    (2.0, 1024, 0.5, 4.0),        # q log R rounds to log(max float64) exactly: R**q raised OverflowError
    (2.0, 1024, 0.5, 1.0),        # the same, a time past float64 (inf, not OverflowError)
    (10.0, 308, 1e-10, 100.0),    # R**q in range, log(1/delta) R**q past it, the time in range (was inf)
    (10.0, 307, 1e-300, 1e10),    # the same with a large log(1/delta)
    (10.0, 308, 0.1, 1.0),        # R**q in range, the time past it: inf
])
def test_recruitment_time_at_the_edge_of_float64_matches_exact_arithmetic(R, q, delta, eta):
    got, ref = th.recruitment_time(R, delta, eta, q), _exact(R, delta, eta, q)
    assert got == ref if math.isinf(ref) else abs(got - ref) <= 1e-12 * ref, (got, ref)
