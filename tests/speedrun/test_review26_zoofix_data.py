"""Review 26 (zoofix): the zoo trainer's data identity on resume.

1. A checkpoint recorded ``data="bin:<directory as typed>"``: resuming with ``./data`` after ``data``, an
   absolute path or a symlink to the same shards was refused as other settings. The directory is no longer
   compared (the fingerprint identifies the shards) and is recorded resolved.
2. The fingerprint hashed each shard's first and last 65,536 tokens only: the same number of tokens edited in
   the middle of a longer shard passed. Version 2 also hashes 256 windows of 1,024 tokens spaced evenly in
   between; checkpoints holding a version-1 fingerprint still resume when the data matches.
"""
import os
import zlib

import numpy as np
import pytest
import torch

from examples.nanogpt import data as D
from examples.nanogpt.data import TokenStream, bin_data, write_shard
from examples.nanogpt.train import train
from examples.nanogpt.variants import PROFILES, Profile

TINY = dict(variant="RoPE", profile="gpt2-mini", steps=4, batch_tier=1, seq_len=32, rows=1, val_tokens=64,
            device="cpu", verbose=False, eval_every_tokens=10**9, save_final=False)


@pytest.fixture(autouse=True)
def gpt2_mini(monkeypatch):
    """A 2-layer profile with the GPT-2 vocabulary, so that .bin shards (GPT-2 ids) train in a second."""
    monkeypatch.setitem(PROFILES, "gpt2-mini", Profile("gpt2-mini", 2, 2, 32, 50304, 50256, 32, 32, 8))


def _shards(d, n_train=400):
    d.mkdir(exist_ok=True)
    write_shard(d / "fineweb_train_000000.bin", np.arange(n_train) % 250)
    write_shard(d / "fineweb_val_000000.bin", np.arange(3000, 3200) % 250)


def _checkpoint(tmp_path, data: str):
    train(data=data, run_dir=tmp_path / "a", checkpoint_every_tokens=64, **TINY)
    return tmp_path / "a" / "ckpt_000002.pt"


def _v1(stream: TokenStream) -> str:
    """The fingerprint as the trainer before review 26 computed it (copied from that version)."""
    crc, parts = 0, []
    for shard, name in zip(stream.shards, stream.names):
        n = len(shard)
        parts.append(f"{os.path.basename(name)}:{n}")
        head, tail = (shard, shard[:0]) if n <= 2 * 65_536 else (shard[:65_536], shard[-65_536:])
        crc = zlib.crc32(np.ascontiguousarray(tail, dtype="<u2").tobytes(),
                         zlib.crc32(np.ascontiguousarray(head, dtype="<u2").tobytes(), crc))
    return f"{len(parts)} shards, {stream.num_tokens:,} tokens, crc32 {zlib.crc32(' '.join(parts).encode(), crc):08x}"


def _as_before_review26(ckpt, data_name: str):
    """Rewrite ``ckpt`` as the trainer before review 26 wrote it: the directory as typed, a version-1 fingerprint."""
    ck = torch.load(ckpt, weights_only=True)
    d = bin_data(data_name[len("bin:"):])
    ck["settings"]["data"] = data_name
    ck["settings"]["data_fingerprint"] = f"train {_v1(d.train)}; val {_v1(d.val)}"
    torch.save(ck, ckpt)


# ------------------------------------------------------------------------------------------ the directory's spelling
@pytest.mark.parametrize("spelling", ["relative", "symlink"])
def test_resume_accepts_the_same_shards_by_another_path(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, "data")
    other = str(tmp_path / "data") if spelling == "relative" else "link"
    if spelling == "symlink":
        os.symlink(tmp_path / "data", tmp_path / "link")
    assert train(data=other, run_dir=tmp_path / "b", resume=ckpt, **TINY).steps == 4


def test_resume_accepts_a_checkpoint_from_before_review26_with_the_same_shards(tmp_path, monkeypatch):
    """Migration: the directory as typed and the ends-only fingerprint; the same shards resume by any path."""
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "data", n_train=200_000)  # longer than both ends: versions 1 and 2 differ
    ckpt = _checkpoint(tmp_path, "data")
    _as_before_review26(ckpt, "bin:data")
    assert train(data=str(tmp_path / "data"), run_dir=tmp_path / "b", resume=ckpt, **TINY).steps == 4
    # ... and other shards are still refused against that old fingerprint
    write_shard(tmp_path / "data" / "fineweb_train_000000.bin", (np.arange(200_000) * 7) % 250)
    with pytest.raises(ValueError, match="data_fingerprint .*the data changed since the checkpoint"):
        train(data="data", run_dir=tmp_path / "c", resume=ckpt, **TINY)


