"""Review 27 (probeguard): the probe's check for weights changed between updates under real FSDP2 (2 gloo CPU ranks):
FSDP2's unshard / reshard of a training forward and backward (all-gathers into the unsharded buffers, the sharded
DTensor parameters registered back) is no weight change, and gives no warning; an optimizer step on the sharded
parameters is one. (FSDP1 is refused by the probe: nothing to check there.)"""

from __future__ import annotations

import pytest
import torch
from support.per_sample import MLP_KW, mlp_batches, mlp_model
from support.ranks import checked_case, run_gloo_cases


def _fsdp2_train_between_updates(rank):
    import warnings

    from torch.distributed.fsdp import fully_shard

    from spectral_lens import MixedWeightsWarning, PerSampleGradientProbe

    model = mlp_model()
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b1, b2 = mlp_batches()
    probe = PerSampleGradientProbe(model, engine="fast", **MLP_KW)
    out = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", MixedWeightsWarning)
        probe.update(b1)
        opt.zero_grad()
        ((model(b1[0]) - b1[1]) ** 2).sum().backward()  # unshard, reshard, reduce-scatter: no step
        probe.update(b2)
        model(b2[0])  # a forward alone (the root may stay unsharded)
        probe.update(b1)
        out["without_step"] = [str(w.message) for w in seen if w.category is MixedWeightsWarning]
        opt.step()
        probe.update(b2)
        out["after_step"] = [str(w.message) for w in seen if w.category is MixedWeightsWarning]
    out["n_samples"] = probe.n_samples_
    return out


CASES = {"fsdp2_train_between_updates": _fsdp2_train_between_updates}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_unshard_and_reshard_are_no_weight_change_and_a_step_is(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=15, join_s=240, preload="spectral_lens")
    for rank, r in enumerate(checked_case(results, "fsdp2_train_between_updates", None)):
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        got = r["value"]
        assert got["without_step"] == [], (rank, got)
        assert len(got["after_step"]) == 1 and "'2.weight'" in got["after_step"][0], (rank, got)
        assert got["n_samples"] == 20
