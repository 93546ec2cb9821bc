"""The lens in the two common "own loop" frameworks: Lightning Fabric and Hugging Face Accelerate (CPU).

Fabric's ``fabric.setup(model)`` returns a ``_FabricModule`` whose names carry a ``_forward_module.`` prefix (and,
under its DDP strategy, ``_forward_module.module.``): the lens, ``sl.attach`` and the probe unwrap it, so the names
typed for the user's model resolve and the records carry them; the spectra equal float64 references; measuring
leaves outputs, ``.grad``, optimizer state, modes and RNG as they were under each precision plugin. Accelerate's
``prepare`` returns the model itself (its forward patched with autocast under ``mixed_precision="bf16"``): the lens
measures it, keeps the patched forward, and leaves the accumulated ``.grad`` of ``accelerator.accumulate`` bitwise.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectral_lens as sl
from support.fabric import run_fabric_ranks
from support.models import TinyGPT, lm_batch

BLOCK, PARAM = "transformer.h.1", "transformer.h.1.attn.c_proj.weight"
ROOT = Path(__file__).resolve().parents[2]


def pools():
    return [lm_batch(seed=20 + i)[0] for i in range(3)], [lm_batch(seed=30 + i) for i in range(2)]


def reference_activations(model, pool) -> np.ndarray:
    rows = []
    hook = model.get_submodule(BLOCK).register_forward_hook(lambda mod, a, out: rows.append(out.detach()))
    with torch.no_grad():
        for x in pool:
            model(x)
    hook.remove()
    x = torch.cat(rows).flatten(0, 1).double().numpy()
    return np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1], 0, None)


def reference_gradients(model, pool) -> np.ndarray:
    """One gradient per sequence of its mean next-token loss, on a float64 copy."""
    model = copy.deepcopy(model).double().eval()
    weight = model.get_parameter(PARAM)
    grads = []
    for x, y in pool:
        for i in range(x.shape[0]):
            (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1])[0], y[i]), weight)
            grads.append(g.flatten().double())
    G = torch.stack(grads)
    return np.clip(np.linalg.eigvalsh((G @ G.T).numpy())[::-1], 0, None)


def state(model, opt):
    return dict(
        modes=[m.training for m in model.modules()],
        tensors={k: v.clone() for k, v in model.state_dict().items()},
        grads={k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        opt=copy.deepcopy(opt.state_dict()),
        rng=(torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
        hooks=sum(len(getattr(m, a)) for m in model.modules()
                  for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")),
    )


def assert_same_state(a, b):
    assert a["modes"] == b["modes"] and a["hooks"] == b["hooks"]
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    for k, g in a["grads"].items():
        h = b["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k
    for k, s in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][k][n]) for n, v in s.items()), k
    assert torch.equal(a["rng"][0], b["rng"][0]) and a["rng"][1] == b["rng"][1]
    assert np.array_equal(a["rng"][2], b["rng"][2])


# ---------------------------------------------------------------- Lightning Fabric

def fabric_setup(precision: str):
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    torch.manual_seed(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fm, fopt = fabric.setup(model, opt)
    x, y = lm_batch(seed=99)
    for _ in range(2):  # a step (optimizer state), then gradients of the next one left in .grad
        fopt.zero_grad()
        fabric.backward(F.cross_entropy(fm(x).flatten(0, 1).float(), y.flatten()))
        if _ == 0:
            fopt.step()
    return fabric, model, fm, fopt, x


def test_fabric_wrapper_names_resolve_as_the_users_model():
    """The names a user types for the model resolve on fabric.setup's wrapper, and records carry them."""
    _, model, fm, _, x = fabric_setup("32-true")
    assert type(fm).__name__ == "_FabricModule" and not any(n.startswith("transformer") for n, _ in fm.named_modules())
    pool, gpool = pools()
    lens = sl.SpectralLens(fm, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, tail_window=(2, 8),
                           progress=False)
    assert lens.model is model
    assert set(lens.measure(0, 0).spectra) == {f"act:{BLOCK}", f"grad:{PARAM}"}
    lens.detach()
    probe = sl.PerSampleGradientProbe(fm, params=PARAM)
    assert list(probe.params) == [PARAM]
    probe.detach()
    with sl.attach(fm, BLOCK) as cap:  # streams the training forwards through the wrapper
        with torch.no_grad():
            fm(x)
        assert list(cap.accumulators) == [BLOCK] and cap.accumulators[BLOCK].n_rows == x.numel()


