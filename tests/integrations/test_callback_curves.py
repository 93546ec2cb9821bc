"""The framework callbacks record the training curve and the throughput (``train_loss`` and
``tokens_per_s`` events in ``log.jsonl``), as a hand-written loop logs them with ``RunWriter.log``: the
report's loss figure and ``Q`` column, and the taxonomy's throughput gain, read them.

The throughput is checked on a fake clock (``_driver.time``): each training step (or batch) advances it
by 1 s, each forward of a measurement and each evaluation batch by 1000 s, so ``tokens_per_s`` is exact
and shows that measurements and evaluations are left out of the training time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.data import RandomTokens as _RandomTokens
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.integrations import _driver
from spectral_lens.records import RunInfo, RunRecord, RunWriter

VOCAB, T = 64, 16


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(_driver, "time", c, raising=False)  # raising=False: also on a driver without a clock
    return c


def slow_forward(clock):
    """A lens forward that takes 1000 s on the fake clock (a measurement is no training time)."""

    def forward(model, batch):
        clock.t += 1000.0
        return model(**batch) if isinstance(batch, dict) else model(batch[0])

    return forward


def train_events(path):
    return [e for e in RunRecord.open(path).events if e.get("train_loss") is not None]


# ---- Hugging Face Trainer -----------------------------------------------------------------------

def hf():
    return pytest.importorskip("transformers", reason="the hf extra is not installed")


def tiny_gpt2():
    transformers = hf()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=T,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)



def RandomTokens(n: int, seed: int) -> _RandomTokens:  # noqa: N802 (the dataset class, sized for this file)
    return _RandomTokens(n, seed, vocab=VOCAB, length=T)

def hf_pool():
    ids = RandomTokens(2, 99).ids
    return [{"input_ids": ids, "labels": ids}]


def hf_trainer(model, tmp_path, clock, **kw):
    transformers = hf()
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")

    class Tick(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.t += 1.0  # one optimizer step of training

        def on_prediction_step(self, args, state, control, **kwargs):
            clock.t += 1000.0  # an evaluation batch: no training time

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        save_strategy=kw.pop("save_strategy", "no"), use_cpu=True, disable_tqdm=True, **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(64, 0),
                                   eval_dataset=RandomTokens(2, 1), callbacks=[Tick()])
    return trainer


def test_hf_records_the_trainers_training_loss_and_throughput(tmp_path, clock):
    from spectral_lens.integrations import SpectralLensCallback

    model = tiny_gpt2()
    writer = RunWriter(tmp_path / "run", RunInfo("gpt2", family="gpt2", batch_tier=1, total_tokens=6 * 4 * T),
                       fsync=False, tail_window=(4, 16))
    lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2),
                           forward_fn=slow_forward(clock), progress=False)
    # gradient accumulation 2 x batch 2: 4 sequences of T tokens per optimizer step, counted by the trainer
    trainer = hf_trainer(model, tmp_path, clock, max_steps=6, logging_steps=2, gradient_accumulation_steps=2,
                         include_num_input_tokens_seen=True, eval_strategy="steps", eval_steps=3)
    SpectralLensCallback(lens).attach(trainer)
    trainer.train()
    writer.close()

    events = train_events(tmp_path / "run")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # what the trainer logged (its mean over the logging interval and the accumulated micro-batches), at its step
    assert [e["step"] for e in events] == [h["step"] for h in logged] == [2, 4, 6]
    assert [e["train_loss"] for e in events] == [h["loss"] for h in logged]
    assert [e["tokens"] for e in events] == [h["num_input_tokens_seen"] for h in logged] == [128, 256, 384]
    # 128 tokens per 2 training seconds; the measurements (steps 2, 4, 6) and evaluations (3, 6) took none
    assert [e["tokens_per_s"] for e in events] == pytest.approx([64.0, 64.0, 64.0], rel=1e-12)
    assert [m.step for m in lens.history] == [2, 4, 6] and clock.t > 3000

    # the report: its Q column, and the training curve in its loss figure
    from spectral_lens.cli import main
    from spectral_lens.report import build_report

    record = RunRecord.open(tmp_path / "run")
    assert record.throughput() == pytest.approx(64.0, rel=1e-12)
    report = build_report([record], tmp_path / "report", plots=False)
    row = next(line for line in report.path.read_text().splitlines() if line.startswith("| gpt2 |"))
    assert row.split(" | ")[7] == "64"  # Q (tokens/s)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    assert "| 64 |" in (tmp_path / "cli" / "report.md").read_text()
    pytest.importorskip("matplotlib", reason="the loss figure needs the plot extra")
    from spectral_lens.plot import plot_loss_curves

    fig = plot_loss_curves([record])
    (dashed,) = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert list(dashed.get_xdata()) == [128, 256, 384]
    assert list(dashed.get_ydata()) == [h["loss"] for h in logged]


@pytest.mark.parametrize("tokens_per_step", [40, None])
def test_hf_tokens_rule_without_the_trainers_token_count(tmp_path, clock, tokens_per_step):
    """Without include_num_input_tokens_seen the events' tokens follow the callback's rule (step *
    tokens_per_step); with no tokens_per_step either they count steps, so no tokens_per_s is recorded."""
    from spectral_lens.integrations import SpectralLensCallback

    model = tiny_gpt2()
    writer = RunWriter(tmp_path / "run", RunInfo("gpt2", batch_tier=1), fsync=False, tail_window=(4, 16))
    lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), progress=False)  # no schedule: no measurement
    trainer = hf_trainer(model, tmp_path, clock, max_steps=2, logging_steps=1)
    SpectralLensCallback(lens, tokens_per_step=tokens_per_step).attach(trainer)
    if tokens_per_step is None:
        with pytest.warns(sl.SpectralLensWarning, match="tokens count optimizer steps"):
            trainer.train()
    else:
        trainer.train()
    writer.close()
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [1, 2]
    assert [e["train_loss"] for e in events] == [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if tokens_per_step is None:
        assert [e["tokens"] for e in events] == [1, 2] and all("tokens_per_s" not in e for e in events)
        assert RunRecord.open(tmp_path / "run").throughput() is None
    else:
        assert [e["tokens"] for e in events] == [40, 80]
        assert [e["tokens_per_s"] for e in events] == pytest.approx([40.0, 40.0], rel=1e-12)


def test_hf_resume_records_each_training_loss_once(tmp_path, clock):
    """A run resumed from its checkpoint at step 4 drops the events logged after it (step 6) and logs
    steps 6 and 8 again; the first interval after the resume starts at the checkpoint's tokens."""
    from spectral_lens.integrations import SpectralLensCallback

    class CrashAt7(hf().TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise KeyboardInterrupt("crash at step 7")

    def run(resume: bool):
        model = tiny_gpt2()
        writer = RunWriter(tmp_path / "run", None if resume else RunInfo("gpt2", batch_tier=1), resume=resume,
                           fsync=False, tail_window=None if resume else (4, 16))
        lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), progress=False)
        trainer = hf_trainer(model, tmp_path, clock, max_steps=8, logging_steps=2, save_strategy="steps",
                             save_steps=4)
        SpectralLensCallback(lens, tokens_per_step=32).attach(trainer)
        try:
            if resume:
                trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
            else:
                trainer.add_callback(CrashAt7())
                with pytest.raises(KeyboardInterrupt):
                    trainer.train()
        finally:
            writer.close()
        return trainer

    first = run(resume=False)
    assert [e["step"] for e in train_events(tmp_path / "run")] == [2, 4, 6]
    resumed = run(resume=True)
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4, 6, 8]  # the replayed step 6 once
    assert [e["tokens"] for e in events] == [64, 128, 192, 256]
    before = {h["step"]: h["loss"] for h in first.state.log_history if "loss" in h}
    after = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    assert [e["train_loss"] for e in events] == [before[2], before[4], after[6], after[8]]
    assert [e["tokens_per_s"] for e in events] == pytest.approx([32.0] * 4, rel=1e-12)


