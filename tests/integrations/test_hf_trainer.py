"""SpectralLensCallback inside a real transformers.Trainer (tiny config-built Llama, CPU, no download)."""

from __future__ import annotations

import dataclasses

import time

import pytest
import torch

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402
from spectral_lens.records import RunInfo, RunWriter, open_runs, spectrum_summaries  # noqa: E402
from support.data import RandomTokens as _RandomTokens  # noqa: E402

VOCAB, T = 64, 16


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(cfg)



def RandomTokens(n: int, seed: int) -> _RandomTokens:  # noqa: N802 (the dataset class, sized for this file)
    return _RandomTokens(n, seed, vocab=VOCAB, length=T)

def heldout_pool():
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(99))
    return [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]


def trainer_for(model, tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=kw.pop("max_steps", 20), per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=kw.pop("report_to", []), save_strategy=kw.pop("save_strategy", "no"), use_cpu=True,
        disable_tqdm=True, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(80, 0),
                                eval_dataset=RandomTokens(8, 1))


def test_records_and_trainer_logs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the Trainer's TensorBoard logger needs the tensorboard extra")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # read by the Trainer's TensorBoardCallback
    model = tiny_llama()
    writer = RunWriter(tmp_path / "run", RunInfo("hf", family="llama", batch_tier=1, total_tokens=20 * 4 * T),
                       fsync=False, tail_window=(4, 16), head_window=(1, 4))
    lens = sl.SpectralLens(model, heldout_pool(), writer=writer, schedule=sl.Schedule.every(10, start=10))
    tb = {}  # transformers 5 reads the TensorBoard directory from the environment, 4.x from an argument
    if "logging_dir" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
        tb["logging_dir"] = str(tmp_path / "tb")
    trainer = trainer_for(model, tmp_path, report_to=["tensorboard"], eval_strategy="steps", eval_steps=5, **tb)
    SpectralLensCallback(lens, on_evaluate=True, tokens_per_step=4 * T).attach(trainer)
    trainer.train()
    writer.close()

    (run,) = open_runs([tmp_path / "run"])
    # schedule: 10, 20; evaluations: 5, 10 (already measured), 15, 20 (already measured)
    assert [m.step for m in run.measurements] == [5, 10, 15, 20]
    assert [m.tokens for m in run.measurements] == [5 * 4 * T, 10 * 4 * T, 15 * 4 * T, 20 * 4 * T]
    assert [m.val_loss is not None for m in run.measurements] == [True, False, True, False]
    m = run.measurements[-1]
    assert set(m.spectra) == {"act:model.layers.1", "grad:model.layers.1.self_attn.o_proj.weight"}
    assert m.spectra["act:model.layers.1"].n_rows == 4 * T
    assert "noise_scale" in m.scalars
    # the spectra differ across checkpoints: the callback measured the model being trained
    first = run.measurements[0].spectra["act:model.layers.1"].values
    assert not torch.equal(first, m.spectra["act:model.layers.1"].values)

    # scalars went through trainer.log: into log_history and the Trainer's TensorBoard logger
    logged = [h for h in trainer.state.log_history if "spectral_lens/noise_scale" in h]
    assert [h["step"] for h in logged] == [5, 10, 15, 20]
    want = spectrum_summaries(m.spectra["act:model.layers.1"], (4, 16), (1, 4))
    assert logged[-1]["spectral_lens/act:model.layers.1/rankme"] == pytest.approx(want["rankme"], rel=1e-12)
    assert logged[-1]["spectral_lens/act:model.layers.1/alpha_tail"] == pytest.approx(want["alpha_tail"], rel=1e-12)
    assert logged[-1]["spectral_lens/noise_scale"] == m.scalars["noise_scale"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.endswith("act:model.layers.1/rankme")]
    assert len(tags) == 1 and [e.step for e in acc.Scalars(tags[0])] == [5, 10, 15, 20]


def test_plain_callback_attaches_a_lens_without_model_and_logs_into_state(tmp_path):
    model = tiny_llama()
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(10))
    sink = Recorder()
    trainer = trainer_for(model, tmp_path)
    trainer.add_callback(SpectralLensCallback(lens, sinks=[sink]))
    trainer.train()
    assert [m.step for m in lens.history] == [10, 20] == [m.step for m in sink.seen]
    assert [m.tokens for m in lens.history] == [10, 20]  # no token count: tokens count steps
    assert lens.model is None  # attached for the run only
    logged = [h for h in trainer.state.log_history if "spectral_lens/act:model.layers.1/rankme" in h]
    assert [h["step"] for h in logged] == [10, 20]
    assert logged[-1]["spectral_lens/act:model.layers.1/rankme"] == lens.history[-1].summaries["act:model.layers.1"]["rankme"]


