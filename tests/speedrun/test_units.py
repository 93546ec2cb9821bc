"""Speedrun building blocks: presets, LR candidates, successive halving, the trainable, the verdict."""
import json
import math

import pytest

from examples.speedrun.halving import lr_candidates, select_rate
from examples.speedrun.presets import PRESETS, get_preset
from examples.speedrun.summary import verdict_lines
from examples.speedrun.trainable import ZooTrainable, lr_scale_of
from examples.speedrun.workload import ZooWorkload, is_complete, run_id
from examples.tune.trainable import Candidate

REF = {"matrix": 0.02, "embed": 0.3, "head": 0.002, "scalar": 0.02}


def test_presets_meet_the_issue():
    for name in ("tiny", "cpu", "gpu-small", "paper-d12"):
        p = get_preset(name)
        assert p.measure_every <= 0.1  # measurements at 10%, 20%, ... resolve 10-50% progress
        assert p.reference_tier in p.tiers
    assert len(PRESETS["cpu"].tiers) >= 4 and 2 <= len(PRESETS["cpu"].families) <= 3
    assert PRESETS["cpu"].data == "pydoc" and PRESETS["cpu"].device == "cpu"
    g = PRESETS["gpu-small"]
    assert len(g.tiers) >= 4 and g.attn_impl == "flex" and g.device == "cuda"
    d = PRESETS["paper-d12"]
    assert d.tiers == (1, 2, 4, 8, 16, 32) and d.target_loss == 3.2 and d.reference_tier == 8
    assert d.rungs == (50_000_000, 150_000_000, 500_000_000) and d.profile == "d12"


@pytest.mark.parametrize("change, match", [
    (dict(tiers=(4, 2)), "ascending"), (dict(reference_tier=3), "reference_tier"),
    (dict(rungs=(10**9,)), "rungs"), (dict(measure_every=0.25), "10-50%"),
    (dict(target_loss=float("nan")), "target_loss"), (dict(centers=("cube",)), "centers"),
    (dict(lr_factor=0.0), "lr_factor")])
def test_preset_rejects_bad_settings(change, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["tiny"].replace(**change)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="paper-d12"):
        get_preset("d99")


def test_lr_candidates_follow_the_protocol_grid():
    # App. B.3: centers sqrt(B/B0) and B/B0, multipliers {0.5, 1/sqrt2, 1, sqrt2, 2}, de-duplicated
    mult = (0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0)
    at_ref = lr_candidates("Untied", 8, 8, REF, ("sqrt", "linear"), mult)
    assert [c.scale for c in at_ref] == pytest.approx(sorted(mult))
    assert all(len(c.origins) == 2 for c in at_ref)  # both centers coincide at B0
    at_32 = lr_candidates("Untied", 32, 8, REF, ("sqrt", "linear"), mult)
    # sqrt center 2 x {.5..2} = {1..4}, linear 4 x {.5..2} = {2..8}: 2, 2.83, 4 are shared
    assert [round(c.scale, 4) for c in at_32] == [1.0, 1.4142, 2.0, 2.8284, 4.0, 5.6569, 8.0]
    c = at_32[-1]
    assert c.lrs == pytest.approx({g: r * 8.0 for g, r in REF.items()}) and c.origins == (("linear", 2.0),)
    with pytest.raises(ValueError, match="center"):
        lr_candidates("Untied", 8, 8, REF, ("cube",), mult)


class FakeTrainable:
    """Loss = (log2 scale - 1)^2 + 1/budget-ish; records calls and resumes."""

    def __init__(self, fail_scale=None):
        self.calls = []
        self.fail_scale = fail_scale

    def __call__(self, candidate, budget, *, horizon, workdir, report):
        self.calls.append((candidate.scale, budget))
        workdir.mkdir(parents=True, exist_ok=True)
        if candidate.scale == self.fail_scale:
            raise RuntimeError("diverged")
        report(budget, (math.log2(candidate.scale) - 1) ** 2 + 100 / budget)


