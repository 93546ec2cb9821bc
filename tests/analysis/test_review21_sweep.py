"""Review of the sweeps3 merge (several learning rates per tier, divergence, ended runs): cases a
real sweep produces that broke ``pick_learning_rates`` and the controller.

Before: a tier where every rate had one diverged seed was left out as having "no validation loss
... yet" (and the controller stopped it as diverged); a healthy rate still waiting for its first
validation loss beside a diverged rate was stopped with it; rates evaluated at different token
counts were compared at different token counts (each run's last evaluation before the common one)
and a rate whose evaluations all came after another's last was beaten unseen ("no val loss"); one
seed cut short early made the whole tier's pick on its first evaluations; one rate written two ways
(``1e-3``, ``0.0010000000000000002``, ``"0.001"``) was split into several rates.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest

from spectral_lens.analysis import (
    SweepController,
    TailPredictor,
    divergence,
    ended,
    pick_learning_rates,
)
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import RunInfo, RunWriter, open_runs
from spectral_lens.report import build_report

from .test_sweeps3 import _append_event, _info, _rewrite, _with_rates

TARGET = 2.95


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("review21") / "base"
    write_theorem6_sweep(root, (2, 4, 8, 16), family="toy", dim=128, grad_dim=64, n_measure=10, n_eval=20,
                         tail_window=(10, 40))
    return root


def _run(root, rid, lr, evals, *, tier=8, total=None, key="lr"):
    """A record of tier ``tier`` at learning rate ``lr`` (extras ``key``) with ``(tokens, val_loss)`` evaluations."""
    with RunWriter(root / rid, RunInfo(rid, family="f", batch_tier=tier, total_tokens=total, extras={key: lr})) as w:
        for i, (t, v) in enumerate(evals):
            w.log(step=i + 1, tokens=int(t), val_loss=v)
    return root / rid


def _pick(*dirs):
    kept, left = pick_learning_rates(open_runs(list(dirs)))
    return [r.run_id for r in kept], left


def _copy_run(d, src, dst, lr, **info):
    shutil.copytree(d / src, d / dst)
    _info(d / dst, run_id=dst, **info)
    data = json.loads((d / dst / "run.json").read_text())
    data["extras"]["lr"] = lr
    (d / dst / "run.json").write_text(json.dumps(data))


def _diverge(run_dir):
    _append_event(run_dir, val_loss=math.nan, train_loss=math.nan)
    _append_event(run_dir, val_loss=math.nan, train_loss=math.nan)
    assert divergence(open_runs([run_dir])[0]) is not None


# ---- a diverged seed at every rate -----------------------------------------------------------------


def test_each_rate_with_a_diverged_seed_still_picks_the_rate_with_fewer_divergences_then_lower_loss(tmp_path):
    nan = math.nan
    runs = [_run(tmp_path, "a1", 1e-3, [(1e7, 3.0), (2e7, 2.5)]),
            _run(tmp_path, "a2", 1e-3, [(1e7, 3.0), (2e7, nan), (3e7, nan)]),
            _run(tmp_path, "a3", 3e-3, [(1e7, 3.1), (2e7, 2.9)]),
            _run(tmp_path, "a4", 3e-3, [(1e7, nan), (2e7, nan)])]
    runs.append(_run(tmp_path, "a0", 1e-1, []))  # a rate with no validation loss (and no divergence) yet
    kept, left = _pick(*runs)
    assert kept == ["a1", "a2"]  # before: none, "no validation loss to pick the best one by yet"
    assert "lr=0.1: no val loss" in left["a0"]
    assert "the best, lr=0.001 (val loss 2.5 at 2e+07 tokens, 1 of 2 runs diverged; " in left["a3"], left["a3"]
    assert "lr=0.003: 2.9, 1 of 2 runs diverged" in left["a3"]
    # a rate none of whose runs diverged still beats one with a diverged seed, whatever its loss
    runs.append(_run(tmp_path, "a5", 1e-2, [(1e7, 3.2), (2e7, 2.95)]))
    assert _pick(*runs)[0] == ["a5"]


def test_the_controller_decides_a_tier_whose_every_rate_has_a_diverged_seed_on_its_best_rate(base, tmp_path):
    d = tmp_path / "sweep"
    shutil.copytree(base, d)
    for run in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        data = json.loads((d / run / "run.json").read_text())
        data["extras"]["lr"] = 1e-3
        (d / run / "run.json").write_text(json.dumps(data))
    _copy_run(d, "toy-b8", "toy-b8-s1", 1e-3, seed=1)
    _copy_run(d, "toy-b16", "toy-b8-hi", 3e-3, batch_tier=8, tokens_per_step=8 * 65536, batch_size=8 * 64)
    _copy_run(d, "toy-b16", "toy-b8-hi-s1", 3e-3, batch_tier=8, tokens_per_step=8 * 65536, batch_size=8 * 64, seed=1)
    _diverge(d / "toy-b8-s1")
    _diverge(d / "toy-b8-hi-s1")
    runs = open_runs([d])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = TailPredictor().fit(open_runs([base])).predict()["toy"]
        rk = TailPredictor().fit(runs).predict()["toy"]
        dec = {x.tier: x for x in SweepController().decide(runs)["toy"].decisions}
    assert rk.run_ids[8] == ("toy-b8",) and rk.values[8] == alone.values[8]  # before: tier 8 left out
    assert dec[8].value == alone.values[8]  # before: stopped as diverged, its healthy toy-b8 with it
    assert set(dec[8].run_ids) == {"toy-b8", "toy-b8-s1", "toy-b8-hi", "toy-b8-hi-s1"}


def test_a_rate_still_waiting_for_its_first_val_loss_beside_a_diverged_rate_is_waited_for(base, tmp_path):
    d = _with_rates(base, tmp_path, "toy-b16")  # toy-b8 at lr 1e-3, toy-b8-hi at lr 3e-3
    _diverge(d / "toy-b8-hi")
    strip = lambda o: {k: v for k, v in o.items() if k not in ("val_loss", "train_loss")}
    _rewrite(d / "toy-b8" / "log.jsonl", strip)  # no validation loss logged yet
    _rewrite(d / "toy-b8" / "measurements.jsonl", strip)
    runs = open_runs([d])
    _, left = pick_learning_rates(runs)
    assert "no validation loss to pick the best one by yet" in left["toy-b8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = SweepController().decide(runs)["toy"]
        rep = build_report(runs, tmp_path / "rep", target_loss=TARGET, plots=False)
    by_tier = {x.tier: x for x in dec.decisions}
    assert not dec.ready and by_tier[8].action == "wait", by_tier[8]  # before: "stop" (toy-b8-hi diverged)
    assert "no validation loss to pick the best one by yet" in by_tier[8].reason
    assert 8 not in rep.rankings["toy"].tiers  # the report says why tier 8 is not ranked
    assert sum("no validation loss to pick the best one by yet" in n for n in rep.notes) == 1, rep.notes


# ---- rates evaluated at different token counts --------------------------------------------------------


def test_rates_evaluated_at_different_token_counts_are_compared_at_one_token_count(tmp_path):
    loss_a = lambda t: 4.0 - 2e-8 * t
    loss_b = lambda t: loss_a(t) + 0.01  # worse at every token count
    a = _run(tmp_path, "a", 1e-3, [(t, loss_a(t)) for t in (1e7, 2e7, 3e7, 4e7, 5e7)])
    b = _run(tmp_path, "b", 3e-3, [(t, loss_b(t)) for t in (1.5e7, 3e7, 4.5e7)])
    kept, left = _pick(a, b)
    assert kept == ["a"], left  # before: b, its loss at 4.5e7 tokens against a's at 4e7
    assert f"(val loss {loss_a(4.5e7):.4g} at 4.5e+07 tokens; lr=0.003: {loss_b(4.5e7):.4g})" in left["b"]


def test_a_rate_whose_evaluations_all_follow_the_others_last_is_not_beaten_unseen(tmp_path):
    a = _run(tmp_path, "a", 1e-3, [(1e7, 3.0)])
    b = _run(tmp_path, "b", 3e-3, [(1.5e7, 2.0), (3e7, 1.5)])
    kept, left = _pick(a, b)
    assert kept == [] and set(left) == {"a", "b"}  # before: a kept, b "no val loss"
    assert ("no token count where every rate has a validation loss yet (lr=0.003 first at 1.5e+07 tokens, "
            "after 1e+07)") in left["a"], left["a"]


def test_a_seed_cut_short_early_does_not_make_the_pick_on_the_first_evaluations(tmp_path):
    total = 10 ** 8
    early = [(1e7, 3.5), (2e7, 3.2)]  # a higher rate is ahead early and behind at the end
    a = _run(tmp_path, "a", 1e-3, early + [(5e7, 2.8), (1e8, 2.5)], total=total)
    a_s1 = _run(tmp_path, "a-s1", 1e-3, [(1e7, 3.5)], total=total)  # preempted at 10%
    b = _run(tmp_path, "b", 3e-3, [(1e7, 3.3), (2e7, 3.0), (5e7, 2.8), (1e8, 2.6)], total=total)
    kept, left = _pick(a, a_s1, b)
    assert kept == ["a", "a-s1"], left  # before: b, compared at 1e7 tokens (10%)
    assert "(val loss 2.5 at 1e+08 tokens, 100% of the budget; lr=0.003: 2.6)" in left["b"], left["b"]


# ---- one rate written two ways ------------------------------------------------------------------------


def test_one_rate_written_with_float_rounding_or_as_a_string_is_one_rate(tmp_path):
    runs = [_run(tmp_path, "s0", 1e-3, [(1e7, 3.0)]),
            _run(tmp_path, "s1", 0.0010000000000000002, [(1e7, 2.9)]),  # 3.6e-3 * (1 / 3.6) and friends
            _run(tmp_path, "s2", "0.001", [(1e7, 2.95)]),
            _run(tmp_path, "g0", {"muon": 0.02, "adam": 3e-4}, [(1e7, 3.0)], tier=4, key="lrs"),
            _run(tmp_path, "g1", {"adam": 0.00030000000000000003, "muon": 0.02}, [(1e7, 3.1)], tier=4, key="lrs")]
    kept, left = _pick(*runs)
    assert left == {} and kept == ["s0", "s1", "s2", "g0", "g1"]  # before: 3 rates at tier 8, 2 at tier 4
    # rates that differ are still told apart, and named so that they read apart
    d = _run(tmp_path, "s3", 1.0004e-3, [(1e7, 2.0)])
    kept, left = _pick(*runs, d)
    assert kept == ["g0", "g1", "s3"] and "the best, lr=0.0010004 (" in left["s0"] and "lr=0.001: " in left["s0"]


# ---- divergence: the rule's edge cases (guards; these held before) ---------------------------------------


def test_divergence_counts_token_counts_not_losses(tmp_path):
    def record(name, events, **extras):
        with RunWriter(tmp_path / name, RunInfo(name, batch_tier=1, extras=extras)) as w:
            for i, kv in enumerate(events):
                w.log(step=i + 1, tokens=(i + 1) * 1000, **kv)
        return open_runs([tmp_path / name])[0]

    nan = math.nan
    # train_loss and val_loss non-finite at one step: one token count, not two
    assert divergence(record("same", [{"train_loss": 1.0}, {"train_loss": nan, "val_loss": nan}])) is None
    # a run whose only logged loss is NaN: not judged until it logs another or ends
    assert divergence(record("only", [{"val_loss": nan}])) is None
    assert divergence(record("only-ended", [{"val_loss": nan}], status="diverged")) is not None
    # NaN, then finite, then NaN: one non-finite loss since the last finite one
    assert divergence(record("nfn", [{"val_loss": nan}, {"val_loss": 1.0}, {"val_loss": nan}])) is None
    two = record("nfnn", [{"val_loss": nan}, {"val_loss": 1.0}, {"val_loss": nan}, {"train_loss": nan}])
    assert "diverged: val_loss nan at step 3 " in divergence(two)
    # a run marked complete and then resumed keeps its status: ended until the status says otherwise
    assert ended(record("resumed", [{"val_loss": 1.0}], status="complete"))
    assert not ended(record("running", [{"val_loss": 1.0}], status="running"))
