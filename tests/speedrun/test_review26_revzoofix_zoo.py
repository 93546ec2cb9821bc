"""Review 26 (revzoofix) of the zoo trainer's review-26 changes (merge add988d).

1. A checkpoint holding a fingerprint of a version this trainer does not know (``"v3 ..."``, written by a newer
   trainer) was refused as "the data changed since the checkpoint (...): start a new run": it is refused as made
   by a newer trainer, whose data this one cannot check.
2. Under torchrun a rank that finished met the others at a barrier in ``train``'s ``finally`` and then destroyed
   its process group; when the barrier failed (another rank had failed: its gloo connection reset) the group was
   never destroyed. It is destroyed whatever the barrier does, and the barrier's error still ends the rank.
"""
import pytest
import torch

from examples.nanogpt import train as T
from examples.nanogpt.train import train

TINY = dict(variant="RoPE", profile="tiny", steps=2, batch_tier=1, seq_len=32, rows=1, val_tokens=64,
            device="cpu", verbose=False, eval_every_tokens=10**9, data="pydoc")


def test_a_fingerprint_of_a_newer_version_is_not_called_changed_data(tmp_path):
    train(run_dir=tmp_path / "a", **TINY)
    ckpt = tmp_path / "a" / "ckpt_000002.pt"
    ck = torch.load(ckpt, weights_only=True)
    assert ck["settings"]["data_fingerprint"].startswith("v2 ")
    ck["settings"]["data_fingerprint"] = "v3 " + ck["settings"]["data_fingerprint"][3:] + "; sha 0123"
    torch.save(ck, ckpt)
    with pytest.raises(T.CheckpointMismatch) as info:
        train(run_dir=tmp_path / "b", resume=ckpt, **TINY)
    msg = str(info.value)
    assert "version 3" in msg and "newer trainer" in msg and str(ckpt) in msg
    assert "data changed" not in msg


def test_a_failed_end_barrier_still_destroys_the_process_group(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "_setup_distributed", lambda device: (0, 1, True))  # as a torchrun rank that made it

    def barrier():
        calls.append("barrier")
        raise RuntimeError("Read error [127.0.0.1]:36075: Connection reset by peer")  # gloo, the other rank died
    monkeypatch.setattr(T.dist, "barrier", barrier)
    monkeypatch.setattr(T.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        train(run_dir=tmp_path / "a", **TINY)
    assert calls == ["barrier", "destroy"]
