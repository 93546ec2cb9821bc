"""The synchronized rule: top half by rung loss, at least one survivor, deterministic ties, failures last."""
import math

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune  # noqa: E402
from examples.tune.promotion import Entry, n_keep, rank, survivors  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402

NAN = float("nan")


def test_top_half_at_least_one():
    assert [n_keep(n) for n in range(1, 9)] == [1, 1, 1, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="at least one entrant"):
        n_keep(0)
    with pytest.raises(ValueError, match="empty rung"):
        survivors([])


def test_ranking_ties_nan_and_failures():
    es = [Entry("e", 4.0, 3.0), Entry("nan", 0.1, NAN), Entry("b", 2.0, 3.0), Entry("fail", 0.2, None),
          Entry("a", 1.0, 2.5), Entry("c", 2.0, 3.0)]
    assert [e.key for e in rank(es)] == ["a", "b", "c", "e", "nan", "fail"]
    assert [e.key for e in survivors(es)] == ["a", "b", "c"]
    assert [e.key for e in survivors(es[:2])] == ["e"]           # 2 entrants: one survives
    assert [e.key for e in survivors([Entry("x", 1.0, 9.0)])] == ["x"]    # single candidate survives
    assert survivors([Entry("x", 1.0, NAN)]) == []                # but never a failed one
    assert [e.key for e in survivors([Entry("x", 1.0, None), Entry("y", 2.0, 7.0)])] == ["y"]


def _run(tmp_path, trainable=None, **kw):
    args = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 8, 32], reference_tier=8, rungs=[30, 90, 270],
                workdir=tmp_path, progress=False)
    return tune(trainable or SyntheticTrainable(), **(args | kw))