def test_wrong_model_is_a_clear_error(tmp_path):
    lens = sl.SpectralLens(tiny_llama(), heldout_pool(), params=(), schedule=sl.Schedule.every(1))
    trainer = trainer_for(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"model \(another LlamaForCausalLM instance\) is not the model the "
                                         r"SpectralLens measures \(LlamaForCausalLM\)"):
        SpectralLensCallback(lens).attach(trainer)


class CrashAt(transformers.TrainerCallback):
    """A crash of the training loop itself (not of a measurement) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


def crash_at_7_or_resume_from_4(trainer, tmp_path, resume: bool) -> None:
    """The two runs of a resume test (a trainer with ``save_steps=4``): ``resume=False`` trains until the
    training loop crashes after step 7; ``resume=True`` resumes from its checkpoint at step 4."""
    if resume:
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    else:
        trainer.add_callback(CrashAt(7))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()


def test_after_a_crash_the_lens_is_not_left_on_the_crashed_model(tmp_path):
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bad held-out batch")
        return model(**batch)

    lens = sl.SpectralLens(pool=heldout_pool(), params=(), forward_fn=forward, schedule=sl.Schedule.every(2))
    crashed = tiny_llama()
    with pytest.raises(RuntimeError, match="bad held-out batch"):
        SpectralLensCallback(lens).attach(trainer_for(crashed, tmp_path / "a", max_steps=2)).trainer.train()
    assert lens.model is None  # the failed measurement detached it
    # the training loop crashes before any measurement: no end hook runs, the lens stays on that model ...
    with pytest.raises(KeyboardInterrupt):
        trainer = trainer_for(tiny_llama(), tmp_path / "b", max_steps=2)
        SpectralLensCallback(lens).attach(trainer)
        trainer.add_callback(CrashAt(1))
        trainer.train()
    # ... and a rerun with a fresh model and the same lens attaches it there instead of refusing it
    fresh = tiny_llama()
    trainer = trainer_for(fresh, tmp_path / "c", max_steps=2)
    SpectralLensCallback(lens).attach(trainer)
    assert lens.model is fresh
    trainer.train()
    assert [m.step for m in lens.history] == [2] and lens.model is None


def test_resume_from_checkpoint_records_each_step_once(tmp_path):
    pytest.importorskip("tensorboard", reason="the sink part needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from spectral_lens.integrations import TensorBoardSink

    def run(resume: bool):
        model = tiny_llama()
        writer = RunWriter(tmp_path / "run", None if resume else RunInfo("hf", batch_tier=1), resume=resume,
                           fsync=False)
        lens = sl.SpectralLens(model, heldout_pool(), writer=writer, schedule=sl.Schedule.every(2))
        trainer = trainer_for(model, tmp_path, max_steps=8, save_strategy="steps", save_steps=4,
                              eval_on_start=resume)
        sink = TensorBoardSink(tmp_path / "tb", figures=False)
        SpectralLensCallback(lens, on_evaluate=True, sinks=[sink]).attach(trainer)
        crash_at_7_or_resume_from_4(trainer, tmp_path, resume)
        writer.close()
        sink.close()
        return lens, trainer

    lens, _ = run(resume=False)
    assert [m.step for m in lens.history] == [2, 4, 6]  # step 6 was measured after the last checkpoint
    time.sleep(1.1)  # TensorBoard orders event files by name, whose first key is the second they were created
    lens, trainer = run(resume=True)
    assert [m.step for m in lens.history] == [6, 8]  # the replay measures step 6 again ...
    (record,) = open_runs([tmp_path / "run"])
    assert [m.step for m in record.measurements] == [2, 4, 6, 8]  # ... and the record holds it once
    assert len(list((tmp_path / "run" / "spectra").iterdir())) == 4 * 2  # the first step-6 files are gone
    assert record.measurements[1].val_loss is None  # eval_on_start at the restored step 4: not measured again
    assert [h["step"] for h in trainer.state.log_history if "spectral_lens/noise_scale" in h] == [2, 4, 6, 8]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    # TensorBoard shows the replayed step 6 once (the sink reopened its writer with purge_step=5)
    assert [e.step for e in events.Scalars("spectral_lens/noise_scale")] == [2, 4, 6, 8]


class Recorder:
    def __init__(self) -> None:
        self.seen = []

    def log_measurement(self, measurement, tail=None, head=None):
        self.seen.append(measurement)


@pytest.mark.parametrize("lens_on_model", [True, False])
def test_trainer_with_torch_compile(tmp_path, lens_on_model):
    """TrainingArguments(torch_compile=True): the trainer trains through a torch.compile wrapper; the
    callback measures the wrapped model eagerly, under the model's own names, every scheduled step."""
    model = tiny_llama()
    lens = (sl.SpectralLens(model, heldout_pool(), schedule=sl.Schedule.every(2), progress=False) if lens_on_model
            else sl.SpectralLens(pool=heldout_pool(), schedule=sl.Schedule.every(2), progress=False))
    trainer = trainer_for(model, tmp_path, max_steps=4, torch_compile=True, torch_compile_backend="aot_eager")
    SpectralLensCallback(lens).attach(trainer)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert [m.step for m in lens.history] == [2, 4]
    rows = {k: v.n_rows for k, v in lens.history[-1].spectra.items()}
    assert rows == {"act:model.layers.1": 4 * T, "grad:model.layers.1.self_attn.o_proj.weight": 4}


