"""Review 25 (zoo): the token data a run reads is pinned across resume, and no shard is both train and val.

Micro-batch ``k`` is addressed by position in the concatenated shards, so a shard added, removed or
replaced in ``--data DIR`` between a run and its resume silently moved every later chunk (tokens
trained twice or never). The checkpoint now records the data's layout and the resume refuses a change.
"""
import json

import numpy as np
import pytest

from examples.nanogpt.data import bin_data, builtin_data, write_shard
from examples.nanogpt.train import train
from examples.nanogpt.variants import PROFILES, Profile

TINY = dict(variant="RoPE", profile="gpt2-mini", steps=4, batch_tier=1, seq_len=32, rows=1, val_tokens=64,
            device="cpu", verbose=False, eval_every_tokens=10**9, save_final=False)


@pytest.fixture(autouse=True)
def gpt2_mini(monkeypatch):
    """A 2-layer profile with the GPT-2 vocabulary, so that .bin shards (GPT-2 ids) train in a second."""
    monkeypatch.setitem(PROFILES, "gpt2-mini", Profile("gpt2-mini", 2, 2, 32, 50304, 50256, 32, 32, 8))


def _shards(d, train_parts, val=range(3000, 3200)):
    d.mkdir(exist_ok=True)
    for i, part in enumerate(train_parts):
        write_shard(d / f"fineweb_train_{i:06d}.bin", np.asarray(part) % 250)
    write_shard(d / "fineweb_val_000000.bin", np.asarray(val) % 250)


@pytest.mark.parametrize("change", ["add", "replace"])
def test_resume_refuses_when_the_shards_changed(tmp_path, change):
    d = tmp_path / "data"
    _shards(d, [np.arange(0, 400), np.arange(1000, 1400)])
    train(data=str(d), run_dir=tmp_path / "a", checkpoint_every_tokens=64, **TINY)
    ckpt = tmp_path / "a" / "ckpt_000002.pt"
    if change == "add":  # a shard that sorts first: every chunk index now points at other tokens
        write_shard(d / "fineweb_train_.bin", np.arange(7, 407) % 250)
    else:  # same names and lengths, other tokens
        write_shard(d / "fineweb_train_000000.bin", (np.arange(0, 400) * 7) % 250)
    with pytest.raises(ValueError, match=f"{ckpt}: checkpoint made with other settings: data_fingerprint"):
        train(data=str(d), run_dir=tmp_path / "b", resume=ckpt, **TINY)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_resume_with_the_same_shards_still_works_and_config_records_the_fingerprint(tmp_path):
    d = tmp_path / "data"
    _shards(d, [np.arange(0, 400)])
    train(data=str(d), run_dir=tmp_path / "a", checkpoint_every_tokens=64, **TINY)
    res = train(data=str(d), run_dir=tmp_path / "b", resume=tmp_path / "a" / "ckpt_000002.pt", **TINY)
    assert res.steps == 4
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["data_fingerprint"] == bin_data(d).fingerprint


def test_fingerprint_sees_names_lengths_and_content(tmp_path):
    d = tmp_path / "data"
    _shards(d, [np.arange(0, 400)])
    first = bin_data(d).fingerprint
    assert bin_data(d).fingerprint == first  # deterministic
    write_shard(d / "fineweb_train_000000.bin", np.arange(1, 401) % 250)
    assert bin_data(d).fingerprint != first
    assert builtin_data("pydoc").fingerprint == builtin_data("pydoc").fingerprint != first


def test_a_shard_matching_both_patterns_is_refused(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 50))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100, 150))
    write_shard(tmp_path / "train_minus_val.bin", np.arange(200, 250))  # "*train*" and "*val*": held out AND trained on
    with pytest.raises(ValueError, match="train_minus_val.bin.*both"):
        bin_data(tmp_path)


def test_a_run_longer_than_its_data_says_so(tmp_path):
    """Chunks wrap around at the end of the training tokens (a new epoch): that used to happen silently."""
    d = tmp_path / "data"
    _shards(d, [np.arange(0, 100)])  # 3 chunks of 32 (+1) tokens; 4 steps of tier 1 need 4
    with pytest.warns(UserWarning, match=r"1\.33 passes over the 96 training tokens .* step 3"):
        train(data=str(d), run_dir=tmp_path / "a", **TINY)
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["train_epochs"] == pytest.approx(4 / 3, abs=1e-4)
    assert meta["val_tokens"] == 64  # used: 2 micro-batches of 32 (of 199 held-out tokens)


def test_validation_tokens_actually_used_are_recorded(tmp_path):
    d = tmp_path / "data"
    _shards(d, [np.arange(0, 400)], val=range(3000, 3070))  # 70 held-out tokens: 2 micro-batches of 32
    train(data=str(d), run_dir=tmp_path / "a", **{**TINY, "val_tokens": 10_000})
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["val_tokens"] == 64 and meta["train_epochs"] == pytest.approx(128 / 384, abs=1e-4)
