"""Audit (session 25, toyjob): the README main job (``python -m examples.toy``) killed at each stage and rerun
resumes to the uninterrupted job's results; kills are injected in-process into the ``smoke`` preset."""
import json
import shutil

import pytest
from support.figures import save_figures_unrendered

pytest.importorskip("optuna", reason="the toy's tuner needs the tune extra: pip install -e '.[tune]'")

from examples.toy.__main__ import main  # noqa: E402


class Killed(KeyboardInterrupt):
    """What Ctrl-C raises, injected at a chosen point."""


CLOCK = ("time", "tokens_per_s")  # wall-clock fields: the only ones a rerun may change


def _lines(path):
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCK} for line in path.read_text().splitlines()]


def _records(out):
    """Every run's measurements (spectra, val losses, probes) and log, without the wall-clock fields."""
    return {p.name: (_lines(p / "measurements.jsonl"), _lines(p / "log.jsonl"))
            for p in sorted((out / "runs").iterdir()) if not p.name.startswith(".")}


@pytest.mark.slow  # ~5 s: trains two of the three smoke runs again
def test_a_job_killed_mid_training_of_a_tier_resumes_to_the_uninterrupted_results(smoke_job, tmp_path, capsys,
                                                                                  monkeypatch):
    from examples.toy import workload as wl

    status, finished, _ = smoke_job
    assert status == 0
    out = tmp_path / "toy"
    shutil.copytree(finished, out)
    for name in ("muon-b32", "muon-b64"):
        shutil.rmtree(out / "runs" / name)
    shutil.rmtree(out / "report")
    real = wl.ToyRun.train_until
    calls = {"n": 0}

    def killed_midway(self, budget, horizon, x, y, on_step=None):
        def step(r, loss):
            on_step(r, loss)
            if r.seen >= budget // 2:
                raise Killed()
        calls["n"] += 1
        return real(self, budget, horizon, x, y, step)

    save_figures_unrendered(monkeypatch)  # the report's figures: built and saved, not rendered (most of the time)
    monkeypatch.setattr(wl.ToyRun, "train_until", killed_midway)
    assert main(["--preset", "smoke", "--out", str(out)]) == 130
    assert calls["n"] == 1 and "rerun the same command to resume" in capsys.readouterr().err
    assert not (out / "runs" / "muon-b32").exists() and (out / "runs" / ".partial" / "muon-b32").exists()
    monkeypatch.setattr(wl.ToyRun, "train_until", real)
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert "1 of 3 runs already complete; training 2" in capsys.readouterr().out
    assert not (out / "runs" / ".partial").exists()
    assert _records(out) == _records(finished)
    assert (out / "report" / "verdict.json").read_text() == (finished / "report" / "verdict.json").read_text()


