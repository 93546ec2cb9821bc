"""Review 23 (rev-clileft): the merged clileft change, adversarially. A non-finite RunInfo number is
refused where the run is described (the reader now refuses it, so the writer must not write a run.json
its own reader cannot open); ``percent`` says a non-finite fraction instead of raising (``build_report``
with ``fraction=nan`` named the fraction before) and keeps a tiny or negative-zero share honest."""

from __future__ import annotations

import math

import pytest


@pytest.mark.parametrize("field", ["batch_tier", "tokens_per_step", "total_tokens", "batch_size"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_run_info_number_is_refused_where_it_is_given(tmp_path, field, value):
    """Was: RunWriter wrote ``NaN`` / ``Infinity`` into run.json, and open_runs then refused the record."""
    from spectral_lens.records import RunInfo, RunWriter

    with pytest.raises(ValueError, match=rf"RunInfo\.{field} must be"):
        with RunWriter(tmp_path / "r", RunInfo("r", **{field: value}), fsync=False):
            pass
    assert not (tmp_path / "r" / "run.json").exists()


def test_finite_run_info_numbers_still_round_trip(tmp_path):
    """Integer-valued floats, a float tier and null fields load as they did."""
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    info = RunInfo("r", batch_tier=0.5, tokens_per_step=4.0, total_tokens=1000.0, batch_size=None)
    with RunWriter(tmp_path / "r", info, fsync=False):
        pass
    back = RunRecord.open(tmp_path / "r").info
    assert (back.batch_tier, back.tokens_per_step, back.total_tokens, back.batch_size) == (0.5, 4.0, 1000.0, None)


@pytest.mark.parametrize("fraction, text", [
    (math.nan, "nan%"), (math.inf, "inf%"), (-math.inf, "-inf%"),
    (-0.0, "0%"), (1e-300, "1e-298%"), (-1e-300, "-1e-298%"),
    (0.2, "20%"), (0.001, "0.1%"), (0.0005, "0.05%"), (1.5, "150%"), (0.0, "0%"),
])
def test_percent_edge_cases(fraction, text):
    from spectral_lens.analysis.tier_predictor import percent

    assert percent(fraction) == text


@pytest.mark.parametrize("fraction", [math.nan, math.inf])
def test_build_report_non_finite_fraction_names_the_fraction(tmp_path, fraction):
    """Was "cannot convert float NaN to integer" (and an OverflowError, not a ValueError, for inf)."""
    from spectral_lens.records import RunInfo, RunWriter
    from spectral_lens.report import build_report

    for rid, tier in (("a", 1), ("b", 2)):
        with RunWriter(tmp_path / rid, RunInfo(rid, family="f", batch_tier=tier, total_tokens=1000), fsync=False):
            pass
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", fraction=fraction, plots=False)


def test_unknown_option_before_and_after_the_command_each_named_by_its_owner(tmp_path, capsys):
    """Was "spectral-lens: error: unrecognized arguments: --foo --foo": the one after the command is the
    command's, and the program's error names only its own."""
    from spectral_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--foo", "predict", str(tmp_path), "--foo"])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err == ["spectral-lens: error: unrecognized arguments: --foo"], err
