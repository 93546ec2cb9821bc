"""The refusal of a ``LightningModule`` without ``forward`` under ``Trainer(strategy="ddp")`` with two gloo CPU
processes: every rank refuses alike at ``fit`` start (the condition reads only the module's class and the lens's
options), before any training step, and the run ends promptly instead of leaving a rank in a collective. Lightning
re-runs the script for rank 1, so it is a file run in a subprocess (slow tier).

The DDP ``timeout`` is also rank 0's rendezvous deadline, and rank 0 starts waiting before Lightning starts rank 1's
process: it must cover a whole Python start-up of the script (torch, Lightning and spectral-lens imports alone took
54-57 s on the 2-core machine under load), so it is 240 s, not 60 (``DistStoreError: Timed out after 61 seconds
waiting for clients. 1/2 clients joined``: tests/integrations/test_review23_flake_ddp.py). The promptness is timed
from the moment the last rank reached ``fit``, so neither process's start-up counts; a rank left in a collective
would wait the 240 s. Rank 1 exits 0 after its refusal: exiting with the error, it had Lightning's child-process
observer kill rank 0 (SIGKILL, polled every 5 s), on a loaded machine before rank 0 printed its own refusal. It exits
by ``os._exit(0)`` (``support.teardown.end_rank``): torch 2.13's gloo teardown abort at its exit did the same. The
``REFUSED`` lines are found anywhere in the output, not at line starts: with ``PYTHONUNBUFFERED=1`` (set on this
machine) ``print`` writes the text and its newline separately, so the two ranks' lines, printed at once into one
pipe, interleaved (6 of 8 runs on the loaded machine), as ``REFUSED rank=1 ...REFUSED rank=0 ...`` in 3, where
the test saw rank 1's alone and failed (it required rank 0's). The test now requires both refusals."""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from support import lightning_user

pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import datetime, os, sys, time
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from support.lightning_user import no_forward_module
    from support.models import lm_pool
    from support.teardown import end_rank
    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensLightningCallback

    class Lit(no_forward_module(pl)):  # no forward
        def training_step(self, batch, i):
            print(f"TRAINED rank={self.global_rank}", flush=True)
            return super().training_step(batch, i)

    lens = sl.SpectralLens(pool=lm_pool(2, batch=4, t=12, vocab=37, seed=9), schedule=sl.Schedule.every(2))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo",
                         timeout=datetime.timedelta(seconds=240)), max_steps=4, limit_val_batches=0, logger=False,
                         callbacks=[SpectralLensLightningCallback(lens)], enable_progress_bar=False,
                         enable_model_summary=False)
    print(f"FIT rank={os.environ.get('LOCAL_RANK', 0)} t={time.time()}", flush=True)  # start-up done
    try:
        trainer.fit(Lit(), torch.utils.data.DataLoader(lm_pool(8, batch=4, t=12, vocab=37, seed=1), batch_size=None))
    except TypeError as e:
        print(f"REFUSED rank={trainer.global_rank} {str(e)[:80]}", flush=True)
        if trainer.global_rank:  # not an error exit: rank 0's launcher would kill rank 0 (SIGKILL, polled every
            end_rank()           # 5 s) once a child exits with one; os._exit(0), as torch 2.13's gloo teardown
        raise                    # aborts a rank at exit now and then (SIGABRT: support.teardown)
''')
TIMEOUT_S = 240  # the script's DDP timeout (a rank left in a collective waits this long)


def run_script(tmp_path: Path, pythonpath: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, float]:
    """The script run in a subprocess (``pythonpath``: directories put first on its ``PYTHONPATH``), and the
    seconds from the last rank's ``FIT`` line (its start-up done, at ``fit``) to the end of the run."""
    done = lightning_user.run_script(tmp_path, SCRIPT, timeout=TIMEOUT_S + 360, pythonpath=pythonpath)
    end = time.time()
    (tmp_path / "output.txt").write_text(f"{done.stdout}\n--- stderr ---\n{done.stderr}")  # kept for a failure
    return done, end - max(fit_times(done).values(), default=float("-inf"))


def fit_times(done: subprocess.CompletedProcess) -> dict[int, float]:
    """Each rank's time (``time.time()``) at ``fit``, from its ``FIT`` line (found anywhere: see the docstring)."""
    return {int(r): float(t) for r, t in re.findall(r"FIT rank=(\d+) t=(\d+\.\d+)", done.stdout)}


def refusals(done: subprocess.CompletedProcess) -> list[int]:
    """The ranks that printed ``REFUSED`` (found anywhere in the output: two ranks' lines may interleave)."""
    return sorted(int(r) for r in re.findall(r"REFUSED rank=(\d+)", done.stdout))


def check_refused(done: subprocess.CompletedProcess, after_fit: float) -> None:
    """Every rank refused at ``fit`` start (rank 0 with the error, rank 1 exiting 0 after it: see the script), none
    trained, and the run ended promptly once both ranks were up."""
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "TRAINED" not in out, out[-3000:]
    assert refusals(done) == [0, 1], f"exit status {done.returncode}: {out[-5000:]}"
    assert "Lit defines no forward" in out
    assert after_fit < TIMEOUT_S / 2, f"the refused run took {after_fit:.0f} s to end after both ranks reached fit"


def test_every_rank_refuses_a_module_without_forward_before_training(tmp_path):
    check_refused(*run_script(tmp_path))
