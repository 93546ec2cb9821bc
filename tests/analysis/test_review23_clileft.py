"""Review 23 (clileft): leftovers of the CLI and the record reader. A run.json whose tail window is not
1-based ranks LO < HI stops predict and report with the run and its file named (inspect still shows it);
a non-finite number in run.json is refused naming the file and the field; ``--transition a:a`` is
refused; a value that rounds to zero prints without a sign; ``inspect FILE.npz`` says a run.json
problem even when the d12 window does not fit; a dangling ``--out`` link and an unknown option before
the command are named as what they are; a tiny coverage is not "0%"."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
from support.cli import run_cli


_run = run_cli


def _make_run(root, run_id, tier=1, values=None, total_tokens=1000, tail_window=(10, 40)):
    """A run directory with five measurements of one activation spectrum (a power law by default)."""
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.records import RunInfo, RunWriter

    values = np.arange(1, 301, dtype=np.float64) ** -1.5 if values is None else np.asarray(values, dtype=np.float64)
    info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=total_tokens, n_layer=12)
    with RunWriter(root / run_id, info, fsync=False, tail_window=tail_window) as w:
        for k in range(1, 6):
            spec = Spectrum(torch.tensor(values), n_rows=1000, dim=len(values))
            w.log_measurement(k, 100 * k, {"act": spec}, val_loss=3.0 - 0.1 * k)
    return root / run_id


def _edit_run_json(run_dir, text_edit=None, **fields):
    path = run_dir / "run.json"
    header = json.loads(path.read_text())
    header.update(fields)
    text = json.dumps(header)
    if text_edit is not None:
        text = text_edit(text)
    path.write_text(text)
    return path


def _swap_tail(run_dir):
    path = run_dir / "run.json"
    header = json.loads(path.read_text())
    header["summary_windows"]["tail"] = [5, 3]
    path.write_text(json.dumps(header))
    return path


# ---- 1. a recorded tail window that is not LO < HI ------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "report"])
def test_swapped_recorded_tail_window_names_the_run_and_file(tmp_path, command):
    """Was "BandAlphaFitter: windows (5, 3): need 1 <= lo < hi ...", naming neither run nor file."""
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    run_json = _swap_tail(a)
    extra = ["--out", tmp_path / "out", "--no-plots"] if command == "report" else []
    status, _, err = _run([command, a, b, *extra])
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"spectral-lens {command}: error: run 'a': {run_json} records tail window [5, 3]"), err
    assert "--window LO HI" in err[0]
    # --window replaces the recorded window: the run is usable
    status, _, err = _run([command, a, b, "--window", "10", "40", *extra])
    assert status == 0, err


def test_swapped_recorded_tail_window_api_error_names_the_run(tmp_path):
    from spectral_lens.analysis import resolve_window
    from spectral_lens.records import RunRecord

    a = _make_run(tmp_path, "a")
    _swap_tail(a)
    run = RunRecord.open(a)
    with pytest.raises(ValueError, match=r"run 'a': .*run\.json records tail window \[5, 3\]"):
        resolve_window(run)
    assert resolve_window(run, (10, 40)) == (10, 40)


def test_swapped_recorded_tail_window_inspect_still_works(tmp_path):
    """The reader keeps such a run.json readable: inspect is where the user looks at it."""
    a = _make_run(tmp_path, "a")
    run_json = _swap_tail(a)
    status, out, err = _run(["inspect", a])
    assert status == 0 and err == [], err
    assert "summary windows: tail ranks [5, 3]" in out
    npz = sorted((a / "spectra").glob("*.npz"))[0]
    status, out, err = _run(["inspect", npz])
    assert status == 0 and err == [], err
    assert f"{run_json} records tail window [5, 3], not 1-based ranks LO < HI" in out


# ---- 2. non-finite numbers in run.json ------------------------------------------------------------


@pytest.mark.parametrize("field", ["batch_tier", "tokens_per_step", "total_tokens", "batch_size"])
@pytest.mark.parametrize("raw", ["1e400", "-1e400", "NaN", "Infinity"])
def test_non_finite_run_json_number_is_refused(tmp_path, field, raw):
    """``json`` reads 1e400 as inf (and accepts NaN / Infinity): batch_tier 1e400 was "one tier (inf)"."""
    from spectral_lens.records import RecordFormatError, RunRecord

    a = _make_run(tmp_path, "a")
    run_json = _edit_run_json(a, text_edit=lambda t: t.replace(f'"{field}": 12345', f'"{field}": {raw}'),
                              **{field: 12345})
    assert f'"{field}": {raw}' in run_json.read_text()
    with pytest.raises(RecordFormatError, match=rf"{run_json}: run metadata field '{field}'"):
        RunRecord.open(a)


@pytest.mark.parametrize("field", ["seed", "n_layer"])
def test_non_finite_integer_fields_are_refused(tmp_path, field):
    """seed and n_layer are integers: 1e400 (a float) is the wrong type (covered before this review)."""
    from spectral_lens.records import RecordFormatError, RunRecord

    a = _make_run(tmp_path, "a")
    _edit_run_json(a, text_edit=lambda t: t.replace(f'"{field}": 12345', f'"{field}": 1e400'), **{field: 12345})
    with pytest.raises(RecordFormatError, match=field):
        RunRecord.open(a)


def test_infinite_batch_tier_predict_is_one_line_naming_the_file(tmp_path):
    a = _make_run(tmp_path, "a")
    run_json = _edit_run_json(a, text_edit=lambda t: t.replace('"batch_tier": 1,', '"batch_tier": 1e400,'))
    status, out, err = _run(["predict", a])
    assert status == 2 and out == "" and err == [
        f"spectral-lens predict: error: {run_json}: run metadata field 'batch_tier' must be a finite number, got inf"
    ], err


# ---- 3. --transition a:a ----------------------------------------------------------------------------


def test_transition_of_a_run_with_itself_is_refused(tmp_path):
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    status, out, err = _run(["report", a, b, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                             "--transition", "a:a"])
    assert status == 2 and out == "" and len(err) == 1 and "two different runs" in err[0] and "'a:a'" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- 4. no "-0.0000" --------------------------------------------------------------------------------

_NEG_ZERO = re.compile(r"(?<![+\w])-0(\.0+)?(?![.\d])")  # "-0", "-0.0000"; not "+-0.032" nor "-0.5"


def test_fmt_drops_the_sign_of_a_rounded_zero():
    from spectral_lens.cli import _fmt
    from spectral_lens.report import _num

    for fmt in (_fmt, lambda v, s: _num(v, s)):
        assert fmt(-0.0, ".4f") == "0.0000"
        assert fmt(-1e-7, ".4f") == "0.0000"
        assert fmt(-0.0, ".4g") == "0"
        assert fmt(-0.0, "+.3f") == "+0.000"
        assert fmt(-0.001, ".4f") == "-0.0010"  # a real negative value keeps its sign
        assert fmt(-0.0, ".0%") == "-0%" or fmt(-0.0, ".0%") == "0%"  # a suffixed spec does not raise
    assert _fmt(math.nan) == "nan"


def test_flat_spectrum_prints_zero_without_sign(tmp_path):
    """A flat spectrum's fitted slope is -0.0: inspect printed "alpha_tail [10, 40]: -0.0000", inspect RUN
    "alpha_tail=-0", and predict's and report's tables "-0.0000"."""
    flat = np.ones(300)
    a, b = _make_run(tmp_path, "a", 1, values=flat), _make_run(tmp_path, "b", 2, values=flat)
    npz = sorted((a / "spectra").glob("*.npz"))[0]
    for argv in (["inspect", npz], ["inspect", a], ["predict", a, b, "--target-loss", "2.75"]):
        status, out, err = _run(argv)
        assert status == 0, err
        assert not _NEG_ZERO.search(out), out
    assert "alpha_tail [10, 40]: 0.0000" in _run(["inspect", npz])[1]
    status, _, err = _run(["report", a, b, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                           "--transition", "a:b"])
    assert status == 0, err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 0.0000 |" in text and not _NEG_ZERO.search(text), text


# ---- 5. inspect FILE.npz says a run.json problem whether or not the window fits ------------------


@pytest.mark.parametrize("problem", ["swapped", "unreadable"])
def test_inspect_short_spectrum_names_a_run_json_problem(tmp_path, problem):
    """A 50-eigenvalue spectrum: the d12 window [100, 200] does not fit, and no "tail window:" line was
    printed at all, hiding that the run's run.json cannot be read or records a swapped window."""
    a = _make_run(tmp_path, "a", values=np.arange(1, 51, dtype=np.float64) ** -1.5)
    run_json = a / "run.json"
    if problem == "swapped":
        _swap_tail(a)
        expected = f"{run_json} records tail window [5, 3], not 1-based ranks LO < HI"
    else:
        run_json.write_text("{not json")
        expected = f"{run_json} cannot be read: "
    npz = sorted((a / "spectra").glob("*.npz"))[0]
    status, out, err = _run(["inspect", npz])
    assert status == 0 and err == [], err
    line = next((x for x in out.splitlines() if x.startswith("  tail window: ")), None)
    assert line is not None and expected in line, out
    assert "alpha_tail [100, 200]: not fitted" in out


