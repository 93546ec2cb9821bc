"""Review 26 (libwrap): model wrappers in the library's name resolution.

* ``spectral_lens.attach`` / ``acc.attach`` refuse a ``DistributedDataParallel`` / ``DataParallel`` wrapper and a
  DeepSpeed engine (also inside ``torch.compile``) with the lens's way out, ``model.module`` (before: accepted,
  names with a ``module.`` prefix that the lens's records and ``weight_spectra`` lack).
* ``weight_spectra`` / ``select_parameters`` name a PEFT model's parameters as the lens records them (the base
  model's: ``a.weight``, not ``base_model.model.a.base_layer.weight``), and take those names as selectors.
* FSDP1 with flat parameters (``use_orig_params=False``): a clear refusal naming ``summon_full_params`` (before:
  "no matrix parameter matches ...; matrix parameters: []"); inside ``summon_full_params`` the spectra are exact.
* ``torch.compile``'s wrapper is recognized with ``isinstance`` (a user's class named ``OptimizedModule`` with an
  ``_orig_mod`` attribute is a model like any other: before, its other layers were dropped).
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


# ---------------------------------------------------------------- 1. sl.attach refuses DDP as the lens does

def test_attach_refuses_ddp_and_compiled_ddp_with_the_lens_way_out(one_rank):
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    for wrapped in (ddp, torch.compile(ddp)):
        with pytest.raises(ValueError, match=r"spectral_lens\.attach: model is a DistributedDataParallel wrapper; "
                                             r".*pass the wrapped module \(model\.module\)"):
            sl.attach(wrapped, "module.a")
        with pytest.raises(ValueError, match=r"\.attach: model is a DistributedDataParallel wrapper"):
            ActivationCovarianceAccumulator(precision="float64").attach(wrapped, "module.a")
    for h in (model.a._forward_hooks, model.b._forward_hooks):
        assert not h  # a refused attach registers nothing
    # the way out: hooks on model.module fire inside the wrapper's forward; rows equal a float64 reference
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with sl.attach(ddp.module, "a", precision="float64") as capture:
        ddp(x)
    acc = capture.accumulators["a"]
    assert list(capture.accumulators) == ["a"] and acc.n_rows == 7
    want = np.clip(np.linalg.eigvalsh(np.cov(model.a(x).detach().numpy(), rowvar=False))[::-1], 0, None)
    np.testing.assert_allclose(acc.compute().values.numpy(), want, rtol=1e-10, atol=1e-13)


def test_a_bound_lens_or_probe_given_the_ddp_of_its_model_names_the_wrapper(one_rank):
    """lens.attach(ddp) on a lens bound to ddp.module: the DDP refusal with its way out (before: 'SpectralLens is
    attached to another Net', for the same model wrapped); the binding is kept."""
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    lens = sl.SpectralLens(model, [torch.randn(3, 6, dtype=torch.float64)], layers="a", params=(), progress=False)
    probe = sl.PerSampleGradientProbe(model, params="b.weight")
    for owner, who in ((lens, "SpectralLens"), (probe, "PerSampleGradientProbe")):
        with pytest.raises(ValueError, match=rf"{who}: model is a DistributedDataParallel wrapper; pass the wrapped "
                                             r"module \(model\.module\)"):
            owner.attach(ddp)
        assert owner.model is model


def test_attach_refuses_data_parallel_and_a_deepspeed_engine():
    model = net()
    with pytest.raises(ValueError, match=r"spectral_lens\.attach: model is a DataParallel wrapper; .*\(model\.module\)"):
        sl.attach(nn.DataParallel(model), "module.a")

    class DeepSpeedEngine(nn.Module):  # what deepspeed.initialize returns, recognized by name and module
        def __init__(self, module):
            super().__init__()
            self.module = module

    DeepSpeedEngine.__module__ = "deepspeed.runtime.engine"
    with pytest.raises(ValueError, match=r"spectral_lens\.attach: model is a DeepSpeed engine .*\(engine\.module\)"):
        sl.attach(DeepSpeedEngine(model), "module.a")
    assert list(sl.attach(model, "a").accumulators) == ["a"]


# ---------------------------------------------------------------- 2. PEFT names in weight_spectra

def lora_net():
    peft = pytest.importorskip("peft", reason="the hf extra installs peft")
    return peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["a", "b"], modules_to_save=["head"],
                                                       init_lora_weights=False))


