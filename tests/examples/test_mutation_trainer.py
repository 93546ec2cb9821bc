"""Mutation audit of the zoo trainer (examples/nanogpt/train.py): its results against independent references.

Each test recomputes one promise of the trainer's docstrings from the raw token arrays or from the model
alone: the gradient of step ``s`` is the mean of the gradients of micro-batches ``s*B .. s*B+B-1`` (each one
contiguous slice of ``rows*seq_len + 1`` tokens at stride ``rows*seq_len``, targets shifted by one), the
validation loss is the mean over the first ``val_tokens`` held-out tokens with the window of the current
step, ``tokens_per_s`` is training tokens over training time, and ``tokens=`` rounds up to whole steps.
"""
import copy
import json

import numpy as np
import pytest
import torch

from examples.nanogpt import train as T
from examples.nanogpt.data import load_data
from examples.nanogpt.model import GPT, window_at
from examples.nanogpt.variants import build_config, get_profile


def _raw_micro_batch(shard: np.ndarray, k: int, rows: int, seq_len: int):
    """Micro-batch ``k`` straight from the token array (no TokenStream): tokens [k*L, k*L + L] with L = rows*seq_len."""
    L = rows * seq_len
    toks = torch.from_numpy(np.asarray(shard[k * L: k * L + L + 1], dtype=np.int64))
    assert toks.numel() == L + 1
    return toks[:-1].view(rows, seq_len), toks[1:].view(rows, seq_len)


def test_accumulated_gradient_is_the_mean_over_the_steps_own_micro_batches():
    td = load_data("pydoc")
    torch.manual_seed(0)
    model = GPT(build_config("RoPE", get_profile("tiny"), seq_len=32, eot_id=td.eot_id))
    ref = copy.deepcopy(model)
    step, tier, rows, seq_len = 3, 3, 2, 32
    loss = T.accumulate_gradients(model, td.train, step, batch_tier=tier, rows=rows, seq_len=seq_len)
    shard = td.train.shards[0]
    losses = []
    for i in range(tier):
        x, y = _raw_micro_batch(shard, step * tier + i, rows, seq_len)
        micro = ref(x, y)
        losses.append(float(micro.detach()))
        micro.backward()
    assert float(loss) == pytest.approx(sum(losses) / tier, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad / tier, rtol=1e-4, atol=1e-7, msg=name)


def test_validation_loss_is_the_mean_over_the_first_val_tokens_with_the_steps_window(tmp_path):
    td = load_data("pydoc")
    steps, n_chunks = 4, 3
    seen = []

    def on_eval(model, step, tokens, val):
        cfg = model.config
        rows, seq_len = 1, cfg.seq_len
        window = window_at(cfg, step / steps)
        with torch.no_grad():
            ref = [float(model(*_raw_micro_batch(td.val.shards[0], k, rows, seq_len), window=window))
                   for k in range(n_chunks)]
        seen.append(step)
        assert val == pytest.approx(sum(ref) / n_chunks, rel=1e-6), step

    # FlexWin at the tiny profile: one packed 512-token row, a window that grows with progress
    T.train(variant="FlexWin", profile="tiny", data="pydoc", run_dir=tmp_path, steps=steps, batch_tier=1,
            val_tokens=n_chunks * 512 + 100, eval_every_tokens=2 * 512, on_eval=on_eval, save_final=False,
            verbose=False, device="cpu")
    assert seen == [0, 2, 4]


class _Clock:
    """A perf_counter that advances one second per call: every training step then takes exactly 1 s."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 1.0
        return self.t


def test_tokens_per_s_is_training_tokens_over_training_time(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "time", _Clock())
    res = T.train(variant="RoPE", profile="tiny", data="pydoc", run_dir=tmp_path, steps=4, batch_tier=3, seq_len=32,
                  rows=2, val_tokens=64, eval_every_tokens=2 * 192, log_every=1, save_final=False, verbose=False,
                  device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["tokens_per_s"] is None and [r["tokens_per_s"] for r in rows[1:]] == [192.0] * 4
    assert [r["tokens"] for r in rows] == [192 * s for s in range(5)]
    assert res.tokens_per_s == 192.0 and res.tokens == 4 * 192


def test_tokens_round_up_to_whole_steps_and_stop_tokens_stops_after_reaching_them(tmp_path):
    kw = dict(variant="RoPE", profile="tiny", data="pydoc", batch_tier=1, seq_len=32, rows=2, val_tokens=64,
              save_final=False, verbose=False, device="cpu")
    res = T.train(run_dir=tmp_path / "a", tokens=130, **kw)  # 64 tokens per step: 3 steps reach 130
    assert (res.steps, res.tokens) == (3, 192)
    res = T.train(run_dir=tmp_path / "b", tokens=640, stop_tokens=130, **kw)
    assert (res.steps, res.tokens) == (3, 192)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["steps"] == 10


def test_each_training_step_uses_the_window_of_its_own_progress(tmp_path, monkeypatch):
    seen = []
    real = T.accumulate_gradients

    def spy(model, stream, step, **kw):
        seen.append((step, kw["window"]))
        return real(model, stream, step, **kw)

    monkeypatch.setattr(T, "accumulate_gradients", spy)
    steps = 4
    T.train(variant="FlexWin", profile="tiny", data="pydoc", run_dir=tmp_path, steps=steps, batch_tier=1,
            val_tokens=512, eval_every_tokens=10**9, save_final=False, verbose=False, device="cpu")
    cfg = build_config("FlexWin", get_profile("tiny"), eot_id=load_data("pydoc").eot_id)
    assert [s for s, _ in seen] == list(range(steps))
    assert [w for _, w in seen] == [window_at(cfg, s / steps) for s in range(steps)]
    assert len({w for _, w in seen}) > 1  # the window grows over these steps: the check can tell steps apart


def test_eval_interval_is_the_nearest_whole_number_of_steps(tmp_path):
    # 64 tokens per step: 150 tokens is 2.34 steps -> every 2 steps (3 would be 192 tokens, further from 150)
    res = T.train(variant="RoPE", profile="tiny", data="pydoc", run_dir=tmp_path, steps=6, batch_tier=1, seq_len=32,
                  rows=2, val_tokens=64, eval_every_tokens=150, save_final=False, verbose=False, device="cpu")
    assert [h["step"] for h in res.history] == [0, 2, 4, 6]
