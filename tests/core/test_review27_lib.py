"""Review 27 (lib): loose ends around model wrappers and names.

* A name or glob written with wrapper segments (``_orig_mod.`` of ``torch.compile``, as ``compiled.named_parameters()``
  prints it or a state dict saved from a compiled model holds it; ``h.0._orig_mod.`` of a compiled block) selects the
  same parameter or module as the plain name, in ``select_parameters`` / ``weight_spectra``, ``sl.attach``, the
  lens's ``layers=`` and the probe's ``params=`` (before: "no matrix parameter matches").
* The parallel-wrapper refusals of ``sl.attach``, the lens, the probe and ``weight_spectra`` are one wording that names
  the wrapper class once and the way out (before: three reasons, and "a DistributedDataParallel wrapper
  (DistributedDataParallel)").
* ``sl.attach`` keys its accumulators by the names the lens's records and ``weight_spectra`` use (a PEFT model's as
  before ``get_peft_model``, a compiled block's without ``_orig_mod``); before: the model's own long names.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.accumulate import ActivationCovarianceAccumulator
from spectral_lens.weights import select_parameters, weight_spectra

from support.wrapped import net, svd_ref


class Stack(nn.Module):
    """Two float64 blocks in a ModuleList (per-block compilation as torchtitan does it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)]).double()

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def _cov_eigs(rows: torch.Tensor) -> np.ndarray:
    """float64 reference: eigenvalues of the covariance of ``rows`` (descending)."""
    x = rows.detach().double().numpy()
    return np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=False))[::-1], 0, None)


# ---------------------------------------------------------------- 1. _orig_mod names select

def test_a_compiled_models_printed_names_select_the_same_parameters_as_the_plain_names():
    model = net()
    compiled = torch.compile(model)
    printed = [n for n, p in compiled.named_parameters() if p.ndim == 2]
    assert printed == ["_orig_mod.a.weight", "_orig_mod.b.weight", "_orig_mod.head.weight"]
    for name in printed:
        plain = name.removeprefix("_orig_mod.")
        for m in (compiled, model):  # the wrapper, and the plain model given a compiled model's state-dict key
            (got_name, got), = select_parameters(m, name)
            assert got_name == plain and got is model.get_parameter(plain)
    assert [n for n, _ in select_parameters(model, "_orig_mod.*.weight")] == ["a.weight", "b.weight", "head.weight"]
    got = weight_spectra(model, ["_orig_mod.b.weight"])
    assert list(got) == ["b.weight"]
    np.testing.assert_allclose(np.sort(got["b.weight"].values.numpy())[::-1], svd_ref(model.b.weight), rtol=1e-12)
    probe = sl.PerSampleGradientProbe(model, params="_orig_mod.b.weight")
    assert list(probe.params) == ["b.weight"] and probe.params["b.weight"] is model.b.weight
    assert list(sl.attach(model, "_orig_mod.a").accumulators) == ["a"]


def test_a_compiled_blocks_printed_names_select_in_a_model_compiled_otherwise_or_not_at_all():
    compiled_block = Stack()
    compiled_block.blocks[0] = torch.compile(compiled_block.blocks[0])
    assert [n for n, _ in compiled_block.named_parameters()][0] == "blocks.0._orig_mod.weight"
    plain = Stack()
    for m in (compiled_block, plain):
        w1 = m.blocks[1].weight
        # a name printed by a model whose every block was compiled, given to one where block 1 is not
        (name, got), = select_parameters(m, "blocks.1._orig_mod.weight")
        assert name == "blocks.1.weight" and got is w1
        assert [n for n, _ in select_parameters(m, "blocks.*._orig_mod.weight")] == ["blocks.0.weight",
                                                                                       "blocks.1.weight"]
        probe = sl.PerSampleGradientProbe(m, params="blocks.1._orig_mod.weight")
        assert list(probe.params.values())[0] is w1
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with sl.attach(plain, "blocks.1._orig_mod", precision="float64") as capture:
        plain(x)
    assert list(capture.accumulators) == ["blocks.1"]
    want = _cov_eigs(plain.blocks[1](torch.tanh(plain.blocks[0](x))))
    np.testing.assert_allclose(capture.accumulators["blocks.1"].compute().values.numpy(), want, rtol=1e-10,
                               atol=1e-13)
    lens = sl.SpectralLens(plain, [x], layers="_orig_mod.blocks.1", params=(), progress=False)
    assert list(lens.measure(1, 1).spectra) == ["act:blocks.1"]


