"""Speedrun building blocks: presets (with the shared tuner's settings), the workload, the report helpers."""
import pytest

from examples.replicate import TunerSettings
from examples.speedrun.presets import PRESETS, get_preset
from examples.speedrun.summary import min_pvalue
from examples.speedrun.workload import ZooWorkload
from examples.tune import candidate_set
from examples.tune.zoo import ZooTrainable, lr_scale_of

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
    # the paper's 50M / 150M / 500M, rounded to whole steps of tier 32 (2^21 tokens)
    assert d.rungs == (24 * 2**21, 72 * 2**21, 238 * 2**21) and d.profile == "d12"
    assert [abs(r - t) / t for r, t in zip(d.rungs, (50e6, 150e6, 500e6))] == pytest.approx([0, 0, 0], abs=0.007)


@pytest.mark.parametrize("change, match", [
    (dict(tiers=(4, 2)), "ascending"), (dict(reference_tier=3), "reference_tier"),
    (dict(rungs=(10**9,)), "rungs"), (dict(measure_every=0.25), "10-50%"),
    (dict(target_loss=float("nan")), "target_loss"), (dict(multipliers=(1.0, -2.0)), "multipliers"),
    (dict(lr_factor=0.0), "lr_factor"), (dict(fraction=0.0), "fraction=0.0 must be in"),
    (dict(fraction=1.5), "fraction"), (dict(tail_window=(40, 10)), "tail_window=\\(40, 10\\) must be two ranks"),
    (dict(head_window=(0, 4)), "head_window")])
def test_preset_rejects_bad_settings(change, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["tiny"].replace(**change)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="paper-d12"):
        get_preset("d99")


def test_presets_configure_the_shared_tuner():
    p = PRESETS["cpu"]
    assert p.tuner == TunerSettings(rungs=(26_624,), multipliers=p.multipliers)
    assert p.budget == 262_144 and p.target_loss == 2.4  # budget raised from 120k, target kept
    w = ZooWorkload(p)
    t = w.trainable()
    assert isinstance(t, ZooTrainable) and t.schedule_tokens == p.budget and t.lr_factor == p.lr_factor
    assert t.eval_every_tokens == int(p.measure_every * p.budget)
    # the paper's two centers around B0 = 2 at tier 8 with its five multipliers (App. B.3):
    # sqrt 2 x {0.5, 0.71, 1, 1.41, 2} and linear 4 x {...}, shared values once
    scales = [c.scale for c in candidate_set("RoPE", 8, reference_tier=2, reference_lrs=w.reference_lrs("RoPE"),
                                             multipliers=p.multipliers)]
    r2 = 2 ** 0.5
    assert scales == pytest.approx([1.0, r2, 2.0, 2 * r2, 4.0, 4 * r2, 8.0])


def test_every_preset_rung_is_a_whole_number_of_steps():
    for p in PRESETS.values():
        w = ZooWorkload(p)
        for f in w.families:
            assert all(r % w.tokens_per_step(f, max(p.tiers)) == 0 for r in p.rungs), (p.name, f)
    with pytest.raises(ValueError, match="not multiples of RoPE at tier 4's 512 tokens per step"):
        ZooWorkload(PRESETS["tiny"].replace(rungs=(1_000, 4_096)))
    # tier 3's steps (384 tokens) divide 1,152 but tier 2's (256) do not: every tier is checked
    with pytest.raises(ValueError, match="not multiples of RoPE at tier 2's 256 tokens per step"):
        ZooWorkload(PRESETS["tiny"].replace(tiers=(2, 3), reference_tier=2, rungs=(1_152,)))


def test_lr_scale_of_needs_one_common_factor():
    assert lr_scale_of({g: r * 3 for g, r in REF.items()}, REF, 2.0) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="not the zoo recipe's rates times one scale"):
        lr_scale_of({**REF, "head": 1.0}, REF, 1.0)
    with pytest.raises(ValueError, match="groups"):
        lr_scale_of({"matrix": 1.0}, REF, 1.0)


