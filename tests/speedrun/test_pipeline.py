"""The speedrun end to end on the ``tiny`` preset through the CLI and the shared pipeline, resume, the library CLI."""
import json
import os

import pytest
import torch
from support.figures import save_figures_unrendered

from examples.nanogpt.train import train
from examples.speedrun.__main__ import main
from examples.speedrun.presets import PRESETS
from examples.speedrun.workload import ZooWorkload
from examples.tune import load_choices
from examples.tune.trainable import Candidate
from spectral_lens.cli import main as cli_main
from spectral_lens.records import open_runs


def test_stopped_and_resumed_run_is_the_straight_run(tmp_path):
    # the trainer hook behind promoted trials: stop at a rung, resume, same run as never stopped
    kw = dict(variant="Muon", profile="tiny", data="pydoc", tokens=4096, batch_tier=2, seq_len=64, rows=2,
              eval_every_tokens=1024, val_tokens=512, seed=0, verbose=False)
    straight = train(run_dir=tmp_path / "a", save_final=False, **kw)
    first = train(run_dir=tmp_path / "b", stop_tokens=1536, **kw)
    assert first.tokens == 1536 and (tmp_path / "b" / "ckpt_000006.pt").exists()
    rest = train(run_dir=tmp_path / "b", resume=tmp_path / "b" / "ckpt_000006.pt", save_final=False, **kw)
    assert rest.steps == straight.steps == 16
    assert rest.final_val_loss == straight.final_val_loss
    losses = {h["tokens"]: h["val_loss"] for h in first.history + rest.history}
    assert losses == {h["tokens"]: h["val_loss"] for h in straight.history} | {1536: first.final_val_loss}


def test_zoo_trainable_trial_is_a_prefix_of_the_run_budget_schedule(tmp_path):
    # the speedrun's trainable: schedule over the run budget (8192), whatever the trial's horizon (the tuner
    # passes its last rung; 4096 here)
    w = ZooWorkload(PRESETS["tiny"])
    ref = w.reference_lrs("RoPE")
    c = Candidate("RoPE", 2, 2.0, {g: r * 2.0 for g, r in ref.items()})
    seen = []
    t = w.trainable()
    t(c, 2048, horizon=4096, workdir=tmp_path / "t", report=lambda tok, loss: seen.append((tok, loss)))
    assert (tmp_path / "t" / "ckpt.pt").exists() and not list((tmp_path / "t").glob("ckpt_*.pt"))
    t(c, 4096, horizon=4096, workdir=tmp_path / "t", report=lambda tok, loss: seen.append((tok, loss)))
    tokens = [tok for tok, _ in seen]
    assert tokens == sorted(set(tokens)) and tokens[0] == 0 and tokens[-1] == 4096  # no point reported twice
    p = w.preset
    straight = train(variant="RoPE", profile=p.profile, data=p.data, run_dir=tmp_path / "s", tokens=p.budget,
                     stop_tokens=4096, batch_tier=2, seq_len=p.seq_len, rows=p.rows, lr_scale=2.0 * p.lr_factor,
                     eval_every_tokens=t.eval_every_tokens, val_tokens=p.val_tokens, seed=p.seed, verbose=False)
    assert seen[-1][1] == straight.final_val_loss  # the LR schedule spans the run budget, not the horizon
    short = train(variant="RoPE", profile=p.profile, data=p.data, run_dir=tmp_path / "h", tokens=4096,
                  batch_tier=2, seq_len=p.seq_len, rows=p.rows, lr_scale=2.0 * p.lr_factor,
                  eval_every_tokens=t.eval_every_tokens, val_tokens=p.val_tokens, seed=p.seed, verbose=False)
    assert short.final_val_loss != straight.final_val_loss  # (the check above can tell the two apart)


