"""Review 24 (cli): the CLI's and readers' last small wrong outputs. A run id holding ``:`` can be the first
run of ``--transition`` (the ``:`` that leaves two known run ids splits it; two such splits are refused,
naming both readings); ``percent`` of a huge share is not 300 digits and NumPy float32 values print
without the sign of a rounded zero; a ``run.json`` with ``tokens_per_step`` / ``batch_size`` of 0 or less
is refused naming the file and field; a swapped recorded head window stops the taxonomy naming the run
and its run.json instead of becoming NaN."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from support.cli import run_cli


def _make_run(root, run_id, tier=1, dirname=None):
    """A run directory (``root/dirname``) with five measurements of a power-law activation spectrum."""
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.records import RunInfo, RunWriter

    values = np.arange(1, 301, dtype=np.float64) ** -(1.5 + 0.1 * tier)
    info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=1000, n_layer=12)
    path = root / (dirname or run_id)
    with RunWriter(path, info, fsync=False, tail_window=(10, 40), head_window=(10, 40)) as w:
        for k in range(1, 6):
            spec = Spectrum(torch.tensor(values), n_rows=1000, dim=len(values))
            w.log_measurement(k, 100 * k, {"act": spec}, val_loss=3.0 - 0.1 * k)
    return path


def _edit_header(run_dir, edit):
    path = run_dir / "run.json"
    header = json.loads(path.read_text())
    edit(header)
    path.write_text(json.dumps(header))
    return path


# ---- 1. --transition with run ids that hold ':' ----------------------------------------------------


def test_transition_first_run_id_with_a_colon(tmp_path):
    """Was "no run with id 'exp'": the text was split at its first ':' whatever the runs were called."""
    a, b = _make_run(tmp_path, "exp:1", 1, "e1"), _make_run(tmp_path, "exp:2", 2, "e2")
    status, out, err = run_cli(["report", a, b, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                                "--transition", "exp:1:exp:2"])
    assert status == 0, err
    assert "| exp:1 → exp:2 |" in (tmp_path / "out" / "report.md").read_text()


def test_transition_ambiguous_split_is_refused_naming_both_readings(tmp_path):
    """Runs a, b:c, a:b and c: "a:b:c" reads two ways; it was taken as a -> b:c without a word."""
    runs = [_make_run(tmp_path, rid, t, f"r{t}") for t, rid in enumerate(["a", "b:c", "a:b", "c"], 1)]
    status, out, err = run_cli(["report", *runs, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                                "--transition", "a:b:c"])
    assert status == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("spectral-lens report: error: --transition 'a:b:c' is ambiguous"), err
    assert "'a' -> 'b:c'" in err[0] and "'a:b' -> 'c'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_transition_with_no_known_split_names_the_run_ids(tmp_path):
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    status, out, err = run_cli(["report", a, b, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                                "--transition", "x:y:z"])
    assert status == 2 and out == "" and len(err) == 1, err
    assert "'x:y:z'" in err[0] and "run ids: ['a', 'b']" in err[0], err


def test_split_transition_rule():
    from spectral_lens.cli import _split_transition

    assert _split_transition("a:b", {"a", "b"}) == ("a", "b")
    assert _split_transition("a:b", {"x"}) == ("a", "b")  # one reading: the report names the unknown id
    assert _split_transition("exp:1:exp:2", {"exp:1", "exp:2", "exp"}) == ("exp:1", "exp:2")
    assert _split_transition("x:x:y", {"x:x", "y", "x"}) == ("x:x", "y")
    assert _split_transition("a::b", {"a:", "b"}) == ("a:", "b")
    with pytest.raises(ValueError, match="no ':' in it splits it into two run ids"):
        _split_transition("x:x:x", {"x:x"})
    with pytest.raises(ValueError, match="ambiguous"):
        _split_transition("x:x:x", {"x", "x:x"})  # x -> x:x or x:x -> x
    with pytest.raises(ValueError, match="ambiguous"):
        _split_transition("x:x:y", {"x", "x:x", "y", "x:y"})  # x -> x:y or x:x -> y


@pytest.mark.parametrize("text, why", [("ab", "RUN_A:RUN_B"), (":ab", "RUN_A:RUN_B"), ("a:a", "two different runs")])
def test_transition_form_is_checked_before_anything_is_read(tmp_path, text, why):
    status, out, err = run_cli(["report", tmp_path / "missing", "--out", tmp_path / "out", "--transition", text])
    assert status == 2 and out == "" and len(err) == 1 and why in err[0] and repr(text) in err[0], err


# ---- 2. numbers: huge, tiny, NumPy float32, negative zero ----------------------------------------------


@pytest.mark.parametrize("fraction, text", [
    (1e300, "1e+302%"), (-1e300, "-1e+302%"), (1e4, "1e+06%"), (99.99, "9999%"),
    (np.float32(0.2), "20%"), (np.float32(-0.0), "0%"), (np.float64(1e-300), "1e-298%"),
])
def test_percent_huge_and_numpy(fraction, text):
    """percent(1e300) printed 303 digits."""
    from spectral_lens.analysis.efficiency import percent

    assert percent(fraction) == text


def test_fmt_and_num_numpy_float32_and_huge():
    """np.float32 is not a float: "-0.0000" for -0.00004, "nan"/"inf" in the report for NaN/inf; 1e300 in a
    ".4f" column was 305 characters."""
    from spectral_lens.cli import _fmt
    from spectral_lens.report import _num

    tiny = np.float32(-0.00004)
    assert _fmt(tiny) == "0.0000" and _fmt(tiny, "+.3f") == "+0.000"
    assert _num(tiny, ".4f") == "0.0000" and _num(tiny, "+.3f") == "+0.000"
    assert _num(np.float32("nan")) == "–" and _num(np.float32("inf"), ".3f") == "not reached"
    assert _fmt(np.float32("nan")) == "nan"
    assert _fmt(1e300) == "1e+300" and _num(-1e300, ".3f") == "-1e+300" and _fmt(1e300, "+.3f") == "+1e+300"
    assert _fmt(np.float32(-0.5)) == "-0.5000" and _fmt(123.456, ".2f") == "123.46"  # ordinary values unchanged
    assert _fmt(3) == "3.0000" and _num(np.int64(7)) == "7"


def test_score_flags_rho_that_rounds_to_zero_keeps_its_digit():
    """"ρ = -0.00 is negative" read as a contradiction."""
    from spectral_lens.report import score_flags

    score = SimpleNamespace(within={"f": SimpleNamespace(rho=-0.004, pvalue=0.9, n=10)})
    flags = score_flags(score)
    assert "ρ = -0.004 is negative" in flags[0] and "a ρ of -0.004 could be chance" in flags[1], flags
    score = SimpleNamespace(within={"f": SimpleNamespace(rho=-0.0, pvalue=0.9, n=10)})
    assert "a ρ of 0.00 could be chance" in score_flags(score)[0]
    score = SimpleNamespace(within={"f": SimpleNamespace(rho=-0.5, pvalue=0.9, n=10)})
    assert "ρ = -0.50 is negative" in score_flags(score)[0]


# ---- 3. tokens_per_step / batch_size of 0 or less in run.json ------------------------------------------


@pytest.mark.parametrize("field", ["tokens_per_step", "batch_size"])
@pytest.mark.parametrize("value", [-8, -0.5])
def test_non_positive_count_in_run_json_is_refused(tmp_path, field, value):
    """Was read as given: batch_size -1 fed the noise-scale baseline. (A 0, which RunInfo took before, reads as
    unknown with a warning: test_review24_revcli.)"""
    from spectral_lens.records import RecordFormatError, RunRecord

    a = _make_run(tmp_path, "a")
    run_json = _edit_header(a, lambda h: h.update({field: value}))
    with pytest.raises(RecordFormatError, match=rf"{run_json}: run metadata field '{field}' must be a positive number, "
                                                rf"got {value}"):
        RunRecord.open(a)
    status, out, err = run_cli(["inspect", a])
    assert status == 2 and out == "" and err == [
        f"spectral-lens inspect: error: {run_json}: run metadata field '{field}' must be a positive number, got {value}"
    ], err


@pytest.mark.parametrize("field", ["tokens_per_step", "batch_size"])
def test_non_positive_count_is_refused_where_it_is_given(tmp_path, field):
    """So that the writer never writes a run.json its reader refuses."""
    from spectral_lens.records import RunInfo, RunWriter

    with pytest.raises(ValueError, match=rf"RunInfo\.{field} must be positive, got 0"):
        with RunWriter(tmp_path / "r", RunInfo("r", **{field: 0}), fsync=False):
            pass
    assert not (tmp_path / "r" / "run.json").exists()
    assert RunInfo("r", tokens_per_step=1, batch_size=0.5).batch_size == 0.5


# ---- 4. a swapped recorded head window -----------------------------------------------------------------


def _swap_head(run_dir):
    return _edit_header(run_dir, lambda h: h["summary_windows"].update(head=[40, 10]))


def test_swapped_recorded_head_window_report_names_the_run_and_file(tmp_path):
    """Was a report with Δα_head "–": alpha_head NaN, the transition without activation-head evidence."""
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    run_json = _swap_head(b)
    status, out, err = run_cli(["report", a, b, "--out", tmp_path / "out", "--no-plots", "--target-loss", "2.75",
                                "--transition", "a:b"])
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"spectral-lens report: error: run 'b': {run_json} records head window [40, 10], "
                             "not 1-based ranks LO < HI"), err
    status, _, err = run_cli(["report", a, b, "--out", tmp_path / "out2", "--no-plots"])  # no taxonomy: not read
    assert status == 0, err


def test_swapped_head_window_api(tmp_path):
    from spectral_lens.analysis.taxonomy import transition_evidence
    from spectral_lens.records import RunRecord

    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    ra, rb = RunRecord.open(a), RunRecord.open(b)
    ev = transition_evidence(ra, rb, 2.75)
    assert math.isfinite(ev.d_alpha_head) and ev.details["head_window"] == (10, 40)
    for kw in (dict(head_window=(40, 10)), dict(gradient_window=(40, 10))):  # given swapped: NaN before
        with pytest.raises(ValueError, match=r"transition_evidence: \w+_window=\(40, 10\): need 1 <= lo < hi"):
            transition_evidence(ra, rb, 2.75, **kw)
    _swap_head(a)
    ra = RunRecord.open(a)
    with pytest.raises(ValueError, match=r"run 'a': .*run\.json records head window \[40, 10\]"):
        transition_evidence(ra, rb, 2.75)
    assert transition_evidence(ra, rb, 2.75, head_window=(10, 40)).d_alpha_head == ev.d_alpha_head


def test_swapped_recorded_head_window_inspect_says_it(tmp_path):
    """inspect FILE.npz fitted alpha_head on the default [10, 40] without a word (the tail one is said)."""
    a = _make_run(tmp_path, "a")
    run_json = _swap_head(a)
    npz = sorted((a / "spectra").glob("*.npz"))[0]
    status, out, err = run_cli(["inspect", npz])
    assert status == 0 and err == [], err
    assert (f"  head window: ranks [10, 40] (the default; {run_json} records head window [40, 10], not 1-based "
            "ranks LO < HI)") in out, out
    assert "alpha_head [10, 40]: " in out
    _make_run(tmp_path, "b")
    status, out, err = run_cli(["inspect", sorted((tmp_path / "b" / "spectra").glob("*.npz"))[0]])
    assert status == 0 and "head window:" not in out, out


def test_huge_batch_tier_prints_in_g_form(tmp_path):
    """A finite batch_tier 1e300 in run.json printed as int(1e300), 301 digits, in the report's tables and
    in the analyses' notes."""
    from spectral_lens.analysis.efficiency import _tier_text
    from spectral_lens.report import _tier

    for tier_text in (_tier, _tier_text):
        assert tier_text(1e300) == "1e+300" and tier_text(8.0) == "8" and tier_text(0.5) == "0.5"
        assert tier_text(np.float32(4)) == "4" and tier_text(2 ** 40) == "1099511627776" and tier_text(None) == "?"
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    _edit_header(b, lambda h: h.update(batch_tier=1e300))
    status, out, err = run_cli(["report", a, b, "--out", tmp_path / "out", "--no-plots"])
    assert status == 0, err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 1e+300 |" in text and "0" * 30 not in text, text


