"""SpectralLensLightningCallback inside a real Lightning Trainer (tiny module, CPU, few steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.models import TinyGPT, lm_pool

import spectral_lens as sl

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
from spectral_lens.integrations import SpectralLensLightningCallback  # noqa: E402
from spectral_lens.records import RunInfo, RunWriter, open_runs, spectrum_summaries  # noqa: E402


class TinyLit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)

    def forward(self, idx):
        return self.net(idx)

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loader(n: int, seed: int):
    return torch.utils.data.DataLoader(lm_pool(n, batch=4, t=12, vocab=37, seed=seed), batch_size=None)


def trainer(tmp_path, callback, logger, **kw):
    callbacks = callback if isinstance(callback, list) else [callback]
    kw = {"max_steps": 6, "enable_checkpointing": False, "devices": 1, **kw}
    return pl.Trainer(accelerator="cpu", logger=logger, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def test_records_and_logger_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoardLogger needs the tensorboard extra")
    torch.manual_seed(0)
    module = TinyLit()
    writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), fsync=False, tail_window=(4, 12),
                       head_window=(1, 4))
    lens = sl.SpectralLens(module.net, lm_pool(2, batch=4, t=12, vocab=37, seed=9), writer=writer,
                           schedule=sl.Schedule.every(3, start=3))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    cb = SpectralLensLightningCallback(lens, on_validation=True, tokens_per_step=48)
    trainer(tmp_path, cb, logger, val_check_interval=2, num_sanity_val_steps=1, limit_val_batches=2).fit(
        module, loader(6, 0), loader(2, 1))
    writer.close()

    (run,) = open_runs([tmp_path / "run"])
    # validation after steps 2, 4, 6; schedule 3, 6; a step is measured once; the sanity check never
    assert [m.step for m in run.measurements] == [2, 3, 4, 6]
    assert [m.tokens for m in run.measurements] == [96, 144, 192, 288]
    assert [m.val_loss is not None for m in run.measurements] == [True, False, True, False]  # step 6: the schedule came first
    m = run.measurements[-1]
    assert set(m.spectra) == {"act:transformer.h.1", "grad:transformer.h.1.attn.c_proj.weight"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    rankme = acc.Scalars("spectral_lens/act:transformer.h.1/rankme")
    assert [e.step for e in rankme] == [2, 3, 4, 6]
    want = spectrum_summaries(m.spectra["act:transformer.h.1"], (4, 12), (1, 4))
    assert rankme[-1].value == pytest.approx(want["rankme"], rel=1e-6)
    assert acc.Scalars("spectral_lens/noise_scale")[-1].value == pytest.approx(m.scalars["noise_scale"], rel=1e-6)


def test_no_logger_and_module_check(tmp_path):
    module = TinyLit()
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), params=(),
                           schedule=sl.Schedule.at_fractions(6, [0.5, 1.0]))
    trainer(tmp_path, SpectralLensLightningCallback(lens), False, limit_val_batches=0).fit(module, loader(6, 0))
    assert [m.step for m in lens.history] == [3, 5]  # at_fractions maps 1.0 to the last step a loop runs
    assert [m.tokens for m in lens.history] == [3, 5]  # no tokens_per_step: tokens count steps
    unbound = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(3))
    trainer(tmp_path, SpectralLensLightningCallback(unbound), False, limit_val_batches=0).fit(TinyLit(), loader(6, 0))
    assert [m.step for m in unbound.history] == [3, 6] and unbound.model is None  # attached for the fit only
    other = sl.SpectralLens(TinyGPT(), lm_pool(1), params=(), schedule=sl.Schedule.every(1))
    with pytest.raises(ValueError, match="not the model the SpectralLens measures"):
        trainer(tmp_path, SpectralLensLightningCallback(other), False, limit_val_batches=0).fit(TinyLit(), loader(2, 0))


class CrashAt(pl.Callback):
    """A crash of the training loop itself (not of a measurement) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_a_crashed_fit_leaves_the_lens_detached(tmp_path):
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("bad held-out batch")
        return model(batch[0])

    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), forward_fn=forward,
                           schedule=sl.Schedule.every(2))
    cb = SpectralLensLightningCallback(lens)
    with pytest.raises(ValueError, match="bad held-out batch"):
        trainer(tmp_path, cb, False, limit_val_batches=0).fit(TinyLit(), loader(6, 0))
    assert lens.model is None
    with pytest.raises(RuntimeError, match="crash at step 1"):  # a crash outside a measurement: on_exception
        trainer(tmp_path, [cb, CrashAt(1)], False, limit_val_batches=0).fit(TinyLit(), loader(6, 0))
    assert lens.model is None
    trainer(tmp_path, cb, False, limit_val_batches=0, max_steps=2).fit(TinyLit(), loader(6, 0))  # the same callback
    assert [m.step for m in lens.history] == [2] and lens.model is None


