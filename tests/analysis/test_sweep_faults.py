"""A batch sweep with faulty runs: diverged, cut short, measured at another layer / on another pool /
with another token budget, and two runs of one tier.

Before: one run cut short (or diverged) before 20%, or one degenerate spectrum there, made
``spectral-lens predict`` fail for the whole sweep (exit 2) and the report drop every prediction; a
diverged run was ranked by its early alpha like any other (here: recommended); a run cut short
before the target got ``eps_tok = inf`` (ranked as the slowest); runs measured at different layers
were compared without a word; different pools and budgets were not mentioned; the controller waited
forever for a diverged tier.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest

from spectral_lens.analysis import (
    COMPLETE_COVERAGE,
    FractionNotReachedError,
    SpectrumMismatchError,
    SweepController,
    SweepWarning,
    TailPredictor,
    alpha_trajectory,
    coverage,
    early_alpha,
    token_inefficiency,
    tokens_to_target,
)
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import open_runs
from spectral_lens.report import build_report, sweep_notes
from spectral_lens.spectrum import Spectrum

TARGET = 2.95  # reached by every tier of the base sweep, in the order of its early alpha_tail: b4, b8, b2, b16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "base"
    write_theorem6_sweep(root, (2, 4, 8, 16), family="toy", dim=128, grad_dim=64, n_measure=10, n_eval=20,
                         tail_window=(10, 40))
    return root


def _copy(base, tmp_path):
    d = tmp_path / "sweep"
    shutil.copytree(base, d)
    return d


def _rewrite(path, fn):
    lines = [fn(json.loads(line)) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(o) + "\n" for o in lines if o is not None))


def _progress(o):
    return o.get("progress", o["tokens"] / 1e9)


def _stop_at(run_dir, cut, diverge=False):
    """Drop the measurements after progress ``cut``; events after it are dropped too (preempted) or
    get a NaN loss (``diverge``: the lens refused to measure NaN activations, training went on)."""
    def ev(o):
        if _progress(o) <= cut:
            return o
        if not diverge:
            return None
        return {k: (math.nan if k in ("val_loss", "train_loss") else v) for k, v in o.items()}
    _rewrite(run_dir / "log.jsonl", ev)
    _rewrite(run_dir / "measurements.jsonl", lambda o: o if _progress(o) <= cut else None)


def _respectrum(run_dir, fn, start=0.0):
    for line in (run_dir / "measurements.jsonl").read_text().splitlines():
        o = json.loads(line)
        if _progress(o) >= start:
            for e in o["spectra"].values():
                s = Spectrum.load(run_dir / e["file"])
                Spectrum(fn(s.values.numpy().copy()), n_rows=s.n_rows, dim=s.dim, kind=s.kind, source=s.source).save(
                    run_dir / e["file"])


def _table_tiers(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.strip()[:1].isdigit()]


# ---- diverged ---------------------------------------------------------------------------------------


def test_a_diverged_run_is_left_out_with_a_note_not_recommended(base, tmp_path):
    d = _copy(base, tmp_path)
    # tier 16 diverges at 30%: its loss turns NaN, and around 20% its spectrum went flat (tiny alpha)
    _respectrum(d / "toy-b16", lambda v: np.arange(1, v.size + 1, dtype=np.float64) ** -0.3, start=0.1)
    _stop_at(d / "toy-b16", 0.3, diverge=True)
    with pytest.warns(SweepWarning, match=r"run 'toy-b16' \(tier 16\) diverged: val_loss nan at step \d+"):
        pred = TailPredictor().fit(open_runs([d]))
    rk = pred.predict()["toy"]
    assert 16 not in rk.tiers and rk.recommended == 4  # before: tier 16 recommended (flattest tail)
    assert set(pred.excluded_) == {"toy-b16"} and "diverged" in pred.excluded_["toy-b16"]
    score = pred.score(targets=TARGET)
    assert score.n == 3 and score.within["toy"].rho == pytest.approx(1.0)


def test_cli_predict_names_the_diverged_run_in_one_line(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b8", 0.1, diverge=True)  # diverged before 20%: no measurement there
    assert main(["predict", str(d), "--target-loss", str(TARGET)]) == 0  # before: exit 2, nothing ranked
    out, err = capsys.readouterr()
    assert _table_tiers(out) == [4, 2, 16]
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "run 'toy-b8' (tier 8) diverged: val_loss nan" in notes[0], out
    assert main(["predict", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["excluded"]) == ["toy-b8"] and "diverged" in data["excluded"]["toy-b8"]
    assert [t["tier"] for t in data["families"]["toy"]["tiers"]] == [4, 2, 16]


def test_inspect_says_a_run_diverged_or_was_cut_short(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3, diverge=True)  # the first NaN: the evaluation at 35%
    _stop_at(d / "toy-b2", 0.6)
    status = {}
    for run in ("toy-b16", "toy-b2", "toy-b4"):
        assert main(["inspect", str(d / run)]) == 0
        status[run] = [line.strip() for line in capsys.readouterr().out.splitlines() if "status:" in line]
    assert status["toy-b16"] == ["status: diverged: val_loss nan at step 334 (3.502e+08 tokens, 35% of its token budget)"]
    assert status["toy-b2"] == ["status: ends at 60% of budget"] and status["toy-b4"] == ["status: complete"]


def test_the_controller_stops_a_diverged_tier_instead_of_waiting_for_it(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.1, diverge=True)
    dec = SweepController().decide([d])["toy"]
    assert dec.ready and dec.waiting_tiers == []  # before: not ready, waiting for tier 16 forever
    stop16 = next(x for x in dec.decisions if x.tier == 16)
    assert stop16.action == "stop" and "diverged: val_loss nan" in stop16.reason
    assert dec.decisions[0].tier == 4 and dec.decisions[0].action == "continue"


# ---- cut short ----------------------------------------------------------------------------------------


def test_a_run_cut_short_before_the_fraction_is_left_out_and_the_rest_ranked(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b2", 0.15)  # preempted: last measurement at 10%
    assert main(["predict", str(d)]) == 0  # before: "error: run 'toy-b2': latest measurement ..." and exit 2
    out = capsys.readouterr().out
    assert _table_tiers(out) == [4, 8, 16]
    assert "note: run 'toy-b2': latest measurement is at progress 0.100 < 0.2; left out of the alpha_tail" in out


def test_a_run_cut_short_before_the_target_has_an_unknown_eps_tok_not_inf(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3)  # reaches 2.95 only at 45%: cut short before it
    _stop_at(d / "toy-b2", 0.3, diverge=True)  # diverged before the target: it will never reach it
    runs = open_runs([d])
    with pytest.warns(SweepWarning, match=r"run 'toy-b16' has records to 30% of its token budget and has not reached"):
        eps = token_inefficiency(runs, TARGET)
    assert math.isnan(eps["toy-b16"])  # before: inf, ranked as the slowest tier
    assert eps["toy-b2"] == math.inf
    by_id = {r.run_id: r for r in runs}
    assert eps["toy-b8"] == pytest.approx(tokens_to_target(by_id["toy-b8"], TARGET) / tokens_to_target(by_id["toy-b4"], TARGET))
    with pytest.warns(SweepWarning):
        score = TailPredictor().fit(runs).score(targets=TARGET)
    assert {p[0]: p[4] for p in score.points}.keys() == {"toy-b4", "toy-b8", "toy-b16"}  # toy-b2 diverged: left out
    assert math.isnan({p[0]: p[4] for p in score.points}["toy-b16"])


def test_a_degenerate_spectrum_at_the_fraction_leaves_that_run_out(base, tmp_path):
    d = _copy(base, tmp_path)
    _respectrum(d / "toy-b8", lambda v: np.where(np.arange(v.size) < 3, v, 0.0), start=0.15)  # collapsed to rank 3
    with pytest.warns(SweepWarning, match=r"run 'toy-b8', step \d+: .*zero eigenvalues.*left out of the alpha_tail"):
        pred = TailPredictor().fit(open_runs([d]))  # before: ValueError for the whole sweep
    assert pred.predict()["toy"].tiers == (4, 2, 16)


def test_no_usable_run_is_one_error_naming_every_run(base, tmp_path):
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        _stop_at(d / run, 0.15)
    with pytest.raises(FractionNotReachedError, match=r"no run has a usable alpha_tail at 20%") as info:
        TailPredictor().fit(open_runs([d]))
    assert all(f"run '{r}'" in str(info.value) for r in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"))


def test_the_report_shows_status_and_notes_instead_of_dropping_the_prediction(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.1, diverge=True)
    _stop_at(d / "toy-b2", 0.6)
    rep = build_report([d], tmp_path / "rep", target_loss=TARGET, plots=False)
    assert rep.rankings["toy"].tiers == (4, 8, 2)  # before: "tail predictor not run", no ranking
    text = rep.path.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| toy-b")}
    assert rows["toy-b16"][-1] == "diverged" and rows["toy-b16"][-2] == "left out (see notes)"
    assert rows["toy-b2"][-1] == "ends at 60% of budget" and rows["toy-b4"][-1] == "complete"
    diverged = [n for n in rep.notes if "toy-b16" in n]
    assert len(diverged) == 1 and "diverged" in diverged[0] and "left out of the rankings and scores" in diverged[0]


# ---- mismatched runs --------------------------------------------------------------------------------


def test_runs_measured_at_different_layers_are_refused(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    run = d / "toy-b16"
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, primary_spectrum="act:blocks.5")))
    _rewrite(run / "measurements.jsonl", lambda o: dict(o, spectra={k.replace("blocks.11", "blocks.5"): v
                                                                    for k, v in o["spectra"].items()}))
    with pytest.raises(SpectrumMismatchError, match=r"toy-b16: 'act:blocks.5'; toy-b2, toy-b4, toy-b8: 'act:blocks.11'"):
        TailPredictor().fit(open_runs([d]))  # before: ranked, blocks.5 against blocks.11
    for cmd in (["predict", str(d)], ["report", str(d), "--out", str(tmp_path / "rep"), "--no-plots"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "different spectra" in err and "toy-b16: 'act:blocks.5'" in err
    assert not (tmp_path / "rep" / "report.md").exists()


def test_different_pools_and_budgets_are_flagged_naming_runs_and_values(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    for line in (d / "toy-b16" / "measurements.jsonl").read_text().splitlines():  # the same values from a quarter of the rows
        for e in json.loads(line)["spectra"].values():
            s = Spectrum.load(d / "toy-b16" / e["file"])
            Spectrum(s.values, n_rows=s.n_rows // 4, dim=s.dim, kind=s.kind, source=s.source).save(d / "toy-b16" / e["file"])
    info = json.loads((d / "toy-b8" / "run.json").read_text())
    (d / "toy-b8" / "run.json").write_text(json.dumps(dict(info, total_tokens=2 * info["total_tokens"])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = TailPredictor().fit(open_runs([d]))
    flags = [str(w.message) for w in caught if issubclass(w.category, SweepWarning)]
    assert flags == pred.flags_ and len(flags) == 2  # before: no attribute, no warning
    assert "toy-b16, toy-b2, toy-b4: 1000000000; toy-b8: 2000000000" in flags[0] and "token budgets" in flags[0]
    assert "toy-b16: 16384; toy-b2, toy-b4, toy-b8: 65536" in flags[1] and "probe rows" in flags[1]
    assert main(["predict", str(d)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "token budgets" in notes[0] and "probe rows" in notes[1]


def test_two_runs_of_one_tier_are_averaged_and_both_listed(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    shutil.copytree(d / "toy-b8", d / "toy-b8-s1")
    _respectrum(d / "toy-b8-s1", lambda v: v * np.arange(1, v.size + 1, dtype=np.float64) ** -0.1)  # alpha + 0.1
    info = json.loads((d / "toy-b8-s1" / "run.json").read_text())
    (d / "toy-b8-s1" / "run.json").write_text(json.dumps(dict(info, run_id="toy-b8-s1", seed=1)))
    runs = open_runs([d])
    a = {r.run_id: early_alpha(r).value for r in runs if r.info.batch_tier == 8}
    rk = TailPredictor().fit(runs).predict()["toy"]
    assert rk.values[8] == pytest.approx((a["toy-b8"] + a["toy-b8-s1"]) / 2, rel=1e-12)
    assert a["toy-b8-s1"] - a["toy-b8"] == pytest.approx(0.1, abs=1e-9)
    assert rk.run_ids[8] == ("toy-b8", "toy-b8-s1")
    assert main(["predict", str(d), "--json"]) == 0
    tiers = json.loads(capsys.readouterr().out)["families"]["toy"]["tiers"]
    assert next(t for t in tiers if t["tier"] == 8)["runs"] == ["toy-b8", "toy-b8-s1"]


def test_a_collapsed_late_spectrum_keeps_the_alpha_tail_figure(base, tmp_path):
    # a run whose spectrum collapses after 60% (diverging): alpha_trajectory raised for the whole run, and the
    # report dropped the alpha_tail figure of every run ("figure alpha_tail.png skipped")
    pytest.importorskip("matplotlib")
    d = _copy(base, tmp_path)
    _respectrum(d / "toy-b8", lambda v: np.where(np.arange(v.size) < 3, v, 0.0), start=0.6)
    run = next(r for r in open_runs([d]) if r.run_id == "toy-b8")
    prog, alpha, _ = alpha_trajectory(run)
    assert np.isnan(alpha[prog >= 0.6]).all() and np.isfinite(alpha[prog < 0.6]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepWarning)
        rep = build_report([d], tmp_path / "rep", target_loss=TARGET, plots=True)
    assert (tmp_path / "rep" / "alpha_tail.png").exists()
    assert not [n for n in rep.notes if "alpha_tail.png" in n]


def test_coverage_is_the_share_of_the_budget_the_records_reach(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b2", 0.6)
    runs = {r.run_id: r for r in open_runs([d])}
    cut = runs["toy-b2"]
    reached = max([e["tokens"] for e in cut.events] + [m.tokens for m in cut.measurements])
    assert coverage(cut) == reached / cut.info.total_tokens and 0.5 < coverage(cut) < 0.61
    assert coverage(runs["toy-b4"]) >= COMPLETE_COVERAGE


def test_sweep_notes_collects_each_sweep_warning_once_and_shows_the_others():
    notes = ["already here"]
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old, warnings.showwarning = warnings.showwarning, lambda msg, *a, **k: shown.append(str(msg))
        try:
            with sweep_notes(notes):
                warnings.warn("run 'a' left   out", SweepWarning)
                warnings.warn("run 'a' left out", SweepWarning)  # the same line once, whitespace folded
                warnings.warn("already here", SweepWarning)
                warnings.warn("something else", UserWarning)
        finally:
            warnings.showwarning = old
    assert notes == ["already here", "run 'a' left out"] and shown == ["something else"]