def test_weight_spectra_of_a_peft_model_use_the_lens_names_and_equal_float64_references():
    pm = lora_net()
    base = pm.get_base_model()
    got = weight_spectra(pm)
    assert list(got) == ["a.weight", "a.lora_A.default.weight", "a.lora_B.default.weight", "b.weight",
                         "b.lora_A.default.weight", "b.lora_B.default.weight", "head.original_module.weight",
                         "head.weight"]
    from spectral_lens.capture import record_names  # the names the lens's records carry

    own = [n for n, p in pm.named_parameters() if p.ndim == 2]
    assert list(record_names(pm, own, params=True).values()) == list(got)
    for name, w in (("a.weight", base.a.base_layer.weight), ("b.lora_B.default.weight", base.b.lora_B["default"].weight),
                    ("head.weight", base.head.modules_to_save["default"].weight)):
        np.testing.assert_allclose(np.sort(got[name].values.numpy())[::-1], svd_ref(w), rtol=1e-12, atol=1e-14)
    # the lens's names select; so do the module's own names and globs over either
    assert list(weight_spectra(pm, "a.weight")) == ["a.weight"]
    assert list(weight_spectra(pm, "base_model.model.a.base_layer.weight")) == ["a.weight"]
    assert [n for n, _ in select_parameters(pm, ["*.weight"])] == ["a.weight", "b.weight", "head.weight"]
    assert select_parameters(pm, "head.weight")[0][1] is base.head.modules_to_save["default"].weight
    # nested: torch.compile(PeftModel) names alike
    assert list(weight_spectra(torch.compile(pm))) == list(got)


