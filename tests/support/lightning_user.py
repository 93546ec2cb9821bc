"""A Lightning user's module without ``forward`` (the common Lightning style: the steps call the network), its
``fit`` on one CPU device, and a user's training script run as a file (Lightning's DDP re-runs it for every other
rank): what the review-22 Lightning tests share (``tests/integrations/test_review22_lightuser*.py``,
``test_review22_revlightuser*.py``; the scripts import :func:`no_forward_module` too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from support.models import TinyGPT, lm_pool


def no_forward_module(pl, name: str = "Base"):
    """A ``pl.LightningModule`` class named ``name`` that defines no ``forward`` (Lightning does not need one): its
    ``training_step`` calls its ``net`` (a TinyGPT of vocabulary 37, context 12) and counts ``steps_run``."""

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
            self.steps_run = 0

        def training_step(self, batch, batch_idx):
            self.steps_run += 1
            x, y = batch
            return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    Module.__name__ = Module.__qualname__ = name  # the name the callback's refusal prints
    return Module


def pool():
    """The lens's held-out pool: 2 batches of 4 sequences of 12 tokens (seed 9)."""
    return lm_pool(2, batch=4, t=12, vocab=37, seed=9)


def fit(pl, callback, module, lens, *, max_steps: int, batches: int, **trainer_kw):
    """``module`` fitted for ``max_steps`` on one CPU device with ``callback(lens)`` alone, on ``batches`` batches
    of 4 random sequences (seed 0); no validation, logger, checkpoint, progress bar or summary. The trainer."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[callback(lens)], **trainer_kw)
    trainer.fit(module, torch.utils.data.DataLoader(lm_pool(batches, batch=4, t=12, vocab=37, seed=0), batch_size=None))
    return trainer


def run_script(tmp_path: Path, script: str, *args: str, timeout: float,
               pythonpath: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``script`` written to ``tmp_path/train.py`` and run there with ``args`` in a subprocess (its output
    captured): ``pythonpath`` first on its ``PYTHONPATH``, then the repository and ``tests/`` (``support``), and
    none of torchrun's variables (Lightning sets its own for the ranks it starts)."""
    (tmp_path / "train.py").write_text(script)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(root), str(root / "tests")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(tmp_path / "train.py"), *args], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
