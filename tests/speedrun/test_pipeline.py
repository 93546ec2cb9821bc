"""The speedrun end to end on the ``tiny`` preset (the same code path as ``cpu``), resume, the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.nanogpt.train import train
from examples.speedrun.__main__ import main
from examples.speedrun.pipeline import run_pipeline
from examples.speedrun.presets import PRESETS
from examples.speedrun.summary import write_summary
from examples.speedrun.workload import ZooWorkload, is_complete
from examples.tune.trainable import Candidate
from spectral_lens.cli import main as cli_main
from spectral_lens.records import open_runs

ROOT = Path(__file__).resolve().parents[2]


def test_stopped_and_resumed_run_is_the_straight_run(tmp_path):
    # the trainer hook behind promoted trials: stop at a rung, resume, same run as never stopped
    kw = dict(variant="Muon", profile="tiny", data="pydoc", tokens=4096, batch_tier=2, seq_len=64, rows=2,
              eval_every_tokens=1024, val_tokens=1024, seed=0, verbose=False)
    straight = train(run_dir=tmp_path / "a", save_final=False, **kw)
    first = train(run_dir=tmp_path / "b", stop_tokens=1536, **kw)
    assert first.tokens == 1536 and (tmp_path / "b" / "ckpt_000006.pt").exists()
    rest = train(run_dir=tmp_path / "b", resume=tmp_path / "b" / "ckpt_000006.pt", save_final=False, **kw)
    assert rest.steps == straight.steps == 16
    assert rest.final_val_loss == straight.final_val_loss
    losses = {h["tokens"]: h["val_loss"] for h in first.history + rest.history}
    assert losses == {h["tokens"]: h["val_loss"] for h in straight.history} | {1536: first.final_val_loss}


def test_trainable_continues_from_its_checkpoint(tmp_path):
    w = ZooWorkload(PRESETS["tiny"])
    ref = w.reference_lrs("RoPE")
    c = Candidate("RoPE", 2, 2.0, {g: r * 2.0 for g, r in ref.items()})
    seen = []
    t = w.trainable()
    t(c, 2048, horizon=4096, workdir=tmp_path, report=lambda tok, loss: seen.append((tok, loss)))
    assert (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob("ckpt_*.pt"))
    t(c, 4096, horizon=4096, workdir=tmp_path, report=lambda tok, loss: seen.append((tok, loss)))
    tokens = [tok for tok, _ in seen]
    assert tokens == sorted(set(tokens)) and tokens[0] == 0 and tokens[-1] == 4096  # no point reported twice
    assert all(math.isfinite(l) for _, l in seen) and seen[-1][1] < seen[0][1]


def test_tiny_preset_end_to_end_then_resume_and_cli(tmp_path, capsys):
    p = PRESETS["tiny"]
    res = run_pipeline(ZooWorkload(p, verbose=False), tmp_path, progress=False)
    ids = sorted(d.name for d in res.run_dirs)
    assert ids == sorted(f"{f.lower()}-b{t}" for f in p.families for t in p.tiers)
    assert all(is_complete(d) for d in res.run_dirs)
    runs = open_runs([tmp_path])  # the output directory as is
    assert len(runs) == len(ids)
    for r in runs:
        fr = [r.progress(m) for m in r.measurements]
        assert sum(0.1 <= f <= 0.5 for f in fr) >= 4  # 10-50% progress is resolved
        assert "act:blocks.3" in r.spectrum_names() and any(n.startswith("grad:") for n in r.spectrum_names())
        assert r.info.extras["target_loss"] == p.target_loss
    choices = json.loads((tmp_path / "_tune" / "choices.json").read_text())
    assert set(choices) == {f"{f}/b{t}" for f in p.families for t in p.tiers}
    for k, v in choices.items():
        run = next(r for r in runs if r.run_id == f"{v['family'].lower()}-b{v['tier']}")
        assert run.info.extras["lr_scale"] == pytest.approx(v["scale"] * p.lr_factor)
        last = str(p.rungs[-1])
        at_last = {t["scale"]: t["losses"][last] for t in v["trials"].values() if t["losses"].get(last) is not None}
        assert v["scale"] == min(at_last, key=at_last.get)  # the best trial at the last rung

    s = res.summary
    assert set(s["score"]["within"]) == set(p.families)
    assert all(w["n"] == len(p.tiers) for w in s["score"]["within"].values())
    assert any("Underpowered" in v for v in s["verdict"])  # 3 tiers: no within-family rho can be significant
    md = res.report.read_text()
    for part in ("ours beside the paper's", "0.97", "0.93", "Tuned learning rates", "Taxonomy of transitions",
                 "Early prediction of the token-efficient tier", "Normalized activation spectra at matched loss",
                 "loss_curves.png", "gain_plane.png"):
        assert part in md, part
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["target_loss"] == p.target_loss
    # a target no run reaches: every run is listed as missed, the transition is flagged, nothing is hidden
    s2 = write_summary(ZooWorkload(p.replace(target_loss=0.5), verbose=False), res.run_dirs, tmp_path / "r2",
                       choices=choices)
    assert len(s2["missed_target"]) == len(ids) and "did NOT reach" in (tmp_path / "r2" / "report.md").read_text()
    assert any("did not reach the target" in v and "Transition" in v for v in s2["verdict"])

    # resume: nothing is retrained; an interrupted run (no "complete" status) is trained again
    victim = tmp_path / "rope-b2"
    before = {d.name: (d / "run.json").stat().st_mtime_ns for d in res.run_dirs if d != victim}
    header = json.loads((victim / "run.json").read_text())
    header["extras"]["status"] = "running"
    (victim / "run.json").write_text(json.dumps(header))
    run_pipeline(ZooWorkload(p, verbose=False), tmp_path, progress=False)
    assert is_complete(victim)
    assert before == {d.name: (d / "run.json").stat().st_mtime_ns for d in res.run_dirs if d != victim}

    # the library CLI works on the output directory as is
    assert cli_main(["predict", str(tmp_path), "--target-loss", str(p.target_loss), "--window", "4", "12"]) == 0
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "cli-report"), "--target-loss",
                     str(p.target_loss), "--window", "4", "12", "--no-plots"]) == 0
    assert (tmp_path / "cli-report" / "report.md").exists()

    # other settings in the same directory are refused
    with pytest.raises(ValueError, match="budget"):
        run_pipeline(ZooWorkload(p.replace(budget=2 * p.budget), verbose=False), tmp_path, progress=False)


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
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "d99"])
    assert exc.value.code == 2
