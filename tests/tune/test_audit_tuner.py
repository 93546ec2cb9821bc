"""Audit of the tuner's command line: settings that no trial can train with are one-line errors
(exit status 2) before any trial runs, and zoo variant names are the registry's spelling.

Before this audit each bad setting below made every trial fail inside the trainable, and the command
printed "choices written to ..." with exit status 0 and an empty choices file.
"""
import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

import examples.tune.tuner as tuner_module  # noqa: E402
from examples.tune.__main__ import main  # noqa: E402

SYN = ["synthetic", "--tiers", "8", "--rungs", "10", "20", "--workdir", "W", "--quiet"]
ZOO = ["zoo", "--variants", "RoPE", "--tiers", "8", "--rungs", "4096", "8192", "--workdir", "W", "--quiet"]


def _run(argv, tmp_path):
    argv = [str(tmp_path / "w") if a == "W" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    return e.value.code


@pytest.mark.parametrize("argv, says", [
    (SYN + ["--eval-every", "0"], "eval_every"),
    (SYN + ["--eval-every", "-3"], "eval_every"),
    (SYN + ["--sleep", "-1"], "sleep"),
    (SYN + ["--sleep", "nan"], "sleep"),
    (ZOO + ["--eval-every-tokens", "0"], "eval_every_tokens"),
    (ZOO + ["--eval-every-tokens", "512", "--val-tokens", "0"], "val_tokens"),
    (ZOO + ["--eval-every-tokens", "512", "--profile", "bogus"], "unknown profile 'bogus'"),
    (ZOO + ["--eval-every-tokens", "512", "--device", "bogus"], "device='bogus'"),
    (ZOO + ["--eval-every-tokens", "512", "--data", "/nonexistent/shards"], "data='/nonexistent/shards'"),
    (SYN + ["--family", "a=lr:1e-3", "--family", "a=lr:2e-3"], "family 'a' is given twice"),
    (ZOO + ["--eval-every-tokens", "512", "--variants", "unet", "U-Net"], "variant 'U-Net' is given twice"),
    # the synchronized rule always keeps the top half: these settings would be silently ignored
    (SYN + ["--reduction-factor", "3"], "--reduction-factor applies to --mode asynchronous only"),
    (SYN + ["--mode", "synchronized", "--min-resource", "10"], "--min-resource applies to --mode asynchronous only"),
])
def test_unusable_settings_are_one_line_exit_2_before_any_training(tmp_path, capsys, argv, says):
    assert _run(argv, tmp_path) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert "choices written" not in cap.out
    assert not (tmp_path / "w" / "choices.json").exists()
    assert not (tmp_path / "w" / "trials").exists()  # no trial was started


def test_asynchronous_mode_takes_the_pruner_settings(tmp_path, capsys):
    assert _run(SYN + ["--mode", "asynchronous", "--reduction-factor", "3", "--min-resource", "10"], tmp_path) == 0
    assert (tmp_path / "w" / "choices.json").exists()


def test_zoo_families_are_the_registry_spelling(tmp_path, monkeypatch):
    """``--variants unet sublr`` tunes "U-Net" and "AttnScale": the choices file must name the variants as
    every reader looks them up (before: "unet"/"sublr" rows that a lookup of ("U-Net", tier) misses)."""
    seen = {}

    def fake_tune(trainable, *, families, **kw):
        seen.update(families)
        raise KeyboardInterrupt  # stop here: only the families matter

    monkeypatch.setattr(tuner_module, "tune", fake_tune)
    assert _run(ZOO + ["--eval-every-tokens", "512", "--variants", "unet", "sublr"], tmp_path) == 130
    assert sorted(seen) == ["AttnScale", "U-Net"]


def test_missing_choice_message_says_why_when_only_the_finalist_diverged(tmp_path):
    """Five candidates, rungs 10/20/40: the one finalist reports NaN at the last rung, four were pruned with
    finite losses. The family/tier has no choice (docs/tuning.md rule 5), and the table must not claim that
    every candidate failed (it did before)."""
    from dataclasses import dataclass

    from examples.tune import tune
    from examples.tune.synthetic import SyntheticTrainable

    @dataclass(frozen=True)
    class LateNaN(SyntheticTrainable):
        def __call__(self, candidate, budget, *, horizon, workdir, report):
            if budget == horizon:
                report(budget, float("nan"))
                return
            super().__call__(candidate, budget, horizon=horizon, workdir=workdir, report=report)

    res = tune(LateNaN(), families={"f": {"lr": 1e-3}}, tiers=[8], reference_tier=8, rungs=[10, 20, 40],
               workdir=tmp_path, progress=False)
    assert res.missing == [("f", 8)] and not res.choices
    assert sorted(s.state for s in res.trials) == ["failed", "pruned", "pruned", "pruned", "pruned"]
    table = res.table()
    assert "every candidate failed" not in table
    assert "no choice for f/b8: every candidate that reached the last rung failed" in table


def test_pipeline_refuses_choices_tuned_under_other_settings(tmp_path):
    """examples/replicate/tuning.choose_rates reuses an existing choices file (an interrupted pipeline must not
    tune twice). Before this audit it reused one tuned with other rungs, mode or reference tier without a
    word; the tuner itself refuses such a resume ("started with other settings")."""
    from examples.replicate.tuning import TunerSettings, choose_rates
    from examples.tune.synthetic import SyntheticTrainable

    class Workload:
        name, families, tiers, reference_tier = "w", ("A",), (1, 2), 1

        def reference_lrs(self, family):
            return {"lr": 1e-3}

        def trainable(self):
            return SyntheticTrainable()

    first = choose_rates(Workload(), tmp_path / "tune", TunerSettings(rungs=(10,), multipliers=(1.0,)), stream=False)
    again = choose_rates(Workload(), tmp_path / "tune", TunerSettings(rungs=(10,), multipliers=(1.0,)), stream=False)
    assert again == first and set(first) == {("A", 1), ("A", 2)}
    with pytest.raises(ValueError, match=r"rungs \[10\] vs \[10, 20\].*delete .*tune"):
        choose_rates(Workload(), tmp_path / "tune", TunerSettings(rungs=(10, 20), multipliers=(1.0,)), stream=False)
    other = Workload()
    other.reference_tier = 2
    with pytest.raises(ValueError, match=r"reference_tier 1 vs 2"):
        choose_rates(other, tmp_path / "tune", TunerSettings(rungs=(10,), multipliers=(1.0,)), stream=False)
    with pytest.raises(ValueError, match=r"mode 'synchronized' vs 'asynchronous'"):
        choose_rates(Workload(), tmp_path / "tune", TunerSettings(rungs=(10,), mode="asynchronous", multipliers=(1.0,)),
                     stream=False)
