"""Measuring a finished run's saved checkpoints (docs/guide-checkpoints.md): a checkpoint measured offline gives
the spectra measured online at its step, bit for bit; the Trainer's ``trainer_state.json`` gives the record its
positions and loss curves (spectral_lens.integrations.trainer_state); report and predict read the record."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.cli import main
from spectral_lens.integrations.trainer_state import checkpoint_position, log_history
from spectral_lens.records import RunInfo, RunRecord, RunWriter

V, T = 64, 16


def _same_measurements(a: RunRecord, b: RunRecord) -> None:
    assert [(m.step, m.tokens) for m in a.measurements] == [(m.step, m.tokens) for m in b.measurements]
    for ma, mb in zip(a.measurements, b.measurements):
        assert sorted(ma.spectra) == sorted(mb.spectra)
        for name in ma.spectra:
            assert torch.equal(ma.spectra[name].values, mb.spectra[name].values), (ma.step, name)
            assert ma.summaries[name] == mb.summaries[name]
        assert ma.scalars == mb.scalars


# ------------------------------------------------------------------ plain PyTorch: torch.save(state_dict) files
def _plain_run(tmp_path, tier: int, steps: int, measure_at, *, autocast=None):
    """Train TinyGPT with AdamW, saving the state dict at ``measure_at`` (and measuring there online)."""
    torch.manual_seed(tier)
    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
    pool = lm_pool(2, batch=4, t=T, vocab=V, seed=99)
    info = RunInfo(f"b{tier}", family="tiny", batch_tier=tier, n_layer=2, total_tokens=steps * tier * T)
    writer = RunWriter(tmp_path / "online" / f"b{tier}", info, fsync=False, tail_window=(2, 8))
    lens = sl.SpectralLens(model, pool, progress=False, writer=writer, autocast_dtype=autocast,
                           params="transformer.h.1.attn.c_proj.weight")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = lm_pool(steps, batch=tier, t=T, vocab=V, seed=tier)
    for step, (x, y) in enumerate(batches):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens = (step + 1) * tier * T
        if step in measure_at:
            torch.save(model.state_dict(), tmp_path / f"b{tier}-step{step}.pt")
            lens.measure(step, tokens)
            writer.log(step, tokens, val_loss=loss.item())
    writer.close()
    return pool


SWEEP_STEPS, SWEEP_AT = 10, [0, 1, 2, 9]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two tiers (batch 2 and 4) trained 10 steps, their state dicts saved and measured online at steps 0, 1, 2 and 9
    (10%, 20%, 30%, 100%): ``(root, {tier: pool})``, shared by the tests below, which only read it."""
    root = tmp_path_factory.mktemp("sweep")
    return root, {tier: _plain_run(root, tier, SWEEP_STEPS, SWEEP_AT) for tier in (2, 4)}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
def test_load_state_dict_into_the_attached_model_measures_each_checkpoint_as_online(sweep, tmp_path, autocast):
    """One model stays attached; each checkpoint is loaded into it (in place, and with assign=True, which
    replaces the parameter objects), out of order and one of them twice: every measurement equals the one
    taken at that step during training. Under bf16 autocast the probe keeps weight casts within a pass
    (gradients/cast_cache.py): none survives into the next checkpoint's pass."""
    if autocast is None:
        root, pool = sweep[0], sweep[1][4]
        late, early = 9, 1
    else:
        root, pool = tmp_path, _plain_run(tmp_path, 4, 4, [1, 3], autocast=autocast)
        late, early = 3, 1
    online = RunRecord.open(root / "online" / "b4")
    by_step = {m.step: m for m in online.measurements}

    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)  # fresh weights: nothing carried from training
    lens = sl.SpectralLens(model, pool, progress=False, autocast_dtype=autocast, tail_window=(2, 8),
                           params="transformer.h.1.attn.c_proj.weight")
    for step, assign in [(late, False), (early, True), (late, True), (early, False)]:
        state = torch.load(root / f"b4-step{step}.pt", weights_only=True)
        model.load_state_dict(state, assign=assign)
        m = lens.measure(step, by_step[step].tokens)
        for name, s in m.spectra.items():
            assert torch.equal(s.values, by_step[step].spectra[name].values), (step, assign, name)
            assert m.summaries[name] == by_step[step].summaries[name]
        assert m.scalars["noise_scale"] == by_step[step].scalars["noise_scale"]


