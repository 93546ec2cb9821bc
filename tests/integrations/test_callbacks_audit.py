"""Audit of the framework callbacks: cases the other integration tests do not reach."""

from __future__ import annotations

import warnings

import pytest

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens import SpectralLensWarning  # noqa: E402
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402
from spectral_lens.records import RunInfo, RunWriter, open_runs  # noqa: E402

from .test_hf_trainer import RandomTokens, heldout_pool, tiny_llama  # noqa: E402


def test_hf_eval_loss_key_naming_the_second_of_several_datasets(tmp_path):
    # eval_loss_key names the second of two evaluation datasets: the old callback measured at the first
    # one's evaluation without a loss and warned, at every evaluation, that the measurement "records no
    # validation loss" although the second one's loss then went to log.jsonl; the measurement now carries it
    # a tail window within the tiny model (the default (100, 200) is warned about, once)
    writer = RunWriter(tmp_path / "run", RunInfo("hf", batch_tier=1), fsync=False, tail_window=(2, 8))
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), writer=writer, schedule=sl.Schedule.every(100))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens(40, 0),
                                   eval_dataset={"a": RandomTokens(8, 1), "b": RandomTokens(8, 2)})
    # tokens_per_step: without it (a record, no token count) the callback warns that tokens count steps
    SpectralLensCallback(lens, on_evaluate=True, eval_loss_key="eval_b_loss", tokens_per_step=64).attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpectralLensWarning)
        trainer.train()
    writer.close()
    losses = [(h["step"], h["eval_b_loss"]) for h in trainer.state.log_history if "eval_b_loss" in h]
    assert [s for s, _ in losses] == [2, 4]
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == losses
    (record,) = open_runs([tmp_path / "run"])
    assert [m.step for m in record.measurements] == [2, 4]
    assert [m.val_loss for m in record.measurements] == pytest.approx([loss for _, loss in losses], rel=1e-6)
    assert [h["step"] for h in trainer.state.log_history if "spectral_lens/val_loss" in h] == [2, 4]


def test_hf_a_missing_eval_loss_key_warns_also_at_a_scheduled_step(tmp_path):
    # Schedule.every(k) with eval_steps=k (the guide's set-up): every evaluation falls on a step the schedule
    # measured; the old callback then dropped a missing eval_loss_key silently (no validation loss, no warning)
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, eval_strategy="steps", eval_steps=2)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens(40, 0),
                                   eval_dataset=RandomTokens(8, 1))
    SpectralLensCallback(lens, on_evaluate=True, eval_loss_key="eval_perplexity").attach(trainer)
    with pytest.warns(SpectralLensWarning, match=r"'eval_perplexity' is not among .*'eval_loss'.* step 2"):
        trainer.train()
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(2, None)]


def test_lightning_a_missing_val_loss_key_warns_also_at_a_scheduled_step(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
    from support.models import lm_pool

    from spectral_lens.integrations import SpectralLensLightningCallback

    from .test_lightning import TinyLit, loader, trainer

    module = TinyLit()
    lens = sl.SpectralLens(module.net, lm_pool(1, batch=4, t=12, vocab=37), params=(), schedule=sl.Schedule.every(2))
    cb = SpectralLensLightningCallback(lens, on_validation=True, val_loss_key="valid_loss")
    with pytest.warns(SpectralLensWarning, match=r"'valid_loss' is not among the logged metrics \['val_loss'\]"):
        trainer(tmp_path, cb, False, max_steps=2, val_check_interval=2, limit_val_batches=1,
                num_sanity_val_steps=0).fit(module, loader(2, 0), loader(1, 1))
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(2, None)]


def test_hf_resume_evaluation_at_an_unmeasured_checkpoint_step_measures_it(tmp_path):
    # the interrupted run measured steps 3 and 6 (Schedule.every(3)), not its checkpoint's step 4; the resumed
    # train() evaluates at step 4 (eval_on_start) with on_evaluate=True. The old callback took the restored step
    # for measured, so that evaluation measured nothing (its loss went to log.jsonl only)
    from .test_hf_trainer import crash_at_7_or_resume_from_4, trainer_for

    def run(resume: bool):
        model = tiny_llama()
        writer = RunWriter(tmp_path / "run", None if resume else RunInfo("hf", batch_tier=1), resume=resume,
                           fsync=False)
        lens = sl.SpectralLens(model, heldout_pool(), params=(), writer=writer, schedule=sl.Schedule.every(3))
        trainer = trainer_for(model, tmp_path, max_steps=8, save_strategy="steps", save_steps=4,
                              eval_on_start=resume)
        SpectralLensCallback(lens, on_evaluate=True).attach(trainer)
        crash_at_7_or_resume_from_4(trainer, tmp_path, resume)
        writer.close()
        return lens, trainer

    lens, _ = run(resume=False)
    assert [m.step for m in lens.history] == [3, 6]
    lens, trainer = run(resume=True)
    (eval_loss,) = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(4, eval_loss), (6, None)]
    (record,) = open_runs([tmp_path / "run"])
    assert [m.step for m in record.measurements] == [3, 4, 6]
    assert record.measurements[1].val_loss == pytest.approx(eval_loss, rel=1e-6)


def test_hf_an_evaluation_outside_the_dict_still_warns_and_measures(tmp_path):
    # the dict rule above passes over only the other datasets' evaluations: trainer.evaluate() of another
    # dataset (metrics eval_loss, ...) with eval_loss_key naming a dict member warns and measures, as before
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(100))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_llama(), args=args, train_dataset=RandomTokens(8, 0),
                                   eval_dataset={"a": RandomTokens(8, 1), "b": RandomTokens(8, 2)})
    SpectralLensCallback(lens, on_evaluate=True, eval_loss_key="eval_b_loss").attach(trainer)
    trainer.train()
    with pytest.warns(SpectralLensWarning, match=r"'eval_b_loss' is not among .*'eval_loss'"):
        trainer.evaluate(eval_dataset=RandomTokens(8, 3))
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(1, None)]
