"""Review of the sweep-fault merge (diverged / cut-short runs left out of predict, report and scores).

Before this review:
* ``FamilyScore.n`` / ``PredictionScore.n`` counted every run with a statistic, also those whose
  ``eps_tok`` is NaN (cut short before the target) that the Spearman rho drops: ``n = 4`` was printed
  beside a rho computed on 3 runs (or an undefined rho "of 4 runs" computed on 2);
* the replication verdict's rho-by-fraction scan (and the toy report's) gave no n, although the merge
  made a fraction at which a run has no statistic score the other runs instead of giving no rho;
* any single non-finite loss made a run "diverged": a healthy run with one ``inf`` train loss (an
  fp16 overflow step the GradScaler skipped) or one NaN ``val_loss`` (an empty evaluation batch) was
  left out of every ranking and score, and the controller stopped its tier;
* the Fig. 2 scatter drew a run of unknown (NaN) ``eps_tok`` as "target not reached".
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
from scipy import stats

from spectral_lens.analysis import SweepController, SweepWarning, TailPredictor, divergence, early_alpha, token_inefficiency
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import open_runs
from spectral_lens.report import run_status

from .test_sweep_faults import TARGET, _copy, _respectrum, _rewrite, _stop_at, _table_tiers, base  # noqa: F401 (a fixture)


# ---- n: the runs each rho was computed on ----------------------------------------------------------


def test_spearman_n_counts_the_runs_the_rho_was_computed_on(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3)  # reaches 2.95 only at 45%: cut short before the target, eps_tok NaN
    runs = open_runs([d])
    with pytest.warns(SweepWarning, match="toy-b16"):
        score = TailPredictor().fit(runs).score(targets=TARGET)
    used = [(p[0], p[3], p[4]) for p in score.points if not math.isnan(p[4])]
    assert sorted(r for r, *_ in used) == ["toy-b2", "toy-b4", "toy-b8"]
    assert score.within["toy"].n == 3 and score.n == 3  # before: 4 (toy-b16 counted, though left out)
    alpha = {r.run_id: early_alpha(r, window=(10, 40)).value for r in runs}
    want = stats.spearmanr([alpha[r] for r, *_ in used], [e for *_, e in used]).statistic  # float64 reference
    assert score.within["toy"].rho == pytest.approx(want, abs=1e-12)
    assert main(["predict", str(d), "--target-loss", str(TARGET)]) == 0
    out = capsys.readouterr().out
    assert "n = 3)" in out and "n = 4" not in out
    assert main(["predict", str(d), "--target-loss", str(TARGET), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["score"]["n"] == 3 and data["score"]["within"]["toy"]["n"] == 3


def test_an_undefined_rho_says_how_many_runs_it_had(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b16"):
        _stop_at(d / run, 0.3)  # neither has reached 2.95 at 30%
    assert main(["predict", str(d), "--target-loss", str(TARGET), "--json"]) == 0
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert data["score"]["within"]["toy"] == {"rho": None, "pvalue": None, "n": 2}  # before: n = 4
    assert "(2 run(s) with a known eps_tok" in data["score"]["cautions"][0]


def test_verdict_states_the_n_of_every_scanned_rho(base, tmp_path):
    from examples.replicate.verdict import verdict

    d = _copy(base, tmp_path)
    # toy-b2 measured from 15% on only: no statistic at 10%, so the 10% rho is of the other three runs
    _rewrite(d / "toy-b2" / "measurements.jsonl", lambda o: o if o["progress"] >= 0.15 else None)
    runs = open_runs([d])
    v = verdict(runs, target=TARGET, families=["toy"], unit="tokens", window=(10, 40), fractions=(0.1, 0.2))
    fam = v.families["toy"]
    assert fam.n == 4 and fam.n_by_fraction == {0.1: 3, 0.2: 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at10 = TailPredictor(0.1, window=(10, 40)).fit(runs).score(targets=TARGET).within["toy"]
    assert fam.rho_by_fraction[0.1] == at10.rho and at10.n == 3
    scan = next(line for line in v.lines if "rho by progress fraction" in line)
    assert f"10%: {fam.rho_by_fraction[0.1]:.2f} (n = 3)" in scan and "20%: " in scan and "(n = 4)" in scan


def test_verdict_n_is_zero_when_nothing_was_scored(base, tmp_path):
    from examples.replicate.verdict import verdict

    runs = open_runs([base])
    v = verdict(runs, target=0.1, families=["toy"], unit="tokens", window=(10, 40), fractions=(0.2,))
    fam = v.families["toy"]  # nobody reached 0.1: every eps_tok is NaN
    assert math.isnan(fam.rho) and fam.n == 0 and fam.n_by_fraction == {0.2: 0}  # before: n = 4
    assert "n = 0" in v.lines[1] and v.pooled_n == 0


def test_toy_report_states_the_n_of_its_rho_scan(base, tmp_path):
    from types import SimpleNamespace

    from examples.toy.report import SCAN_FRACTIONS, toy_sections

    d = _copy(base, tmp_path)
    _rewrite(d / "toy-b2" / "measurements.jsonl", lambda o: o if o["progress"] >= 0.15 else None)
    runs = open_runs([d])
    wl = SimpleNamespace(target_loss=TARGET, window=(10, 40), families=("toy",))
    text = "\n\n".join(toy_sections(wl, runs, tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| toy n |"))
    ns = dict(zip(SCAN_FRACTIONS, row.strip("|").split("|")[1:]))
    assert ns[0.1].strip() == "3" and ns[0.2].strip() == "4"
    assert ns[0.05].strip() == "0"  # no run measured by 5%: no rho (n/a), of no run


def test_the_scatter_does_not_draw_an_unknown_eps_tok_as_not_reached(base, tmp_path):
    pytest.importorskip("matplotlib")
    from spectral_lens import plot

    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepWarning)
        score = TailPredictor().fit(open_runs([d])).score(targets=TARGET)
    ax = plot.plot_early_vs_eps(score).axes[0]
    assert not any("not reached" in t.get_text() for t in ax.texts)  # before: toy-b16 as a triangle
    assert sorted(t.get_text() for t in ax.texts if t.get_text().startswith("B=")) == ["B=2", "B=4", "B=8"]


# ---- divergence: non-finite losses that persist, not one transient value ---------------------------


def _set_loss(run_dir, step, key, value):
    def ev(o):
        if o["step"] == step and key in o:
            o[key] = value
        return o
    _rewrite(run_dir / "log.jsonl", ev)


def _event_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_one_transient_non_finite_loss_is_not_a_divergence(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    steps = _event_steps(d / "toy-b8")
    _set_loss(d / "toy-b8", steps[1], "train_loss", math.inf)  # an fp16 overflow step the GradScaler skipped
    _set_loss(d / "toy-b2", steps[5], "val_loss", math.nan)  # an empty evaluation batch: 0 / 0
    runs = open_runs([d])
    assert {r.run_id: divergence(r) for r in runs} == dict.fromkeys(("toy-b16", "toy-b2", "toy-b4", "toy-b8"))
    assert {run_status(r) for r in runs} == {"complete"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)  # no note: nothing is left out
        pred = TailPredictor().fit(runs)
    assert pred.excluded_ == {} and pred.predict()["toy"].tiers == (4, 8, 2, 16)  # before: 8 and 2 left out
    dec = SweepController().decide(runs)["toy"]
    assert all(x.action != "stop" or "diverged" not in x.reason for x in dec.decisions)  # before: 2, 8 stopped
    assert main(["predict", str(d)]) == 0
    out = capsys.readouterr().out
    assert _table_tiers(out) == [4, 8, 2, 16] and "note:" not in out
    assert main(["inspect", str(d / "toy-b8")]) == 0
    assert "status: complete" in capsys.readouterr().out


def test_a_nan_loss_logged_last_is_a_divergence_named_where_it_began(base, tmp_path):
    d = _copy(base, tmp_path)
    steps = _event_steps(d / "toy-b16")
    _set_loss(d / "toy-b16", steps[1], "train_loss", math.inf)  # transient, recovered
    _stop_at(d / "toy-b16", 0.5, diverge=True)  # from 50% on every loss is NaN
    run = open_runs([d / "toy-b16"])[0]
    first = next(e for e in run.events if math.isnan(e["val_loss"]))  # the first event past 50%
    assert divergence(run) == f"run 'toy-b16' (tier 16) diverged: val_loss nan at step {first['step']} " + \
        f"({first['tokens']:.4g} tokens, 50% of its token budget)"
    # a loop that logs its NaN loss and stops: one NaN, the last record. Alone it is not yet a
    # divergence (a run still going may recover at its next loss, tests/analysis/test_sweeps3.py);
    # the loop marks the run ended (update_info(status="diverged")) and then it is one
    d2 = tmp_path / "one"
    shutil.copytree(base / "toy-b4", d2)
    _stop_at(d2, 0.56)  # the last evaluation at 55%, the last measurement at 50%
    last = _event_steps(d2)[-1]
    _set_loss(d2, last, "train_loss", math.nan)
    assert divergence(open_runs([d2])[0]) is None
    info = json.loads((d2 / "run.json").read_text())
    info["extras"]["status"] = "diverged"
    (d2 / "run.json").write_text(json.dumps(info))
    run = open_runs([d2])[0]
    assert divergence(run) == f"run 'toy-b4' (tier 4) diverged: train_loss nan at step {last} " + \
        f"({run.events[-1]['tokens']:.4g} tokens, 55% of its token budget)"
    assert run_status(run) == "diverged"


def test_a_diverged_run_that_never_reached_the_target_keeps_inf(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3, diverge=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)  # diverged: not "cut short"
        eps = token_inefficiency(open_runs([d]), TARGET)
    assert eps["toy-b16"] == math.inf


# ---- early records: predicting while the sweep runs --------------------------------------------------


def test_predict_on_runs_still_at_a_quarter_of_their_budget_is_silent(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        _stop_at(d / run, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = TailPredictor().fit(open_runs([d]))
    assert pred.excluded_ == {} and pred.flags_ == [] and len(pred.predict()["toy"].tiers) == 4
    assert main(["predict", str(d)]) == 0
    out, err = capsys.readouterr()
    assert len(_table_tiers(out)) == 4 and "note:" not in out and "caution:" not in out and err == ""
    assert main(["predict", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["excluded"] == {} and data["notes"] == []


def test_a_run_in_progress_before_the_target_is_not_called_stopped(base, tmp_path):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b16", 0.3)
    with pytest.warns(SweepWarning) as caught:
        token_inefficiency(open_runs([d]), TARGET)
    (msg,) = [str(w.message) for w in caught]
    assert msg.startswith("run 'toy-b16' has records to 30% of its token budget") and "still running" in msg


# ---- records of older versions ---------------------------------------------------------------------


def test_records_without_extras_status_or_windows_still_read(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        info = json.loads((d / run / "run.json").read_text())
        for key in ("extras", "summary_windows", "created"):
            info.pop(key)
        (d / run / "run.json").write_text(json.dumps(info))
    runs = open_runs([d])
    assert {run_status(r) for r in runs} == {"complete"} and not any(divergence(r) for r in runs)
    assert main(["predict", str(d), "--window", "10", "40", "--target-loss", str(TARGET)]) == 0
    out = capsys.readouterr().out
    assert _table_tiers(out) == [4, 8, 2, 16] and "note:" not in out and "n = 4" in out
    assert main(["inspect", str(d / "toy-b4")]) == 0
    assert "status: complete" in capsys.readouterr().out


# ---- the controller and runs that will never have a statistic at the fraction ---------------------


def test_the_controller_decides_the_others_when_a_run_cannot_be_measured_at_the_fraction(base, tmp_path):
    d = _copy(base, tmp_path)
    _respectrum(d / "toy-b8", lambda v: np.where(np.arange(v.size) < 3, v, 0.0), start=0.15)  # collapsed there
    _rewrite(d / "toy-b2" / "measurements.jsonl", lambda o: o if o["progress"] >= 0.3 else None)  # measured late
    dec = SweepController().decide([d])["toy"]  # before: NoEarlyStatisticError for the whole sweep
    assert dec.ready and dec.waiting_tiers == []
    by_tier = {x.tier: x for x in dec.decisions}
    assert by_tier[4].action == "continue" and by_tier[16].action == "stop"
    for tier, why in ((8, "zero eigenvalues"), (2, "first measurement is at progress 0.300 > 0.2")):
        assert by_tier[tier].action == "continue" and math.isnan(by_tier[tier].value)
        assert by_tier[tier].reason.startswith("not judged (no usable alpha_tail at 20%): ") and why in by_tier[tier].reason
    assert [x.tier for x in dec.decisions] == [4, 16, 2, 8]  # ranked tiers first, the unjudged after


def test_cli_pooled_rho_states_its_n(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    write_theorem6_sweep(d, (2, 4, 8), family="other", dim=128, grad_dim=64, n_measure=10, n_eval=20,
                         tail_window=(10, 40))
    _stop_at(d / "toy-b16", 0.3)  # eps_tok unknown: 6 of the 7 runs are scored
    assert main(["predict", str(d), "--target-loss", str(TARGET)]) == 0
    out = capsys.readouterr().out
    pooled = next(line for line in out.splitlines() if line.startswith("pooled"))
    assert pooled.endswith(", n = 6)")  # before: no n
    within = {line.split(", ")[1].split(":")[0]: line for line in out.splitlines() if line.startswith("Spearman rho")}
    assert within["toy"].endswith(", n = 3)") and within["other"].endswith(", n = 3)")


def test_the_controller_still_refuses_a_family_no_run_of_which_can_be_judged(base, tmp_path):
    from spectral_lens.analysis import NoEarlyStatisticError

    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):  # measurements start at 30%: a setup error
        _rewrite(d / run / "measurements.jsonl", lambda o: o if o["progress"] >= 0.3 else None)
    with pytest.raises(NoEarlyStatisticError, match=r"no run of family 'toy' has a usable alpha_tail at 20%") as info:
        SweepController().decide([d])
    assert all(f"run '{r}'" in str(info.value) for r in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"))
