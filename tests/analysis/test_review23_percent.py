"""A small --fraction in the predictors' messages (noticed by the session-23 CLI audit): ``:.0%`` printed 0.001 as
"0%", a fraction the user did not give."""

from __future__ import annotations

import pytest

from spectral_lens.analysis import TailPredictor
from spectral_lens.analysis.tier_predictor import percent


@pytest.mark.parametrize("fraction, text", [(0.2, "20%"), (0.001, "0.1%"), (1 / 3, "33.3%"), (0.0, "0%"), (1.0, "100%"),
                                            (0.0125, "1.25%"), (0.07, "7%")])
def test_percent_says_the_fraction_given(fraction, text):
    assert percent(fraction) == text


def test_no_usable_statistic_names_a_small_fraction(tmp_path):
    from spectral_lens.records import RunInfo, RunWriter

    for name, tier in (("a", 4), ("b", 8)):
        with RunWriter(tmp_path / name, RunInfo(name, family="f", batch_tier=tier, total_tokens=1000), fsync=False) as w:
            w.log(0, 0, train_loss=1.0)
    with pytest.raises(ValueError, match=r"no run has a usable alpha_tail at 0\.1%"):
        TailPredictor(fraction=0.001).predict([tmp_path / "a", tmp_path / "b"])