def test_fabric_64_true_spectra_equal_float64_references():
    """64-true: the lens on the wrapper and on the user's model measure the float64 references (1e-8)."""
    _, model, fm, _, _ = fabric_setup("64-true")
    pool, gpool = pools()
    ref_act, ref_grad = reference_activations(model.eval(), pool), reference_gradients(model, gpool)
    model.train()
    for target in (fm, model):
        lens = sl.SpectralLens(target, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, precision="float64",
                               tail_window=(2, 8), progress=False)
        m = lens.measure(0, 0)
        lens.detach()
        act, grad = m.spectra[f"act:{BLOCK}"].values.numpy(), m.spectra[f"grad:{PARAM}"].values.numpy()
        assert np.abs(act - ref_act).max() <= 1e-8 * ref_act[0]
        assert np.abs(grad[: len(ref_grad)] - ref_grad).max() <= 1e-8 * ref_grad[0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "64-true"])
def test_fabric_precision_plugins_measuring_changes_nothing(precision):
    """Under each precision plugin: the wrapper's and the user's model give the same spectra, and measuring
    (between fabric.backward and the step) leaves outputs, .grad, optimizer state, modes, RNG and hooks."""
    _, model, fm, fopt, x = fabric_setup(precision)
    pool, gpool = pools()
    with torch.no_grad():
        out = fm(x)
    before = state(model, fopt)
    spectra = []
    for target in (fm, model):
        lens = sl.SpectralLens(target, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, tail_window=(2, 8),
                               progress=False)
        spectra.append(lens.measure(0, 0).spectra)
        lens.detach()
    assert_same_state(before, state(model, fopt))
    with torch.no_grad():
        assert torch.equal(fm(x), out)
    assert spectra[0].keys() == spectra[1].keys()
    assert all(torch.equal(spectra[0][k].values, spectra[1][k].values) for k in spectra[0])


@pytest.mark.parametrize("compiled", [False, True])
def test_fabric_ddp_strategy_binds_the_users_model_not_ddp(compiled, monkeypatch):
    """Fabric's DDP strategy (one CPU process, gloo): the wrapper runs a DistributedDataParallel, inside a compile
    wrapper when the model given to setup was compiled; the lens and the probe bind the user's model, never the
    DDP (whose passes would start its collectives on this rank alone), and names resolve without ``module.``."""
    L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
    import torch.distributed as dist
    from support.ranks import free_port

    env = dict(os.environ)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        fabric = L.Fabric(accelerator="cpu", devices=1, strategy="ddp")
        fabric.launch()
        torch.manual_seed(0)
        model = TinyGPT()
        fm = fabric.setup(torch.compile(model) if compiled else model)
        inner = fm._forward_module._orig_mod if compiled else fm._forward_module
        assert isinstance(inner, torch.nn.parallel.DistributedDataParallel)
        pool, gpool = pools()
        lens = sl.SpectralLens(fm, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, tail_window=(2, 8),
                               progress=False)
        assert lens.model is model and lens.probe.model is model
        assert set(lens.measure(0, 0).spectra) == {f"act:{BLOCK}", f"grad:{PARAM}"}
        lens.detach()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


