"""Review 25 (zoo): the speedrun summary's smallest exact Spearman p-value is 2/n! for every n."""
import math
from fractions import Fraction

import pytest

from examples.speedrun.summary import min_pvalue


@pytest.mark.parametrize("n", [2, 5, 20, 21, 25, 40, 170, 171, 300])
def test_min_pvalue_is_two_over_n_factorial_beyond_twenty(n):
    # it returned 0.0 for n > 20 (2/21! = 3.9e-20 is not 0); 2/n! leaves the float range only beyond n = 170
    want = float(Fraction(2, math.factorial(n)))
    assert min_pvalue(n) == want
    assert min_pvalue(n) > 0 or n > 170
