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
from spectral_lens.integrations import SpectralLensLightningCallback


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
            fit(tmp_path, clock, module, callbacks, max_steps=4, log_every_n_steps=2)
        if writer is not None:
            writer.close()
        return len(reads)

    without = run(False, "none")
    with_cb = run(True, "run")
    assert len(train_events(tmp_path / "run")) == 2  # steps 2 and 4
    assert with_cb - without == 2  # one read per event, none per batch
    assert clock.reads <= 2 * 4 + 1  # training_starts, then at most a stop and a run per batch


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


# ---- Hugging Face callback, its hooks called as the Trainer calls them (no Trainer: cheap) ----------------


def hf_callback(tmp_path, **kw):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from spectral_lens.integrations import SpectralLensCallback

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    writer = RunWriter(tmp_path / "run", RunInfo("hf", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(model, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(), progress=False,
                           forward_fn=lambda m, b: m(b[0]), **kw)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb = SpectralLensCallback(lens, tokens_per_step=10)
    cb.on_train_begin(None, state, control, model=model)
    return cb, state, control, writer


def test_hf_non_finite_training_losses_are_recorded(tmp_path, clock):
    """With TrainingArguments(logging_nan_inf_filter=False) the Trainer logs a NaN or inf loss: each is a
    train_loss event as logged (no crash), and divergence() names the run."""
    from spectral_lens.analysis import divergence

    cb, state, control, writer = hf_callback(tmp_path)
    for step, loss in [(2, 3.5), (4, float("nan")), (6, float("inf"))]:
        clock.t += 2.0
        state.global_step = step
        cb.on_step_end(None, state, control)
        cb.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
    writer.close()
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4, 6]
    assert events[0]["train_loss"] == 3.5 and math.isnan(events[1]["train_loss"]) and events[2]["train_loss"] == math.inf
    assert [e["tokens_per_s"] for e in events] == pytest.approx([10.0] * 3, rel=1e-12)
    assert "train_loss" in (divergence(RunRecord.open(tmp_path / "run")) or "")


def test_hf_own_scalars_and_other_logs_are_not_training_losses(tmp_path, clock):
    """on_log sees every trainer.log: the callback's own measurement scalars (logged through trainer.log at
    a measured step), evaluation metrics and the end-of-train summary (its "train_loss" key) are not
    recorded as training losses; only logs["loss"] is, once per log."""
    cb, state, control, writer = hf_callback(tmp_path, schedule=sl.Schedule.every(2))
    logged = []

    class FakeTrainer:  # what _measure's trainer.log needs: the trainer's state and control, on_log called back
        def __init__(self):
            self.state, self.control = state, control

        def log(self, logs):
            logged.append(dict(logs))
            cb.on_log(None, state, control, logs=logs)

    cb._trainer = FakeTrainer()
    state.global_step = 2
    clock.t += 2.0
    cb.on_step_end(None, state, control)  # measures: its scalars go through trainer.log, then on_log
    cb.on_log(None, state, control, logs={"loss": 3.0})
    cb.on_log(None, state, control, logs={"eval_loss": 2.5, "eval_runtime": 1.0})
    cb.on_log(None, state, control, logs={"train_loss": 2.9, "train_runtime": 9.0})
    writer.close()
    assert logged and any(k.startswith("spectral_lens/") for k in logged[0])
    assert [(e["step"], e["train_loss"]) for e in train_events(tmp_path / "run")] == [(2, 3.0)]


def test_train_loss_on_other_ranks_writes_nothing_and_agrees_once_per_event(tmp_path, clock, monkeypatch):
    """On a rank other than 0 a train_loss event writes nothing and reads no loss, but takes part in one
    agreement on rank 0's write (one small collective per event, at the logging cadence, none per batch:
    before review 22, none, so a failed write on rank 0 left this rank in the next training collective), and
    the Lightning callback adds up no returned loss there (no per-batch work)."""
    from spectral_lens.integrations import _lightning_hooks

    def no_collective(*args, **kwargs):
        raise AssertionError("a broadcast for a train_loss event")

    agreed = []
    monkeypatch.setattr(_driver, "ranks", lambda group: (1, 2))
    monkeypatch.setattr(_lightning_hooks, "ranks", lambda group: (1, 2))
    monkeypatch.setattr(_driver, "agree", lambda group, error, what, model=None: agreed.append((error, what)))
    monkeypatch.setattr(_driver, "from_rank0", no_collective)
    module = Lit()
    cb, writer = callback(tmp_path, module)
    adds = []
    monkeypatch.setattr(cb, "_add_loss", lambda *a: adds.append(1))
    monkeypatch.setattr(cb, "_train_loss", lambda *a: no_collective())  # the loss is read on rank 0 only
    cb.driver.training_starts(0)
    cb.driver.record_train_loss(2, 1.0)
    assert agreed == [(None, "recording the training loss (rank 0 writes it)")]
    cb._batch_step = cb._logged_step = 0

    class Trainer:
        global_step, log_every_n_steps, loggers = 1, 2, []

    cb.on_train_batch_end(Trainer(), module, torch.tensor(1.0), None, 0)  # step 1: not a logging step
    assert len(agreed) == 1
    Trainer.global_step = 2
    cb.on_train_batch_end(Trainer(), module, torch.tensor(1.0), None, 1)  # step 2: one agreement
    writer.close()
    assert len(agreed) == 2 and agreed[1][0] is None
    assert train_events(tmp_path / "run") == [] and adds == []