FABRIC_DDP = r'''
import json, os, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, torch, torch.nn.functional as F
import lightning as L
import spectral_lens as sl
from spectral_lens.records import RunInfo, RunWriter
from support.models import TinyGPT, lm_batch
from support.teardown import end_rank
out = sys.argv[1]
fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp", precision="64-true")
fabric.launch()
r = fabric.global_rank
torch.manual_seed(0)
model = TinyGPT()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
fm, fopt = fabric.setup(model, opt)
x, y = lm_batch(seed=50 + r)  # each rank its own batch: DDP averages the gradients
fabric.backward(F.cross_entropy(fm(x).flatten(0, 1), y.flatten()))
fopt.step()
fopt.zero_grad()
pool = [lm_batch(seed=20 + i)[0] for i in range(4)]  # every rank the whole held-out pool: the lens shards it
gpool = [lm_batch(seed=30 + i) for i in range(2)]
writer = RunWriter(f"{out}/run", RunInfo("fab", batch_tier=8, n_layer=2), tail_window=(2, 8)) if r == 0 else None
lens = sl.SpectralLens(fm, pool, layers="transformer.h.1", params="transformer.h.1.attn.c_proj.weight",
                       gradient_pool=gpool, precision="float64", writer=writer, tail_window=(2, 8), progress=False)
m = lens.measure(0, 0)
if writer is not None:
    writer.close()
json.dump({k: s.values.tolist() for k, s in m.spectra.items()}, open(f"{out}/rank{r}.json", "w"))
if r == 0:
    np.savez(f"{out}/weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
fabric.barrier()
print(f"rank {r} done", flush=True)
end_rank()
'''


@pytest.mark.slow
def test_fabric_ddp_two_cpu_ranks_measure_the_whole_pool(tmp_path):
    """Fabric's DDP (2 gloo ranks, fabric.launch()): the lens on fabric.setup's wrapper (DDP inside) measures the
    whole held-out pool (sharded over the ranks) on every rank (the spectra are equal on both and equal one process's on the full pool at
    the trained weights, float64), without DDP's collectives in its passes; rank 0 alone writes the record."""
    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    got = run_fabric_ranks(tmp_path, "fabric_ddp.py", FABRIC_DDP)
    assert got[0] == got[1]
    model = TinyGPT().double()
    with np.load(tmp_path / "weights.npz") as w:
        model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files})
    pool = [lm_batch(seed=20 + i)[0] for i in range(4)]
    gpool = [lm_batch(seed=30 + i) for i in range(2)]
    m = sl.SpectralLens(model, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, precision="float64",
                        tail_window=(2, 8), progress=False).measure(0, 0)
    for k, s in m.spectra.items():
        ref = s.values.numpy()
        assert np.abs(np.array(got[0][k]) - ref).max() <= 1e-10 * ref[0], k
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run"]
    lines = (tmp_path / "run" / "measurements.jsonl").read_text().splitlines()
    assert len(lines) == 1


# ---------------------------------------------------------------- Hugging Face Accelerate

@pytest.fixture
def fresh_accelerator_state():
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from accelerate.state import AcceleratorState, GradientState
    def reset():  # Accelerate's state is process-wide: an earlier Accelerator fixed its mixed precision
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield
    reset()


def test_accelerate_bf16_accumulate_measures_without_touching_grad(fresh_accelerator_state):
    """mixed_precision="bf16", gradient_accumulation_steps=4: the lens on the prepared model (the model itself,
    forward patched with autocast) measures inside accelerator.accumulate, leaves the accumulated .grad bitwise,
    the optimizer state, modes and RNG as they were, and keeps the patched forward; names resolve, and the
    unwrapped model measures the same."""
    import accelerate

    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=4)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader([lm_batch(seed=i) for i in range(6)], batch_size=None)
    pm, popt, ploader = acc.prepare(model, opt, loader)
    patched = pm.forward
    pool, gpool = pools()
    lens = sl.SpectralLens(pm, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, tail_window=(2, 8),
                           progress=False)
    measured = []
    for i, (x, y) in enumerate(ploader):
        with acc.accumulate(pm):
            acc.backward(F.cross_entropy(pm(x).flatten(0, 1).float(), y.flatten()))
            before = state(pm, popt)
            measured.append((acc.sync_gradients, lens.measure(i, i)))
            assert_same_state(before, state(pm, popt))
            popt.step()
            popt.zero_grad()
    assert [s for s, _ in measured] == [False, False, False, True, False, True]
    assert pm.forward == patched
    assert set(measured[0][1].spectra) == {f"act:{BLOCK}", f"grad:{PARAM}"}
    # the weights change only at a synced step: measurements inside one accumulation window agree
    assert all(torch.equal(measured[0][1].spectra[k].values, measured[3][1].spectra[k].values)
               for k in measured[0][1].spectra)
    lens.detach()
    unwrapped = acc.unwrap_model(pm)  # one process: the model itself, its forward still patched (keep_fp32_wrapper)
    spectra = [sl.SpectralLens(m, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, tail_window=(2, 8),
                               progress=False).measure(9, 9).spectra for m in (pm, unwrapped)]
    assert all(torch.equal(spectra[0][k].values, spectra[1][k].values) for k in spectra[0])
    assert pm.forward == patched