# ---- Lightning ----------------------------------------------------------------------------------


def lightning():
    return pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")


def lit_module(pl, log_key=None):
    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
            self.losses: list[float] = []  # the float64 reference: every training batch's loss

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())
            self.losses.append(float(loss.detach()))
            if log_key:
                self.log(log_key, loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x).flatten(0, 1), y.flatten()))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    torch.manual_seed(0)
    return Lit()


def lit_trainer(pl, tmp_path, clock, callbacks, **kw):
    class Tick(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            clock.t += 1.0  # one training batch (after every callback's on_train_batch_start)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            clock.t += 1000.0  # a validation batch: no training time

    kw = {"enable_checkpointing": False, "limit_val_batches": 0, **kw}
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[Tick(), *callbacks],
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def loader(n: int, seed: int = 0):
    return torch.utils.data.DataLoader(lm_pool(n, batch=4, t=12, vocab=37, seed=seed), batch_size=None)


def test_lightning_records_the_returned_loss_and_throughput(tmp_path, clock):
    pl = lightning()
    from spectral_lens.integrations import SpectralLensLightningCallback

    module = lit_module(pl)
    writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer, params=(),
                           schedule=sl.Schedule.every(2), forward_fn=slow_forward(clock), progress=False)
    cb = SpectralLensLightningCallback(lens, tokens_per_step=96)
    # 2 batches of 48 tokens per optimizer step; a train_loss event every 2 steps, and one at the end (step 5)
    lit_trainer(pl, tmp_path, clock, [cb], max_steps=5, accumulate_grad_batches=2, log_every_n_steps=2,
                limit_val_batches=1, val_check_interval=3).fit(module, loader(10), loader(1, 1))
    writer.close()

    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4, 5]
    assert [e["tokens"] for e in events] == [192, 384, 480]
    losses = torch.tensor(module.losses, dtype=torch.float64)
    want = [losses[0:4].mean(), losses[4:8].mean(), losses[8:10].mean()]  # the mean over the interval's batches
    assert [e["train_loss"] for e in events] == pytest.approx([float(w) for w in want], rel=1e-6)
    # 96 tokens per training second (2 batches of 1 s each per step); measurements and validation took none
    assert [e["tokens_per_s"] for e in events] == pytest.approx([48.0] * 3, rel=1e-12)
    assert [m.step for m in lens.history] == [2, 4] and clock.t > 3000
    assert RunRecord.open(tmp_path / "run").throughput() == pytest.approx(48.0, rel=1e-12)  # the report's Q


