"""Review of the FSDP, PEFT and float16 loss-scaling changes: the cases that broke.

1. FSDP2 ``reshard_after_forward=<int>`` (reshard to a smaller group after forward, 4 gloo CPU ranks,
   int 2): the lens's no-grad forward left each module in FSDP's post-forward state, whose registered
   parameters are new ``DTensor``s (the post-forward shards), not the sharded parameters the optimizer
   holds. ``kept_sharded`` took any ``DTensor`` for "sharded" and did not reshard, so with a measurement
   between ``backward`` and ``optimizer.step()`` the next forward all-gathered the stale post-forward
   shards: the weights from before the step (training diverged from the unmeasured run).
2. float16 loss scaling: an all-zero gradient (a sample whose every label is ignored, or a chunk of
   them) searched upward to the 2^40 bound and carried that scale to the next sample or chunk, which then
   overflowed and searched back down: 19 backward passes for 6 samples on the loop engine (6 without
   the zero samples).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spectral_lens import SpectralLens
from spectral_lens.gradients import PerSampleGradientProbe

from support.models import TinyGPT, TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

PARAM = "transformer.h.1.attn.c_proj.weight"


# ---------------------------------------------------------------- 1. FSDP2 reshard_after_forward=int
def _fsdp2_int(dropout=0.0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12, dropout=dropout).double()
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=2)  # 4 ranks: reshard to groups of 2 after forward
    fully_shard(model, reshard_after_forward=2)
    return model


def _train_int(measure: bool):
    import torch.distributed as dist

    model = _fsdp2_int()
    model.train()
    registered = list(model.parameters())  # the sharded DTensors the optimizer updates
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lens = SpectralLens(model, lm_pool(2, batch=4, t=12, vocab=37, seed=1), params=(), precision="float64",
                        progress=False)
    losses, same = [], True
    for step, (x, y) in enumerate(lm_pool(3, batch=4, t=12, vocab=37, seed=2 + dist.get_rank()), start=1):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if measure:  # between backward and step, where gradient clipping goes
            lens.measure(step, step)
            same = same and all(a is b for a, b in zip(model.parameters(), registered))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, same


def _reshard_int(rank):
    plain, _ = _train_int(False)
    measured, same = _train_int(True)
    return {"losses_equal": plain == measured, "same_params": same}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_reshard_after_forward_int_is_resharded(tmp_path):
    """The lens's forwards leave the sharded parameters registered (the optimizer's), and three SGD
    steps with a measurement between backward and step give the same losses as without (before: the
    post-forward DTensors stayed registered and the next forward used the weights from before the
    step)."""
    results = run_gloo_cases(tmp_path, {"reshard_int": _reshard_int}, 4, pg_timeout_s=30, join_s=300,
                             preload="torch.distributed.fsdp")
    for r in checked_case(results, "reshard_int", None):
        assert r["error"] is None, r["error"]
        assert r["value"] == {"losses_equal": True, "same_params": True}, r["value"]
