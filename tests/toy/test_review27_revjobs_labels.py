"""Review 27 (revjobs): progress-fraction labels of the toy's report and the printed verdict.

1. A toy preset's ``fraction`` given in percent (20 for 0.2) was accepted: every run was trained, then the verdict
   had no ranking and the report's columns said ``2e+03%``. Refused at once, as the speedrun's presets do.
2. The verdict and the toy report labelled one pre-registered fraction differently where it lies near a grid point
   only the report scans (0.05001: ``5%`` in the verdict's "at ... of the budget", ``5.001%`` in the report's column
   and Fig. 4a row). Both tell a fraction from every 5% grid point now, so one fraction has one label.
"""
import dataclasses
import math

import pytest

from examples.replicate.verdict import percent
from examples.toy import report
from examples.toy.presets import PRESETS


@pytest.mark.parametrize("bad", [20, 0, -0.2, math.nan, 1.5])
def test_a_toy_fraction_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"toy preset 'smoke': fraction=.* must be in \(0, 1\]"):
        dataclasses.replace(PRESETS["smoke"], fraction=bad)


def test_a_toy_fraction_inside_is_kept():
    assert dataclasses.replace(PRESETS["smoke"], fraction=1.0).fraction == 1.0
    assert dataclasses.replace(PRESETS["smoke"], fraction=1 / 3).fraction == 1 / 3


@pytest.mark.parametrize("f, label", [(0.1 + 0.2, "30%"), (1 / 3, "33.3%"), (0.999999, "99.9999%"), (1.0, "100%"),
                                      (0.2, "20%"), (0.125, "12.5%"), (0.2004, "20.04%"), (0.05001, "5.001%"),
                                      (0.1504, "15.04%"), (0.2499999, "24.99999%")])
def test_one_fraction_one_label_in_the_verdict_and_the_report(f, label):
    verdict_scan = (0.1, 0.2, 0.3, 0.4, 0.5)  # examples.replicate.verdict.verdict's default fractions
    assert percent(f, sorted({*verdict_scan, f})) == label  # the verdict's "at ... of the budget"
    assert report._pct(f) == label  # the toy report's column and Fig. 4a row
    assert percent(f) == label  # and without any list
