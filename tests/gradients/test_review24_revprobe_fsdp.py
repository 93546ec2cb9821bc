"""Review 24 (rev-probe): a layer that FSDP2's ``fully_shard`` was applied to directly keeps its fast path.

``fully_shard(linear)`` swaps the module's class for ``FSDPLinear`` (``type("FSDP" + name, (FSDPModule, cls), ...)``,
no forward of its own). The fast paths were looked up by exact type, so such a layer had none: ``engine='auto'``
chose ``vmap``, which FSDP refuses, and ``engine='fast'`` was refused too, so ``fully_shard(linear)`` could not be
measured at all (the refusal called it "no fast path is registered for FSDPLinear.weight"). Now the lookup goes
through the swapped class's base (:func:`spectral_lens.gradients.registry.fsdp2_base`).

The fast tests swap the class as ``fully_shard`` does (no process group); the slow one runs real FSDP2 on 2 gloo
CPU ranks (as tests/reliability/test_fsdp.py) and compares the spectrum with the unsharded model's (float64).
"""

from __future__ import annotations

import pytest
import torch
from support.per_sample import MLP_KW, mlp_batches, mlp_model, mlp_probe_values
from support.ranks import checked_case, run_gloo_cases
from torch import nn

from spectral_lens import PerSampleGradientProbe
from spectral_lens.gradients.registry import fast_path_for, fsdp2_base


def _fsdp_module() -> type:
    """FSDP2's ``FSDPModule``, imported in the test that needs it (not at collection: importing FSDP makes the
    probe look for it in every update of the session's other tests)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    found = getattr(fsdp, "FSDPModule", None)
    return found if found is not None else pytest.importorskip("torch.distributed._composable.fsdp").FSDPModule


def _swapped(module: nn.Module) -> nn.Module:
    """``module`` with its class swapped as ``fully_shard`` swaps it (the mixin first, no forward of its own)."""
    FSDPModule = _fsdp_module()
    cls = type(module)
    module.__class__ = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {"__deepcopy__": None})
    return module


def test_a_fully_sharded_linear_has_the_linear_fast_path():
    plain = nn.Linear(3, 2)
    lin = _swapped(nn.Linear(3, 2))
    assert type(lin).__name__ == "FSDPLinear"
    assert fsdp2_base(type(lin)) is nn.Linear
    assert fast_path_for(lin, "weight") is fast_path_for(plain, "weight") is not None
    assert fast_path_for(lin, "bias") is fast_path_for(plain, "bias") is not None


def test_a_fully_sharded_conv1d_has_the_conv1d_fast_path_by_name():
    pytest.importorskip("transformers", reason="the hf extra installs transformers")
    from transformers.pytorch_utils import Conv1D

    conv = _swapped(Conv1D(5, 3))
    assert type(conv).__name__ == "FSDPConv1D"
    assert fast_path_for(conv, "weight") is fast_path_for(Conv1D(5, 3), "weight") is not None


def test_only_fully_shards_own_class_swap_is_unwrapped():
    FSDPModule = _fsdp_module()

    class Mine(FSDPModule, nn.Linear):  # a user's subclass: its own name and possibly its own use of the weight
        pass

    class FSDPLinear(FSDPModule, nn.Linear):  # the name alone is not enough: it defines forward
        def forward(self, x):
            return super().forward(2 * x)

    class Sub(nn.Linear):
        pass

    for cls in (Mine, FSDPLinear, Sub, nn.Linear, FSDPModule):
        assert fsdp2_base(cls) is cls, cls
    lin = nn.Linear(3, 2)
    lin.__class__ = FSDPLinear  # (FSDPModule.__new__ would construct the base class)
    assert fast_path_for(lin, "weight") is None




def _fully_shard_linear(rank):
    """``fully_shard`` on the probed ``nn.Linear`` itself (and on the root): ``auto`` and ``fast`` measure it
    with the fast engine on every rank; the shards and ``.grad`` are left as they were."""
    from torch.distributed.fsdp import fully_shard

    model = mlp_model()
    fully_shard(model[2])
    fully_shard(model)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    out = {e: mlp_probe_values(model, e) for e in ("auto", "fast")}
    out["untouched"] = all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    out["no_grads"] = all(p.grad is None for p in model.parameters())
    return out


def _bound_before_fully_shard(rank):
    """A probe bound to the plain model (the fast engine for the nn.Linear), then ``fully_shard`` on that layer and
    the root (in place: the layer's class becomes FSDPLinear): its updates keep measuring it with the fast engine
    (before, the update chose again, found no fast path for FSDPLinear and refused the vmap engine under FSDP)."""
    from torch.distributed.fsdp import fully_shard

    model = mlp_model()
    probe = PerSampleGradientProbe(model, engine="auto", **MLP_KW)
    fully_shard(model[2])
    fully_shard(model)
    for b in mlp_batches():
        probe.update(b)
    return {"engines": probe.engines_, "values": probe.compute().values.tolist()}


CASES = {"fully_shard_linear": _fully_shard_linear, "bound_before_fully_shard": _bound_before_fully_shard}


@pytest.mark.slow
@pytest.mark.distributed
def test_fully_shard_on_the_probed_linear_is_measured_exactly(tmp_path):
    results = run_gloo_cases(tmp_path, CASES, 2, pg_timeout_s=15, join_s=240, preload="spectral_lens")
    ref = mlp_probe_values(mlp_model(), "auto")
    assert ref["engines"] == {"2.weight": "fast"}
    loop = mlp_probe_values(mlp_model(), "loop")
    for rank, r in enumerate(checked_case(results, "fully_shard_linear", None)):
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        got = r["value"]
        for e in ("auto", "fast"):
            assert got[e]["engines"] == {"2.weight": "fast"}, (rank, e, got[e])
            assert got[e]["values"] == ref["values"], (rank, e)  # the same fast engine on the same gathered weight
            torch.testing.assert_close(torch.tensor(got[e]["values"]), torch.tensor(loop["values"]), rtol=1e-12,
                                       atol=1e-14)
        assert got["untouched"] and got["no_grads"], (rank, got)
    for rank, r in enumerate(checked_case(results, "bound_before_fully_shard", None)):
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["value"] == ref, rank
