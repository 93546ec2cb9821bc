"""Review 26 (revlibwrap): an adversarial review of the libwrap merge (7d12934).

* ``weight_spectra(fsdp_model.module)`` (the module inside an FSDP1 wrapper, what "pass ``model.module``" suggests;
  or one of its submodules) under ``use_orig_params=True`` on a sharded strategy: the parameters are 1-D views of
  the rank's shard, but the wrapper's handle that holds their shapes is out of reach. Before: "no matrix parameter
  matches ...; matrix parameters: []", or a selected matrix "matches only parameters with < 2 dims"; now the
  refusal that names ``summon_full_params`` of the wrapper; so is a submodule under ``use_orig_params=False``,
  whose weights are plain tensors there (before: "no matrix parameter matches"). Under ``NO_SHARD`` (the parameters whole) and inside
  ``summon_full_params`` the spectra are the plain model's (float64 references).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.weights import select_parameters, weight_spectra


from support.wrapped import net, svd_ref


# ---------------------------------------------------------------- FSDP1: the module inside the wrapper

def _as_fsdp1_views(model: nn.Module, sharded: bool) -> nn.Module:
    """Stand-in for ``fsdp_model.module`` under ``use_orig_params=True`` (real FSDP1 on 2 ranks: the slow test
    below): FSDP1 marks the original parameters ``_fsdp_flattened``; on a sharded strategy each is a 1-D view of
    this rank's part of its flat parameter (or empty), under ``NO_SHARD`` it keeps its shape."""
    for i, p in enumerate(list(model.parameters())):
        p._fsdp_flattened = True
        if sharded:
            p.data = p.data.flatten()[: 3 * (i % 3)]  # this rank's part, possibly empty
    return model


def test_the_module_inside_an_fsdp1_wrapper_with_sharded_views_is_refused_naming_the_wrapper():
    inner = _as_fsdp1_views(net(), sharded=True)
    for call in (lambda: weight_spectra(inner), lambda: weight_spectra(inner, "b.weight"),
                 lambda: weight_spectra(inner.a)):
        with pytest.raises(ValueError, match=r"weight_spectra: \w+ holds \d FullyShardedDataParallel parameter\(s\) as "
                                             r"views of this rank's shard.*summon_full_params\(fsdp_model\).*the "
                                             r"FullyShardedDataParallel wrapper this module is inside"):
            call()


def test_the_module_inside_an_fsdp1_wrapper_with_whole_parameters_is_measured():
    """NO_SHARD (or one rank): the parameters marked by FSDP1 keep their shapes: no refusal, exact spectra."""
    plain = net()
    inner = _as_fsdp1_views(net(), sharded=False)
    got = weight_spectra(inner)
    assert list(got) == ["a.weight", "b.weight", "head.weight"]
    for name, w in (("a.weight", plain.a.weight), ("head.weight", plain.head.weight)):
        np.testing.assert_allclose(np.sort(got[name].values.numpy())[::-1], svd_ref(w), rtol=1e-12, atol=1e-14)
    assert list(weight_spectra(inner.b)) == ["weight"]