def test_evaluate_after_train_measures_a_lens_without_model(tmp_path):
    # the guide's set-up (a lens without a model, on_evaluate=True, attach) then trainer.evaluate() after train(),
    # whose last step the schedule did not name: the old code raised "SpectralLens is not attached to a model",
    # since on_train_end had detached the lens
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(2))
    trainer = trainer_for(tiny_llama(), tmp_path, max_steps=3)
    SpectralLensCallback(lens, on_evaluate=True).attach(trainer)
    trainer.train()
    metrics = trainer.evaluate()
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(2, None), (3, metrics["eval_loss"])]
    assert lens.model is None  # attached for that measurement only


def test_attached_callback_keeps_the_trainers_loss_logs(tmp_path):
    # Trainer.log, called from on_step_end, cleared control.should_log: on the old code the trainer's own log
    # (the training loss) of every measured step was dropped, here all of them
    def run(with_lens):
        model = tiny_llama()
        trainer = trainer_for(model, tmp_path / str(with_lens), max_steps=4, logging_steps=2)
        if with_lens:
            lens = sl.SpectralLens(model, heldout_pool(), params=(), schedule=sl.Schedule.every(2))
            SpectralLensCallback(lens).attach(trainer)
        trainer.train()
        return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]

    logged = run(True)
    assert [step for step, _ in logged] == [2, 4]
    assert logged == run(False)


def test_evaluate_before_train_with_eval_on_start_measures_step_0_once(tmp_path):
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(2))
    trainer = trainer_for(tiny_llama(), tmp_path, max_steps=2, eval_strategy="steps", eval_steps=10,
                          eval_on_start=True)
    SpectralLensCallback(lens, on_evaluate=True).attach(trainer)
    trainer.evaluate()
    trainer.train()
    assert [m.step for m in lens.history] == [0, 2]


def test_eval_loss_key_with_several_evaluation_datasets(tmp_path):
    # a dict of evaluation datasets: Trainer.evaluate logs eval_<name>_loss, never eval_loss; the old callback
    # recorded no validation loss, silently, and had no way to name the metric
    from spectral_lens import SpectralLensWarning

    def run(**kw):
        lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(100))
        trainer = trainer_for(tiny_llama(), tmp_path / str(len(kw)), max_steps=2)
        trainer.eval_dataset = {"a": RandomTokens(8, 1), "b": RandomTokens(8, 2)}
        SpectralLensCallback(lens, on_evaluate=True, **kw).attach(trainer)
        trainer.train()
        return lens, trainer.evaluate()

    with pytest.warns(SpectralLensWarning, match=r"'eval_loss' is not among .*eval_a_loss"):
        lens, _ = run()
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(2, None)]
    lens, metrics = run(eval_loss_key="eval_a_loss")
    assert [(m.step, m.scalars.get("val_loss")) for m in lens.history] == [(2, metrics["eval_a_loss"])]


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("attached", [True, False])
@pytest.mark.parametrize("crash", [False, True])
def test_a_callback_kept_after_train_does_not_keep_the_trainer(tmp_path, attached, crash):
    """A callback kept after ``train()`` (to read its lens's history) kept the trainer it was attached to
    (``self.trainer``), and with it the model, the optimizer and the datasets. Now ``attach`` holds the trainer
    until its ``train()`` begins, then weakly; ``cb.trainer`` still reaches it while the user keeps it."""
    import gc
    import weakref

    model = tiny_gpt2()
    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(2), progress=False)
    trainer = trainer_for(model, tmp_path, max_steps=4)
    cb = SpectralLensCallback(lens)
    if attached:
        cb.attach(trainer)
    else:
        trainer.add_callback(cb)
    if crash:
        trainer.add_callback(CrashAt(3))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    else:
        trainer.train()
    assert cb.trainer is (trainer if attached else None)
    refs = [weakref.ref(o) for o in (trainer, trainer.optimizer, trainer.train_dataset, trainer.eval_dataset)]
    model_ref = weakref.ref(model)
    del trainer, model
    gc.collect()
    assert [r() for r in refs] == [None] * 4  # before (attached): all four alive
    assert cb.trainer is None
    assert [m.step for m in cb.driver.lens.history] == ([2] if crash else [2, 4])  # what the docs promise
    # a run that crashed outside a measurement leaves the lens on its model until the next run (documented);
    # lens.detach() lets it go
    assert (model_ref() is not None) == crash
    lens.detach()
    gc.collect()
    assert model_ref() is None
