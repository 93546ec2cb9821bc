"""An evaluation that falls on a step the schedule already measured keeps its validation loss.

The natural setup, ``Schedule.every(k)`` with an evaluation every ``k`` steps, used to record no
validation loss at all: the schedule measured first (without a loss), the evaluation's measurement
was skipped as a repeat, and its loss was dropped, so ``RunRecord.val_curve()`` was empty and
``tokens_to_target`` (the report's ``T`` and ``eps_tok``) had nothing to read.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunWriter, open_runs


def _losses(run):
    tokens, losses = run.val_curve()
    return [int(t) for t in tokens], [float(v) for v in losses]


def test_hf_trainer_evaluation_at_a_scheduled_step_keeps_its_loss(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    from spectral_lens.integrations import SpectralLensCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 40, (24, 12), generator=torch.Generator().manual_seed(1))

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    writer = RunWriter(tmp_path / "run", RunInfo("gpt2", batch_tier=4), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(model, [{"input_ids": ids[:4], "labels": ids[:4]}], writer=writer,
                           schedule=sl.Schedule.every(2), progress=False)
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                                          eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=48).attach(trainer)
    trainer.train()
    writer.close()

    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    assert [s for s, _ in evals] == [2, 4]
    (run,) = open_runs([tmp_path / "run"])
    assert [m.step for m in run.measurements] == [2, 4]  # each step measured once, as before
    tokens, losses = _losses(run)
    assert tokens == [96, 192]
    assert losses == pytest.approx([v for _, v in evals], rel=1e-6)


class _Lit:
    """Built lazily so that the module imports without lightning."""

    @staticmethod
    def make(pl):
        class TinyLit(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
                self.val_losses: list[float] = []

            def _loss(self, batch):
                x, y = batch
                return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

            def training_step(self, batch, batch_idx):
                return self._loss(batch)

            def validation_step(self, batch, batch_idx):
                loss = self._loss(batch)
                self.log("val_loss", loss)

            def on_validation_epoch_end(self):
                if not self.trainer.sanity_checking:
                    self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=3e-3)

        return TinyLit()


def test_lightning_validation_at_a_scheduled_step_keeps_its_loss(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from spectral_lens.integrations import SpectralLensLightningCallback

    torch.manual_seed(0)
    module = _Lit.make(pl)
    writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=4), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer,
                           schedule=sl.Schedule.every(2), progress=False)
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=48)

    def loader(n, seed):
        return torch.utils.data.DataLoader(lm_pool(n, batch=4, t=12, vocab=37, seed=seed), batch_size=None)

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[cb], max_steps=4, val_check_interval=2,
                         limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, loader(4, 0), loader(1, 1))
    writer.close()

    assert len(module.val_losses) == 2  # validation after steps 2 and 4, both scheduled
    (run,) = open_runs([tmp_path / "run"])
    assert [m.step for m in run.measurements] == [2, 4]
    tokens, losses = _losses(run)
    assert tokens == [96, 192]
    assert losses == pytest.approx(module.val_losses, rel=1e-6)


def test_driver_keeps_the_loss_once_and_not_on_a_closed_writer(tmp_path):
    from support.models import TinyGPT as Net

    from spectral_lens.integrations._driver import LensDriver

    writer = RunWriter(tmp_path / "run", RunInfo("d", batch_tier=1), fsync=False, tail_window=(4, 12))
    lens = sl.SpectralLens(Net(vocab=37, d=16, heads=2, layers=2, ctx=12), lm_pool(1, batch=4, t=12, vocab=37),
                           writer=writer, params=(), progress=False)
    driver = LensDriver(lens, (), tokens_per_step=10)
    driver.measure(2, 20)
    driver.record_val_loss(2, 20, 3.5)
    driver.record_val_loss(2, 20, 3.4)  # a second evaluation at the step: the first loss stands
    driver.measure(4, 40, val_loss=3.0)
    driver.record_val_loss(4, 40, 2.9)  # the measurement carries its loss already
    driver.measure(6, 60)
    writer.close()
    driver.record_val_loss(6, 60, 2.8)  # trainer.evaluate() after the writer was closed: no error
    (run,) = open_runs([tmp_path / "run"])
    assert [(int(t), float(v)) for t, v in zip(*run.val_curve())] == [(20, 3.5), (40, 3.0)]


def test_a_resumed_evaluation_keeps_the_loss_the_record_holds_at_the_checkpoint(tmp_path):
    """A run resumed from a checkpoint at a step whose evaluation was recorded (in the measurement or
    as a val_loss event) evaluated again there and appended a second val_loss event at the step: the
    val curve had two losses at one token count (only exact repeats are merged). The resumed driver
    reads the record, so the first life's loss stands; a checkpoint measured without a loss gets one."""
    from support.models import TinyGPT as Net

    from spectral_lens.integrations._driver import LensDriver

    def life():
        writer = RunWriter(tmp_path / "run", RunInfo("d", batch_tier=1), resume=True, fsync=False, tail_window=(4, 12))
        lens = sl.SpectralLens(Net(vocab=37, d=16, heads=2, layers=2, ctx=12), lm_pool(1, batch=4, t=12, vocab=37),
                               writer=writer, params=(), progress=False)
        return writer, LensDriver(lens, (), tokens_per_step=10)

    writer, driver = life()
    driver.measure(2, 20)
    driver.record_val_loss(2, 20, 3.5)  # a val_loss event
    driver.measure(4, 40, val_loss=3.0)  # the loss in the measurement
    driver.measure(6, 60)  # no loss
    writer.close()
    curve = [(20, 3.5), (40, 3.0), (60, 2.8)]
    # each resume evaluates at its checkpoint; a resume at 4 drops step 6, one at 2 drops step 4
    for step, loss, events in ((6, 2.8, [2, 6]), (6, 2.7, [2, 6]), (4, 2.99, [2]), (2, 3.49, [2])):
        writer, driver = life()  # a new process: writer reopened on the same run, a new lens and driver
        driver.resumed(step)
        assert driver.last_step == step
        driver.record_val_loss(step, step * 10, loss)
        writer.close()
        (run,) = open_runs([tmp_path / "run"])
        assert [(int(t), float(v)) for t, v in zip(*run.val_curve())] == curve[: step // 2], step
        assert [e["step"] for e in run.events if e.get("val_loss") is not None] == events, step
