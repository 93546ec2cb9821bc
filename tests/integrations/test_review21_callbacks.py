"""Review of the callbacks' ``train_loss`` / ``tokens_per_s`` events (Lightning): checkpoint writes are no
training time, the per-step cost (no host sync per batch, at most two clock reads), a non-finite loss is
recorded as such, and the held loss does not alias the module's tensor.

The clock is faked as in test_callback_curves.py: a training batch advances it by 1 s (at its backward), a checkpoint write by
1000 s, so ``tokens_per_s`` is exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.integrations import _driver
from spectral_lens.records import RunInfo, RunRecord, RunWriter

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from spectral_lens.integrations import SpectralLensLightningCallback  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(_driver, "time", c)
    return c


class Lit(pl.LightningModule):
    def __init__(self, nan_from: int | None = None, manual: bool = False, returns: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
        self.nan_from = nan_from
        self.automatic_optimization = not manual
        self.losses: list[float] = []
        self.returned: list[torch.Tensor] = []
        self.returns = returns

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
        if self.nan_from is not None and batch_idx >= self.nan_from:
            loss = loss * float("nan")
        self.losses.append(float(loss.detach()))
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            out = loss.detach()
            self.returned.append(out)
            return out if self.returns else None
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


class Tick(pl.Callback):
    def __init__(self, clock) -> None:
        self.clock = clock

    def on_before_backward(self, trainer, pl_module, loss):
        self.clock.t += 1.0  # one training batch (after every callback's on_train_batch_start)


def fit(tmp_path, clock, module, callbacks, **kw):
    kw = {"enable_checkpointing": False, "limit_val_batches": 0, "max_steps": 4, "log_every_n_steps": 2, **kw}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[Tick(clock), *callbacks],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)
    loader = torch.utils.data.DataLoader(lm_pool(4, batch=4, t=12, vocab=37), batch_size=None)
    val = torch.utils.data.DataLoader(lm_pool(1, batch=4, t=12, vocab=37, seed=1), batch_size=None)
    trainer.fit(module, loader, val)
    return trainer


def callback(tmp_path, module, name="run"):
    writer = RunWriter(tmp_path / name, RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer, params=(),
                           progress=False)
    return SpectralLensLightningCallback(lens, tokens_per_step=48), writer


def train_events(path):
    return [e for e in RunRecord.open(path).events if e.get("train_loss") is not None]


def test_lightning_checkpoint_writes_are_no_training_time(tmp_path, clock):
    """ModelCheckpoint runs after every other callback (Lightning moves it last): at a batch's end
    (every_n_train_steps) and after validation; the 1000 s of each write are left out of tokens_per_s."""

    class SlowCheckpoint(pl.callbacks.ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            super()._save_checkpoint(trainer, filepath)
            clock.t += 1000.0  # writing the file

    module = Lit()
    cb, writer = callback(tmp_path, module)
    every_step = SlowCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    after_val = SlowCheckpoint(dirpath=tmp_path / "b")  # saves at the end of each validation run
    fit(tmp_path, clock, module, [cb, every_step, after_val], enable_checkpointing=True, limit_val_batches=1,
        val_check_interval=2, num_sanity_val_steps=0)
    writer.close()
    assert len(list((tmp_path / "a").glob("*.ckpt"))) == 4 and list((tmp_path / "b").glob("*.ckpt"))
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4]
    assert [e["tokens_per_s"] for e in events] == pytest.approx([48.0, 48.0], rel=1e-12)


def test_lightning_reads_the_loss_only_at_the_logging_cadence(tmp_path, clock, monkeypatch):
    """Per training batch the callback reads no tensor on the host (on CUDA each read is a device sync)
    and the clock at most twice; the loss sum is read once per train_loss event."""
    reads = []
    item, to_float = torch.Tensor.item, torch.Tensor.__float__

    def counted(original):
        def read(self, *args):
            reads.append(1)
            return original(self, *args)
        return read

    def run(with_callback: bool, name: str) -> int:
        module = Lit()
        callbacks, writer = [], None
        if with_callback:
            cb, writer = callback(tmp_path, module, name)
            callbacks = [cb]
        del reads[:]
        clock.reads = 0
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", counted(item))
            m.setattr(torch.Tensor, "__float__", counted(to_float))
            fit(tmp_path, clock, module, callbacks, max_steps=8, log_every_n_steps=4)
        if writer is not None:
            writer.close()
        return len(reads)

    without = run(False, "none")
    with_cb = run(True, "run")
    assert len(train_events(tmp_path / "run")) == 2  # steps 4 and 8
    assert with_cb - without == 2  # one read per event, none per batch
    assert clock.reads <= 2 * 8 + 1  # training_starts, then at most a stop and a run per batch


def test_lightning_non_finite_training_loss_is_recorded(tmp_path, clock):
    """A NaN training loss is recorded as NaN (not dropped, no crash): divergence() names it."""
    from spectral_lens.analysis import divergence

    module = Lit(nan_from=2)
    cb, writer = callback(tmp_path, module)
    fit(tmp_path, clock, module, [cb], max_steps=6)
    writer.close()
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4, 6]
    assert math.isfinite(events[0]["train_loss"]) and all(math.isnan(e["train_loss"]) for e in events[1:])
    assert "train_loss" in (divergence(RunRecord.open(tmp_path / "run")) or "")


def test_lightning_manual_optimization_loss_not_aliased(tmp_path, clock):
    """Under manual optimization Lightning passes on the returned tensor itself (detached, not copied): the
    callback's running sum must not be that tensor, or a module that reuses it in place changes the event."""

    class Reuses(pl.Callback):  # e.g. a module or callback that recycles the returned buffer
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.returned[-1].zero_()

    module = Lit(manual=True)
    cb, writer = callback(tmp_path, module)
    fit(tmp_path, clock, module, [cb, Reuses()], max_steps=2, log_every_n_steps=2)
    writer.close()
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2]
    assert events[0]["train_loss"] == pytest.approx(sum(module.losses) / 2, rel=1e-6)


def test_lightning_no_returned_loss_warns_once(tmp_path, clock):
    """Manual optimization may return nothing from training_step: no train_loss can be recorded, which
    warns once (naming train_loss_key=) instead of leaving the training curve silently empty."""
    module = Lit(manual=True, returns=False)
    cb, writer = callback(tmp_path, module)
    with pytest.warns(sl.SpectralLensWarning, match="training_step returned no loss") as caught:
        fit(tmp_path, clock, module, [cb], max_steps=4, log_every_n_steps=1)
    writer.close()
    assert sum("returned no loss" in str(w.message) for w in caught) == 1
    assert train_events(tmp_path / "run") == []