def test_the_wrapper_name_alone_still_means_the_module_it_names():
    """"_orig_mod" has no eager name (it is the root): it keeps matching the wrapped module as typed."""
    model = net()
    compiled = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sl.CompiledModelWarning)
        capture = sl.attach(compiled, "_orig_mod")
    assert capture.accumulators[""].name == "_orig_mod" and model._forward_hooks
    capture.remove()
    assert not model._forward_hooks


# ---------------------------------------------------------------- 3. one refusal wording

def _refusals(wrapped: nn.Module) -> dict[str, str]:
    out = {}
    calls = {
        "spectral_lens.attach": lambda: sl.attach(wrapped, "module.a"),
        "ActivationCovarianceAccumulator.attach": lambda: ActivationCovarianceAccumulator().attach(wrapped, "module.a"),
        "SpectralLens": lambda: sl.SpectralLens(wrapped, [torch.zeros(2, 6, dtype=torch.float64)], layers="a",
                                                params=(), progress=False),
        "PerSampleGradientProbe": lambda: sl.PerSampleGradientProbe(wrapped, params="b.weight"),
        "weight_spectra": lambda: weight_spectra(wrapped),
    }
    for who, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(who if who != "ActivationCovarianceAccumulator.attach" else "ActivationCovariance"), msg
        out[who] = msg.split(": ", 1)[1]
    return out


def _check_one_wording(wrapped: nn.Module, cls: str, way: str) -> None:
    got = _refusals(wrapped)
    assert len(set(got.values())) == 1, got  # the same words after "<who>: "
    msg = next(iter(got.values()))
    assert msg.count(cls) == 1, msg  # the class named once
    assert f"pass the wrapped module ({way})" in msg and "'module.' prefix" in msg, msg


def test_ddp_refusals_share_one_wording_naming_the_class_once(one_rank):
    ddp = nn.parallel.DistributedDataParallel(net())
    _check_one_wording(ddp, "DistributedDataParallel", "model.module")
    _check_one_wording(torch.compile(ddp), "DistributedDataParallel", "model.module")


def test_data_parallel_and_deepspeed_refusals_share_one_wording():
    _check_one_wording(nn.DataParallel(net()), "DataParallel", "model.module")

    class DeepSpeedEngine(nn.Module):  # what deepspeed.initialize returns, recognized by name and module
        def __init__(self, module):
            super().__init__()
            self.module = module

    DeepSpeedEngine.__module__ = "deepspeed.runtime.engine"
    _check_one_wording(DeepSpeedEngine(net()), "DeepSpeedEngine", "engine.module")


# ---------------------------------------------------------------- 4. attach keys as the records

def lora_net():
    peft = pytest.importorskip("peft", reason="the hf extra installs peft")
    return peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["a", "b"], modules_to_save=["head"],
                                                       init_lora_weights=False))


def test_attach_on_a_peft_model_keys_as_the_lens_and_weight_spectra():
    pm = lora_net()
    x = torch.randn(11, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with sl.attach(pm, ["a", "b"], precision="float64") as capture:
        pm(x)
    assert list(capture.accumulators) == ["a", "b"]  # before: base_model.model.a, base_model.model.b
    assert capture.accumulators["a"].name == "base_model.model.a"  # the spectrum's source: the module's own name
    lens = sl.SpectralLens(pm, [x], layers=["a", "b"], params=(), precision="float64", progress=False)
    measured = lens.measure(1, 1).spectra
    assert [k.removeprefix("act:") for k in measured] == list(capture.accumulators)
    assert {n.rpartition(".")[0] for n in weight_spectra(pm, ["a.weight", "b.weight"])} == set(capture.accumulators)
    base = pm.get_base_model()
    want = _cov_eigs(base.a(x))
    np.testing.assert_allclose(capture.compute()["a"].values.numpy(), want, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(measured["act:a"].values.numpy(), want, rtol=1e-10, atol=1e-13)
    acc = ActivationCovarianceAccumulator(precision="float64")
    with acc.attach(pm, "b") as one:
        assert list(one.accumulators) == ["b"] and acc.name == "base_model.model.b"


# ---------------------------------------------------------------- 5. pipeline layers= agreement without addresses

def _stage(index: int) -> nn.Module:
    """Stage ``index`` of a two-stage split that keeps the unsplit model's names (h.0 on stage 0, h.1 on stage 1)."""
    return nn.ModuleDict({"h": nn.ModuleDict({str(index): nn.Linear(3, 3)})})


class _Stage:
    def __init__(self, index: int) -> None:
        self.stage_index, self.num_stages, self.group = index, 2, None


def _merge_on_each_rank(monkeypatch, layers_per_rank: list) -> list:
    """Run the lens's per-stage resolution and the merge as each of two ranks would, with each rank's own
    ``layers=`` objects (two processes: two lambdas at two addresses), the all_gather played by hand."""
    import torch.distributed as dist
    from spectral_lens import _pipeline

    resolved = [sl.SpectralLens._stage_layers(_stage(r), _Stage(r), layers) for r, layers in enumerate(layers_per_rank)]
    gathered = [(r, {}, missing, 0) for r, (_, missing) in enumerate(resolved)]
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), gathered))
    outcomes = []
    for r, layers in enumerate(layers_per_rank):
        try:
            _pipeline.merge_stages(_Stage(r), {}, resolved[r][1], layers, 0)
            outcomes.append(None)
        except ValueError as exc:
            outcomes.append(str(exc))
    return outcomes