@pytest.mark.slow  # ~5 s (~65 s before the interrupted worker released its trials: the rerun waited out grace_period)
def test_a_job_killed_during_tuning_resumes_to_the_uninterrupted_choices(smoke_job, tmp_path, capsys, monkeypatch):
    from examples.toy import workload as wl

    status, finished, _ = smoke_job
    assert status == 0
    out = tmp_path / "toy"
    real = wl.ToyTrainable.__call__
    calls = {"n": 0}

    def killed_at_the_fifth_trial(self, candidate, budget, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed()
        return real(self, candidate, budget, **kw)

    monkeypatch.setattr(wl.ToyTrainable, "__call__", killed_at_the_fifth_trial)
    assert main(["--preset", "smoke", "--out", str(out)]) == 130
    capsys.readouterr()
    assert not (out / "tune" / "choices.json").exists() and not (out / "runs").exists()
    monkeypatch.setattr(wl.ToyTrainable, "__call__", real)
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    capsys.readouterr()

    def choices(o):
        c = json.loads((o / "tune" / "choices.json").read_text())
        return [(x["family"], x["tier"], x["lrs"]) for x in c["choices"]]
    assert choices(out) == choices(finished)
    assert _records(out) == _records(finished)


def test_a_measured_run_that_diverges_is_kept_as_diverged_and_the_verdict_ranks_it_last(smoke_job, tmp_path, capsys,
                                                                                        monkeypatch):
    # a tier whose measured run diverged stopped the whole job with status 2 and kept nothing of it; the rerun
    # trained it again, with the same seed and rate, and diverged again: the job could never give its verdict.
    # The library ranks a run recorded as diverged last (eps_tok inf), as a tier that never reached the target
    import math

    from examples.toy import workload as wl
    from spectral_lens.analysis import divergence
    from spectral_lens.records import open_runs

    status, finished, _ = smoke_job
    assert status == 0
    out = tmp_path / "toy"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "runs" / "muon-b32")
    real = wl.ToyRun.train_until

    def nan_from_step_1(self, budget, horizon, x, y, on_step=None):
        def step(r, loss):
            on_step(r, math.nan if self.batch == 32 and r.step >= 1 else loss)
        return real(self, budget, horizon, x, y, step)

    save_figures_unrendered(monkeypatch)
    monkeypatch.setattr(wl.ToyRun, "train_until", nan_from_step_1)
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert "muon-b32 diverged (lrs" in capsys.readouterr().out
    run, = open_runs([out / "runs" / "muon-b32"])
    assert run.info.extras["status"] == "diverged" and "nan" in run.info.extras["divergence"]
    assert "diverged: train_loss nan at step 1" in divergence(run)
    assert max(e["step"] for e in run.events) == 1  # training stopped there, before the target
    v = json.loads((out / "report" / "verdict.json").read_text())["families"]["Muon"]
    assert 32 in v["missed"] and "32" not in v["reached"]
    assert "(not: 32 (diverged))" in (out / "report" / "verdict.txt").read_text() and v["diverged"] == [32]
    # the rerun keeps it (it is finished): nothing is trained again
    monkeypatch.setattr(wl.ToyRun, "train_until", real)
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert "3 of 3 runs already complete; training 0" in capsys.readouterr().out


def test_a_nan_validation_loss_at_a_measurement_ends_the_run_as_diverged_without_measuring(tmp_path, monkeypatch):
    # a model whose weights went non-finite in an update whose loss was still finite is found by the next
    # validation; measuring its spectra then would record NaN spectra (or fail to converge) as results
    import math

    from examples.toy import measure
    from examples.toy.presets import PRESETS
    from examples.toy.workload import ToyWorkload
    from spectral_lens.analysis import divergence
    from spectral_lens.records import open_runs

    real = measure.ToyLens._probe_pass

    def nan_after_step_3(self, fourier=True):
        val, f = real(self, fourier)
        return (math.nan, {}) if calls.append(1) or len(calls) > 2 else (val, f)

    calls = []
    monkeypatch.setattr(measure.ToyLens, "_probe_pass", nan_after_step_3)
    measured = []
    monkeypatch.setattr(measure.sl.SpectralLens, "measure",
                        lambda self, *a, _real=measure.sl.SpectralLens.measure, **k: measured.append(a) or _real(self, *a, **k))
    wl = ToyWorkload(PRESETS["smoke"])
    run_dir = wl.run("Muon", 32, {"embed": 4e-3, "hidden": 0.03}, tmp_path / "muon-b32")
    run, = open_runs([run_dir])
    assert run.info.extras["status"] == "diverged" and "validation loss nan" in run.info.extras["divergence"]
    assert len(measured) == len(run.measurements) == 2  # steps 0 and 2 measured; not the NaN one (step 4)
    assert "diverged: val_loss nan at step 4" in divergence(run)


def test_verdict_json_records_the_rule_it_was_judged_by(smoke_job):
    # the target, fraction and window are guarded by preset.json, but the rho threshold and the significance
    # level were only in the text: verdict.json alone could not say whether "reproduced" meant rho >= 0.8
    from examples.replicate.verdict import ALPHA, REPRODUCED_RHO

    status, finished, _ = smoke_job
    assert status == 0
    v = json.loads((finished / "report" / "verdict.json").read_text())
    assert v["reproduced_rho"] == REPRODUCED_RHO == 0.8 and v["alpha"] == ALPHA == 0.05
    assert v["target"] == 2.0 and v["fraction"] == 0.2