def test_select_rate_halves_synchronously_and_resumes(tmp_path):
    cands = lr_candidates("RoPE", 4, 1, REF, ("sqrt",), (0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0))
    # factors 1, 1.41, 2, 2.83, 4; the loss is smallest at factor 2; factor 4 diverges
    t = FakeTrainable(fail_scale=4.0)
    best, table = select_rate(t, cands, (10, 30, 90), horizon=90, workdir=tmp_path)
    assert best.scale == pytest.approx(2.0)
    per_rung = {b: sorted(s for s, bb in t.calls if bb == b) for b in (10, 30, 90)}
    assert len(per_rung[10]) == 5 and len(per_rung[30]) == 3 and len(per_rung[90]) == 2
    assert table[cands[-1].key]["losses"]["10"] is None and "diverged" in table[cands[-1].key]["error"]
    assert json.loads((tmp_path / "trials.json").read_text()) == json.loads(json.dumps(table))
    t2 = FakeTrainable()
    best2, _ = select_rate(t2, cands, (10, 30, 90), horizon=90, workdir=tmp_path)
    assert t2.calls == [] and best2 == best  # resumed from trials.json: nothing retrained


def test_select_rate_all_diverged_is_an_error(tmp_path):
    cands = lr_candidates("RoPE", 2, 2, REF, ("sqrt",), (1.0,))
    with pytest.raises(RuntimeError, match="RoPE at tier 2"):
        select_rate(FakeTrainable(fail_scale=1.0), cands, (10,), horizon=10, workdir=tmp_path)


def test_lr_scale_of_needs_one_common_factor():
    assert lr_scale_of({g: r * 3 for g, r in REF.items()}, REF, 2.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="not one multiple"):
        lr_scale_of({**REF, "head": 1.0}, REF, 1.0)
    with pytest.raises(ValueError, match="groups"):
        lr_scale_of({"matrix": 1.0}, REF, 1.0)


def test_reference_lrs_are_the_recipe_rates_times_the_factor():
    # the Untied recipe (protocol §8): embedding 0.3, head 0.002, Muon 0.02; scalars keep the Muon step's 3.6e-3
    w = ZooWorkload(PRESETS["tiny"].replace(lr_factor=3.0, families=("Untied",)))
    assert w.reference_lrs("Untied") == pytest.approx({"matrix": 0.06, "embed": 0.9, "head": 0.006, "scalar": 0.0108})
    assert w.families == ("Untied",) and run_id("U-Net", 4) == "u-net-b4"
    assert (w.name, w.unit, w.fraction, w.window) == ("speedrun-tiny", "tokens", 0.2, (4, 12))


def test_trainable_rejects_an_unknown_family(tmp_path):
    w = ZooWorkload(PRESETS["tiny"])
    c = Candidate("Untied", 2, 1.0, REF)
    with pytest.raises(KeyError, match="Untied"):
        w.trainable()(c, 10, horizon=10, workdir=tmp_path, report=lambda *a: None)


def test_is_complete_reads_the_status(tmp_path):
    assert not is_complete(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"extras": {"status": "running"}}))
    assert not is_complete(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"extras": {"status": "complete"}}))
    assert is_complete(tmp_path)


def test_verdict_flags_negative_underpowered_and_undefined():
    score = dict(within={"A": dict(rho=-0.4, pvalue=0.75, n=4), "B": dict(rho=1.0, pvalue=0.083, n=4),
                         "C": dict(rho=float("nan"), pvalue=float("nan"), n=4)},
                 pooled=dict(rho=0.6, pvalue=0.01, n=12))
    lines = verdict_lines(score, 4)
    text = "\n".join(lines)
    assert "Underpowered" in lines[0] and "0.0833" in lines[0]  # 2/4! is the best exact p with 4 tiers
    assert "A: rho = -0.400 is NEGATIVE" in text
    assert "B: rho = 1.000 is positive but not significant" in text
    assert "C: rho is undefined" in text
    assert "pooled" not in text  # significant and positive: no flag
    assert not any("Underpowered" in l for l in verdict_lines(score, 6))  # 2/6! < 0.05
