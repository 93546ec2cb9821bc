"""The refusal of a ``LightningModule`` without ``forward`` under ``Trainer(strategy="ddp")`` with two gloo CPU
processes: every rank refuses alike at ``fit`` start (the condition reads only the module's class and the lens's
options), before any training step, and the run ends promptly instead of leaving a rank in a collective. Lightning
re-runs the script for rank 1, so it is a file run in a subprocess (slow tier)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import datetime, os, sys
    import torch, torch.nn.functional as F
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from support.models import TinyGPT, lm_pool
    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensLightningCallback

    class Lit(pl.LightningModule):  # no forward
        def __init__(self):
            super().__init__()
            self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
        def training_step(self, batch, i):
            print(f"TRAINED rank={self.global_rank}", flush=True)
            x, y = batch
            return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    lens = sl.SpectralLens(pool=lm_pool(2, batch=4, t=12, vocab=37, seed=9), schedule=sl.Schedule.every(2))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo",
                         timeout=datetime.timedelta(seconds=60)), max_steps=4, limit_val_batches=0, logger=False,
                         callbacks=[SpectralLensLightningCallback(lens)], enable_progress_bar=False,
                         enable_model_summary=False)
    try:
        trainer.fit(Lit(), torch.utils.data.DataLoader(lm_pool(8, batch=4, t=12, vocab=37, seed=1), batch_size=None))
    except TypeError as e:
        print(f"REFUSED rank={trainer.global_rank} {str(e)[:80]}", flush=True)
        raise
''')


def test_every_rank_refuses_a_module_without_forward_before_training(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(tmp_path / "train.py")], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "TRAINED" not in out, out[-3000:]
    refused = sorted(line.split(" Spectral")[0] for line in done.stdout.splitlines() if line.startswith("REFUSED"))
    assert refused[:1] == ["REFUSED rank=0"], out[-3000:]  # rank 0 at least; rank 1 may be ended by the launcher
    assert "Lit defines no forward" in out
    assert took < 120, f"the refused run took {took:.0f} s to end"