def test_other_shards_in_another_directory_are_still_refused(tmp_path):
    _shards(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, str(tmp_path / "data"))
    (tmp_path / "copy").mkdir()
    write_shard(tmp_path / "copy" / "fineweb_train_000000.bin", (np.arange(400) * 3) % 250)  # same name and length
    write_shard(tmp_path / "copy" / "fineweb_val_000000.bin", np.arange(3000, 3200) % 250)
    with pytest.raises(ValueError, match="data_fingerprint .*the data changed since the checkpoint"):
        train(data=str(tmp_path / "copy"), run_dir=tmp_path / "b", resume=ckpt, **TINY)


def test_a_changed_held_out_shard_is_refused(tmp_path):
    _shards(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, str(tmp_path / "data"))
    write_shard(tmp_path / "data" / "fineweb_val_000000.bin", (np.arange(3000, 3200) * 3) % 250)
    with pytest.raises(ValueError, match="data_fingerprint .*the data changed since the checkpoint"):
        train(data=str(tmp_path / "data"), run_dir=tmp_path / "b", resume=ckpt, **TINY)


def test_the_data_name_is_the_resolved_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "link")
    assert bin_data("data").name == bin_data("link").name == f"bin:{(tmp_path / 'data').resolve()}"


def test_a_checkpoint_without_fingerprint_and_another_spelling_says_no_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, "data")
    ck = torch.load(ckpt, weights_only=True)
    del ck["settings"]["data_fingerprint"]
    ck["settings"]["data"] = "bin:data"
    torch.save(ck, ckpt)
    with pytest.raises(ValueError, match="no data fingerprint"):
        train(data=str(tmp_path / "data"), run_dir=tmp_path / "b", resume=ckpt, **TINY)


# ------------------------------------------------------------------------------------------ the fingerprint's reach
N = 1_000_000  # a shard of a million tokens: 65,536 at each end, 868,928 between


def _stream(tokens) -> TokenStream:
    return TokenStream([tokens], ["fineweb_train_000000.bin"])


def test_version_1_is_the_fingerprint_of_before_review26():
    tokens = (np.arange(N) * 7919 % 50257).astype(np.uint16)
    for n in (0, 5, 2 * 65_536, 2 * 65_536 + 1, N):
        assert _stream(tokens[:n]).fingerprint(1) == _v1(_stream(tokens[:n]))


def test_version_2_sees_an_edit_in_the_middle_that_version_1_misses():
    tokens = (np.arange(N) * 7919 % 50257).astype(np.uint16)
    edited = tokens.copy()
    edited[N // 2 - 5_000: N // 2 + 5_000] += 1  # same length, 10,000 tokens in the middle
    assert _stream(edited).fingerprint(1) == _stream(tokens).fingerprint(1)
    assert _stream(edited).fingerprint(2) != _stream(tokens).fingerprint(2)


def test_version_2_sees_every_edit_longer_than_the_largest_gap():
    """Windows of 1,024 every (N - 2 * 65,536 - 1,024) / 255 tokens: an edit of more than the gap between two
    always overlaps one; every token of the ends and of each window counts."""
    tokens = (np.arange(N) * 7919 % 50257).astype(np.uint16)
    base = _stream(tokens).fingerprint(2)
    middle = N - 2 * 65_536
    gap = -(-(middle - 1_024) // 255) - 1_024
    rng = np.random.default_rng(0)
    for start in rng.integers(65_536, N - 65_536 - gap, size=40):
        edited = tokens.copy()
        edited[start: start + gap + 1] ^= 1
        assert _stream(edited).fingerprint(2) != base, start
    starts = [65_536 + i * (middle - 1_024) // 255 for i in range(256)]
    for pos in (0, 65_535, starts[0], starts[100] + 1_023, starts[-1] + 1_023, N - 65_536, N - 1):
        edited = tokens.copy()
        edited[pos] ^= 1
        assert _stream(edited).fingerprint(2) != base, pos
    edited = tokens.copy()
    edited[starts[100] + 1_024] ^= 1  # in a gap: not seen (documented)
    assert _stream(edited).fingerprint(2) == base


def test_a_short_middle_is_hashed_whole():
    n = 2 * 65_536 + 256 * 1_024  # every token hashed
    tokens = (np.arange(n) * 7919 % 50257).astype(np.uint16)
    base = _stream(tokens).fingerprint(2)
    for pos in (65_536, 65_536 + 1_500, n - 65_537):
        edited = tokens.copy()
        edited[pos] ^= 1
        assert _stream(edited).fingerprint(2) != base, pos


def test_the_versions_are_told_apart():
    td = D.builtin_data("pydoc")
    assert td.fingerprint.startswith("v2 train ") and D.fingerprint_version(td.fingerprint) == 2
    assert D.fingerprint_version(td.fingerprint_as(1)) == 1 and td.fingerprint_as(1).startswith("train ")
    with pytest.raises(ValueError, match="fingerprint version 3"):
        td.train.fingerprint(3)