def _accelerate_rank(rank: int, port: int, out: str) -> None:
    """One of 2 CPU processes under Accelerate (MULTI_CPU, gloo), bf16 mixed precision, 2 accumulation steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    from accelerate import Accelerator
    from support.ranks import write_case
    from support.teardown import end_rank

    acc = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = TinyGPT()
    pm, popt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    pool, gpool = pools()
    try:
        sl.SpectralLens(pm, pool, layers=BLOCK, progress=False)
        refused = ""
    except ValueError as e:
        refused = str(e)
    inner = acc.unwrap_model(pm)
    lens = sl.SpectralLens(inner, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, precision="float64",
                           tail_window=(2, 8), progress=False)
    same_grad = []
    for i in range(2):
        x, y = lm_batch(seed=50 + 2 * i + rank)
        with acc.accumulate(pm):
            acc.backward(F.cross_entropy(pm(x).flatten(0, 1).float(), y.flatten()))
            grads = [p.grad.clone() for p in inner.parameters()]
            m = lens.measure(i, i)
            same_grad.append(all(torch.equal(g, p.grad) for g, p in zip(grads, inner.parameters())))
            weights = {k: v.tolist() for k, v in inner.state_dict().items()}  # the measured ones
            popt.step()
            popt.zero_grad()
    write_case(out, "acc", rank, dict(refused=refused, same_grad=same_grad, inner=type(inner).__name__,
                                      spectra={k: s.values.tolist() for k, s in m.spectra.items()},
                                      weights=weights))
    end_rank()


@pytest.mark.slow
def test_accelerate_two_cpu_processes(tmp_path):
    """Accelerate under 2 CPU processes (bf16, accumulation): the prepared DDP wrapper is refused with the way out,
    unwrap_model's module measures inside accumulate without touching .grad, and both ranks get the same spectra,
    equal to one process's measurement of the whole pool at the same weights under bf16 autocast."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from support.ranks import case_results, run_ranks

    assert run_ranks(_accelerate_rank, 2, tmp_path, 180.0) == []
    got = case_results(tmp_path, ["acc"], 2)["acc"]
    assert None not in got, got
    for r in got:
        assert "DistributedDataParallel" in r["refused"] and "model.module" in r["refused"]
        assert r["same_grad"] == [True, True] and r["inner"] == "TinyGPT"
    assert got[0]["spectra"] == got[1]["spectra"]
    model = TinyGPT()
    model.load_state_dict({k: torch.tensor(v) for k, v in got[0]["weights"].items()})
    pool, gpool = pools()
    m = sl.SpectralLens(model, pool, layers=BLOCK, params=PARAM, gradient_pool=gpool, precision="float64",
                        autocast_dtype=torch.bfloat16, tail_window=(2, 8), progress=False).measure(0, 0)
    act = m.spectra[f"act:{BLOCK}"].values.numpy()
    assert np.abs(np.array(got[0]["spectra"][f"act:{BLOCK}"]) - act).max() <= 1e-8 * act[0]
