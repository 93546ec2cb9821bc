"""Review of the Lightning Fabric unwrapping (f949510), and the same names for weight spectra.

* Only Lightning's own ``_FabricModule`` is unwrapped: a user's class of that name (with a ``_forward_module``
  attribute) is a model like any other (before: the lens bound its ``_forward_module`` and dropped its other layers).
* A compiled DDP (``torch.compile(DDP(model))``, PyTorch's recipe) is refused as a plain DDP is (before: the lens and
  the probe bound the DDP, whose passes start its collectives on one rank, names with ``module.``).
* ``weight_spectra`` / ``select_parameters`` read the module the lens binds: a ``torch.compile`` wrapper and Fabric's
  wrapper (Fabric DDP: the DDP's module) unwrapped, per-block ``_orig_mod`` segments left out, so names are the
  user's, as the lens records them (before: ``_orig_mod.`` / ``_forward_module.`` prefixes, and a user's name did not
  resolve); a plain DDP is refused as the lens refuses it.
* Under Fabric's DDP (2 CPU ranks), a measurement between the DDP forward and ``fabric.backward`` (the reducer armed)
  leaves the all-reduced ``.grad`` bitwise on every engine, and the spectra equal on both ranks (slow).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.capture import unwrap_compiled
from spectral_lens.weights import select_parameters, weight_spectra
from support.fabric import run_fabric_ranks
from support.models import TinyGPT, lm_batch

BLOCK, PARAM = "transformer.h.1", "transformer.h.1.attn.c_proj.weight"
ROOT = Path(__file__).resolve().parents[2]




def fabric(**kw):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    return L.Fabric(accelerator="cpu", devices=1, **kw)


def assert_same_spectra(got: dict, want: dict):
    assert list(got) == list(want)
    assert all(torch.equal(got[k].values, want[k].values) for k in want)


# ---------------------------------------------------------------- what is unwrapped

def test_a_users_class_named_fabricmodule_is_not_unwrapped():
    """A class of the user's own named ``_FabricModule`` with a ``_forward_module`` is measured as it is."""

    class _FabricModule(nn.Module):
        def __init__(self):
            super().__init__()
            self._forward_module = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self._forward_module(x))

    model = _FabricModule()
    assert unwrap_compiled(model) is model
    lens = sl.SpectralLens(model, [torch.randn(4, 8)], layers="head", params=(), tail_window=(1, 3),
                           progress=False)
    assert lens.model is model and list(lens.measure(0, 0).spectra) == ["act:head"]
    assert list(weight_spectra(model)) == ["_forward_module.weight", "head.weight"]


def test_compiled_ddp_is_refused_as_ddp_is(one_rank):
    """torch.compile(DDP(model)): the lens and the probe refuse it with the way out, as they refuse the DDP."""
    ddp = nn.parallel.DistributedDataParallel(TinyGPT())
    for wrapped in (ddp, torch.compile(ddp)):
        with pytest.raises(ValueError, match=r"SpectralLens: model is a DistributedDataParallel wrapper; pass the "
                                             r"wrapped module \(model\.module\)"):
            sl.SpectralLens(wrapped, [lm_batch(seed=1)[0]], layers=f"module.{BLOCK}", params=(), progress=False)
        with pytest.raises(ValueError, match=r"PerSampleGradientProbe: model is a DistributedDataParallel wrapper"):
            sl.PerSampleGradientProbe(wrapped, params=f"module.{PARAM}")
    lens = sl.SpectralLens(pool=[lm_batch(seed=1)[0]], layers=BLOCK, params=(), progress=False)
    with pytest.raises(ValueError, match="DistributedDataParallel wrapper"):
        lens.attach(torch.compile(ddp))
    assert lens.model is None


