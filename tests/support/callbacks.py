"""The set-up that review 23's callback tests share (``tests/integrations/test_review23_integleft.py``,
``test_review23_revinteg.py``, ``test_review23_revintegleft.py``): a tiny lens and its record's events, a fake
2-rank gloo world, and the ``SpectralLensCallback`` in one process, in a real ``transformers.Trainer`` or driven by
hand as ``train()`` calls it (the model and data are ``tests/integrations/test_callback_curves.py``'s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def tiny_lens(tmp_path: Path, *, writer: bool = True, schedule=None):
    """A lens on one ``Linear(4, 4)`` (its layer ``"0"``, no gradients, a pool of one batch of 3 rows), writing to
    ``tmp_path/run`` (tail window (2, 8)) with ``writer``."""
    import spectral_lens as sl
    from spectral_lens.records import RunInfo, RunWriter

    w = RunWriter(tmp_path / "run", RunInfo("r", batch_tier=1), fsync=False, tail_window=(2, 8)) if writer else None
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    return sl.SpectralLens(model, [torch.randn(3, 4)], writer=w, params=(), layers=["0"], progress=False,
                           schedule=schedule)


def events(path: Path, key: str) -> list[tuple]:
    """``(step, value)`` of every event in the record at ``path`` (its ``log.jsonl``) that has ``key``."""
    lines = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [(e["step"], e[key]) for e in lines if key in e]


def fake_two_ranks(monkeypatch) -> dict:
    """``torch.distributed`` faked: this process is rank ``state["rank"]`` of 2 gloo ranks (the other one
    succeeds); ``state["calls"]`` counts the all_reduces made. Returns ``state``."""
    import torch.distributed as dist

    state = {"rank": 1, "calls": 0}

    def all_reduce(t, op=None, group=None):
        state["calls"] += 1

    def broadcast_object_list(objects, src=0, group=None):
        pass

    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                        "get_rank": lambda group=None: state["rank"], "get_world_size": lambda group=None: 2,
                        "get_backend": lambda group=None: "gloo", "all_reduce": all_reduce,
                        "broadcast_object_list": broadcast_object_list}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def lens_trainer(tmp_path: Path, train_n: int, *, eval_n: int | None = None, callbacks=(), **args):
    """``(trainer, writer)``: a config-built GPT-2 (no download) trained on ``train_n`` random sequences (seed 0),
    evaluated on ``eval_n`` (seed 1) where given; ``callbacks`` given to the ``Trainer`` (ahead of the lens's);
    ``args``: the ``TrainingArguments`` beyond batch 4, lr 1e-3, CPU, no saving, reporting or progress bar. The
    lens (activations only, the default pool ``hf_pool()``) writes to ``tmp_path/run`` and is attached last with
    ``tokens_per_step=40``. Skips the test without the hf extra."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    from integrations.test_callback_curves import RandomTokens, hf_pool, tiny_gpt2

    import spectral_lens as sl
    from spectral_lens.integrations import SpectralLensCallback
    from spectral_lens.records import RunInfo, RunWriter

    model = tiny_gpt2()
    writer = RunWriter(tmp_path / "run", RunInfo("hf", batch_tier=1), fsync=False, tail_window=(2, 8))
    lens = sl.SpectralLens(model, hf_pool(), writer=writer, params=(), progress=False)
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, **args)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=RandomTokens(train_n, 0),
                                   eval_dataset=None if eval_n is None else RandomTokens(eval_n, 1),
                                   callbacks=list(callbacks))
    SpectralLensCallback(lens, tokens_per_step=40).attach(trainer)
    return trainer, writer


TRAIN_SET_EVALUATION = {"train_loss": 0.5, "train_runtime": 0.1, "train_samples_per_second": 80.0,
                        "train_steps_per_second": 10.0, "epoch": 1.0}  # trainer.evaluate(..., metric_key_prefix="train")
FINAL_METRICS = {"train_runtime": 1.0, "train_samples_per_second": 8.0, "train_steps_per_second": 6.0,
                 "train_loss": 1.9, "epoch": 1.5}  # train()'s final metrics (total_flos popped by the Printer/ProgressCallback)


def hf_hooks(lens, step: int | None = None):
    """``(cb, state, control)``: the ``SpectralLensCallback`` on ``lens`` (``tokens_per_step=4``) after
    ``on_train_begin`` and, with ``step``, that step's ``on_step_end``, for a test to call its hooks as
    ``Trainer.train()`` does (copy the metrics above with ``dict(...)``: the callback may pop keys). Skips the test
    without the hf extra."""
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from spectral_lens.integrations import SpectralLensCallback

    cb = SpectralLensCallback(lens, tokens_per_step=4)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.on_train_begin(None, state, control)
    if step is not None:
        state.global_step = step
        cb.on_step_end(None, state, control)
    return cb, state, control