def test_inspect_short_spectrum_outside_a_run_stays_quiet(tmp_path):
    """A file outside a run, the d12 default not fitting: nothing to say (unchanged)."""
    import torch

    from spectral_lens import Spectrum

    path = tmp_path / "s.npz"
    Spectrum(torch.tensor(np.arange(1, 51, dtype=np.float64) ** -1.5), n_rows=1000, dim=50).save(path)
    status, out, err = _run(["inspect", path])
    assert status == 0 and err == [], err
    assert "tail window:" not in out and "alpha_tail" not in out, out


# ---- 6. --out a dangling symlink --------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_out_dangling_symlink_is_named(tmp_path, nested):
    """Was "spectral-lens report: error: OUT: File exists" (mkdir's word for a dangling link)."""
    a = _make_run(tmp_path, "a")
    link = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", link)
    out_dir = link / "sub" if nested else link
    status, _, err = _run(["report", a, "--out", out_dir, "--no-plots"])
    assert status == 2 and len(err) == 1, err
    assert f"'{link}' is a symbolic link to a path that does not exist" in err[0], err
    assert not (tmp_path / "nowhere").exists()


# ---- 7. an unknown option before the command ------------------------------------------------------


def test_unknown_option_before_the_command_is_the_programs(tmp_path):
    status, _, err = _run(["--foo", "predict", tmp_path])
    assert status == 2 and err == ["spectral-lens: error: unrecognized arguments: --foo"], err
    # after the command it is the command's (unchanged)
    status, _, err = _run(["predict", tmp_path, "--foo"])
    assert status == 2 and err == ["spectral-lens predict: error: unrecognized arguments: --foo"], err