def test_resume_from_checkpoint_records_each_step_once(tmp_path):
    def run(ckpt_path=None):
        torch.manual_seed(0)
        module = TinyLit()
        writer = RunWriter(tmp_path / "run", RunInfo("lit", batch_tier=1), resume=ckpt_path is not None, fsync=False)
        lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), writer=writer,
                               schedule=sl.Schedule.every(2))
        saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4,
                                             save_top_k=-1)
        callbacks = [SpectralLensLightningCallback(lens), saves] + ([] if ckpt_path else [CrashAt(7)])
        fit = trainer(tmp_path, callbacks, False, max_steps=8, enable_checkpointing=True, limit_val_batches=0)
        try:
            fit.fit(module, loader(8, 0), ckpt_path=ckpt_path)
        finally:
            writer.close()
        return lens

    with pytest.raises(RuntimeError, match="crash at step 7"):
        run()
    lens = run(ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert [m.step for m in lens.history] == [6, 8]  # the replay measures step 6 again ...
    (record,) = open_runs([tmp_path / "run"])
    assert [m.step for m in record.measurements] == [2, 4, 6, 8]  # ... and the record holds it once
    assert len(list((tmp_path / "run" / "spectra").iterdir())) == 4 * 2


def test_standalone_pytorch_lightning_package(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    from spectral_lens.integrations.pytorch_lightning import SpectralLensLightningCallback as PTLCallback

    class Module(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(2))
    cb = PTLCallback(lens)
    assert isinstance(cb, ptl.Callback) and not isinstance(cb, pl.Callback)
    ptl.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)).fit(
        module, loader(2, 0))
    assert [m.step for m in lens.history] == [2]


def test_gradient_accumulation_measures_after_optimizer_steps_only(tmp_path):
    def run(with_lens):
        torch.manual_seed(0)
        module = TinyLit()
        lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9),
                               schedule=sl.Schedule.every(1))
        fit = trainer(tmp_path, [SpectralLensLightningCallback(lens)] if with_lens else [], False, max_steps=3,
                      accumulate_grad_batches=2, limit_val_batches=0)
        fit.fit(module, loader(8, 0))
        return module, fit, lens

    module, fit, lens = run(True)
    # step 0 is no optimizer step: the first batch only accumulated gradients (it was measured on the old code)
    assert [m.step for m in lens.history] == [1, 2, 3]
    plain, plain_fit, _ = run(False)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), plain.parameters()))
    ours, theirs = fit.optimizers[0].state_dict()["state"], plain_fit.optimizers[0].state_dict()["state"]
    assert all(torch.equal(ours[k][n], theirs[k][n]) for k in theirs for n in theirs[k])


def test_validate_after_fit_does_not_measure(tmp_path):
    module = TinyLit()
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37, seed=9), schedule=sl.Schedule.every(2))
    fit = trainer(tmp_path, SpectralLensLightningCallback(lens, on_validation=True), False, max_steps=5,
                  val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0)
    fit.fit(module, loader(8, 0), loader(2, 1))
    with_val_loss = [(m.step, m.scalars.get("val_loss") is not None) for m in lens.history]
    assert with_val_loss == [(2, False), (3, True), (4, False)]
    # trainer.validate() runs under torch.inference_mode(), outside training: on the old code the gradient probe
    # raised there ("cannot differentiate inside torch.inference_mode()") and failed the validation
    fit.validate(module, loader(2, 1), verbose=False)
    assert [m.step for m in lens.history] == [2, 3, 4]


def test_a_new_fit_with_the_same_callback_measures_its_steps(tmp_path):
    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(4))
    cb = SpectralLensLightningCallback(lens)
    for _ in range(2):
        trainer(tmp_path, cb, False, max_steps=4, limit_val_batches=0).fit(TinyLit(), loader(8, 0))
    assert [m.step for m in lens.history] == [4, 4]  # the old code skipped step 4 of the second fit


