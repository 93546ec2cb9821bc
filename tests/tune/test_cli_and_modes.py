"""Asynchronous mode, argument checks, progress output and the command line."""
import json

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune  # noqa: E402
from examples.tune.__main__ import main  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402

CFG = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 32], reference_tier=8, rungs=[30, 90, 270], progress=False)


def test_asynchronous_mode_one_study_per_family_tier(tmp_path):
    import optuna

    storage = f"journal:{tmp_path}/j.log"
    res = tune(SyntheticTrainable(), workdir=tmp_path, mode="asynchronous", storage=storage, study_name="s",
               min_resource=30, reduction_factor=3, **CFG)
    st = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp_path}/j.log"))
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(st))
    assert names == ["s/f/b1", "s/f/b32"]
    for name, n in (("s/f/b1", 8), ("s/f/b32", 7)):
        study = optuna.load_study(study_name=name, storage=st)
        assert len(study.trials) == n and {t.user_attrs["tier"] for t in study.trials} == {int(name[-2:].strip("b"))}
    states = {s.state for s in res.trials}
    assert states <= {"complete", "pruned"} and "pruned" in states
    # ASHA in one sequential worker keeps the first trial; the best of the completed ones is chosen
    for tier in (1, 32):
        done = [s for s in res.trials if s.candidate.tier == tier and s.state == "complete"]
        best = min(done, key=lambda s: (s.rung_losses[-1], s.candidate.scale))
        assert res.choices[("f", tier)] == best.candidate
    assert res.survivors == {}


def test_pruner_settings_are_explicit(tmp_path):
    from examples.tune.tuner import _open_studies, _validate

    cfg = _validate(CFG["families"], [8], 8, [30, 90], "asynchronous", 1, None, 10, 3, (1.0, 2.0), 1e-9, None)
    (study,) = _open_studies(cfg, None, "x").values()
    p = study.pruner
    assert (p._min_resource, p._reduction_factor, p._min_early_stopping_rate) == (10, 3, 0)


@pytest.mark.parametrize("kw, match", [
    (dict(families={}), "empty candidate set: families is empty"),
    (dict(families={"f": {}}), "empty candidate set: family 'f' has no reference rates"),
    (dict(families={"a/b": {"lr": 1.0}}), "family name 'a/b' must be a non-empty string without '/'"),
    (dict(tiers=[]), "empty candidate set: no tiers"),
    (dict(tiers=[0]), "tier 0 must be a positive int"),
    (dict(tiers=[2, 2]), "repeat a tier"),
    (dict(rungs=[90, 30]), "strictly increasing"),
    (dict(mode="fastest"), "mode='fastest'"),
    (dict(n_workers=2), "n_workers=2 needs a shared storage; None is single-worker"),
    (dict(n_workers=2, storage="sqlite:///x.db"), "'sqlite:///x.db' is single-worker"),
    (dict(multipliers=()), "empty candidate set for family 'f' tier 1"),
    (dict(storage="journal:/nonexistent-dir-xyz/j.log"), "cannot be opened"),
    (dict(multipliers=(1.0, 1.00001)), r"candidates \['f/b1/x0.125', 'f/b1/x0.3536', .*share a key \(scales equal to 4 significant digits\)"),
    (dict(heartbeat_interval=5.0, grace_period=5.0), "must be > 0 and below grace_period=5.0"),
    (dict(extrapolate_to=0), "extrapolate_to=0 must be a positive budget"),   # was 'math domain error' mid-study
])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tune(SyntheticTrainable(), workdir=tmp_path, **(CFG | kw))


def test_progress_lines_and_summary_table(tmp_path, capsys):
    res = tune(SyntheticTrainable(), workdir=tmp_path, **(CFG | dict(tiers=[8], progress=True)))
    err = capsys.readouterr().err
    assert "tune: 5/5 finished | done 1 running 0 pruned 4 failed 0 waiting 0 | best f/b8/x1 " in err
    assert "tune: trial 2 f/b8/x1: rung 2 -> 270" in err
    table = res.table()
    assert table in err
    head, *rows = table.splitlines()
    assert head.split() == ["family", "tier", "scale", "state", "rung0@30", "rung1@90", "rung2@270", "extrap", "chosen"]
    assert [r.split()[2] for r in rows] == ["0.5", "0.7071", "1", "1.414", "2"]
    assert [r.split()[-1] for r in rows].count("*") == 1 and rows[2].endswith("*")


