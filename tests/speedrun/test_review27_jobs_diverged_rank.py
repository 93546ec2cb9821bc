"""Review 27 (jobs): ``TrainingDiverged`` on a torchrun rank other than 0 said "no checkpoint was saved before it"
(and ``checkpoint`` was ``None``) after rank 0 had saved one: only rank 0 saves, and only rank 0 noted the path.
Every rank names the newest checkpoint now. A rank other than 0 is played here by one process whose
``_setup_distributed`` says rank 1 of 1 (no process group: the real two-rank runs are in
tests/examples/test_zoo_ddp.py)."""
import math

import pytest
import torch

from examples.nanogpt import train as T


def _diverge(tmp_path, monkeypatch, rank):
    monkeypatch.setattr(T, "_setup_distributed", lambda device: (rank, 1, False))

    def blow_up(model, step, tokens, val):  # after the evaluation at step 2 (the checkpoint of step 2 is saved)
        if step == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
    tps = 2 * 32  # batch_tier x seq_len: one step's tokens
    with pytest.raises(T.TrainingDiverged) as info:
        T.train(variant="RoPE", profile="tiny", steps=4, batch_tier=2, seq_len=32, rows=1, val_tokens=64,
                device="cpu", verbose=False, data="pydoc", eval_every_tokens=2 * tps, checkpoint_every_tokens=tps,
                on_eval=blow_up, run_dir=tmp_path / "run", save_final=False)
    return info.value


@pytest.mark.slow  # one tiny training run: ~4-7 s on the shared 2-core machine
def test_a_rank_other_than_0_names_the_checkpoint_rank_0_saved(tmp_path, monkeypatch):
    e = _diverge(tmp_path, monkeypatch, 1)  # saves nothing (rank 0's job), yet names rank 0's file
    assert e.step == 3 and e.checkpoint == tmp_path / "run" / "ckpt_000002.pt"
    assert "no checkpoint was saved" not in str(e) and f"the last checkpoint, {e.checkpoint}, was saved" in str(e)
    assert not (tmp_path / "run").exists()  # (rank 0 saved it: played alone, this rank wrote nothing)