def test_a_compiled_peft_model_selects_modules_by_the_base_models_names():
    """torch.compile(PeftModel): sl.attach(..., "a") selects the LoRA layer as on the PeftModel itself (before:
    'no module matches target 'a''; the PEFT prefix was read from the compile wrapper, which has none)."""
    from spectral_lens.capture import select_modules

    pm = lora_net()
    assert [n for n, _ in select_modules(pm, "a")] == ["base_model.model.a"]
    compiled = torch.compile(pm)
    assert [n for n, _ in select_modules(compiled, ["a", "b"])] == ["_orig_mod.base_model.model.a",
                                                                     "_orig_mod.base_model.model.b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sl.CompiledModelWarning)
        assert list(sl.attach(compiled, "a").accumulators) == ["a"]  # keyed as the records (review 27)


# ---------------------------------------------------------------- 3. FSDP1 flat parameters

def fsdp1(model, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 1: NO_SHARD instead of FULL_SHARD
        return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def test_weight_spectra_refuse_fsdp1_flat_parameters_and_are_exact_under_summon_full_params(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    want = weight_spectra(net())
    flat = fsdp1(net(), use_orig_params=False)
    for call in (lambda: weight_spectra(flat), lambda: select_parameters(flat, "a.weight")):
        with pytest.raises(ValueError, match=r"weight_spectra: FullyShardedDataParallel holds its weights as 1 flat "
                                             r"1-D parameter.*use_orig_params=False.*summon_full_params"):
            call()
    with FSDP.summon_full_params(flat):
        got = weight_spectra(flat)
        assert list(got) == list(want) == ["a.weight", "b.weight", "head.weight"]
        assert all(torch.equal(got[k].values, want[k].values) for k in want)
        np.testing.assert_allclose(got["b.weight"].values.numpy(), svd_ref(net().b.weight), rtol=1e-12)
    orig = fsdp1(net(), use_orig_params=True)  # one rank: NO_SHARD, the parameters whole
    got = weight_spectra(orig)
    assert list(got) == list(want) and all(torch.equal(got[k].values, want[k].values) for k in want)


def test_fsdp1_sharded_views_are_refused_by_their_shapes():
    """Stand-in for use_orig_params=True on several ranks (one rank here runs NO_SHARD): a parameter that is a 1-D
    view of the rank's shard, its original shape kept by the handle's flat parameter."""
    model = net()

    class Flat(nn.Parameter):
        _is_flat_param = True

    class Handle:
        flat_param = Flat(torch.zeros(3))

    Handle.flat_param._params = [model.a.weight, model.b.weight]
    Handle.flat_param._shapes = (torch.Size([5, 6]), torch.Size([4, 5]))
    model._handle = Handle()
    assert list(weight_spectra(model)) == ["a.weight", "b.weight", "head.weight"]  # unsharded: shapes as recorded
    model.b.weight = nn.Parameter(model.b.weight.detach().flatten()[:12])  # this rank's part, 1-D
    Handle.flat_param._params = [model.a.weight, model.b.weight]
    with pytest.raises(ValueError, match=r"1 FullyShardedDataParallel parameter\(s\) as views of this rank's shard.*"
                                         r"\['b\.weight'\].*summon_full_params"):
        weight_spectra(model)


# ---------------------------------------------------------------- 4. OptimizedModule by isinstance

class OptimizedModule(nn.Module):
    """A user's class that happens to share torch.compile's wrapper's name and attribute."""

    def __init__(self):
        super().__init__()
        self._orig_mod, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self._orig_mod(x))


def test_a_users_class_named_optimizedmodule_is_not_unwrapped():
    # dynamo loaded, as in a process that compiled anything (before it is, nothing is a compile wrapper)
    import torch._dynamo

    model = OptimizedModule()
    got = weight_spectra(model)  # both layers (before: the _orig_mod Linear alone, "weight")
    assert len(got) == 2 and "head.weight" in got  # (the "_orig_mod" segment itself is dropped by name, as in per-
    # block compilation: uncompiled_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.CompiledModelWarning)  # not a compile wrapper: no warning
        assert list(sl.attach(model, "head").accumulators) == ["head"]
    lens = sl.SpectralLens(model, [torch.randn(3, 4)], layers="head", params=(), progress=False)
    assert lens.model is model
    real = torch.compile(net())
    assert list(weight_spectra(real)) == ["a.weight", "b.weight", "head.weight"]  # the real wrapper still unwrapped


def _fsdp1_rank(rank: int, port: int, out: str) -> None:
    """Real FSDP1 on 2 gloo ranks (FULL_SHARD): weight_spectra outside and inside summon_full_params."""
    from support.ranks import gloo_group, write_case
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with gloo_group(rank, port, 2, 60):
        result = {}
        for orig in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = FSDP(net(), use_orig_params=orig, device_id=torch.device("cpu"))
            try:
                weight_spectra(model)
                result[f"outside {orig}"] = None
            except ValueError as exc:
                result[f"outside {orig}"] = str(exc)
            with FSDP.summon_full_params(model):
                got = weight_spectra(model)
            result[f"inside {orig}"] = {k: s.values.tolist() for k, s in got.items()}
        write_case(out, "fsdp1", rank, result)


@pytest.mark.slow
@pytest.mark.distributed
def test_real_fsdp1_sharded_on_two_ranks_is_refused_outside_and_exact_inside_summon_full_params(tmp_path):
    """The stand-in's rule on real FSDP1 (FULL_SHARD, 2 gloo ranks): use_orig_params=True leaves each parameter a
    1-D view of the rank's shard (before: 'no matrix parameter matches', or matrices silently left out), =False a
    flat parameter; both refused naming summon_full_params, inside which the spectra equal the plain model's."""
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_fsdp1_rank, 2, tmp_path, 180.0)
    got = case_results(tmp_path, ["fsdp1"], 2)["fsdp1"]
    assert hung == [] and None not in got, (hung, got)
    want = {k: s.values.tolist() for k, s in weight_spectra(net()).items()}
    for r in got:
        assert "as views of this rank's shard" in r["outside True"] and "summon_full_params" in r["outside True"], r
        assert "flat 1-D parameter" in r["outside False"] and "summon_full_params" in r["outside False"], r
        assert r["inside True"] == want and r["inside False"] == want, r