def test_real_fsdp1_module_on_one_rank(one_rank):
    """Real FSDP1 on one rank (NO_SHARD): ``.module`` with use_orig_params=True is measured exactly; with =False its
    flat parameter is refused naming the wrapper (summon_full_params of the inner module gathers nothing)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    want = weight_spectra(net())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 1: NO_SHARD instead of FULL_SHARD
        orig = FSDP(net(), use_orig_params=True, device_id=torch.device("cpu"))
        flat = FSDP(net(), use_orig_params=False, device_id=torch.device("cpu"))
    got = weight_spectra(orig.module)
    assert list(got) == list(want) and all(torch.equal(got[k].values, want[k].values) for k in want)
    with pytest.raises(ValueError, match=r"flat 1-D parameter.*summon_full_params\(fsdp_model\).*wrapper this module "
                                         r"is inside"):
        weight_spectra(flat.module)
    with pytest.raises(ValueError, match=r"use_orig_params=False\) as plain tensors, not parameters \(\['weight', "
                                         r"'bias'\].*summon_full_params\(fsdp_model\).*wrapper this module is inside"):
        weight_spectra(flat.module.a)  # before: 'no matrix parameter matches None; matrix parameters: []'
    with pytest.raises(ValueError, match=r"flat 1-D parameter.*summon_full_params\(model\)"):
        weight_spectra(flat)  # the wrapper itself: summon_full_params(model) as before
    with FSDP.summon_full_params(flat):
        got = weight_spectra(flat.module)
    assert list(got) == list(want) and all(torch.equal(got[k].values, want[k].values) for k in want)
    cached = net()
    cached.a.cache = torch.ones(2, 3).T  # a plain tensor attribute (a view) of the user's own: not FSDP's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = FSDP(cached, use_orig_params=False, device_id=torch.device("cpu"))
    with FSDP.summon_full_params(cached):
        assert list(weight_spectra(cached)) == list(want)


@pytest.mark.slow  # loading torch._dynamo takes ~3 s in a process that has not yet
def test_a_subclass_of_the_compile_wrapper_is_unwrapped():
    from torch._dynamo.eval_frame import OptimizedModule

    class Mine(OptimizedModule):
        pass

    compiled = torch.compile(net())
    mine = Mine(compiled._orig_mod, compiled.dynamo_ctx)
    assert list(weight_spectra(mine)) == ["a.weight", "b.weight", "head.weight"]  # no "_orig_mod." prefix
    with pytest.warns(sl.CompiledModelWarning):
        sl.attach(mine, "a").remove()


@pytest.mark.slow
def test_dynamo_loaded_after_spectral_lens_is_read_at_call_time():
    """spectral_lens does not load torch._dynamo; a process that loads it later (torch.compile) has its wrappers
    recognized when weight_spectra / attach are called."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, warnings, torch\n"
        "import spectral_lens as sl\n"
        "from spectral_lens.weights import weight_spectra\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "c = torch.compile(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)))\n"
        "assert list(weight_spectra(c)) == ['0.weight', '1.weight'], list(weight_spectra(c))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    sl.attach(c, '1').remove()\n"
        "assert any(issubclass(x.category, sl.CompiledModelWarning) for x in w)\n"
        "print('ok')\n")
    root = str(Path(sl.__file__).resolve().parents[1])  # this checkout's spectral_lens
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _fsdp1_module_rank(rank: int, port: int, out: str) -> None:
    """Real FSDP1 on 2 gloo ranks (FULL_SHARD): weight_spectra of the wrapper's ``.module`` and of a submodule,
    outside and inside ``summon_full_params`` of the wrapper."""
    from support.ranks import gloo_group, write_case
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with gloo_group(rank, port, 2, 60):
        result = {}
        for orig in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = FSDP(net(), use_orig_params=orig, device_id=torch.device("cpu"))
            for tag, inner, select in (("module", model.module, None), ("select", model.module, "b.weight"),
                                       ("submodule", model.module.a, None)):
                try:
                    weight_spectra(inner, select)
                    result[f"outside {orig} {tag}"] = None
                except ValueError as exc:
                    result[f"outside {orig} {tag}"] = str(exc)
            with FSDP.summon_full_params(model):
                got = weight_spectra(model.module)
            result[f"inside {orig}"] = {k: s.values.tolist() for k, s in got.items()}
        from torch.distributed.fsdp import (
            fully_shard,  # FSDP2: DTensor shards, gathered, never refused
        )

        model = net()
        fully_shard(model.a)
        fully_shard(model)
        result["fsdp2"] = {k: s.values.tolist() for k, s in weight_spectra(model).items()}
        write_case(out, "fsdp1_module", rank, result)


