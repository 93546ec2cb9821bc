"""Review of the saved-checkpoints workflow (docs/guide-checkpoints.md, spectral_lens/integrations/trainer_state.py,
SpectralLens._warn_measured): a state whose step is not its directory's, a directory where the state file should be,
several evaluation datasets, a record the callback already wrote into, a run resumed from an earlier checkpoint,
a crash half-way through log_history, and the duplicate-step check on a long record."""

from __future__ import annotations

import json
import warnings

import pytest
from support.files import bytes_read
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.integrations.trainer_state import checkpoint_position, log_history
from spectral_lens.records import RecordWarning, RunInfo, RunRecord, RunWriter

V, T = 64, 16


def _state(tmp_path, name="checkpoint-4", history=None, **kw):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    state = {"global_step": 4, "num_input_tokens_seen": 256, "log_history": history if history is not None else [
        {"loss": 3.9, "learning_rate": 1e-3, "num_input_tokens_seen": 64, "step": 1},
        {"loss": 3.8, "learning_rate": 8e-4, "num_input_tokens_seen": 128, "step": 2},
        {"eval_loss": 3.85, "num_input_tokens_seen": 128, "step": 2},
        {"loss": 3.7, "learning_rate": 6e-4, "num_input_tokens_seen": 256, "step": 4},
        {"eval_loss": 3.75, "num_input_tokens_seen": 256, "step": 4},
    ]}
    state.update(kw)
    (d / "trainer_state.json").write_text(json.dumps(state))
    return d


def _writer(tmp_path, **kw):
    return RunWriter(tmp_path / "run", RunInfo("r", family="f", batch_tier=4, n_layer=2, total_tokens=384),
                     fsync=False, tail_window=(2, 8), **kw)


def _events(path):
    return [{k: v for k, v in e.items() if k != "time"} for e in RunRecord.open(path).events]


# ------------------------------------------------------------------ checkpoint_position
def test_a_state_whose_step_is_not_its_checkpoint_directorys_is_refused(tmp_path):
    """checkpoint-6 holding the state of step 4 (a trainer_state.json copied over) was measured as step 4 with
    checkpoint-6's weights. The Trainer saves checkpoint-<global_step>: a mismatch names both."""
    d = _state(tmp_path, "checkpoint-6")
    with pytest.raises(ValueError, match=r"checkpoint-6/trainer_state\.json: global_step is 4 but the directory is "
                                         r"checkpoint-6: expected the step in its name"):
        checkpoint_position(d)
    with pytest.raises(ValueError, match=r"global_step is 4 but the directory is checkpoint-6"):
        checkpoint_position(d / "trainer_state.json")
    assert checkpoint_position(_state(tmp_path, "checkpoint-4")) == (4, 256)
    assert checkpoint_position(_state(tmp_path, "final")) == (4, 256)  # a directory named otherwise: no check