def test_ddp_spawn_is_refused_with_a_clear_error(tmp_path):
    # ddp_spawn pickles the trainer into new processes; the old code failed with "Can't pickle local object
    # 'PerSampleGradientProbe.__init__.<locals>.<lambda>'", or, for a lens that pickled, measured in copies the
    # main process never saw, its RunWriter's file descriptors sent to processes where they mean nothing
    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(2))
    cb = SpectralLensLightningCallback(lens)
    fit = trainer(tmp_path, cb, False, max_steps=2, limit_val_batches=0, strategy="ddp_spawn", devices=2)
    with pytest.raises(TypeError, match="cannot run with strategy='ddp_spawn'"):
        fit.fit(TinyLit(), loader(4, 0))
    assert lens.model is None and lens.history == []


class TwoValLoaders(TinyLit):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self._loss(batch))  # Lightning logs it as val_loss/dataloader_idx_N


def test_a_missing_val_loss_key_warns_with_the_logged_keys(tmp_path):
    def fit(key):
        module = TwoValLoaders()
        lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), params=(),
                               schedule=sl.Schedule.every(100))
        cb = SpectralLensLightningCallback(lens, on_validation=True, val_loss_key=key)
        trainer(tmp_path, cb, False, max_steps=2, val_check_interval=2, limit_val_batches=1,
                num_sanity_val_steps=0).fit(module, loader(2, 0), [loader(1, 1), loader(1, 2)])
        return lens.history

    # the old code recorded no validation loss, silently
    with pytest.warns(sl.SpectralLensWarning, match=r"val_loss_key 'val_loss' is not among the logged metrics "
                                                    r"\['val_loss/dataloader_idx_0', 'val_loss/dataloader_idx_1'\]"):
        (m,) = fit("val_loss")
    assert m.step == 2 and "val_loss" not in m.scalars
    (m,) = fit("val_loss/dataloader_idx_1")
    assert m.scalars["val_loss"] > 0


class TwoOptimizers(TinyLit):
    """Manual optimization, two optimizers stepped per batch: ``global_step`` advances by 2 per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(self._loss(batch))
            opt.step()

    def configure_optimizers(self):
        params = list(self.parameters())
        return [torch.optim.SGD(params[: len(params) // 2], lr=1e-2), torch.optim.SGD(params[len(params) // 2:], lr=1e-2)]


def test_schedule_steps_passed_over_in_one_batch_are_measured(tmp_path):
    # global_step goes 2, 4, 6, 8: every(3) names 3 and 6; the old callback compared the end step only and
    # never measured step 3 (nor 9, 15, ...: every odd multiple of 3)
    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(3))
    fit = trainer(tmp_path, SpectralLensLightningCallback(lens), False, max_steps=8, limit_val_batches=0)
    fit.fit(TwoOptimizers(), loader(8, 0))
    assert fit.global_step == 8
    assert [m.step for m in lens.history] == [4, 6]


@pytest.mark.parametrize("crash", [False, True])
@pytest.mark.parametrize("then_validate", [False, True])
def test_a_callback_kept_after_fit_does_not_keep_the_module_or_trainer(tmp_path, crash, then_validate):
    """Lightning sets ``callback.log`` / ``callback.log_dict`` (the module's bound methods) on every callback at
    each run; a callback kept after ``fit`` (to read its lens's history) held the LightningModule, through it
    the trainer, its optimizer and data loaders. The callback drops them in ``teardown`` / ``on_exception``."""
    import gc
    import weakref

    torch.manual_seed(0)
    module = TinyLit()
    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), forward_fn=lambda m, b: m(b[0]),
                           schedule=sl.Schedule.every(2), progress=False)
    cb = SpectralLensLightningCallback(lens)
    t = trainer(tmp_path, [cb, CrashAt(3)] if crash else cb, False, limit_val_batches=0)
    if crash:
        with pytest.raises(RuntimeError, match="crash at step 3"):
            t.fit(module, loader(6, 0))
    else:
        t.fit(module, loader(6, 0))
        if then_validate:
            t.validate(module, loader(2, 1), verbose=False)
    refs = [weakref.ref(o) for o in (t, module, t.optimizers[0])]
    del t, module
    gc.collect()
    assert [r() for r in refs] == [None] * 3  # before: all three alive
    assert [m.step for m in lens.history] == ([2] if crash else [2, 4, 6]) and lens.model is None