def test_fabric_attach_detach_leaves_no_hook_and_records_carry_the_users_names(tmp_path):
    """On fabric.setup's wrapper: hooks go on the user's modules and all go with detach (the wrapper never holds
    one); the run record and a sink get the user's names."""
    from spectral_lens.integrations._driver import LensDriver
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    torch.manual_seed(0)
    model = TinyGPT()
    fm = fabric(precision="32-true").setup(model)

    def hooks():
        return sum(len(getattr(m, a)) for m in fm.modules()
                   for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))

    with sl.attach(fm, BLOCK) as cap:
        assert len(model.get_submodule(BLOCK)._forward_hooks) == 1 and not fm._forward_hooks
    assert hooks() == 0 and list(cap.accumulators) == [BLOCK]
    writer = RunWriter(tmp_path / "run", RunInfo("fab", batch_tier=8, n_layer=2), tail_window=(2, 8))
    lens = sl.SpectralLens(pool=[lm_batch(seed=20)[0]], layers=BLOCK, params=PARAM, gradient_pool=[lm_batch(seed=30)],
                           writer=writer, tail_window=(2, 8), progress=False)
    handle = lens.attach(fm)
    assert lens.model is model

    logged = []

    class Sink:
        def log_measurement(self, m, tail=None, head=None):
            logged.append(sorted(m.spectra))

    LensDriver(lens, [Sink()], tokens_per_step=None).measure(0, 0, None, log=None)
    handle.remove()
    writer.close()
    assert hooks() == 0
    want = [f"act:{BLOCK}", f"grad:{PARAM}"]
    assert logged == [want]
    assert sorted(RunRecord.open(tmp_path / "run").measurements[0].spectra) == want


# ---------------------------------------------------------------- weight spectra: the user's names

def test_weight_spectra_of_a_compiled_model_have_the_eager_names():
    """torch.compile(model): the eager names (before: ``_orig_mod.`` prefixes, a user's name unresolved), the
    same spectra; select_parameters likewise."""
    torch.manual_seed(0)
    model = TinyGPT()
    compiled = torch.compile(model)
    assert_same_spectra(weight_spectra(compiled), weight_spectra(model))
    assert_same_spectra(weight_spectra(compiled, PARAM), weight_spectra(model, PARAM))
    assert [n for n, _ in select_parameters(compiled, "transformer.h.*.mlp.*.weight")] == \
        [n for n, _ in select_parameters(model, "transformer.h.*.mlp.*.weight")]