def test_a_directory_where_the_state_file_should_be_and_unreadable_files_are_named(tmp_path):
    d = tmp_path / "checkpoint-4"
    (d / "trainer_state.json").mkdir(parents=True)
    for given in (d, d / "trainer_state.json"):
        with pytest.raises(FileNotFoundError, match=r"checkpoint-4/trainer_state\.json is not a file: expected a "
                                                    r"Trainer checkpoint directory"):
            checkpoint_position(given)
    e = tmp_path / "checkpoint-2"
    e.mkdir()
    (e / "trainer_state.json").write_bytes(b'{"global_step": 2, "note": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"checkpoint-2/trainer_state\.json: not a JSON file \(.*utf-8") as info:
        checkpoint_position(e)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ log_history
def test_log_history_records_the_loss_of_one_of_several_evaluation_datasets(tmp_path):
    """A Trainer with eval_dataset={"a": ..., "b": ...} logs eval_a_loss and eval_b_loss, no eval_loss: the callback
    records one of them (eval_loss_key=); log_history wrote no validation curve at all, without a word, and could not
    be told which."""
    history = [{"loss": 3.9, "learning_rate": 1e-3, "num_input_tokens_seen": 64, "step": 2},
               {"eval_a_loss": 3.85, "num_input_tokens_seen": 64, "step": 2},
               {"eval_b_loss": 3.95, "num_input_tokens_seen": 64, "step": 2}]
    d = _state(tmp_path, "checkpoint-2", history, global_step=2, num_input_tokens_seen=64)
    with _writer(tmp_path) as w:
        for key in ("eval_loss", "eval_c_loss"):  # the default, a typo: which dataset is not guessed
            with pytest.raises(ValueError, match=rf"checkpoint-2/trainer_state\.json: log_history holds no '{key}' but "
                                                 r"\['eval_a_loss', 'eval_b_loss'\] .*pass eval_loss_key="):
                log_history(w, d, eval_loss_key=key)
        assert _events(w.path) == []
        assert log_history(w, d, eval_loss_key="eval_a_loss") == 2
        assert log_history(w, d, eval_loss_key="eval_a_loss") == 0
    assert _events(tmp_path / "run") == [{"step": 2, "tokens": 64, "train_loss": 3.9, "lr": 1e-3},
                                         {"step": 2, "tokens": 64, "val_loss": 3.85}]


def test_log_history_does_not_repeat_the_validation_loss_a_measurement_holds(tmp_path):
    """The callback with on_evaluate=True keeps each evaluation's loss in the measurement it takes there; log_history
    into the same record then appended the same loss again as a val_loss event (and a different one, of another run,
    without a word: two points at one step of the validation curve)."""
    pool = lm_pool(1, batch=4, t=T, vocab=V, seed=99)
    d = _state(tmp_path)
    with _writer(tmp_path) as w:
        lens = sl.SpectralLens(TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T), pool, writer=w, progress=False,
                               params=())
        lens.measure(2, 128, val_loss=3.85)
        lens.measure(4, 256, val_loss=3.75)
        assert log_history(w, d) == 3  # the 3 training entries; both evaluations are in the measurements
        assert log_history(w, d) == 0
        assert not any("val_loss" in e for e in _events(w.path))
        other = _state(tmp_path / "other", history=[{"eval_loss": 9.0, "num_input_tokens_seen": 256, "step": 4}])
        with pytest.raises(ValueError, match=r"log_history\[0\] has val_loss=9\.0 at step 4, but the record .*run "
                                             r"already holds val_loss=3\.75"):
            log_history(w, other)
    tokens, losses = RunRecord.open(tmp_path / "run").val_curve()
    assert tokens.tolist() == [128, 256] and losses.tolist() == [3.85, 3.75]


def test_a_run_resumed_from_an_earlier_checkpoint_is_named_with_the_way_out(tmp_path):
    """Measured through checkpoint-6, then resumed from checkpoint-4 with max_steps raised (seen with a real Trainer:
    the learning rate and evaluation at step 6 change, checkpoint-6 is overwritten): the newest state disagrees with
    the record after step 4. The error said only "another run?"; it now names drop_after, after which the newest
    state's history completes the record, each step once."""
    first = [{"loss": 3.9, "learning_rate": 1e-3, "num_input_tokens_seen": 64, "step": 2},
             {"loss": 3.8, "learning_rate": 6e-4, "num_input_tokens_seen": 128, "step": 4},
             {"loss": 3.7, "learning_rate": 2e-4, "num_input_tokens_seen": 192, "step": 6}]
    resumed = first[:2] + [{"loss": 3.7, "learning_rate": 4e-4, "num_input_tokens_seen": 192, "step": 6},
                           {"loss": 3.6, "learning_rate": 2e-4, "num_input_tokens_seen": 256, "step": 8}]
    old = _state(tmp_path / "a", "checkpoint-6", first, global_step=6, num_input_tokens_seen=192)
    new = _state(tmp_path / "b", "checkpoint-8", resumed, global_step=8, num_input_tokens_seen=256)
    with _writer(tmp_path) as w:
        assert log_history(w, old) == 3
        with pytest.raises(ValueError, match=r"log_history\[2\] has lr=0\.0004 at step 6, but the record .* already "
                                             r"holds lr=0\.0002 there: the state of another run\? A run resumed from a "
                                             r"checkpoint before that step .*writer\.drop_after\("):
            log_history(w, new)
        w.drop_after(4)
        assert log_history(w, new) == 2
    assert [(e["step"], e["lr"]) for e in _events(tmp_path / "run")] == [(2, 1e-3), (4, 6e-4), (6, 4e-4), (8, 2e-4)]