@pytest.mark.slow
@pytest.mark.distributed
def test_real_fsdp1_module_sharded_on_two_ranks_is_refused_outside_and_exact_inside(tmp_path):
    """The stand-in's rule on real FSDP1 (FULL_SHARD, 2 gloo ranks): ``fsdp_model.module`` (and a submodule) with
    use_orig_params=True holds 1-D views (before: 'no matrix parameter matches ...: []', a selected matrix 'matches
    only parameters with < 2 dims'), with =False the flat parameter (a submodule: plain tensors); all refused naming the
    wrapper's summon_full_params, inside which the spectra equal the plain model's."""
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_fsdp1_module_rank, 2, tmp_path, 180.0)
    got = case_results(tmp_path, ["fsdp1_module"], 2)["fsdp1_module"]
    assert hung == [] and None not in got, (hung, got)
    want = {k: s.values.tolist() for k, s in weight_spectra(net()).items()}
    for r in got:
        for orig in (True, False):
            for tag in ("module", "select", "submodule"):
                msg = r[f"outside {orig} {tag}"]
                assert msg is not None and "summon_full_params(fsdp_model)" in msg and "wrapper this module is inside" \
                    in msg, (orig, tag, msg)
            assert r[f"inside {orig}"] == want, r
        assert list(r["fsdp2"]) == list(want), r
        for k, values in want.items():
            np.testing.assert_allclose(r["fsdp2"][k], values, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(want["b.weight"], svd_ref(net().b.weight), rtol=1e-12)


# ---------------------------------------------------------------- PEFT: which matrix a short name measures

class Shared(nn.Module):
    """A module of the user's own with a matrix and a ``base_layer`` submodule: both are ``x.weight`` without the
    PEFT segments."""

    def __init__(self):
        super().__init__()
        self.weight, self.base_layer = nn.Parameter(torch.randn(4, 6)), nn.Linear(6, 4)

    def forward(self, x):
        return x @ self.weight.T + self.base_layer(x)


class PeftNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.x, self.head = nn.Linear(6, 6), Shared(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.x(torch.tanh(self.a(x)))))


def _peft_net(**config):
    peft = pytest.importorskip("peft", reason="the hf extra installs peft")
    torch.manual_seed(0)
    return peft, peft.get_peft_model(PeftNet().double(), peft.LoraConfig(r=2, init_lora_weights=False, **config))


def test_a_short_name_of_two_peft_matrices_is_an_error_naming_both_never_a_pick():
    """``x.weight`` and ``x.base_layer.weight`` share the short name ``x.weight``: both keep their full names (no
    silent pick), each spectrum is its own matrix's (float64 reference), and selecting ``x.weight`` raises naming
    both (before: "no matrix parameter matches 'x.weight'; closest names: ['a.weight', 'head.weight']")."""
    _, pm = _peft_net(target_modules=["a"], modules_to_save=["head"])
    x = pm.get_base_model().x
    got = weight_spectra(pm)
    full = ["base_model.model.x.weight", "base_model.model.x.base_layer.weight"]
    assert all(k in got for k in full) and "x.weight" not in got
    for name, w in zip(full, (x.weight, x.base_layer.weight)):
        np.testing.assert_allclose(np.sort(got[name].values.numpy())[::-1], svd_ref(w), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"PeftModel: 'x\.weight' is the name before get_peft_model of 2 matrices "
                                         r"\(\['base_model\.model\.x\.weight', 'base_model\.model\.x\.base_layer\."
                                         r"weight'\]\).*select one by its full name"):
        weight_spectra(pm, "x.weight")
    assert list(weight_spectra(pm, full[1])) == [full[1]]
    with pytest.raises(ValueError, match=r"no matrix parameter matches 'y\.weight'"):  # an unknown name as before
        weight_spectra(pm, "y.weight")


def test_peft_adapters_each_matrix_keeps_its_own_name_and_head_weight_follows_the_active_copy():
    """Two LoRA adapters with a ``modules_to_save`` head: ``lora_A``/``lora_B`` keep the adapter segment, and
    ``head.weight`` is the copy the forward runs (the active adapter's, the original with adapters disabled), as
    the probe's ``params="head.weight"`` takes it; the other copies keep their full names."""
    peft, pm = _peft_net(target_modules=["a"], modules_to_save=["head"])
    pm.add_adapter("other", peft.LoraConfig(r=3, target_modules=["a"], modules_to_save=["head"], init_lora_weights=False))
    head = pm.get_base_model().head
    with torch.no_grad():  # distinct copies
        head.modules_to_save["other"].weight.mul_(3.0)
        head.original_module.weight.mul_(0.5)
    for adapter, want, rest in (("default", head.modules_to_save["default"], ["head.modules_to_save.other.weight",
                                                                              "head.original_module.weight"]),
                                ("other", head.modules_to_save["other"], ["head.modules_to_save.default.weight",
                                                                          "head.original_module.weight"])):
        pm.set_adapter(adapter)
        got = weight_spectra(pm)
        assert {"a.lora_A.default.weight", "a.lora_A.other.weight", "a.lora_B.other.weight", *rest} <= set(got)
        assert len(got) == 10  # every matrix once: a, its 4 LoRA matrices, x's 2, the head's 3 copies
        np.testing.assert_allclose(got["head.weight"].values.numpy(), svd_ref(want.weight), rtol=1e-12, atol=1e-14)
        assert select_parameters(pm, "head.weight")[0][1] is want.weight
        assert sl.PerSampleGradientProbe(pm, params="head.weight").params["base_model.model.head.modules_to_save."
                                                                          f"{adapter}.weight"] is want.weight
    with pm.disable_adapter():
        got = weight_spectra(pm)
        np.testing.assert_allclose(got["head.weight"].values.numpy(), svd_ref(head.original_module.weight), rtol=1e-12)
        assert "head.original_module.weight" not in got