def test_a_callable_layer_matching_no_stage_is_refused_on_every_rank(monkeypatch):
    def layers():  # a new lambda per rank, as in each rank's process
        return ["h.0", lambda name, m: name == "h.9"]

    got = _merge_on_each_rank(monkeypatch, [layers(), layers()])
    assert all(g is not None and "['layers[1] (test_a_callable_layer_matching_no_stage_is_refused_on_every_rank."
               "<locals>.layers.<locals>.<lambda>)'] match no module of any pipeline stage" in g for g in got), got
    # a callable that one stage matches is no error; nor is a name on the other stage
    fine = _merge_on_each_rank(monkeypatch, [["h.0", lambda n, m: n == "h.1"], ["h.0", lambda n, m: n == "h.1"]])
    assert fine == [None, None]
    assert sl.SpectralLens._stage_layers(_stage(1), _Stage(1), ["h.0", lambda n, m: n == "h.1"]) == (["h.1"], [0])


# ---------------------------------------------------------------- review: the default stack with some blocks wrapped

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.lin(x))


class _WithTables(nn.Module):
    """Blocks beside a list of per-layer tables of the same length (value embeddings)."""

    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleList([nn.Embedding(10, 4) for _ in range(3)])
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])


def test_a_stack_with_one_block_compiled_or_checkpoint_wrapped_is_still_the_default_stack():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from spectral_lens.lens import all_blocks, deepest_block

    for wrap in (torch.compile, checkpoint_wrapper):
        model = _WithTables()
        assert all_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]
        model.blocks[0] = wrap(model.blocks[0])  # before: the tables were chosen ("tables.2" the default probe)
        assert all_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"] and deepest_block(model) == "blocks.2"
        model.blocks[2] = wrap(model.blocks[2])
        assert deepest_block(model) == "blocks.2"


def test_a_glob_of_wrapper_segments_alone_still_means_the_wrapped_modules():
    """"**._orig_mod" asks for the modules compiled blocks wrap, not, stripped to "**", for every module."""
    from spectral_lens.capture import select_modules

    model = Stack()
    model.blocks[0] = torch.compile(model.blocks[0])
    assert [n for n, _ in select_modules(model, "**._orig_mod")] == ["blocks.0._orig_mod"]
    assert [n for n, _ in select_modules(model, "blocks.*._orig_mod")] == ["blocks.0", "blocks.1"]  # as "blocks.*"


# ---------------------------------------------------------------- review: a refused acc.attach changes nothing

def test_an_acc_attach_whose_hook_cannot_be_registered_leaves_the_accumulator_unnamed_and_unhooked(monkeypatch):
    model = net()

    def refuse(*args, **kwargs):
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(model.b, "register_forward_hook", refuse)
    acc = ActivationCovarianceAccumulator(precision="float64")
    with pytest.raises(RuntimeError, match="no hooks here"):
        acc.attach(model, "b")
    assert acc.name is None  # before: "b", the name of a module it never measured
    with pytest.raises(RuntimeError, match="no hooks here"):
        sl.attach(model, ["a", "b", "head"])
    assert not model.a._forward_hooks and not model.head._forward_hooks  # none left behind by a failed attach
    x = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with acc.attach(model, "a") as capture:  # attachable again, named by this attach
        model(x)
    assert acc.name == "a" and list(capture.accumulators) == ["a"]
    np.testing.assert_allclose(acc.compute().values.numpy(), _cov_eigs(model.a(x)), rtol=1e-10, atol=1e-13)