def test_a_compiled_model_measures_each_loaded_checkpoint(tmp_path):
    """The lens on a torch.compile'd model (its capture fed from inside the graph, _compiled_feed.py): the graphs
    compiled at the first checkpoint read the weights loaded for the next one, none is baked in."""
    pool = lm_pool(2, batch=4, t=T, vocab=V, seed=99)
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sources.append(TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T))
    eager = [sl.SpectralLens(m, pool, progress=False, tail_window=(2, 8)).measure(0, 0) for m in sources]
    torch.manual_seed(5)
    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
    lens = sl.SpectralLens(torch.compile(model, backend="aot_eager"), pool, progress=False, tail_window=(2, 8))
    for i in (0, 1, 0):
        model.load_state_dict(sources[i].state_dict())
        m = lens.measure(i, 0)
        assert sorted(m.spectra) == sorted(eager[i].spectra)
        for name, s in m.spectra.items():
            assert torch.equal(s.values, eager[i].spectra[name].values), (i, name)


def test_a_checkpoint_of_another_shape_is_refused_and_the_next_load_measures_right(sweep):
    root, pools = sweep
    pool = pools[4]
    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
    lens = sl.SpectralLens(model, pool, progress=False, tail_window=(2, 8))
    wide = TinyGPT(vocab=V, d=32, heads=2, layers=2, ctx=T).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer\.h\.1\.attn\.c_proj\.weight"):
        model.load_state_dict(wide)
    model.load_state_dict(torch.load(root / "b4-step1.pt", weights_only=True))
    got = lens.measure(1, 128)
    ref = next(m for m in RunRecord.open(root / "online" / "b4").measurements if m.step == 1)
    for name, s in got.spectra.items():
        assert torch.equal(s.values, ref.spectra[name].values)


def test_offline_records_of_a_sweep_give_the_online_report_and_prediction(sweep, tmp_path, capsys):
    """Two tiers trained with state dicts saved at 10%, 20%, 30% and 100%, measured offline out of order into
    records with their logged losses: predict prints the same ranking and report succeeds."""
    root, pools = sweep
    for tier, pool in pools.items():
        online = RunRecord.open(root / "online" / f"b{tier}")
        info = RunInfo(f"b{tier}", family="tiny", batch_tier=tier, n_layer=2, total_tokens=SWEEP_STEPS * tier * T)
        model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
        with RunWriter(tmp_path / "offline" / f"b{tier}", info, fsync=False, tail_window=(2, 8)) as w:
            lens = sl.SpectralLens(model, pool, progress=False, writer=w, params="transformer.h.1.attn.c_proj.weight")
            for m in sorted(online.measurements, key=lambda m: -m.step):  # newest first
                model.load_state_dict(torch.load(root / f"b{tier}-step{m.step}.pt", weights_only=True))
                lens.measure(m.step, m.tokens)
            for e in online.events:
                w.log(e["step"], e["tokens"], val_loss=e["val_loss"])
        offline = RunRecord.open(tmp_path / "offline" / f"b{tier}")
        offline.measurements.sort(key=lambda m: m.step)
        _same_measurements(online, offline)
        assert offline.val_curve()[1].tolist() == online.val_curve()[1].tolist()

    target = ["--target-loss", "4.3"]
    out = {}
    for which, where in (("online", root), ("offline", tmp_path)):
        assert main(["predict", str(where / which), "--json", *target]) == 0
        out[which] = json.loads(capsys.readouterr().out)
    assert _strip_paths(out["online"]) == _strip_paths(out["offline"])
    assert out["offline"]["excluded"] == {}
    assert [t["tier"] for t in out["offline"]["families"]["tiny"]["tiers"]] == [2, 4]
    assert all(math.isfinite(t["alpha_tail"]) for t in out["offline"]["families"]["tiny"]["tiers"])
    pytest.importorskip("matplotlib", reason="report figures need the plot extra")
    assert main(["report", str(tmp_path / "offline"), "--out", str(tmp_path / "report"), *target]) == 0
    assert (tmp_path / "report" / "report.md").is_file()


def _strip_paths(obj):
    if isinstance(obj, dict):
        return {k: _strip_paths(v) for k, v in obj.items() if k not in ("path", "paths")}
    if isinstance(obj, list):
        return [_strip_paths(v) for v in obj]
    if isinstance(obj, str):
        return obj.replace("offline", "X").replace("online", "X")
    return obj


# ------------------------------------------------------------------ trainer_state.json (no Trainer needed)
def _state(tmp_path, name="checkpoint-4", **kw):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    state = {"global_step": 4, "num_input_tokens_seen": 256, "max_steps": 6,
             "log_history": [
                 {"loss": 3.9, "learning_rate": 1e-3, "num_input_tokens_seen": 64, "step": 1, "epoch": 0.1},
                 {"loss": 3.8, "learning_rate": 8e-4, "num_input_tokens_seen": 128, "step": 2, "epoch": 0.2},
                 {"eval_loss": 3.85, "num_input_tokens_seen": 128, "step": 2, "epoch": 0.2},
                 {"loss": 3.7, "learning_rate": 6e-4, "num_input_tokens_seen": 256, "step": 4, "epoch": 0.4},
                 {"eval_loss": 3.75, "num_input_tokens_seen": 256, "step": 4, "epoch": 0.4},
                 {"train_runtime": 1.0, "train_loss": 3.8, "num_input_tokens_seen": 256, "step": 4},
             ]}
    state.update(kw)
    (d / "trainer_state.json").write_text(json.dumps(state))
    return d


