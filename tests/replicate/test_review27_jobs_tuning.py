"""Review 27 (jobs): the toy's and the speedrun's tuning stage printed Optuna's INFO lines (``[I <time>] A new study
created in Journal ...`` and, from a spawned worker, ``Using an existing study ... instead of creating a new one``,
which reads as a problem) between the tuner's own ``tune:`` lines; ``python -m examples.tune`` silences them. The
stage runs the tuner (and its workers, which take the parent's verbosity) at WARNING, and restores the level."""
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna", reason="the tuner needs the tune extra")

import examples.tune as tune_pkg  # noqa: E402
from examples.replicate import tuning  # noqa: E402


def test_the_tuning_stage_runs_the_tuner_without_optunas_info_lines(tmp_path, monkeypatch):
    seen = []

    def fake_tune(trainable, *, choices_path, **kwargs):
        seen.append(optuna.logging.get_verbosity())  # what the tuner and its spawned workers log at
        raise KeyboardInterrupt  # stopped there: only the level is checked
    monkeypatch.setattr(tune_pkg, "tune", fake_tune)
    workload = SimpleNamespace(families=("Muon",), tiers=(16,), reference_tier=16, name="w",
                               reference_lrs=lambda f: {"lr": 1e-3}, trainable=lambda: None)
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default
    try:
        with pytest.raises(KeyboardInterrupt):
            tuning.choose_rates(workload, tmp_path / "tune", tuning.TunerSettings(rungs=(10,)))
        assert seen == [optuna.logging.WARNING]
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # restored, on the way out of an exception too
    finally:
        optuna.logging.set_verbosity(before)
