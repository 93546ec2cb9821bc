"""A report built by the CLI from records that a real (tiny) model's training wrote through SpectralLens."""

from __future__ import annotations

import re

import pytest
import torch

from spectral_lens import Schedule, SpectralLens
from spectral_lens.analysis import token_inefficiency, tokens_to_target
from spectral_lens.cli import main as cli_main
from spectral_lens.records import RunInfo, RunWriter, open_runs

from support.models import TinyLM, lm_pool


def _train_run(root, tier: int, steps: int = 24, seq: int = 16, rows: int = 2):
    torch.manual_seed(0)
    model = TinyLM(vocab=32, d=48, layers=2, ctx=seq, tied=False, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pool = lm_pool(n_batches=4, batch=4, t=seq, vocab=32, seed=99)
    data = lm_pool(n_batches=steps * tier, batch=rows, t=seq, vocab=32, seed=1)
    tokens_per_step = tier * rows * seq
    info = RunInfo(f"tiny-b{tier}", family="tiny", batch_tier=tier, tokens_per_step=tokens_per_step,
                   total_tokens=steps * tokens_per_step, n_layer=2, batch_size=tier * rows)
    writer = RunWriter(root / info.run_id, info, fsync=False, tail_window=(4, 16), head_window=(1, 4))
    lens = SpectralLens(model, pool, writer=writer, gradient_samples=8, schedule=Schedule.every(4))
    for step in range(steps + 1):
        model.eval()
        with torch.no_grad():
            val = sum(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in pool) / len(pool)
        lens.maybe_measure(step, step * tokens_per_step, val_loss=float(val))
        writer.log(step, step * tokens_per_step, val_loss=float(val), tokens_per_s=1000.0 * tier)
        if step == steps:
            break
        model.train()
        for i in range(tier):
            x, y = data[step * tier + i]
            (torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) / tier).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    writer.close()
    return root / info.run_id


def test_cli_report_from_real_records(tmp_path, capsys):
    dirs = [_train_run(tmp_path / "runs", tier) for tier in (1, 2, 4)]
    runs = open_runs(dirs)
    target = max(float(min(r.val_curve()[1])) for r in runs) + 1e-9
    out = tmp_path / "report"
    assert cli_main(["report", *map(str, dirs), "--out", str(out), "--target-loss", repr(target), "--window", "4", "16"]) == 0
    text = (out / "report.md").read_text()
    eps = token_inefficiency(runs, target)
    for run in runs:  # the table's T and eps_tok are the library's numbers for these records
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.run_id} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[5]) == pytest.approx(tokens_to_target(run, target), rel=1e-3)
        assert float(cells[6]) == pytest.approx(eps[run.run_id], abs=1e-3)
    assert re.search(r"recommended tier \d", text)
    assert all(run.measurements for run in runs) and len(runs[0].measurements) == 7  # steps 0, 4, ..., 24
    figures = sorted(p.name for p in out.glob("*.png"))
    pytest.importorskip("matplotlib")
    assert {"spectra.png", "alpha_tail.png", "early_alpha_vs_eps.png"} <= set(figures)
    assert all((out / f).stat().st_size > 5000 for f in figures)
    assert cli_main(["inspect", str(dirs[0])]) == 0
    assert "tiny-b1" in capsys.readouterr().out