def _writer(tmp_path, **kw):
    return RunWriter(tmp_path / "run", RunInfo("r", family="f", batch_tier=4, total_tokens=384), fsync=False, **kw)


def test_checkpoint_position_reads_step_and_tokens(tmp_path):
    d = _state(tmp_path)
    assert checkpoint_position(d) == (4, 256) == checkpoint_position(d / "trainer_state.json")
    assert checkpoint_position(d, tokens_per_step=10) == (4, 256)  # the Trainer's own count wins


def test_without_a_token_count_nothing_is_guessed(tmp_path):
    """A Trainer without include_num_input_tokens_seen writes num_input_tokens_seen: 0 in the state and
    leaves it out of log_history: an error names the file and tokens_per_step, never 0 tokens."""
    d = _state(tmp_path, num_input_tokens_seen=0)
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state\.json: the state has no token count .*"
                                         r"include_num_input_tokens_seen.*tokens_per_step="):
        checkpoint_position(d)
    assert checkpoint_position(d, tokens_per_step=64) == (4, 256)
    state = json.loads((d / "trainer_state.json").read_text())
    for e in state["log_history"]:
        del e["num_input_tokens_seen"]
    (d / "trainer_state.json").write_text(json.dumps(state))
    with _writer(tmp_path) as w:
        with pytest.raises(ValueError, match=r"trainer_state\.json: log_history\[0\] has no token count"):
            log_history(w, d)
        assert RunRecord.open(w.path).events == []  # nothing written
        assert log_history(w, d, tokens_per_step=64) == 5
    events = RunRecord.open(tmp_path / "run").events
    assert [(e["step"], e["tokens"]) for e in events] == [(1, 64), (2, 128), (2, 128), (4, 256), (4, 256)]


def test_log_history_writes_the_curves_once(tmp_path):
    early = _state(tmp_path, "checkpoint-2")
    state = json.loads((early / "trainer_state.json").read_text())
    state["log_history"] = state["log_history"][:3]
    (early / "trainer_state.json").write_text(json.dumps(state))
    late = _state(tmp_path, "checkpoint-4")
    with _writer(tmp_path) as w:
        assert log_history(w, early) == 3
        assert log_history(w, late) == 2  # only the entries after checkpoint-2
        assert log_history(w, late) == 0  # a re-run writes nothing
    with _writer(tmp_path, resume=True) as w:  # a resumed record: still nothing new
        assert log_history(w, late) == 0
    rec = RunRecord.open(tmp_path / "run")
    got = [{k: v for k, v in e.items() if k != "time"} for e in rec.events]
    assert got == [
        {"step": 1, "tokens": 64, "train_loss": 3.9, "lr": 1e-3},
        {"step": 2, "tokens": 128, "train_loss": 3.8, "lr": 8e-4},
        {"step": 2, "tokens": 128, "val_loss": 3.85},
        {"step": 4, "tokens": 256, "train_loss": 3.7, "lr": 6e-4},
        {"step": 4, "tokens": 256, "val_loss": 3.75},
    ]
    assert rec.val_curve()[1].tolist() == [3.85, 3.75]


def test_log_history_refuses_another_runs_state_and_bad_files(tmp_path):
    d = _state(tmp_path)
    with _writer(tmp_path) as w:
        log_history(w, d)
        other = _state(tmp_path / "other")
        state = json.loads((other / "trainer_state.json").read_text())
        state["log_history"][4]["eval_loss"] = 9.0
        (other / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=r"log_history\[4\] has val_loss=9\.0 at step 4, but the record .* "
                                             r"already holds val_loss=3\.75"):
            log_history(w, other)
        with pytest.raises(FileNotFoundError, match=r"nothing holds no trainer_state\.json|nothing"):
            log_history(w, tmp_path / "nothing")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match=r"empty holds no trainer_state\.json"):
            checkpoint_position(tmp_path / "empty")
        bad = _state(tmp_path, "bad")
        (bad / "trainer_state.json").write_text("{not json")
        with pytest.raises(ValueError, match=r"bad/trainer_state\.json: not a JSON file"):
            log_history(w, bad)
        for kw, match in [({"log_history": None}, r"expected a list under 'log_history', got NoneType"),
                          ({"global_step": "4"}, r"global_step must be the checkpoint's optimizer step, got '4'")]:
            _state(tmp_path, "bad", **kw)
            with pytest.raises(ValueError, match=match):
                (log_history(w, bad) if "log_history" in kw else checkpoint_position(bad))
        state = json.loads((d / "trainer_state.json").read_text())
        del state["global_step"]
        del state["log_history"][0]["step"]
        (bad / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=r"global_step must be .* got nothing \(missing\)"):
            checkpoint_position(bad)
        with pytest.raises(ValueError, match=r"log_history\[0\] has \['lr', 'train_loss'\] but no step"):
            log_history(w, bad)
        with pytest.raises(ValueError, match=r"tokens_per_step must be a positive integer, got 0"):
            checkpoint_position(d, tokens_per_step=0)
    assert len(RunRecord.open(tmp_path / "run").events) == 5  # the failed calls wrote nothing