def test_weight_spectra_of_per_block_compiled_modules_have_the_eager_names():
    """Blocks compiled one by one (torchtitan's way): names without the ``_orig_mod`` segments, as the lens records
    them; a 3-D experts weight inside a compiled block is still one spectrum per expert."""
    torch.manual_seed(0)
    model = TinyGPT()
    eager = weight_spectra(model)
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = torch.compile(block)
    assert_same_spectra(weight_spectra(model), eager)
    assert list(weight_spectra(model, PARAM)) == [PARAM]
    assert list(weight_spectra(model, "**.h.1._orig_mod.attn.c_proj.weight")) == [PARAM]  # its own name too

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(3, 4, 5))

    net = nn.Sequential(collections.OrderedDict(experts=torch.compile(Experts())))
    assert list(weight_spectra(net)) == ["experts.w1[0]", "experts.w1[1]", "experts.w1[2]"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_weight_spectra_of_fabrics_wrapper_have_the_users_names(precision):
    """fabric.setup's wrapper: the user's names (before: ``_forward_module.``), the user's model's spectra."""
    torch.manual_seed(0)
    model = TinyGPT()
    fm = fabric(precision=precision).setup(model)
    assert_same_spectra(weight_spectra(fm), weight_spectra(model))
    assert [n for n, _ in select_parameters(fm, PARAM)] == [PARAM]


@pytest.mark.parametrize("compiled", [False, True])
def test_weight_spectra_under_fabric_ddp_read_the_users_model_and_refuse_plain_ddp(compiled, monkeypatch):
    """Fabric's DDP strategy (one CPU process): the DDP's module is read, as the lens binds it (names without
    ``_forward_module.module.``); a plain DDP, compiled or not, is refused as the lens refuses it."""
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    import torch.distributed as dist
    from support.ranks import free_port

    env = dict(os.environ)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        fab = L.Fabric(accelerator="cpu", devices=1, strategy="ddp")
        fab.launch()
        torch.manual_seed(0)
        model = TinyGPT()
        fm = fab.setup(torch.compile(model) if compiled else model)
        assert_same_spectra(weight_spectra(fm), weight_spectra(model))
        assert list(weight_spectra(fm, PARAM)) == [PARAM]
        ddp = unwrap_compiled(fm._forward_module) if not compiled else fm._forward_module._orig_mod
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        for wrapped in (ddp, torch.compile(ddp)):
            with pytest.raises(ValueError, match=r"weight_spectra: model is a DistributedDataParallel wrapper; .*"
                                                 r"\(model\.module\)"):
                weight_spectra(wrapped)
            with pytest.raises(ValueError, match="DistributedDataParallel"):
                select_parameters(wrapped, f"module.{PARAM}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def test_weight_spectra_of_fsdp2_shards_are_the_whole_matrices(one_rank):
    """fully_shard (FSDP2, the weights DTensors): the spectra are plain tensors of the whole matrices, equal to the
    unsharded model's (before: DTensor values, which .numpy() and the records refuse)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT()
    want = weight_spectra(model)
    fully_shard(model)
    assert type(model.get_parameter(PARAM)).__name__ == "DTensor"
    got = weight_spectra(model)
    assert all(type(s.values) is torch.Tensor for s in got.values())
    assert_same_spectra(got, want)
    assert got[PARAM].values.numpy().shape == (16,)


# ---------------------------------------------------------------- Fabric DDP: measuring with the reducer armed

FABRIC_DDP_ARMED = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F
import lightning as L
import spectral_lens as sl
from spectral_lens.weights import weight_spectra
from support.models import TinyGPT, lm_batch
from support.teardown import end_rank
fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp", precision="64-true")
fabric.launch()
r = fabric.global_rank
torch.manual_seed(0)
model = TinyGPT()
fm = fabric.setup(model)
x, y = lm_batch(seed=50 + r)  # each rank its own batch: DDP averages the gradients
fabric.backward(F.cross_entropy(fm(x).flatten(0, 1), y.flatten()))
ref = [p.grad.clone() for p in model.parameters()]
model.zero_grad(set_to_none=True)
pool, gpool = [lm_batch(seed=20 + i)[0] for i in range(2)], [lm_batch(seed=30 + i) for i in range(2)]
res = {"weights": list(weight_spectra(fm, "**.h.1.attn.*.weight"))}
for engine in ("fast", "vmap", "loop"):
    probe = sl.PerSampleGradientProbe(params="transformer.h.1.attn.c_proj.weight", engine=engine)
    lens = sl.SpectralLens(fm, pool, layers="transformer.h.1", probe=probe, gradient_pool=gpool, precision="float64",
                           tail_window=(2, 8), progress=False)
    out = fm(x)  # DDP's forward: its reducer now expects this step's gradients
    m = lens.measure(0, 0)  # between the forward and the backward
    fabric.backward(F.cross_entropy(out.flatten(0, 1), y.flatten()))
    lens.detach()
    res[engine] = dict(same_grad=all(torch.equal(a, p.grad) for a, p in zip(ref, model.parameters())),
                       spectra={k: s.values.tolist() for k, s in m.spectra.items()},
                       hooks=sum(len(h) for mm in fm.modules()
                                 for h in (mm._forward_hooks, mm._forward_pre_hooks, mm._backward_hooks)))
    model.zero_grad(set_to_none=True)
res["grad_sum"] = float(sum(g.sum() for g in ref))
json.dump(res, open(f"{sys.argv[1]}/rank{r}.json", "w"))
fabric.barrier()
print(f"rank {r} done", flush=True)
end_rank()
'''


@pytest.mark.slow
def test_fabric_ddp_measuring_between_forward_and_backward_leaves_the_allreduced_grad(tmp_path):
    """Fabric's DDP on 2 gloo ranks: with DDP's reducer armed by the training forward, a measurement (fast, vmap and
    loop engines) before fabric.backward neither hangs nor feeds the reducer: the all-reduced .grad is bitwise the
    one without it, on both ranks; the spectra are equal on both ranks, no hook is left, weight names are the user's."""
    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    got = run_fabric_ranks(tmp_path, "fabric_ddp_armed.py", FABRIC_DDP_ARMED)
    assert got[0]["grad_sum"] == got[1]["grad_sum"]  # all-reduced
    assert got[0]["weights"] == ["transformer.h.1.attn.c_attn.weight", PARAM]
    for engine in ("fast", "vmap", "loop"):
        assert got[0][engine]["same_grad"] and got[1][engine]["same_grad"], engine
        assert got[0][engine]["hooks"] == got[1][engine]["hooks"] == 0
        assert got[0][engine]["spectra"] == got[1][engine]["spectra"]
        for k, v in got[0][engine]["spectra"].items():
            ref = np.array(got[0]["fast"]["spectra"][k])
            assert np.abs(np.array(v) - ref).max() <= 1e-10 * ref[0], (engine, k)


FABRIC_FSDP2 = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F
import lightning as L
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
import spectral_lens as sl
from spectral_lens.weights import weight_spectra
from support.models import TinyGPT, lm_batch
from support.teardown import end_rank


def shard(model, mesh):
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])