def _expected_survivors(trainable, tier, rungs):
    """The rule replayed by hand from the closed-form losses."""
    from examples.tune import candidate_set

    alive = candidate_set("f", tier, reference_tier=8, reference_lrs={"lr": 1e-3})
    out = []
    for k, b in enumerate(rungs):
        ranked = sorted(alive, key=lambda c: (trainable.loss(c, b), c.scale))
        alive = ranked[: max(1, len(alive) // 2)] if k < len(rungs) - 1 else ranked[:1]
        out.append(sorted(c.key for c in alive))
    return out


def test_synthetic_study_follows_the_rule(tmp_path):
    tr = SyntheticTrainable()
    res = _run(tmp_path, tr)
    for tier in (1, 8, 32):
        assert [sorted(s) for s in res.survivors[("f", tier)]] == _expected_survivors(tr, tier, [30, 90, 270])
    # tier 1: s_opt = (1/8)^0.75 sits exactly between 1/(4 sqrt2) and 1/4 (log2 distance 1/4 each): a tie
    t1 = {round(s.candidate.scale, 6): s for s in res.trials if s.candidate.tier == 1}
    assert t1[0.176777].rung_losses == t1[0.25].rung_losses
    assert res.choices[("f", 1)].scale == pytest.approx(1 / (4 * math.sqrt(2)))   # tie -> smaller scale
    assert res.choices[("f", 8)].scale == 1.0
    assert res.choices[("f", 32)].scale == pytest.approx(2 * math.sqrt(2))
    counts = {}
    for s in res.trials:
        counts[s.state] = counts.get(s.state, 0) + 1
    # 8 + 5 + 7 candidates; survivors of rung 0: 4 + 2 + 3, of rung 1: 2 + 1 + 1 (all complete)
    assert counts == {"pruned": 20 - 4, "complete": 4}
    assert not res.missing


def test_single_candidate_survives_every_rung(tmp_path):
    res = _run(tmp_path, tiers=[8], multipliers=(1.0,))
    (s,) = res.trials
    assert s.state == "complete" and len(s.rung_losses) == 3
    assert res.survivors[("f", 8)] == [["f/b8/x1"]] * 3


def test_two_candidates_keep_one(tmp_path):
    res = _run(tmp_path, tiers=[8], multipliers=(1.0, 2.0))
    assert res.survivors[("f", 8)] == [["f/b8/x1"]] * 3
    assert sorted(s.state for s in res.trials) == ["complete", "pruned"]


def test_nan_and_raising_trials_fail_alone(tmp_path):
    # tier 8: scales 0.5 .. 2; the two largest report NaN, 0.5 raises: 2 finite candidates remain of 5
    tr = SyntheticTrainable(nan_above=1.2, raise_keys=frozenset({"f/b8/x0.5"}))
    res = _run(tmp_path / "a", tr, tiers=[8])
    by = {s.candidate.key: s for s in res.trials}
    assert by["f/b8/x0.5"].state == "failed" and "RuntimeError: synthetic failure of f/b8/x0.5" in by["f/b8/x0.5"].error
    assert by["f/b8/x2"].state == "failed" and "validation loss nan" in by["f/b8/x2"].error
    assert by["f/b8/x1.414"].state == "failed"
    # 5 entrants -> keep 2: both finite ones (0.7071 and 1) survive; failures rank last
    assert sorted(res.survivors[("f", 8)][0]) == ["f/b8/x0.7071", "f/b8/x1"]
    assert res.choices[("f", 8)].scale == 1.0
    assert not res.missing
    # every tier-32 candidate diverges: all fail, no choice, and the other tier still finishes
    res = _run(tmp_path / "b", SyntheticTrainable(nan_above=0.9), tiers=[8, 32])
    assert all(s.state == "failed" for s in res.trials if s.candidate.tier == 32)
    assert res.missing == [("f", 32)] and ("f", 32) not in res.choices
    assert res.choices[("f", 8)].scale == pytest.approx(2 ** -0.5)
    assert "no choice for f/b32: every candidate failed" in res.table()


def test_trainable_that_never_reports_at_the_budget_fails_clearly(tmp_path):
    def late(candidate, budget, *, horizon, workdir, report):
        report(budget + 1, 3.0)

    res = _run(tmp_path, late, tiers=[8], multipliers=(1.0,))
    (s,) = res.trials
    assert s.state == "failed" and "reported no validation loss at or before the rung budget 30" in s.error


def test_trainable_that_overshoots_its_rung_fails_instead_of_promoting_on_an_earlier_report(tmp_path):
    # the toy's old rungs (1,000 examples with batches of 64): reports halfway and after the last step, past
    # the rung; promoting on the halfway report would rank candidates earlier in training than the rung
    def overshoot(candidate, budget, *, horizon, workdir, report):
        report(budget // 2, 3.0)
        report(budget + 2, 2.5)

    res = _run(tmp_path, overshoot, tiers=[8], multipliers=(1.0,))
    (s,) = res.trials
    assert s.state == "failed"
    assert "reported past the rung budget 30 but not at it (reports: [15, 32])" in s.error
    assert ("f", 8) not in res.choices


def test_trainable_reporting_a_bad_resource_fails_clearly(tmp_path):
    def bad(candidate, budget, *, horizon, workdir, report):
        report(-5, 3.0)

    res = _run(tmp_path, bad, tiers=[8], multipliers=(1.0,))
    (s,) = res.trials
    assert s.state == "failed" and "report(resource=-5, ...): resource must be an int >= 0" in s.error


def test_a_choice_at_the_end_of_the_grid_is_flagged(tmp_path):
    import json

    # s_opt = (tier / 8)^2: 1/64 at tier 1 (below the grid's 1/16), 16 at tier 32 (above its 8), 1 at tier 8
    with pytest.warns(UserWarning, match=r"lowest candidate for f/b1; highest candidate for f/b32 of the grid"):
        res = _run(tmp_path, SyntheticTrainable(exponent=2.0))
    assert res.choices[("f", 1)].scale == 1 / 16 and res.choices[("f", 32)].scale == 8.0
    assert res.at_edge == {("f", 1): "lowest", ("f", 32): "highest"}
    rows = {(r["family"], r["tier"]): r["at_edge"] for r in json.loads((tmp_path / "choices.json").read_text())["choices"]}
    assert rows == {("f", 1): "lowest", ("f", 8): None, ("f", 32): "highest"}
    assert "f/b32: the choice is the highest candidate of the grid" in res.table()
    # an interior optimum is not flagged, and one candidate is no grid
    assert _run(tmp_path / "interior", SyntheticTrainable()).at_edge == {}
    assert _run(tmp_path / "one", tiers=[8], multipliers=(1.0,)).at_edge == {}