def test_cli_synthetic(tmp_path, capsys):
    rc = main(["synthetic", "--tiers", "8", "32", "--rungs", "30", "90", "--workdir", str(tmp_path),
               "--family", "a=adam:0.001,muon:0.02", "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "choices.json").read_text())
    assert {(r["family"], r["tier"]) for r in data["choices"]} == {("a", 8), ("a", 32)}
    assert all(set(r["lrs"]) == {"adam", "muon"} for r in data["choices"])
    assert "choices written to" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["synthetic", "--tiers", "8", "--rungs", "90", "30", "--workdir", "W"], "strictly increasing"),
    (["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", "W", "--storage", "redis://x"], "unknown scheme"),
    (["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", "W", "--family", "oops"], "expected NAME=GROUP:LR"),
    (["zoo", "--variants", "Nope", "--tiers", "8", "--rungs", "30", "--workdir", "W", "--eval-every-tokens", "10"],
     "unknown variant 'Nope'"),
    (["synthetic", "--tiers", "8", "--workdir", "W"], "the following arguments are required: --rungs"),
    (["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", "F", "--quiet"], "File exists"),  # an OSError
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, match):
    (tmp_path / "a-file").write_text("")
    argv = [str(tmp_path / "w") if a == "W" else str(tmp_path / "a-file") if a == "F" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err


def test_cli_ctrl_c_is_one_line_and_workers_stop_quietly(tmp_path, capsys, monkeypatch):
    # Ctrl-C used to print a KeyboardInterrupt traceback from the command and one from each spawned worker
    import examples.tune.tuner as tuner
    from examples.tune.synthetic import SyntheticTrainable

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SyntheticTrainable, "__call__", interrupted)
    try:
        rc = main(["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", str(tmp_path / "w"), "--quiet"])
    except KeyboardInterrupt:
        pytest.fail("the command let KeyboardInterrupt through (a traceback)")
    err = capsys.readouterr().err.strip()
    assert rc == 130 and len(err.splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    # a spawned worker's entry point ends with status 130 instead of raising (no traceback from multiprocessing)
    monkeypatch.setattr(tuner, "_open_studies", interrupted)
    with pytest.raises(SystemExit) as e:
        try:
            tuner._worker_main(None, None, None, "s", tmp_path, 10.0, 60.0, 0.1)
        except KeyboardInterrupt:
            pytest.fail("the worker let KeyboardInterrupt through (a traceback)")
    assert e.value.code == 130


def test_progress_bar_on_a_tty(tmp_path):
    import io

    from examples.tune.progress import Progress
    from examples.tune.tuner import _open_studies, _validate

    class Tty(io.StringIO):
        def isatty(self):
            return True

    cfg = _validate({"f": {"lr": 1.0}}, [8], 8, [30], "synchronized", 1, None, None, 2, (1.0, 2.0), 1e-9, None)
    studies = _open_studies(cfg, None, "x")
    out = Tty()
    bar = Progress(total=2, stream=out)
    assert bar.bar is not None                       # tqdm, not plain lines
    bar.update(studies.values())
    bar.note("hello")
    bar.close()
    text = out.getvalue()
    assert "done 0 running 0 pruned 0 failed 0 waiting 2" in text and "tune: hello" in text


@pytest.mark.parametrize("kw", [dict(reduction_factor=3), dict(min_resource=30)])
def test_synchronized_mode_refuses_the_asynchronous_pruners_settings(tmp_path, kw):
    # they were validated and then ignored: synchronized mode always keeps the better half at every rung
    with pytest.raises(ValueError, match="asynchronous pruner's settings; synchronized mode"):
        tune(SyntheticTrainable(), workdir=tmp_path, **kw, **CFG)
    assert not (tmp_path / "choices.json").exists()


@pytest.mark.parametrize("quiet", [True, False])
def test_cli_a_family_tier_without_a_choice_is_said_on_stderr_with_exit_1(tmp_path, capsys, monkeypatch, quiet):
    """Every tier-32 candidate diverged: the command exited 0, and with --quiet said nothing about it,
    so a script went on to train with a choices file that lacks that tier."""
    import functools

    import examples.tune.synthetic as synthetic

    monkeypatch.setattr(synthetic, "SyntheticTrainable", functools.partial(SyntheticTrainable, nan_above=0.9))
    rc = main(["synthetic", "--tiers", "8", "32", "--rungs", "30", "90", "--workdir", str(tmp_path)]
              + (["--quiet"] if quiet else []))
    out, err = capsys.readouterr()
    assert rc == 1
    assert "choices written to" in out  # the other tier's choice is kept
    data = json.loads((tmp_path / "choices.json").read_text())
    assert [(r["family"], r["tier"]) for r in data["choices"]] == [("synthetic", 8)]
    lines = [line for line in err.splitlines() if "no choice for synthetic/b32" in line]
    assert len(lines) == 1 and "every candidate failed" in lines[0], err
    if quiet:
        assert err.splitlines() == lines
    assert "synthetic/b8" not in "".join(lines)