fabric = L.Fabric(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(parallelize_fn=shard))
fabric.launch()
r = fabric.global_rank
torch.manual_seed(0)
with fabric.init_module(empty_init=False):
    model = TinyGPT()
fm = fabric.setup(model)
x, y = lm_batch(seed=50 + r)
fabric.backward(F.cross_entropy(fm(x).flatten(0, 1), y.flatten()))
lens = sl.SpectralLens(fm, [lm_batch(seed=20 + i)[0] for i in range(2)], layers="transformer.h.1",
                       params="transformer.h.1.attn.c_proj.weight", tail_window=(2, 8), progress=False,
                       gradient_pool=[lm_batch(seed=30 + i) for i in range(2)])
m = lens.measure(0, 0)
bound = type(lens.model).__name__
lens.detach()
weights = {k: s.values.tolist() for k, s in weight_spectra(fm).items()}  # every rank: full_tensor() gathers
json.dump({"model": bound, "weights": weights, "spectra": {k: s.values.tolist() for k, s in m.spectra.items()}},
          open(f"{sys.argv[1]}/rank{r}.json", "w"))
fabric.barrier()
print(f"rank {r} done", flush=True)
end_rank()
'''


@pytest.mark.slow
def test_fabric_fsdp2_on_two_cpu_ranks_measures_the_plain_models_spectra(tmp_path):
    """Fabric's ModelParallelStrategy with fully_shard (FSDP2; Fabric's strategy="fsdp" refuses the CPU) on 2 gloo
    ranks: the lens on the wrapper binds the sharded user model and measures, on both ranks, the spectra of the
    plain model at the same weights (float32, 1e-5); weight_spectra on the wrapper gives the plain model's, names
    and values."""
    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    got = run_fabric_ranks(tmp_path, "fabric_fsdp2.py", FABRIC_FSDP2)
    assert got[0]["model"] == "FSDPTinyGPT" and got[0]["spectra"] == got[1]["spectra"]
    torch.manual_seed(0)
    plain = TinyGPT()
    assert got[0]["weights"] == got[1]["weights"] == {k: s.values.tolist() for k, s in weight_spectra(plain).items()}
    want = sl.SpectralLens(plain, [lm_batch(seed=20 + i)[0] for i in range(2)], layers=BLOCK, params=PARAM,
                           gradient_pool=[lm_batch(seed=30 + i) for i in range(2)], tail_window=(2, 8),
                           progress=False).measure(0, 0).spectra
    assert sorted(got[0]["spectra"]) == sorted(want)
    for k, s in want.items():
        ref = s.values.numpy()
        assert np.abs(np.array(got[0]["spectra"][k]) - ref).max() <= 1e-5 * ref[0], k
