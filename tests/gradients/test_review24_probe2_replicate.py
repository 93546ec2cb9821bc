"""Review 24 (probe2): a layer that the composable ``replicate`` was applied to keeps its fast path (real gloo ranks).

``torch.distributed._composable.replicate(linear)`` swaps the class for ``DDPLinear`` (``(DDP, Linear)``, no forward
of its own; torch 2.13 as FSDP2's ``fully_shard``). The fast paths were looked up by exact type, so it had none:
``engine='auto'`` chose vmap, which failed in the pass inside replicate's forward hooks ("Cannot access data pointer
of Tensor that doesn't have storage") and left replicate's lazy state half-built (the next training forward raised
``'_ReplicateState' object has no attribute '_ddp'``); ``engine='fast'`` was refused. Now it is measured by the
fast engine, the spectrum equal to the unreplicated model's (float64), and training through it still all-reduces.
"""

from __future__ import annotations

import pytest
import torch
from support.per_sample import mlp_model, mlp_probe_values
from support.ranks import checked_case, run_gloo_cases





def _replicated_linear(rank):
    """``replicate`` on the probed ``nn.Linear`` (its lazy init in the probe's first forward): ``auto`` and ``fast``
    measure it with the fast engine on every rank; no ``.grad`` left; then a training step on rank-own data, whose
    gradient replicate all-reduces (averages) as without the probe."""
    from torch.distributed._composable import replicate

    model = mlp_model()
    replicate(model[2])
    out = {e: mlp_probe_values(model, e) for e in ("auto", "fast")}
    out["no_grads"] = all(p.grad is None for p in model.parameters())
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
    model(x).pow(2).sum().backward()
    out["grad"] = model[2].weight.grad.tolist()
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_a_replicated_linear_is_measured_exactly(tmp_path):
    results = run_gloo_cases(tmp_path, {"replicated_linear": _replicated_linear}, 2, pg_timeout_s=15, join_s=240,
                             preload="spectral_lens")
    ref = mlp_probe_values(mlp_model(), "auto")
    assert ref["engines"] == {"2.weight": "fast"}
    loop = mlp_probe_values(mlp_model(), "loop")
    grads = []
    for rank in range(2):  # the plain model's gradient on each rank's data: replicate averages them
        plain = mlp_model()
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
        plain(x).pow(2).sum().backward()
        grads.append(plain[2].weight.grad)
    for rank, r in enumerate(checked_case(results, "replicated_linear", None)):
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        got = r["value"]
        for e in ("auto", "fast"):
            assert got[e]["engines"] == {"2.weight": "fast"}, (rank, e, got[e])
            assert got[e]["values"] == ref["values"], (rank, e)  # the same fast engine on the same weight
            torch.testing.assert_close(torch.tensor(got[e]["values"]), torch.tensor(loop["values"]), rtol=1e-12,
                                       atol=1e-14)
        assert got["no_grads"], rank
        torch.testing.assert_close(torch.tensor(got["grad"], dtype=torch.float64), (grads[0] + grads[1]) / 2,
                                   rtol=1e-12, atol=1e-14)
