"""The Lightning callback under ``Trainer(strategy="ddp")`` with two gloo CPU processes, as
docs/guide-multi-gpu.md#lightning sets it up: a run stopped by an exception on rank 1, resumed with
``fit(ckpt_path=...)``. Lightning re-runs the training script for rank 1, so the script is a file run in a
subprocess (slow tier: about a minute on two cores). The DDP timeout (240 s) is also rank 0's rendezvous deadline,
counted from before Lightning starts rank 1's process: it covers rank 1's whole start-up on a loaded machine (60 s did
not: tests/integrations/test_review23_flake_ddp.py)."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from support.lightning_user import run_script

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import datetime, os, sys
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy
    from support.lightning_user import no_forward_module
    from support.models import lm_pool
    from support.teardown import end_rank
    import spectral_lens as sl
    from spectral_lens.records import RunInfo, RunWriter
    from spectral_lens.integrations import SpectralLensLightningCallback, TensorBoardSink

    out, mode = sys.argv[1], sys.argv[2]

    class Lit(no_forward_module(pl)):  # no forward: the lens is built on self.net
        def training_step(self, batch, i):
            if mode == "fail" and self.global_step == 120 and self.global_rank == 1:
                raise RuntimeError("injected failure on rank 1")
            return super().training_step(batch, i)

    torch.manual_seed(0)
    lit = Lit()
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    writer = RunWriter(f"{out}/run", RunInfo("lit", batch_tier=8, n_layer=2), tail_window=(2, 8),
                       resume=(mode == "resume")) if rank == 0 else None
    sinks = [TensorBoardSink(f"{out}/tb", figures=False)] if rank == 0 else []
    lens = sl.SpectralLens(lit.net, lm_pool(2, batch=4, t=12, vocab=37, seed=9), writer=writer,
                           schedule=sl.Schedule.every(40))
    cb = SpectralLensLightningCallback(lens, tokens_per_step=2 * 4 * 12, sinks=sinks)
    ck = ModelCheckpoint(dirpath=f"{out}/ckpt", every_n_train_steps=50, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo",
                         timeout=datetime.timedelta(seconds=240)), max_steps=160, log_every_n_steps=10,
                         limit_val_batches=0, callbacks=[cb, ck], logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    train = torch.utils.data.DataLoader(lm_pool(400, batch=4, t=12, vocab=37, seed=1), batch_size=None)
    trainer.fit(lit, train, ckpt_path=f"{out}/ckpt/last.ckpt" if mode == "resume" else None)
    print(f"HISTORY rank={trainer.global_rank} {[m.step for m in lens.history]}", flush=True)
    if writer is not None:
        writer.close()
    for s in sinks:
        s.close()
    end_rank()  # os._exit(0): torch 2.13's gloo teardown aborts a finished rank at exit now and then (support.teardown)
''')


def run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return run_script(tmp_path, SCRIPT, str(tmp_path / "out"), mode, timeout=400)


def steps(path: Path, key: str | None = None) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if key is None or key in r]


def test_lightning_ddp_two_processes_fail_on_rank_1_then_resume(tmp_path):
    failed = run(tmp_path, "fail")
    assert failed.returncode != 0, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "injected failure on rank 1" in failed.stdout + failed.stderr
    run_dir = tmp_path / "out" / "run"
    assert steps(run_dir / "measurements.jsonl") == [40, 80, 120]  # rank 0 alone wrote, each step once

    resumed = run(tmp_path, "resume")  # from last.ckpt at step 100: step 120 is trained and measured again
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # found anywhere in the output: the two ranks' lines may interleave (PYTHONUNBUFFERED=1 writes the text and
    # its newline apart; "HISTORY rank=0 [...]HISTORY rank=1 [...]" failed a slow-tier run, 2026-11-28)
    histories = sorted(re.findall(r"HISTORY rank=\d+ \[[^\]]*\]", resumed.stdout))
    assert histories == ["HISTORY rank=0 [120, 160]", "HISTORY rank=1 [120, 160]"], resumed.stdout[-3000:]
    assert steps(run_dir / "measurements.jsonl") == [40, 80, 120, 160]
    assert steps(run_dir / "log.jsonl", "train_loss") == list(range(10, 161, 10))  # replayed steps once

    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("spectral_lens/noise_scale")] == [40, 80, 120, 160]