def test_two_values_at_one_step_within_one_state_name_both_entries(tmp_path):
    """trainer.evaluate(other_dataset) after train() logs a second eval_loss at the last step: the error blamed the
    record ("the record already holds"), which held nothing yet."""
    history = [{"eval_loss": 3.8, "num_input_tokens_seen": 64, "step": 2},
               {"eval_loss": 4.1, "num_input_tokens_seen": 64, "step": 2}]
    d = _state(tmp_path, "checkpoint-2", history, global_step=2)
    with _writer(tmp_path) as w:
        with pytest.raises(ValueError, match=r"log_history\[1\] has val_loss=4\.1 at step 2, but log_history\[0\] of "
                                             r"trainer_state\.json already holds val_loss=3\.8 there: two values at one step .*writer\.log\("):
            log_history(w, d)
    assert _events(tmp_path / "run") == []


def test_a_log_history_cut_short_by_a_crash_is_completed_by_a_rerun(tmp_path, monkeypatch):
    """Each event is one append of the writer (a whole line); a failure after some of them leaves those, and the
    same call again writes the rest, nothing twice."""
    d = _state(tmp_path)
    with _writer(tmp_path) as w:
        log, calls = RunWriter.log, []

        def failing(self, *args, **kw):
            calls.append(args)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return log(self, *args, **kw)

        monkeypatch.setattr(RunWriter, "log", failing)
        with pytest.raises(OSError):
            log_history(w, d)
        monkeypatch.setattr(RunWriter, "log", log)
        assert len(_events(w.path)) == 2
    with _writer(tmp_path, resume=True) as w:
        assert log_history(w, d) == 3
    assert [(e["step"], sorted(e)) for e in _events(tmp_path / "run")] == [
        (1, ["lr", "step", "tokens", "train_loss"]), (2, ["lr", "step", "tokens", "train_loss"]),
        (2, ["step", "tokens", "val_loss"]), (4, ["lr", "step", "tokens", "train_loss"]),
        (4, ["step", "tokens", "val_loss"])]


# ------------------------------------------------------------------ SpectralLens._warn_measured
def test_the_duplicate_step_check_reads_a_long_record_once(tmp_path, monkeypatch):
    """Each measure read and parsed the whole measurements.jsonl to look for its step: on a record of 5000
    measurements of a 12-layer model (18 MB) about 2-3 s per measure on this machine, quadratic over a run. It now
    reads the lines appended since the previous measure."""
    pool = lm_pool(1, batch=4, t=T, vocab=V, seed=99)
    with _writer(tmp_path) as w:
        lens = sl.SpectralLens(TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T), pool, writer=w, progress=False,
                               params=())
        lens.measure(0, 0)
        file = w.path / "measurements.jsonl"
        line = json.loads(file.read_bytes())
        with open(file, "a") as fh:  # a long record: a resumed run's earlier measurements
            for step in range(1, 200):
                fh.write(json.dumps({**line, "step": step}) + "\n")
        lens.measure(1000, 1000)  # reads the 199 lines appended since the last measure
        size = file.stat().st_size
        counted = bytes_read(monkeypatch, "measurements.jsonl")
        for step in (1001, 1002, 1003):
            lens.measure(step, step)
        assert counted[0] < 3 * 2 * len(json.dumps(line)) < size / 10, (counted[0], size)
        monkeypatch.undo()
        with pytest.warns(sl.SpectralLensWarning, match=r"already holds a measurement at step 150;"):
            lens.measure(150, 150)