def test_lightning_train_loss_key_reads_the_logged_metric(tmp_path, clock):
    pl = lightning()
    from spectral_lens.integrations import SpectralLensLightningCallback

    module = lit_module(pl, log_key="train_loss")
    writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer, params=(),
                           progress=False)
    cb = SpectralLensLightningCallback(lens, tokens_per_step=48, train_loss_key="train_loss")
    lit_trainer(pl, tmp_path, clock, [cb], max_steps=4, log_every_n_steps=2).fit(module, loader(4))
    writer.close()
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4]
    # the value logged at that step (the step's own batch), as Lightning's loggers see it
    assert [e["train_loss"] for e in events] == pytest.approx([module.losses[1], module.losses[3]], rel=1e-6)
    assert [e["tokens_per_s"] for e in events] == pytest.approx([48.0, 48.0], rel=1e-12)

    module = lit_module(pl)  # a key that is never logged warns once and records nothing
    with RunWriter(tmp_path / "run2", RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12)) as writer:
        lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(),
                               progress=False)
        cb = SpectralLensLightningCallback(lens, tokens_per_step=48, train_loss_key="loss_typo")
        with pytest.warns(sl.SpectralLensWarning, match="train_loss_key 'loss_typo' is not among the logged"):
            lit_trainer(pl, tmp_path, clock, [cb], max_steps=4, log_every_n_steps=2).fit(module, loader(4))
    assert train_events(tmp_path / "run2") == []


def test_lightning_resume_records_each_training_loss_once(tmp_path, clock):
    pl = lightning()
    from spectral_lens.integrations import SpectralLensLightningCallback

    class CrashAt7(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("crash at step 7")

    def run(ckpt_path=None):
        module = lit_module(pl)
        writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), resume=ckpt_path is not None, fsync=False)
        lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), writer=writer, params=(),
                               progress=False)
        saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4,
                                             save_top_k=-1)
        callbacks = [SpectralLensLightningCallback(lens, tokens_per_step=48), saves] + ([] if ckpt_path else [CrashAt7()])
        try:
            lit_trainer(pl, tmp_path, clock, callbacks, max_steps=8, log_every_n_steps=2,
                        enable_checkpointing=True).fit(module, loader(8), ckpt_path=ckpt_path)
        finally:
            writer.close()
        return module

    with pytest.raises(RuntimeError, match="crash at step 7"):
        run()
    assert [e["step"] for e in train_events(tmp_path / "run")] == [2, 4, 6]
    assert [e["tokens_per_s"] for e in train_events(tmp_path / "run")] == pytest.approx([48.0] * 3, rel=1e-12)
    module = run(ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    events = train_events(tmp_path / "run")
    assert [e["step"] for e in events] == [2, 4, 6, 8]  # the replayed step 6 once
    assert [e["tokens"] for e in events] == [96, 192, 288, 384]
    # the resumed fit trained batches 4..7: its events are the means of its own losses
    assert [e["train_loss"] for e in events[2:]] == pytest.approx(
        [sum(module.losses[0:2]) / 2, sum(module.losses[2:4]) / 2], rel=1e-6)
    assert [e["tokens_per_s"] for e in events] == pytest.approx([48.0] * 4, rel=1e-12)
