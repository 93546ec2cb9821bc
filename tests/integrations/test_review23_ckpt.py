"""docs/guide-checkpoints.md's measuring scripts, run as a new user runs them: alone, again, over a
checkpoint that does not load, over a crashed run's record, and over torch.compile'd, DDP-saved, bf16 and
tied-embedding state dicts.

Found (review 23): the Trainer script left its writer open when a checkpoint did not load (no ``with``):
the record's lock stayed held, so running the script again in the same Python session failed with
'another RunWriter has this run directory open', and a crashed run's record stayed ``"running"``; a
``with RunWriter`` block instead would mark the record ``failed`` for good (the script writes the curves
up to the newest checkpoint first, so a rerun measures nothing past the record's end); the
script did not import ``torch``/``transformers`` (it ran only after the training block); a cut-off
``model.safetensors`` or ``ckpt.pt`` raised an error naming no file (``SafetensorError: ... header``,
``OSError: [Errno 22] Invalid argument``), and a DDP-saved state dict (``module.`` keys) did not load.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from support.models import TinyGPT, lm_pool

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunRecord, RunWriter

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide-checkpoints.md"


def _blocks():
    spec = importlib.util.spec_from_file_location("spectral_lens_docs_code_blocks",
                                                  ROOT / "tests" / "docs" / "test_code_blocks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module.blocks(GUIDE)


def _run(code: str, ns: dict | None = None) -> dict:
    ns = {"__name__": "__guide__"} if ns is None else ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(GUIDE), "exec"), ns)
    return ns


# --- the Hugging Face Trainer section -------------------------------------------------------------

def _measuring_script() -> str:
    return _blocks()[1].code


def _history(upto: int) -> list[dict]:
    out = []
    for s in range(1, upto + 1):
        out.append({"step": s, "loss": 4.0 - 0.01 * s, "learning_rate": 1e-3 / s, "num_input_tokens_seen": 64 * s})
        if s % 2 == 0:
            out.append({"step": s, "eval_loss": 4.0 - 0.005 * s, "num_input_tokens_seen": 64 * s})
    return out


def _hf_run(root: Path, steps=(2, 4, 6, 8, 10)) -> None:
    """The Trainer's checkpoint-N/ directories (weights + trainer_state.json) without training: a tiny GPT-2
    per step (tied embeddings, as GPT-2's), saved as the Trainer saves it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    for step in steps:
        torch.manual_seed(step)
        d = root / "hf-run" / f"checkpoint-{step}"
        transformers.GPT2LMHeadModel(config).save_pretrained(d)
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "num_input_tokens_seen": 64 * step, "log_history": _history(step)}))


def _status(run: Path):
    return json.loads((run / "run.json").read_text())["extras"].get("status")


def test_the_measuring_script_runs_alone_and_again(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path)
    ns = _run(_measuring_script())  # a namespace of its own: the training block did not run
    assert [m.step for m in ns["lens"].history] == [2, 4, 6, 8, 10]
    ns = _run(_measuring_script())  # again: nothing new, no duplicate
    assert [m.step for m in ns["lens"].history] == []
    record = RunRecord.open("runs/gpt2-b4")
    assert [m.step for m in record.measurements] == [2, 4, 6, 8, 10]
    assert record.info.extras.get("status") is None
    # a checkpoint saved later (a run still training past its budget here): only it is measured,
    # and its curves appended once
    _hf_run(tmp_path, steps=(12,))
    ns = _run(_measuring_script())
    assert [m.step for m in ns["lens"].history] == [12]
    record = RunRecord.open("runs/gpt2-b4")
    assert [m.step for m in record.measurements] == [2, 4, 6, 8, 10, 12]
    steps = [e["step"] for e in record.events if "train_loss" in e]
    assert steps == list(range(1, 13))  # each logged once