def test_the_duplicate_step_check_follows_drop_after_another_lens_and_a_resume(tmp_path):
    """The check stays right as the record changes under it: another lens appending to the same writer, drop_after
    rewriting the file, a writer re-opened after a crash that cut a measurement's line short (not a measurement:
    measuring that step is no duplicate)."""
    pool = lm_pool(1, batch=4, t=T, vocab=V, seed=99)
    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
    with _writer(tmp_path) as w:
        lens = sl.SpectralLens(model, pool, writer=w, progress=False, params=())
        other = sl.SpectralLens(model, pool, writer=w, progress=False, params=())
        with warnings.catch_warnings():
            warnings.simplefilter("error", sl.SpectralLensWarning)
            lens.measure(1, 10)
            other.measure(2, 20)
            lens.measure(3, 30)
        with pytest.warns(sl.SpectralLensWarning, match=r"at step 2;"):  # measured by the other lens
            lens.measure(2, 20)
        w.drop_after(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", sl.SpectralLensWarning)
            lens.measure(2, 20)  # dropped: measured again once
            lens.measure(3, 30)
        with pytest.warns(sl.SpectralLensWarning, match=r"at step 3;"):
            lens.measure(3, 30)
        file = w.path / "measurements.jsonl"
        last = file.read_bytes().splitlines(keepends=True)[-1]
        with open(file, "ab") as fh:  # a crash while appending the measurement of step 9
            fh.write(last.replace(b'"step":3', b'"step":9')[: len(last) // 2])
    with pytest.warns(RecordWarning, match="truncated last line"):
        w = _writer(tmp_path, resume=True)
    with w, warnings.catch_warnings():
        warnings.simplefilter("error", sl.SpectralLensWarning)
        sl.SpectralLens(model, pool, writer=w, progress=False, params=()).measure(9, 90)
    assert [m.step for m in RunRecord.open(tmp_path / "run").measurements] == [1, 2, 3, 3, 9]


# ------------------------------------------------------------------ a real Trainer: the guide's script across a resume
@pytest.mark.slow
def test_the_guides_script_on_a_trainer_run_resumed_from_an_earlier_checkpoint(tmp_path):
    """A Trainer run (gradient accumulation, logging_first_step, two evaluation datasets) measured through
    checkpoint-6 with the guide's script, then resumed from checkpoint-4 with max_steps raised to 8, which overwrites
    checkpoint-6: the script run again stops at log_history naming drop_after; after writer.drop_after(4) it measures
    the new checkpoint-6 and checkpoint-8, and the record's curves are the newest state's, each step once."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    import torch

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            self.ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def train(max_steps, resume=None):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, save_strategy="steps", save_steps=2,
            eval_strategy="steps", eval_steps=2, logging_steps=1, logging_first_step=True,
            include_num_input_tokens_seen=True, report_to=[], use_cpu=True, disable_tqdm=True)
        transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens(64, 0),
                             eval_dataset={"a": Tokens(4, 1), "b": Tokens(4, 2)}).train(resume_from_checkpoint=resume)

    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(99))
    pool = [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]
    info = RunInfo("gpt2", family="gpt2", batch_tier=4, n_layer=2, total_tokens=8 * 4 * T)

    def guide_script():
        checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        with RunWriter(tmp_path / "run", info, resume=True, tail_window=(2, 8), fsync=False) as writer:
            lens = sl.SpectralLens(pool=pool, writer=writer, progress=False)
            log_history(writer, checkpoints[-1], eval_loss_key="eval_a_loss")
            done = writer.measured_steps()
            for checkpoint in checkpoints:
                step, tokens = checkpoint_position(checkpoint)
                if step in done:
                    continue
                hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
                with lens.attach(hf_model):
                    lens.measure(step, tokens)
        return checkpoints

    train(6)
    guide_script()
    m = RunRecord.open(tmp_path / "run").measurements[-1]
    old6 = {n: m.spectra[n].values for n in m.spectra}  # loaded now: drop_after removes the files
    train(8, resume=str(tmp_path / "out" / "checkpoint-4"))
    with pytest.raises(ValueError, match=r"at step 6, but the record .* already holds .*writer\.drop_after\("):
        guide_script()
    with RunWriter(tmp_path / "run", info, resume=True, fsync=False) as writer:
        assert writer.drop_after(4) == 1
    checkpoints = guide_script()
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]

    rec = RunRecord.open(tmp_path / "run")
    assert [(m.step, m.tokens) for m in rec.measurements] == [(2, 128), (4, 256), (6, 384), (8, 512)]
    new6 = rec.measurements[2]
    assert sorted(new6.spectra) == sorted(old6) and m.step == 6
    assert any(not torch.equal(new6.spectra[n].values, old6[n]) for n in old6)  # the new weights, measured
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    train_entries = [(h["step"], h["num_input_tokens_seen"], h["loss"], h["learning_rate"]) for h in history
                     if "loss" in h]
    assert [(e["step"], e["tokens"], e["train_loss"], e["lr"]) for e in rec.events if "train_loss" in e] \
        == train_entries and [s for s, *_ in train_entries] == [1, 2, 3, 4, 5, 6, 7, 8]
    evals = [(h["num_input_tokens_seen"], h["eval_a_loss"]) for h in history if "eval_a_loss" in h]
    tokens, losses = rec.val_curve()
    assert list(zip(tokens.tolist(), losses.tolist())) == evals and len(evals) == 4
    with RunWriter(tmp_path / "run", info, resume=True, fsync=False) as writer:  # once more: nothing new
        assert log_history(writer, checkpoints[-1], eval_loss_key="eval_a_loss") == 0


def test_non_finite_logged_losses_are_kept_once(tmp_path):
    """With logging_nan_inf_filter=False the Trainer logs a diverged loss as NaN or Infinity (json writes them so):
    they reach the record (the divergence rule reads non-finite logged losses) and a re-run adds nothing."""
    history = [{"loss": 3.9, "learning_rate": 1e-3, "num_input_tokens_seen": 64, "step": 1},
               {"loss": float("nan"), "learning_rate": 1e-3, "num_input_tokens_seen": 128, "step": 2},
               {"loss": float("inf"), "learning_rate": 1e-3, "num_input_tokens_seen": 192, "step": 3},
               {"eval_loss": float("nan"), "num_input_tokens_seen": 192, "step": 3}]
    d = _state(tmp_path, "checkpoint-3", history, global_step=3, num_input_tokens_seen=192)
    with _writer(tmp_path) as w:
        assert log_history(w, d) == 4
        assert log_history(w, d) == 0
    events = _events(tmp_path / "run")
    assert [str(e.get("train_loss", e.get("val_loss"))) for e in events] == ["3.9", "nan", "inf", "nan"]


def test_log_history_over_the_callbacks_own_record_adds_no_second_curve(tmp_path, monkeypatch):
    """The HF callback records the Trainer's training loss (and the lens its evaluations' losses); running
    log_history over that record afterwards (as the guide does for an online run) adds only what the callback
    did not record (the learning rate), never a second training or validation point at a step."""
    from integrations.test_callback_curves import FakeClock, hf_pool, hf_trainer, tiny_gpt2

    from spectral_lens.integrations import SpectralLensCallback, _driver

    clock = FakeClock()
    monkeypatch.setattr(_driver, "time", clock, raising=False)
    model = tiny_gpt2()
    writer = RunWriter(tmp_path / "run", RunInfo("gpt2", batch_tier=1), fsync=False, tail_window=(4, 16))
    lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), schedule=sl.Schedule.every(2), progress=False)
    trainer = hf_trainer(model, tmp_path, clock, max_steps=4, logging_steps=2, include_num_input_tokens_seen=True,
                         eval_strategy="steps", eval_steps=2)
    SpectralLensCallback(lens, on_evaluate=True).attach(trainer)
    trainer.train()
    state = tmp_path / "trainer_state.json"
    trainer.state.save_to_json(str(state))
    before = _events(tmp_path / "run")
    assert [e["step"] for e in before if "train_loss" in e] == [2, 4]
    assert log_history(writer, state) == 2  # the two learning-rate entries
    writer.close()
    after = _events(tmp_path / "run")
    assert [e for e in after if "lr" not in e] == before
    assert sorted(e["step"] for e in after if "lr" in e) == [2, 4]
    assert all(set(e) & {"train_loss", "val_loss"} == set() for e in after if "lr" in e)
    tokens, _ = RunRecord.open(tmp_path / "run").val_curve()
    assert len(tokens) == len(set(tokens.tolist())) == 2