def test_a_lora_layers_short_name_measures_the_frozen_base_matrix_not_the_merged_one():
    """``a.weight`` of a LoRA layer is ``base_layer.weight``, frozen while LoRA trains; the matrix the forward
    multiplies with, ``W + scale * B @ A``, is ``a.weight`` of a ``merge_and_unload()``ed copy (float64)."""
    import copy

    peft = pytest.importorskip("peft", reason="the hf extra installs peft")
    pm = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["a"], init_lora_weights=False))
    lora = pm.get_base_model().a
    w = lora.base_layer.weight.detach()
    merged_w = w + lora.scaling["default"] * lora.lora_B["default"].weight.detach() @ lora.lora_A["default"].weight.detach()
    assert not torch.allclose(w, merged_w)
    got = weight_spectra(pm, "a.weight")["a.weight"]
    np.testing.assert_allclose(np.sort(got.values.numpy())[::-1], svd_ref(w), rtol=1e-12, atol=1e-14)
    merged = weight_spectra(copy.deepcopy(pm).merge_and_unload(), "a.weight")["a.weight"]
    np.testing.assert_allclose(np.sort(merged.values.numpy())[::-1], svd_ref(merged_w), rtol=1e-10, atol=1e-13)


def test_fsdp1_around_a_peft_model_names_it_as_the_peft_model(one_rank):
    """``FullyShardedDataParallel(peft_model)`` (as Accelerate's FSDP1 plugin wraps it, ``trainer.model`` under FSDP):
    ``layers=``/``attach`` select by the base model's names, the lens records and ``weight_spectra`` use the same
    keys as for the PeftModel itself, with equal spectra (float64). Before: "no module matches target ['a',
    'head']", and weight spectra keyed ``base_model.model.a.weight`` / ``base_model.model.head.modules_to_save.
    default.weight`` (the PEFT prefix read from the FSDP wrapper, which has none)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    peft = pytest.importorskip("peft", reason="the hf extra installs peft")
    pm = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["a", "b"], modules_to_save=["head"],
                                                    init_lora_weights=False))
    gen = torch.Generator().manual_seed(5)
    pool = [torch.randn(8, 6, dtype=torch.float64, generator=gen) for _ in range(2)]
    want = sl.SpectralLens(pm, pool, layers=["a", "head"], params=(), progress=False).measure(1, 1).spectra
    want_w = weight_spectra(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 1: NO_SHARD, the parameters whole
        wrapped = FSDP(pm, use_orig_params=True, device_id=torch.device("cpu"))
    got = sl.SpectralLens(wrapped, pool, layers=["a", "head"], params=(), progress=False).measure(1, 1).spectra
    assert list(got) == list(want) == ["act:a", "act:head"]
    for k in want:
        np.testing.assert_allclose(got[k].values.numpy(), want[k].values.numpy(), rtol=1e-12, atol=1e-14)
    got_w = weight_spectra(wrapped)
    assert list(got_w) == list(want_w) and "head.weight" in got_w and "a.weight" in got_w
    for k in want_w:
        np.testing.assert_allclose(got_w[k].values.numpy(), want_w[k].values.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.sort(got_w["head.weight"].values.numpy())[::-1],
                               svd_ref(pm.get_base_model().head.modules_to_save["default"].weight), rtol=1e-12)
    with sl.attach(wrapped, "b") as capture:
        assert list(capture.accumulators) == ["b"]  # keyed as the records (review 27)