def test_reference_lrs_are_the_recipe_rates_times_the_factor():
    # the Untied recipe (protocol §8): embedding 0.3, head 0.002, Muon 0.02; scalars keep the Muon step's 3.6e-3
    w = ZooWorkload(PRESETS["tiny"].replace(lr_factor=3.0, families=("Untied",)))
    assert w.reference_lrs("Untied") == pytest.approx({"matrix": 0.06, "embed": 0.9, "head": 0.006, "scalar": 0.0108})
    assert w.families == ("Untied",)
    assert (w.name, w.unit, w.fraction, w.window) == ("speedrun-tiny", "tokens", 0.2, (4, 12))
    assert callable(w.report_sections)


def test_min_pvalue_is_two_over_n_factorial():
    assert min_pvalue(4) == pytest.approx(1 / 12) and min_pvalue(3) == pytest.approx(1 / 3)
    assert min_pvalue(6) < 0.05 < min_pvalue(4)
    with pytest.raises(ValueError, match="n >= 2"):
        min_pvalue(1)


def test_speedrun_sections_on_sweeps_of_known_order(tmp_path):
    """The speedrun's own report sections on Theorem-6 sweeps whose order is known by construction:
    rho per family and within-family mean beside the paper's, the runs that missed the target with
    their best losses, the underpowered note with the smallest p-value, and the tuner's choices read
    from the pipeline's layout with their edges."""
    import json
    from types import SimpleNamespace

    from examples.speedrun.summary import PAPER, speedrun_sections
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import open_runs

    tiers = (1, 2, 4, 8)
    common = dict(dim=256, grad_dim=64, n_eval=40, n_measure=20, total_tokens=10_000_000, tokens_per_tier=1024)
    good = write_theorem6_sweep(tmp_path / "runs", tiers, family="good",
                                q={t: 0.4 + 0.1 * i for i, t in enumerate(tiers)}, **common)
    # every tier of "slow" stops short of the target (best loss 3.41 > 3.2): all missed, no ranking
    slow = write_theorem6_sweep(tmp_path / "runs", tiers, family="slow", eta=2.0, q=lambda b: 0.6, **common)
    runs = open_runs(good + slow)
    target = 3.2
    preset = get_preset("tiny").replace(target_loss=target, tiers=tiers, reference_tier=1)
    workload = SimpleNamespace(preset=preset, target_loss=target, families=("good", "slow"), unit="tokens",
                               fraction=0.2, window=(20, 60), tiers=tiers)
    out = tmp_path / "report"
    out.mkdir()
    sections = speedrun_sections(workload, runs, out)
    assert len(sections) == 2  # no tune/choices.json yet
    head, missed = sections
    assert "| good | 1.000 | 0.0833 | 4 |" in head  # a perfect order of 4 tiers: p = 2 / 4!
    assert "| slow | – |" in head  # no run reached the target: no rho
    assert f"| within-family mean | 1.000 | | | {PAPER['within_rho_d12']} (d12) |" in head
    assert "smallest exact two-sided p-value of a within-family rho is 0.0833" in head
    assert f"pre-registered target **{target:g}**" in head
    lines = [ln for ln in missed.splitlines() if ln.startswith("| slow-")]
    assert [ln.split(" | ")[0] for ln in lines] == [f"| slow-b{t}" for t in tiers]
    assert not any(ln.startswith("| good-") for ln in missed.splitlines())
    best = min(r.val_curve()[1].min() for r in runs if r.run_id == "slow-b1")
    assert f"| slow-b1 | slow | 1 | {best:.3f} |" in missed

    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "choices.json").write_text(json.dumps({"choices": [
        {"family": "good", "tier": 2, "scale": 1.41421356, "loss": 3.25, "at_edge": "largest"},
        {"family": "good", "tier": 4, "scale": 2.0, "loss": None, "at_edge": None}]}), encoding="utf-8")
    tuned = speedrun_sections(workload, runs, out)[-1]
    assert "| good | 2 | 1.414 | 3.250 | largest candidate: the best rate may lie beyond |" in tuned
    assert "| good | 4 | 2 | – |  |" in tuned
    assert "`tune/choices.json`" in tuned

    # every run reached the target: the section says so instead of an empty table
    assert speedrun_sections(SimpleNamespace(**{**vars(workload), "families": ("good",)}),
                             open_runs(good), out)[1] == f"## Target loss\n\nEvery run reached {target:g}."
