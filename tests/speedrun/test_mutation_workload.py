"""Mutation audit of the speedrun workload's token accounting (examples/speedrun/workload.py).

``ZooWorkload.tokens_per_step`` decides the rung check and the runs' ``tokens_per_step`` / ``batch_size``
records; it must be what the trainer actually trains per step (its ``config.json``), also with the
profile's default geometry (``seq_len``/``rows`` None: one packed row for windowed variants, dense
ones ``long_ctx / seq_len`` rows), which no shipped CPU preset exercises.
"""
import json

import pytest

from examples.nanogpt.train import train
from examples.speedrun.presets import PRESETS
from examples.speedrun.workload import ZooWorkload


@pytest.mark.parametrize("family", ["RoPE", "FlexWin"])
def test_tokens_per_step_is_what_the_trainer_trains(family, tmp_path):
    p = PRESETS["tiny"].replace(seq_len=None, rows=None, families=(family,), rungs=(8_192,))
    w = ZooWorkload(p, verbose=False)
    train(variant=family, profile=p.profile, data=p.data, run_dir=tmp_path, steps=1, batch_tier=2, val_tokens=512,
          eval_every_tokens=10**9, save_final=False, verbose=False, device="cpu")
    meta = json.loads((tmp_path / "config.json").read_text())
    assert w.tokens_per_step(family, 2) == meta["tokens_per_step"] == 2 * meta["rows"] * meta["seq_len"]
    assert (meta["rows"], meta["seq_len"]) == ((1, 512) if family == "FlexWin" else (4, 128))