# ------------------------------------------------------------------ a real Trainer run and its checkpoints
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_checkpoints_measured_offline_equal_the_callbacks_online_measurements(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    from spectral_lens.integrations import SpectralLensCallback

    ids = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(99))
    pool = [{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}]
    info = RunInfo("gpt2", family="gpt2", batch_tier=4, n_layer=2, total_tokens=4 * 4 * T)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    with RunWriter(tmp_path / "online", info, fsync=False, tail_window=(2, 8)) as w:
        lens = sl.SpectralLens(model, pool, writer=w, progress=False, schedule=sl.Schedule.every(2, start=2))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
            save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1,
            include_num_input_tokens_seen=True, report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(48, 0),
                                       eval_dataset=_Tokens(8, 1), callbacks=[SpectralLensCallback(lens)])
        trainer.train()
    history = trainer.state.log_history
    del trainer, model

    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    with RunWriter(tmp_path / "offline", info, fsync=False, tail_window=(2, 8)) as w:
        lens = sl.SpectralLens(pool=pool, writer=w, progress=False)
        for checkpoint in checkpoints:
            with lens.attach(transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)):
                lens.measure(*checkpoint_position(checkpoint))
        assert log_history(w, checkpoints[-1]) == 6  # 4 training losses, 2 evaluations
    with RunWriter(tmp_path / "offline", info, resume=True, tail_window=(2, 8), fsync=False) as w:  # the guide's
        done = w.measured_steps()  # script run again: nothing is measured or logged twice
        assert [checkpoint_position(c)[0] for c in checkpoints if checkpoint_position(c)[0] not in done] == []
        assert log_history(w, checkpoints[-1]) == 0
    online, offline = RunRecord.open(tmp_path / "online"), RunRecord.open(tmp_path / "offline")
    _same_measurements(online, offline)  # steps, tokens (the callback's num_input_tokens_seen), spectra
    evals = [h for h in history if "eval_loss" in h]
    tokens, losses = offline.val_curve()
    assert losses.tolist() == [h["eval_loss"] for h in evals]
    assert tokens.tolist() == [h["num_input_tokens_seen"] for h in evals] == [128, 256]
    train = [e["train_loss"] for e in offline.events if "train_loss" in e]
    assert train == [h["loss"] for h in history if "loss" in h] and len(train) == 4
    assert all(math.isfinite(x) for x in train)
    # the report over an offline record: test_offline_records_of_a_sweep_give_the_online_report_and_prediction


def test_measuring_a_step_the_record_already_holds_warns_before_the_passes(tmp_path):
    """Re-running an offline script over the same checkpoints (or a resumed loop without drop_after) appended a
    second measurement at the step without a word; the analyses then count it as one more checkpoint (the early
    prediction's jitter, from its nearest checkpoints, shrinks). The lens says so, naming the record and the
    step, before it measures. Out of order is no reason to warn: the analyses sort by progress."""
    pool = lm_pool(2, batch=4, t=T, vocab=V, seed=99)
    model = TinyGPT(vocab=V, d=16, heads=2, layers=2, ctx=T)
    info = RunInfo("r", family="f", batch_tier=4, n_layer=2, total_tokens=1000)
    with RunWriter(tmp_path / "run", info, fsync=False, tail_window=(2, 8)) as w:
        lens = sl.SpectralLens(model, pool, writer=w, progress=False, params=())
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", sl.SpectralLensWarning)
            lens.measure(5, 500)
            lens.measure(1, 100)  # out of order: fine
        with pytest.warns(sl.SpectralLensWarning, match=r"run record .*run already holds a measurement at step 5;.*"
                                                        r"writer\.measured_steps\(\).*drop_after"):
            lens.measure(5, 500)
    assert [m.step for m in RunRecord.open(tmp_path / "run").measurements] == [5, 1, 5]  # appended, as warned