def test_tiny_preset_end_to_end_then_resume_and_cli(tmp_path, capsys, monkeypatch):
    p = PRESETS["tiny"]
    out = tmp_path / "out"
    # the report's figures are built (every plot_* call runs on these runs) and saved through the real
    # save_figure, but as an empty figure: their rendering was ~1/5 of this test's time; the library report's
    # rendered figures are checked in tests/analysis/test_report_real_records.py (each PNG > 5 kB)
    with monkeypatch.context() as m:
        save_figures_unrendered(m)
        assert main(["--preset", "tiny", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "paper 0.93" in printed and f"predict {out / 'runs'}/*" in printed
    ids = sorted(f"{f.lower()}-b{t}" for f in p.families for t in p.tiers)
    assert sorted(d.name for d in (out / "runs").iterdir()) == ids  # no .partial left
    runs = open_runs(sorted((out / "runs").iterdir()))
    for r in runs:
        fr = [r.progress(m) for m in r.measurements]
        assert sum(0.1 <= f <= 0.5 for f in fr) >= 4  # 10-50% progress is resolved
        assert "act:blocks.3" in r.spectrum_names() and any(n.startswith("grad:") for n in r.spectrum_names())
        assert r.info.extras["target_loss"] == p.target_loss and r.info.extras["status"] == "complete"
    choices = load_choices(out / "tune" / "choices.json")  # the shared tuner's choices file
    assert set(choices) == {(f, t) for f in p.families for t in p.tiers}
    for (family, tier), c in choices.items():
        run = next(r for r in runs if r.run_id == f"{family.lower()}-b{tier}")
        assert run.info.extras["lr_scale"] == pytest.approx(c.scale * p.lr_factor)
        assert run.info.extras["lrs"] == pytest.approx(dict(c.lrs))
    verdict = json.loads((out / "report" / "verdict.json").read_text())
    assert set(verdict["families"]) == set(p.families) and verdict["target"] == p.target_loss
    md = (out / "report" / "report.md").read_text()
    for part in ("ours beside the paper's", "| 0.93 |", "0.97 (d12)", "Underpowered by design", "Tuner choices",
                 "Target loss", "Learning rates chosen by the tuner", "## Verdict",
                 "Early prediction of the token-efficient tier", "Normalized activation spectra at matched loss",
                 "loss.png"):
        assert part in md, part
    # tiny has one multiplier: tiers 1 and 4 have two candidates each, so their choices are a grid end
    assert md.count("candidate: the best rate may lie beyond") == 2 * len(p.families)
    assert (out / "report" / "loss.png").exists()  # the library report's loss curves

    # a target no run reaches: every run is listed as missed in the speedrun's section
    w0 = ZooWorkload(p.replace(target_loss=0.5), verbose=False)
    text = "\n".join(w0.report_sections(runs, out / "report"))
    assert text.count("| rope-b") + text.count("| muon-b") == len(ids) and "did NOT reach" in text

    # resume: nothing retrained; an interrupted run (left in runs/.partial) is trained again
    victim = out / "runs" / "rope-b2"
    os.makedirs(out / "runs" / ".partial")
    os.replace(victim, out / "runs" / ".partial" / "rope-b2")
    before = {d.name: (d / "run.json").stat().st_mtime_ns for d in (out / "runs").iterdir() if d.name != ".partial"}
    # the rerun's report is drawn without figures: nothing below reads them, and the first run drew every
    # one of them from the same runs (their rendering was ~1/4 of this test's time)
    import spectral_lens.report

    with monkeypatch.context() as m:
        m.setattr(spectral_lens.report, "_matplotlib_available", lambda: False)
        assert main(["--preset", "tiny", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    after = {d.name: (d / "run.json").stat().st_mtime_ns for d in (out / "runs").iterdir()}
    assert set(after) == set(ids) and {k: after[k] for k in before} == before
    assert "rope-b2" in after

    # the library CLI works on the output as is (the documented command)
    run_dirs = [str(d) for d in sorted((out / "runs").iterdir())]
    assert cli_main(["predict", *run_dirs, "--target-loss", str(p.target_loss), "--window", "4", "12"]) == 0
    assert cli_main(["report", *run_dirs, "--out", str(tmp_path / "cli-report"), "--target-loss",
                     str(p.target_loss), "--window", "4", "12", "--no-plots"]) == 0
    assert (tmp_path / "cli-report" / "report.md").exists()

    # other settings in the same directory are refused, in one line with status 2, before the data is read
    # (a shard directory that does not exist would otherwise be the error)
    capsys.readouterr()
    assert main(["--preset", "tiny", "--out", str(out), "--data", str(tmp_path / "no-such-shards")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "data" in err[0]


def test_device_cpu_for_a_flex_preset_trains_with_the_dense_mask(tmp_path, monkeypatch, capsys):
    # the no-GPU error says "pass --device cpu to try it on the CPU"; with the preset's FlexAttention every
    # tuner trial then failed (its backward is CUDA-only). The dense form of the same mask is used instead.
    import examples.replicate as rep

    def stop(workload, out, *args, **kwargs):
        assert workload.preset.attn_impl == "dense"
        raise KeyboardInterrupt

    monkeypatch.setattr(rep, "replicate", stop)
    assert main(["--preset", "gpu-small", "--device", "cpu", "--out", str(tmp_path / "g"), "--no-progress"]) == 130
    assert json.loads((tmp_path / "g" / "preset.json").read_text())["attn_impl"] == "dense"


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the GPU-missing error needs a machine without CUDA")
    assert main(["--preset", "gpu-small", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert main(["--preset", "paper-d12", "--device", "cpu", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "d").exists()  # refused before anything was written
    # a bad --device is refused before anything is written (it used to write preset.json and fail every tuner trial)
    for bad, words in (("gpu", "not a torch device"), ("cuda:0", "needs a CUDA GPU")):
        assert main(["--preset", "tiny", "--device", bad, "--out", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]
        assert not (tmp_path / bad).exists()
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "d99"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()   # argparse's own errors are one line too (no usage block)
    assert len(err) == 1 and "invalid choice: 'd99'" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--preset" in err[0]
