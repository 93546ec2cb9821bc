"""Review 26 (jobsig): the two replication jobs' command lines behave as the tuner's on SIGTERM (one line with the
program prefix, status 143; the tuner's trials released, the measured run's record marked failed and retrained by
the rerun); the speedrun records and reports its machine as the toy does; the zoo trainer stops on a non-finite
loss (``TrainingDiverged``, status 1 from its command line, no NaN checkpoint); a speedrun run the lens cannot
measure (``NonFiniteError`` with a finite loss) is kept as diverged instead of failing the job on every rerun."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import examples.speedrun.workload as wl
from examples.cli import Terminated, sigterm_raises
from examples.replicate.machine import machine_info, machine_section
from examples.replicate.runs import _status
from examples.speedrun.presets import PRESETS
from support.lens_faults import overflow_on_second_measure  # noqa: E402
from spectral_lens.analysis import divergence
from spectral_lens.records import RunInfo, RunWriter, open_runs


def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode: Terminated is raised here
    raise AssertionError("SIGTERM did not stop the job")


def test_the_toy_job_turns_sigterm_into_one_line_and_status_143(tmp_path, monkeypatch, capsys):
    import examples.replicate.pipeline as pipeline
    from examples.toy.__main__ import main

    monkeypatch.setattr(pipeline, "replicate", _sigterm_self)  # SIGTERM in the tuning stage
    assert main(["--preset", "smoke", "--out", str(tmp_path / "toy")]) == 143
    err = capsys.readouterr().err
    assert err == "python -m examples.toy: terminated: rerun the same command to resume (finished runs are kept)\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "replicate", ctrl_c)
    assert main(["--preset", "smoke", "--out", str(tmp_path / "toy")]) == 130
    assert capsys.readouterr().err.startswith("python -m examples.toy: interrupted: rerun the same command")


def test_the_speedrun_job_turns_sigterm_into_one_line_and_status_143(tmp_path, monkeypatch, capsys):
    import examples.replicate as replicate
    from examples.speedrun.__main__ import main

    monkeypatch.setattr(replicate, "replicate", _sigterm_self)
    assert main(["--preset", "tiny", "--out", str(tmp_path / "sr"), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert err == ("python -m examples.speedrun: terminated: rerun the same command to resume (finished runs are "
                   "kept)\n")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_sigterm_the_caller_handles_is_left_alone():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_in_a_measured_run_marks_its_record_failed_for_the_rerun(tmp_path):
    # the pipeline trains a run into .partial and retrains a .partial a stopped job left: the writer's record
    # names the signal, and the exception (a KeyboardInterrupt) still reaches the command line
    info = RunInfo("muon-b8", family="Muon", batch_tier=8, total_tokens=100)
    with pytest.raises(Terminated), sigterm_raises():
        with RunWriter(tmp_path / "run", info) as w:
            w.log(1, 10, train_loss=1.0)
            os.kill(os.getpid(), signal.SIGTERM)
    extras = json.loads((tmp_path / "run" / "run.json").read_text())["extras"]
    assert extras["status"] == "failed" and extras["failure"] == "examples.cli.Terminated: SIGTERM"


# ---- the machine ----------------------------------------------------------------------------------------------

def test_the_speedrun_records_its_machine_and_reports_it(tmp_path):
    w = wl.ZooWorkload(PRESETS["tiny"], verbose=False)
    family = w.families[0]
    run_dir = w.run(family, 4, w.reference_lrs(family), tmp_path / "runs" / "run")
    m = json.loads((run_dir / "run.json").read_text())["extras"]["machine"]
    assert m == json.loads(json.dumps(machine_info("cpu")))
    runs = open_runs([run_dir])
    text = "\n".join(w.report_sections(runs, tmp_path / "report"))
    assert "## Machine" in text and str(m["cpu"]) in text and run_dir.name in text


def test_the_machine_section_names_a_gpu_and_tells_two_gpus_apart(tmp_path):
    base = machine_info()
    assert "gpu" not in base  # the toy's records are unchanged

    def run(name, machine):
        info = RunInfo(name, family="F", batch_tier=8, total_tokens=100, extras={"machine": machine})
        with RunWriter(tmp_path / name, info) as w:
            w.log(1, 10, val_loss=1.0)
        return tmp_path / name
    runs = open_runs([run("a", dict(base, gpu="NVIDIA H100; compute capability 9.0; CUDA 12.4")),
                      run("b", dict(base, gpu="NVIDIA A100; compute capability 8.0; CUDA 12.4"))])
    text = machine_section(runs)
    assert "GPU NVIDIA H100" in text and "GPU NVIDIA A100" in text and "2 different machines" in text


# ---- divergence -----------------------------------------------------------------------------------------------

def _nan_after_first_eval(real_train, evals):
    def diverging_train(**kw):
        on_eval = kw.get("on_eval")

        def hooked(model, step, tokens, val_loss):
            evals.append((step, val_loss))
            if on_eval is not None:
                on_eval(model, step, tokens, val_loss)
            if len(evals) == 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(math.nan)
        return real_train(**{**kw, "on_eval": hooked})
    return diverging_train


def test_the_trainer_stops_at_a_nan_training_loss_and_keeps_no_nan_checkpoint(tmp_path):
    from examples.nanogpt.train import TrainingDiverged, train

    evals = []
    kw = dict(variant="FlexWin", profile="tiny", run_dir=tmp_path / "t", steps=40, batch_tier=1,
              eval_every_tokens=10**9, checkpoint_every_tokens=None, log_every=5, verbose=False)
    with pytest.raises(TrainingDiverged) as ei:
        _nan_after_first_eval(train, evals)(**kw)
    e = ei.value
    assert e.what == "training loss" and math.isnan(e.value) and e.step == 5 and e.checkpoint is None
    assert isinstance(e, FloatingPointError) and "no checkpoint was saved" in str(e)
    assert len(evals) == 1  # stopped at the first NaN loss read, not trained on to the next evaluation
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5 and math.isnan(rows[-1]["train_loss"])
    assert not list((tmp_path / "t").glob("ckpt_*.pt"))  # save_final: no checkpoint of the NaN model


@pytest.mark.slow  # > 3 s: trains twice / to a rung
def test_the_trainer_names_its_last_finite_checkpoint(tmp_path):
    from examples.nanogpt.train import TrainingDiverged, train

    calls = []

    def on_eval(model, step, tokens, val_loss):
        calls.append(step)
        if step == 4:  # after the checkpoint at step 4: the next checkpoint would hold NaN weights
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
    one = train(variant="FlexWin", profile="tiny", run_dir=tmp_path / "probe", steps=1, batch_tier=1,
                save_final=False, verbose=False)
    per_step = one.tokens
    with pytest.raises(TrainingDiverged) as ei:
        train(variant="FlexWin", profile="tiny", run_dir=tmp_path / "t", steps=40, batch_tier=1,
              eval_every_tokens=4 * per_step, checkpoint_every_tokens=4 * per_step, log_every=100,
              on_eval=on_eval, verbose=False)
    e = ei.value
    # the loss turned NaN at step 5 and was read at step 8, where an evaluation and a checkpoint were due: no
    # checkpoint of the NaN weights; the evaluation's NaN stops the run
    assert e.step == 8 and e.what == "validation loss" and calls == [0, 4, 8]
    assert e.checkpoint == tmp_path / "t" / "ckpt_000004.pt" and e.checkpoint.exists()
    assert [p.name for p in (tmp_path / "t").glob("ckpt_*.pt")] == ["ckpt_000004.pt"]


def test_the_trainer_cli_says_diverged_in_one_line_with_status_1(tmp_path, monkeypatch, capsys):
    import examples.nanogpt.train as tr
    from examples.nanogpt.__main__ import main

    def diverging(**kw):
        raise tr.TrainingDiverged("train: FlexWin diverged: training loss nan at step 5 (320 tokens); no checkpoint "
                                  "was saved before it", step=5, tokens=320, what="training loss", value=math.nan,
                                  checkpoint=None)
    monkeypatch.setattr(tr, "train", diverging)
    assert main(["train", "--steps", "10", "--run-dir", str(tmp_path / "t")]) == 1
    assert capsys.readouterr().err == ("python -m examples.nanogpt train: FlexWin diverged: training loss nan at "
                                       "step 5 (320 tokens); no checkpoint was saved before it\n")


@pytest.mark.slow  # > 3 s: trains twice / to a rung
def test_a_tuner_trial_with_a_nan_training_loss_still_fails_alone(tmp_path, monkeypatch):
    import examples.nanogpt.train as tr
    from examples.tune.candidates import Candidate
    from examples.tune.zoo import ZooTrainable, zoo_reference_lrs

    evals = []
    monkeypatch.setattr(tr, "train", _nan_after_first_eval(tr.train, evals))
    z = ZooTrainable(eval_every_tokens=10**9, profile="tiny")
    lrs = zoo_reference_lrs("FlexWin")
    cand = Candidate("FlexWin", 1, 1.0, lrs, ((8, 1.0),))
    reports = []
    with pytest.raises(tr.TrainingDiverged):  # the worker fails the trial on any exception (examples.tune.worker)
        z(cand, 64 * 40, horizon=64 * 40, workdir=tmp_path / "trial", report=lambda r, v: reports.append(v))
    # the NaN is still reported (the tuner's report fails the trial on it, as before), and no checkpoint of the
    # NaN model is left for a promotion to resume from
    assert len(reports) == 2 and math.isfinite(reports[0]) and math.isnan(reports[1])
    assert not list((tmp_path / "trial").glob("ckpt*.pt"))


def test_a_speedrun_run_with_a_nan_training_loss_is_kept_as_diverged(tmp_path, monkeypatch):
    evals = []
    monkeypatch.setattr(wl, "train", _nan_after_first_eval(wl.train, evals))
    w = wl.ZooWorkload(PRESETS["tiny"], verbose=False)
    family = w.families[0]
    run_dir = w.run(family, 4, w.reference_lrs(family), tmp_path / "run")
    assert _status(run_dir) == "diverged"
    (run,) = open_runs([Path(run_dir)])
    assert "diverged" in divergence(run) and len(run.measurements) == 1


def test_a_speedrun_run_the_lens_cannot_measure_is_kept_as_diverged_not_failed(tmp_path, monkeypatch):
    # float32 overflow of the activations with a finite loss: NonFiniteError (a ValueError) marked the record
    # failed and stopped the job with status 2; the rerun retrained the .partial run into the same error
    calls = overflow_on_second_measure(monkeypatch)
    w = wl.ZooWorkload(PRESETS["tiny"], verbose=False)
    family = w.families[0]
    run_dir = w.run(family, 4, w.reference_lrs(family), tmp_path / "run")  # returns: a result
    assert _status(run_dir) == "diverged"
    extras = json.loads((run_dir / "run.json").read_text())["extras"]
    assert "the lens could not measure" in extras["divergence"] and "overflowed" in extras["divergence"]
    (run,) = open_runs([Path(run_dir)])
    assert len(run.measurements) == 1 and len(calls) == 2  # stopped at the unmeasurable point
