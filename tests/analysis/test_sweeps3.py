"""Batch-size sweeps read while runs are still going: an unknown token budget, a transient
non-finite loss as the latest one.

Before: a run without ``RunInfo.total_tokens`` that had not reached the target yet got
``eps_tok = inf`` (ranked as the slowest tier, counted in the score's ``n``) even while running; a
run whose latest logged loss was one transient ``inf`` (one bad evaluation) read as diverged: left
out of the ranking, its tier stopped by the controller.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest

from spectral_lens.analysis import (
    SweepController,
    SweepWarning,
    TailPredictor,
    divergence,
    ended,
    pick_learning_rates,
    token_inefficiency,
)
from spectral_lens.cli import main
from spectral_lens.records import open_runs
from spectral_lens.report import build_report, run_status

# the sweep every tier reaches TARGET in (in the order b4, b8, b2, b16; b16 after 30%); base: a fixture
from .test_sweep_faults import TARGET, _copy, _rewrite, base  # noqa: F401


def _stop_at(run_dir, cut):
    """Drop the records after progress ``cut`` (the run is at ``cut`` now, or was preempted there)."""
    keep = lambda o: o if o.get("progress", o["tokens"] / 1e9) <= cut else None  # noqa: E731
    _rewrite(run_dir / "log.jsonl", keep)
    _rewrite(run_dir / "measurements.jsonl", keep)


def _info(run_dir, **changes):
    """Rewrite ``run.json``: a key set to ``None`` is removed; ``status=`` goes into extras."""
    info = json.loads((run_dir / "run.json").read_text())
    if "status" in changes:
        info["extras"]["status"] = changes.pop("status")
    for k, v in changes.items():
        if v is None:
            info.pop(k, None)
        else:
            info[k] = v
    (run_dir / "run.json").write_text(json.dumps(info))


def _append_event(run_dir, **losses):
    """Log one more evaluation 10M tokens after the last record (event or measurement)."""
    last = max((json.loads(line) for name in ("log.jsonl", "measurements.jsonl")
                for line in (run_dir / name).read_text().splitlines()), key=lambda o: o["tokens"])
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": last["step"] + 10, "tokens": last["tokens"] + 10_000_000, **losses}) + "\n")


def _set_last_loss(run_dir, key, value):
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    events[-1][key] = value
    (run_dir / "log.jsonl").write_text("".join(json.dumps(o) + "\n" for o in events))


# ---- 1: a run without a token budget that has not reached the target yet ----------------------------


def test_a_run_without_a_budget_short_of_the_target_has_an_unknown_eps_tok_not_inf(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):  # recorded without total_tokens (progress stored)
        _info(d / run, total_tokens=None)
    _stop_at(d / "toy-b16", 0.3)  # still running at 30%: not at the target yet
    runs = open_runs([d])
    assert not ended(runs[0]) and run_status(runs[0]) == "–"
    with pytest.warns(SweepWarning, match=r"run 'toy-b16' has no token budget \(RunInfo.total_tokens\) and no "
                                          r"run.json extras status 'complete'.*eps_tok is unknown \(NaN\)"):
        eps = token_inefficiency(runs, TARGET)
    assert math.isnan(eps["toy-b16"])  # before: inf, ranked as the slowest tier
    assert eps["toy-b4"] == 1.0 and all(math.isfinite(eps[r]) for r in ("toy-b2", "toy-b8"))

    # predict leaves it out of the score (n = 3, before 4) with one note, also in --json
    assert main(["predict", str(d), "--target-loss", str(TARGET), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["score"]["within"]["toy"]["n"] == 3
    assert [n for n in data["notes"] if "toy-b16" in n and "no token budget" in n]
    # the report: eps_tok unknown, T "not reached yet" (before: "not reached" and an eps_tok of inf)
    rep = build_report(runs, tmp_path / "rep", target_loss=TARGET, plots=False)
    row = next(line for line in rep.path.read_text().splitlines() if line.startswith("| toy-b16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "not reached yet" and cells[6] == "unknown", row  # the word predict prints (was "–", as for no value)
    assert rep.score.within["toy"].n == 3

    # a run that says it ended (update_info(status="complete")) is known not to reach it: inf
    _info(d / "toy-b16", status="complete")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)
        eps = token_inefficiency(open_runs([d]), TARGET)
    assert eps["toy-b16"] == math.inf


# ---- 2: a transient non-finite loss, the latest one ---------------------------------------------------


def test_a_transient_inf_as_the_latest_loss_of_a_running_run_is_not_a_divergence(base, tmp_path, capsys):
    d = _copy(base, tmp_path)
    _stop_at(d / "toy-b8", 0.5)  # running, at 50%
    _append_event(d / "toy-b8", val_loss=math.inf, train_loss=2.9)  # one bad evaluation, the latest record
    runs = open_runs([d])
    b8 = next(r for r in runs if r.run_id == "toy-b8")
    assert divergence(b8) is None and run_status(b8) == "ends at 51% of budget"  # before: diverged
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepWarning)
        pred = TailPredictor().fit(runs)
    assert pred.excluded_ == {} and pred.predict()["toy"].tiers == (4, 8, 2, 16)  # before: 8 left out
    dec = SweepController().decide(runs)["toy"]
    assert {x.tier: x.action for x in dec.decisions}[8] == "continue"  # before: stopped as diverged
    assert main(["predict", str(d)]) == 0
    assert "note:" not in capsys.readouterr().out

    # the next loss is non-finite too: two in a row, a divergence named where it began
    _append_event(d / "toy-b8", val_loss=math.nan, train_loss=math.nan)
    b8 = open_runs([d / "toy-b8"])[0]
    assert divergence(b8).startswith("run 'toy-b8' (tier 8) diverged: val_loss inf at step ")
    with pytest.warns(SweepWarning, match=r"toy-b8.*diverged"):
        pred = TailPredictor().fit(open_runs([d]))
    assert set(pred.excluded_) == {"toy-b8"}
    dec = SweepController().decide(open_runs([d]))["toy"]
    assert {x.tier: x.action for x in dec.decisions}[8] == "stop"


def test_one_non_finite_latest_loss_counts_once_the_run_has_ended(base, tmp_path):
    d = _copy(base, tmp_path)
    _set_last_loss(d / "toy-b2", "train_loss", math.nan)  # at the end of its budget: nothing follows
    _stop_at(d / "toy-b4", 0.56)
    _set_last_loss(d / "toy-b4", "train_loss", math.nan)  # a loop that logs its NaN and stops ...
    runs = {r.run_id: r for r in open_runs([d])}
    assert divergence(runs["toy-b2"]) is not None and run_status(runs["toy-b2"]) == "diverged"
    assert divergence(runs["toy-b4"]) is None  # ... reads as still going until it says it ended
    _info(d / "toy-b4", status="diverged")
    run = open_runs([d / "toy-b4"])[0]
    assert ended(run) and "diverged: train_loss nan" in divergence(run)


# ---- 3: several learning rates at one tier ------------------------------------------------------------


def _with_rates(base, tmp_path, twin):
    """The base sweep at lr 1e-3, plus run 'toy-b8-hi': tier 8 at lr 3e-3, whose records are those
    of run ``twin`` (toy-b16: a worse rate; toy-b4: a better one)."""
    d = _copy(base, tmp_path)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        info = json.loads((d / run / "run.json").read_text())
        info["extras"]["lr"] = 1e-3
        (d / run / "run.json").write_text(json.dumps(info))
    shutil.copytree(d / twin, d / "toy-b8-hi")
    _info(d / "toy-b8-hi", run_id="toy-b8-hi", batch_tier=8, tokens_per_step=8 * 65536, batch_size=8 * 64)
    info = json.loads((d / "toy-b8-hi" / "run.json").read_text())
    info["extras"]["lr"] = 3e-3
    (d / "toy-b8-hi" / "run.json").write_text(json.dumps(info))
    return d


def test_several_learning_rates_at_a_tier_use_the_best_rate_not_their_average(base, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepWarning)
        alone = TailPredictor().fit(open_runs([base])).predict()["toy"]  # one rate per tier
    d = _with_rates(base, tmp_path, "toy-b16")  # lr 3e-3 at tier 8 ends at a higher loss
    runs = open_runs([d])
    kept, left = pick_learning_rates(runs)
    assert set(left) == {"toy-b8-hi"} and len(kept) == 4
    why = left["toy-b8-hi"]
    assert why.startswith("tier 8 of family 'toy' has runs at 2 learning rates: the best, lr=0.001 (val loss ")
    assert "lr=0.003: " in why and why.endswith("is used; the runs at the others (toy-b8-hi) are not")
    with pytest.warns(SweepWarning, match="has runs at 2 learning rates"):
        pred = TailPredictor().fit(runs)
    rk = pred.predict()["toy"]
    assert set(pred.excluded_) == {"toy-b8-hi"}
    assert rk.run_ids[8] == ("toy-b8",) and rk.values[8] == alone.values[8]  # before: the mean with toy-b8-hi
    assert rk.tiers == alone.tiers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepWarning)
        assert pred.score(targets=TARGET).n == 4  # before: 5, the other rate scored as a seed

    assert main(["predict", str(d), "--json", "--target-loss", str(TARGET)]) == 0
    data = json.loads(capsys.readouterr().out)
    tier8 = next(t for t in data["families"]["toy"]["tiers"] if t["tier"] == 8)
    assert tier8["lr"] == 1e-3 and tier8["runs"] == ["toy-b8"]
    assert list(data["excluded"]) == ["toy-b8-hi"] and data["score"]["n"] == 4
    assert sum("has runs at 2 learning rates" in n for n in data["notes"]) == 1

    # the controller decides tier 8 on its best rate's run; stopping or continuing it covers both runs
    dec = {x.tier: x for x in SweepController().decide(runs)["toy"].decisions}
    assert dec[8].value == alone.values[8] and set(dec[8].run_ids) == {"toy-b8", "toy-b8-hi"}


def test_the_better_rate_is_picked_whichever_it_is_and_the_report_says_so(base, tmp_path):
    d = _with_rates(base, tmp_path, "toy-b4")  # lr 3e-3 at tier 8 trains like the best tier
    runs = open_runs([d])
    _, left = pick_learning_rates(runs)
    assert set(left) == {"toy-b8"} and "the best, lr=0.003 " in left["toy-b8"]
    rep = build_report(runs, tmp_path / "rep", target_loss=TARGET, plots=False)
    assert rep.rankings["toy"].run_ids[8] == ("toy-b8-hi",)
    assert sum("has runs at 2 learning rates: the best, lr=0.003" in n for n in rep.notes) == 1
    row = next(line for line in rep.path.read_text().splitlines() if line.startswith("| toy-b8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "–" and cells[8] == "left out (see notes)", row  # eps_tok, early alpha


def test_a_tier_whose_rates_cannot_be_compared_yet_is_left_out_and_waited_for(base, tmp_path):
    d = _with_rates(base, tmp_path, "toy-b16")
    strip = lambda o: {k: v for k, v in o.items() if k not in ("val_loss", "train_loss")}  # noqa: E731
    for run in ("toy-b8", "toy-b8-hi"):  # no validation loss logged yet
        _rewrite(d / run / "log.jsonl", strip)
        _rewrite(d / run / "measurements.jsonl", strip)
    runs = open_runs([d])
    _, left = pick_learning_rates(runs)
    assert set(left) == {"toy-b8", "toy-b8-hi"}
    assert "has runs at 2 learning rates (lr=0.001; lr=0.003) and no validation loss" in left["toy-b8"]
    with pytest.warns(SweepWarning, match="no validation loss to pick the best one by yet"):
        rk = TailPredictor().fit(runs).predict()["toy"]
    assert 8 not in rk.tiers  # before: the two rates averaged as seeds
    dec = SweepController().decide(runs)["toy"]
    by_tier = {x.tier: x for x in dec.decisions}
    assert not dec.ready and "no validation loss to pick the best one by yet" in by_tier[8].reason
    assert by_tier[2].reason.endswith("waiting for tier(s) 8")