def test_a_checkpoint_that_does_not_load_is_named_and_the_record_is_released(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path)
    weights = tmp_path / "hf-run" / "checkpoint-6" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # cut off: a copy or a save that did not finish
    with pytest.raises(RuntimeError, match=r"checkpoint-6: cannot load the model"):
        _run(_measuring_script())
    run = tmp_path / "runs" / "gpt2-b4"
    assert _status(run) is None  # the script's error, not the training's: no failure mark
    assert [m.step for m in RunRecord.open(run).measurements] == [2, 4]  # kept
    assert (tmp_path / "hf-run" / "checkpoint-8").is_dir()  # not reached: the first failure stops the script
    with RunWriter(run, resume=True):  # the lock was released: the same session can run the script again
        pass
    weights.write_bytes(whole)
    ns = _run(_measuring_script())
    assert [m.step for m in ns["lens"].history] == [6, 8, 10]
    assert [m.step for m in RunRecord.open(run).measurements] == [2, 4, 6, 8, 10]
    assert _status(run) is None  # the mark withdrawn


def test_a_checkpoint_without_its_trainer_state_is_named(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path)
    (tmp_path / "hf-run" / "checkpoint-10" / "trainer_state.json").unlink()  # the newest: its curves are read first
    with pytest.raises(FileNotFoundError, match=r"checkpoint-10 holds no trainer_state.json"):
        _run(_measuring_script())
    with RunWriter(tmp_path / "runs" / "gpt2-b4", resume=True):
        pass


def test_an_output_dir_without_checkpoints_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf-run").mkdir()  # before: IndexError: list index out of range
    with pytest.raises(FileNotFoundError, match=r"hf-run: no checkpoint-N/ directories"):
        _run(_measuring_script())


def _budget_20_steps() -> str:
    code = _measuring_script()
    assert "total_tokens=10 * 4 * 16)" in code
    return code.replace("total_tokens=10 * 4 * 16)", "total_tokens=20 * 4 * 16)")


def test_a_crashed_runs_record_keeps_its_failure(tmp_path, monkeypatch, capsys):
    """The record of a run that crashed at step 11 of 20: measuring its checkpoints keeps the failure mark,
    and inspect says so."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path)
    info = RunInfo("gpt2-b4", family="gpt2-tiny", batch_tier=4, n_layer=2, total_tokens=20 * 4 * 16)
    ns = _run(_budget_20_steps())
    assert [m.step for m in ns["lens"].history] == [2, 4, 6, 8, 10]
    # the same record as the training's, which then crashed at step 11
    run = tmp_path / "runs" / "gpt2-b4"
    with pytest.raises(RuntimeError, match="out of memory"), RunWriter(run, info, resume=True) as writer:
        writer.log(11, 11 * 64, train_loss=3.9)
        raise RuntimeError("CUDA out of memory.")
    assert _status(run) == "failed"
    ns = _run(_budget_20_steps())
    assert [m.step for m in ns["lens"].history] == []
    assert _status(run) == "failed"
    from spectral_lens.cli import main

    assert main(["inspect", str(run)]) == 0
    assert "status: failed (RuntimeError: CUDA out of memory.)" in capsys.readouterr().out


def test_the_guides_commands_read_the_record(tmp_path, monkeypatch, capsys):
    """The guide's ``spectral-lens report`` and ``predict`` lines on the record its script wrote: before,
    the run's first checkpoint was at 33% of its budget and ``predict`` refused it (exit 2)."""
    pytest.importorskip("transformers")
    from spectral_lens.cli import main

    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path)
    _run(_measuring_script())
    assert _status(Path("runs/gpt2-b4")) is None
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    start = lines.index("Then, as for a record written during training:")
    fence = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    commands = [shlex.split(line)[1:] for line in lines[fence + 1 : end]]
    assert [c[0] for c in commands] == ["report", "predict"]
    for args in commands:
        code = main(args)
        out = capsys.readouterr()
        assert code == 0, (args, out.out + out.err)
    assert (tmp_path / "report" / "report.md").is_file()
    assert "family gpt2-tiny: one tier (4): nothing to rank" in out.out  # as the guide says


# --- the torch.save / nanoGPT section ---------------------------------------------------------------

def _nanogpt_script() -> str:
    stand_in, script = _blocks()[2].code.split("\n\n", 1)  # the stand-in files: the tests write their own
    assert "torch.save" in stand_in and "torch.save" not in script
    return script


def _nanogpt_ns(tie: bool) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, layers=12, ctx=12, tie=tie)
    return {"__name__": "__guide__", "torch": torch, "sl": sl, "RunInfo": RunInfo, "RunWriter": RunWriter,
            "tokens_per_iter": 4 * 64, "model": model, "heldout_pool": lm_pool(2, batch=4, t=12, vocab=37, seed=1)}


