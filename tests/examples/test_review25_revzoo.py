"""Review 25 (revzoo): resuming a checkpoint written before the trainer recorded the data's fingerprint.

The fingerprint (review 25, zoo) made every older checkpoint refused; the refusal told the user to
"resume with the checkpoint's settings", which no one can (the old trainer recorded none). It now
says what happened and what to do, and is a ``CheckpointMismatch`` (a ``ValueError``) so that callers
that resume on their own (the tuner's ``ZooTrainable``) can tell it from a failing run.
"""
import pytest
import torch

from examples.nanogpt.train import train
from support.threads import one_intra_op_thread  # noqa: F401  (autouse)

RUN = dict(variant="RoPE", profile="tiny", steps=4, batch_tier=1, seq_len=32, rows=1, val_tokens=64,
           device="cpu", verbose=False, eval_every_tokens=10**9, save_final=False)


def _as_if_older(ckpt, fingerprint=None):
    """Rewrite ``ckpt`` as the trainer before review 25 wrote it (no ``data_fingerprint``), or with another one."""
    ck = torch.load(ckpt, weights_only=True)
    if fingerprint is None:
        del ck["settings"]["data_fingerprint"]
    else:
        ck["settings"]["data_fingerprint"] = fingerprint
    torch.save(ck, ckpt)


def test_a_checkpoint_from_before_the_fingerprint_is_refused_with_what_to_do(tmp_path):
    train(run_dir=tmp_path / "a", checkpoint_every_tokens=64, **RUN)
    ckpt = tmp_path / "a" / "ckpt_000002.pt"
    _as_if_older(ckpt)
    with pytest.raises(ValueError) as e:
        train(run_dir=tmp_path / "b", resume=ckpt, **RUN)
    msg = str(e.value)
    assert str(ckpt) in msg and "no data fingerprint" in msg and "without --resume" in msg
    assert "resume with the checkpoint's settings" not in msg  # impossible for such a checkpoint
    assert "\n" not in msg and type(e.value).__name__ == "CheckpointMismatch"
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_other_data_is_still_refused_naming_the_fingerprints(tmp_path):
    train(run_dir=tmp_path / "a", checkpoint_every_tokens=64, **RUN)
    ckpt = tmp_path / "a" / "ckpt_000002.pt"
    _as_if_older(ckpt, "train 1 shards, 7 tokens, crc32 00000000; val 1 shards, 7 tokens, crc32 00000000")
    with pytest.raises(ValueError, match=r"data_fingerprint \(checkpoint 'train 1 shards, 7 tokens.*"
                                                   r"the data changed since the checkpoint"):
        train(run_dir=tmp_path / "b", resume=ckpt, **RUN)


@pytest.mark.parametrize("steps, warns", [(3, False), (4, True)])
def test_the_wrap_warning_counts_the_worlds_chunks_and_spares_a_run_using_all_of_them(tmp_path, monkeypatch, steps,
                                                                                     warns):
    """Tier 2 reads micro-batches 2s and 2s+1 at step s (split over the ranks, never world x tier): 6
    chunks last exactly 3 steps (no warning), a 4th step repeats chunks 0 and 1."""
    import warnings

    import numpy as np

    from examples.nanogpt.data import write_shard
    from examples.nanogpt.variants import PROFILES, Profile

    monkeypatch.setitem(PROFILES, "gpt2-mini", Profile("gpt2-mini", 2, 2, 32, 50304, 50256, 32, 32, 8))
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "train_0.bin", np.arange(6 * 32 + 1) % 250)  # exactly 6 chunks of 32 (+1) tokens
    write_shard(d / "val_0.bin", np.arange(100) % 250)
    run = {**RUN, "profile": "gpt2-mini", "data": str(d), "steps": steps, "batch_tier": 2}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(run_dir=tmp_path / "a", **run)
    wrap = [str(w.message) for w in seen if "passes over" in str(w.message)]
    assert wrap == (["train: 4 steps x 64 tokens = 1.33 passes over the 192 training tokens of "
                     f"bin:{d}: micro-batches repeat from step 3"] if warns else [])