# ---- 5. warnings once; an n_layer that is not a depth named with its run --------------------------------


def _no_tail_window(run_dir, n_layer=None):
    return _edit_header(run_dir, lambda h: (h.update(n_layer=n_layer), h["summary_windows"].update(tail=None)))


@pytest.mark.parametrize("command", ["predict", "report"])
def test_each_warning_line_once(tmp_path, command):
    """A run without a tail window or n_layer: its warning came twice in predict, three times in report."""
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    for r in (a, b):
        _no_tail_window(r)
    extra = ["--out", tmp_path / "out", "--no-plots"] if command == "report" else []
    status, out, err = run_cli([command, a, b, *extra])
    assert status == 0, err
    warned = [x for x in err if "no recorded tail window" in x]
    assert len(warned) == 2 and "run 'a'" in warned[0] and "run 'b'" in warned[1], err
    assert all(x.startswith(f"spectral-lens {command}: warning: ") for x in err), err


def test_n_layer_below_one_names_the_run_and_file(tmp_path):
    """Was "error: n_layer must be >= 1, got -3": no run, no file."""
    a, b = _make_run(tmp_path, "a", 1), _make_run(tmp_path, "b", 2)
    run_json = _no_tail_window(b, -3)
    status, out, err = run_cli(["predict", a, b])
    assert status == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"spectral-lens predict: error: run 'b': {run_json}: n_layer must be >= 1, got -3"), err
    assert "--window LO HI" in err[0]


def test_inspect_run_says_a_swapped_recorded_window(tmp_path):
    """inspect RUN showed "tail ranks [5, 3], head ranks [40, 10]" as if they were windows."""
    a = _make_run(tmp_path, "a")
    _edit_header(a, lambda h: h["summary_windows"].update(tail=[5, 3], head=[40, 10]))
    status, out, err = run_cli(["inspect", a])
    assert status == 0 and err == [], err
    assert ("  summary windows: tail ranks [5, 3] (not 1-based ranks LO < HI: predict and report stop on it), "
            "head ranks [40, 10] (not 1-based ranks LO < HI: a report's --transition stops on it) (run.json)") in out, out