def _spectra(model, pool, state) -> dict[str, np.ndarray]:
    model.load_state_dict(state)
    lens = sl.SpectralLens(model, pool, layers="transformer.h.11", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lens.measure(1, 1)
    return {k: s.values.numpy() for k, s in m.spectra.items()}


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("tie", [False, True])
def test_nanogpt_keys_of_compiled_and_ddp_models_load(tmp_path, monkeypatch, prefix, tie):
    monkeypatch.chdir(tmp_path)
    ns = _nanogpt_ns(tie)
    model = ns["model"]
    states = {}
    for it in (100, 200):
        torch.manual_seed(it)
        trained = TinyGPT(vocab=37, d=16, layers=12, ctx=12, tie=tie).to(torch.bfloat16)  # saved in bf16
        states[it] = trained.state_dict()
        torch.save({"model": {prefix + k: v for k, v in states[it].items()}, "iter_num": it,
                    "best_val_loss": torch.tensor(3.2)}, f"ckpt_{it}.pt")
    _run(_nanogpt_script(), ns)
    record = RunRecord.open("runs/nanogpt")
    assert [m.step for m in record.measurements] == [100, 200]
    # the weights measured are the checkpoint's (bf16 values in the float32 model), not the model's own
    ref = TinyGPT(vocab=37, d=16, layers=12, ctx=12, tie=tie)
    want = _spectra(ref, ns["heldout_pool"], {k: v.float() for k, v in states[200].items()})
    got = record.measurements[-1].spectra
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k].values.numpy(), want[k])
    if tie:
        assert model.lm_head.weight is model.transformer.wte.weight


def test_a_cut_off_ckpt_pt_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _nanogpt_ns(tie=False)
    for it in (100, 200):
        torch.save({"model": ns["model"].state_dict(), "iter_num": it, "best_val_loss": torch.tensor(3.2)}, f"ckpt_{it}.pt")
    whole = Path("ckpt_200.pt").read_bytes()
    Path("ckpt_200.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RuntimeError, match=r"ckpt_200\.pt: cannot load it into the model"):
        _run(_nanogpt_script(), ns)
    assert [m.step for m in RunRecord.open("runs/nanogpt").measurements] == [100]
    assert _status(Path("runs/nanogpt")) is None
    with RunWriter("runs/nanogpt", resume=True):  # released
        pass


def test_a_state_dict_of_another_model_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _nanogpt_ns(tie=False)
    other = TinyGPT(vocab=37, d=32, layers=12, ctx=12)
    for it in (100, 200):
        torch.save({"model": other.state_dict(), "iter_num": it, "best_val_loss": torch.tensor(3.2)}, f"ckpt_{it}.pt")
    with pytest.raises(RuntimeError, match=r"(?s)ckpt_100\.pt: cannot load it into the model .*size mismatch"):
        _run(_nanogpt_script(), ns)
    assert RunRecord.open("runs/nanogpt").measurements == []


def test_a_crashed_run_measured_past_its_records_end_keeps_the_failure_in_its_history(tmp_path, monkeypatch, capsys):
    """As the guide says: checkpoints after the record's last line read as the run going on (records' rule)."""
    pytest.importorskip("transformers")
    from spectral_lens.cli import main

    monkeypatch.chdir(tmp_path)
    _hf_run(tmp_path, steps=(2,))
    ns = _run(_budget_20_steps())
    assert [m.step for m in ns["lens"].history] == [2]
    run = tmp_path / "runs" / "gpt2-b4"
    info = RunInfo("gpt2-b4", family="gpt2-tiny", batch_tier=4, n_layer=2, total_tokens=20 * 4 * 16)
    with pytest.raises(RuntimeError, match="preempted"), RunWriter(run, info, resume=True):
        raise RuntimeError("preempted")
    assert _status(run) == "failed"
    _hf_run(tmp_path, steps=(4, 6))
    ns = _run(_budget_20_steps())
    assert [m.step for m in ns["lens"].history] == [4, 6]
    assert _status(run) is None
    extras = json.loads((run / "run.json").read_text())["extras"]
    assert [h["failure"] for h in extras["failure_history"]] == ["RuntimeError: preempted"]
    assert main(["inspect", str(run)]) == 0
    assert "earlier: failed (RuntimeError: preempted)" in capsys.readouterr().out