# ---- percent: a tiny coverage is not "0%" ----------------------------------------------------------


def test_tiny_coverage_is_not_zero_percent(tmp_path):
    """A run with records to 0.05% of its budget: inspect's status and report's status column said
    "ends at 0% of budget"."""
    from spectral_lens.records import RunRecord
    from spectral_lens.report import run_status

    c = _make_run(tmp_path, "c", total_tokens=10**6)
    assert run_status(RunRecord.open(c)) == "ends at 0.05% of budget"
    status, out, err = _run(["inspect", c])
    assert status == 0 and err == [] and "  status: ends at 0.05% of budget" in out.splitlines(), out


def test_divergence_early_in_a_long_budget_is_not_zero_percent(tmp_path):
    """divergence() said "(300 tokens, 0% of its token budget)" (``:.0%``); inspect prints it as the
    status, predict and report as a note."""
    from spectral_lens.analysis.efficiency import divergence
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    info = RunInfo("d", family="f", batch_tier=1, total_tokens=10**6)
    with RunWriter(tmp_path / "d", info, fsync=False) as w:
        for k, loss in enumerate([3.0, 2.9, float("nan"), float("nan"), float("nan")], 1):
            w.log(k, 100 * k, val_loss=loss)
    why = divergence(RunRecord.open(tmp_path / "d"))
    assert why is not None and "(300 tokens, 0.03% of its token budget)" in why, why
    status, out, err = _run(["inspect", tmp_path / "d"])
    assert status == 0 and "0.03% of its token budget" in out, (out, err)


def test_short_run_warning_is_not_zero_percent(tmp_path):
    """A run cut short at 0.05% of its budget that never reached the target: the warning said "has records
    to 0% of its token budget"."""
    from spectral_lens.analysis.efficiency import token_inefficiency
    from spectral_lens.records import RunRecord

    a = RunRecord.open(_make_run(tmp_path, "a", 1, total_tokens=10**6))
    b = RunRecord.open(_make_run(tmp_path, "b", 2, total_tokens=1000))
    with pytest.warns(Warning) as caught:
        token_inefficiency([a, b], 1.0)
    texts = [str(w.message) for w in caught]
    assert any("run 'a' has records to 0.05% of its token budget" in t for t in texts), texts
