"""The scatter's title printed a small nonzero rho as ``ρ_S = -0.00`` (and a within-family mean likewise), read
as a contradiction; the report's text keeps one significant digit there (``report._rho``): the figure now says
the same as the report beside it."""

import math

import pytest

pytest.importorskip("matplotlib")

from spectral_lens.analysis.tier_predictor import FamilyScore, PredictionScore  # noqa: E402
from spectral_lens.plot import plot_early_vs_eps  # noqa: E402

POINTS = (("b4", "f", 4, 1.0, 1.0), ("b8", "f", 8, 0.5, 1.5), ("b16", "f", 16, 0.0, 1.2),
          ("c4", "g", 4, 1.0, 1.0), ("c8", "g", 8, 0.0, 1.1))


@pytest.mark.parametrize("rho, shown", [(-0.004, "ρ_S = -0.004"), (0.0, "ρ_S = 0.00"), (-0.5, "ρ_S = -0.50"),
                                        (0.004, "ρ_S = 0.004")])
def test_the_title_keeps_a_digit_of_a_rho_that_rounds_to_zero(rho, shown):
    within = {"f": FamilyScore(rho, 0.9, 3), "g": FamilyScore(rho, 1.0, 3)}
    title = plot_early_vs_eps(PredictionScore("alpha_tail", rho, 0.9, 5, within, rho, POINTS)).axes[0].get_title()
    assert shown + " " in title
    assert "-0.00 " not in title and "-0.00;" not in title and not title.rstrip().endswith("-0.00")
    assert f"within-family mean {shown.split(' = ')[1]}" in title


def test_an_undefined_rho_still_says_so():
    score = PredictionScore("alpha_tail", math.nan, math.nan, 2, {"f": FamilyScore(math.nan, math.nan, 2)},
                            math.nan, POINTS[:2])
    assert "ρ_S undefined" in plot_early_vs_eps(score).axes[0].get_title()


def test_zero_dimensional_arrays_and_tensors_print_as_their_value():
    """A 0-d NumPy array or torch tensor (what ``np.mean``'s ``out=``/a tensor reduction gives) printed
    ``-0.0000`` for a value rounding to zero and 300 digits for 1e300: ``_fmt`` now reads its one value."""
    import numpy as np
    import torch

    from spectral_lens.cli import _fmt

    assert _fmt(np.array(-1e-5)) == "0.0000" and _fmt(torch.tensor(-1e-5, dtype=torch.float64)) == "0.0000"
    assert _fmt(np.array(1e300)) == "1e+300"
    assert _fmt(np.array(0.25)) == "0.2500" and _fmt(torch.tensor(0.25)) == "0.2500"
    assert _fmt(np.array(np.nan)) == "nan" and _fmt(torch.tensor(float("nan"))) == "nan"
    assert _fmt(torch.tensor(3)) == format(3, ".4f")
