"""Reader views, score cautions and a CLI boundary the suite did not pin (found by hand mutation
testing; each mutant named below passed the suite):

* ``RunRecord.throughput``: the median after dropping ``floor(warmup * n)`` events (``ceil`` and
  the mean passed: the suite logged one constant throughput);
* ``RunRecord.progress``: ``tokens / total_tokens`` when no progress is stored (``step`` passed);
* ``score_flags``: "a negative rho", "fewer than MIN_TIERS", "p > MAX_PVALUE" (``<= 0``, ``<=`` and
  ``>=`` passed);
* ``--window LO HI`` needs ``LO < HI`` (``LO <= HI`` passed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from spectral_lens.analysis.tier_predictor import FamilyScore, PredictionScore
from spectral_lens.cli import main
from spectral_lens.records import Measurement, RunInfo, RunRecord
from spectral_lens.report import MAX_PVALUE, MIN_TIERS, score_flags


def _events(values):
    return [{"step": i, "tokens": 100 * i, "tokens_per_s": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("warmup", [0.1, 0.3, 0.5])
def test_throughput_is_the_median_after_the_warmup_events(warmup):
    values = [100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 60.0]
    run = RunRecord(Path("."), RunInfo("r"), _events(values), [], {})
    skip = math.floor(warmup * len(values))  # 0, 2, 3
    assert run.throughput(warmup) == float(np.median(values[skip:]))
    assert run.throughput() == 4.0  # default warmup 0.1 of 7 events drops none


def test_progress_without_a_stored_value_is_tokens_over_the_budget():
    ms = [Measurement(step=10, tokens=2500), Measurement(step=20, tokens=5000, progress=0.75)]
    run = RunRecord(Path("."), RunInfo("r", total_tokens=10_000), [], ms, {})
    assert run.progress(ms[0]) == 0.25 and run.progress(ms[1]) == 0.75
    assert RunRecord(Path("."), RunInfo("r"), [], ms, {}).progress(ms[0]) is None


def _score(rho, p, n):
    return PredictionScore("alpha_tail", rho, p, n, {"f": FamilyScore(rho, p, n)}, rho, ())


def test_score_flags_at_their_boundaries():
    assert score_flags(_score(0.0, 0.01, MIN_TIERS)) == []  # zero is not negative
    assert score_flags(_score(0.9, MAX_PVALUE, MIN_TIERS)) == []  # p equal to the limit is not above it
    flags = score_flags(_score(-0.25, 0.01, MIN_TIERS))
    assert len(flags) == 1 and "negative" in flags[0]
    flags = score_flags(_score(0.9, 0.01, MIN_TIERS - 1))
    assert len(flags) == 1 and "underpowered" in flags[0] and f"only {MIN_TIERS - 1} runs" in flags[0]
    flags = score_flags(_score(0.9, MAX_PVALUE * 1.5, MIN_TIERS))
    assert len(flags) == 1 and "underpowered" in flags[0]


def test_cli_window_with_equal_ends_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path), "--window", "5", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--window" in err and "5 5" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("rel", ["../outside.npz", "spectra/../../outside.npz", "OUTSIDE_ABS"])
def test_a_spectrum_file_outside_the_run_directory_is_refused(tmp_path, rel):
    """A measurement line may only name files inside its run directory (the ``..`` check survived
    mutation: only the absolute-path half was exercised, and not even that)."""
    import json
    import warnings

    from spectral_lens import Spectrum
    from spectral_lens.records import RecordFormatError, RecordWarning, RunWriter

    spec = Spectrum(np.array([3.0, 2.0, 1.0]), n_rows=10, dim=3)
    with RunWriter(tmp_path / "sweep" / "r", RunInfo("r", total_tokens=100), fsync=False) as w:
        w.log_measurement(1, 10, {"act": spec})
        w.log_measurement(2, 20, {"act": spec})
    outside = tmp_path / "sweep" / "outside.npz"  # a real spectrum file, one level above the run
    spec.save(outside)
    rel = str(outside) if rel == "OUTSIDE_ABS" else rel
    mfile = tmp_path / "sweep" / "r" / "measurements.jsonl"
    lines = [json.loads(x) for x in mfile.read_text().splitlines()]
    lines[1]["spectra"]["act"]["file"] = rel
    mfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RecordFormatError, match="line 2.*relative to the run directory"):
        RunRecord.open(tmp_path / "sweep" / "r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = RunRecord.open(tmp_path / "sweep" / "r", errors="skip")
    assert [m.step for m in run.measurements] == [1]  # the bad line costs that line only
    assert sum(issubclass(c.category, RecordWarning) for c in caught) == 1
