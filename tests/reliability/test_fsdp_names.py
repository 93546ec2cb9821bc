"""Names of wrapped models as the unwrapped model has them: FSDP1's ``FullyShardedDataParallel`` inserts
``_fsdp_wrapped_module.`` segments into every module and parameter name, ``torch.distributed``'s activation
checkpoint wrapper ``_checkpoint_wrapped_module.`` (under FSDP2 too, as torchtitan applies it per block).
``layers=`` and ``params=`` typed without those segments match, and the records name the spectra by the
unwrapped model's names (as ``capture.uncompiled_name`` does for ``torch.compile``'s ``_orig_mod``), so a
run of the wrapped model compares with one of the plain model. Spectra against the unwrapped model's,
float64. Before, the names typed for the plain model matched nothing (``ValueError: no module matches``)
and the records carried the wrapper segments.

The FSDP cases run on 2 gloo CPU ranks in one spawn (slow tier); the activation checkpoint cases on a
plain model run in the test process.
"""

from __future__ import annotations

import functools

import pytest
import torch
from support.models import Block, TinyGPT, lm_pool
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens.capture import uncompiled_name

WORLD = 2
PARAM = "transformer.h.1.attn.c_proj.weight"
LAYERS = "transformer.h.*.attn"


def _plain():
    torch.manual_seed(0)
    return TinyGPT(vocab=37, d=16, heads=2, layers=2, ctx=12).double()


def _pool():
    return lm_pool(3, batch=4, t=12, vocab=37, seed=1)


def _checkpointed(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, Block))
    return model


def _spectra(model, **kw):
    m = SpectralLens(model, _pool(), precision="float64", progress=False, **kw).measure(1, 1)
    return {k: {"values": v.values.tolist(), "n_rows": v.n_rows} for k, v in m.spectra.items()}


def _reference(**kw):
    return _spectra(_plain(), **kw)


def _assert_same(got: dict, want: dict, where) -> None:
    assert sorted(got) == sorted(want), (where, sorted(got), sorted(want))
    for name, w in want.items():
        assert got[name]["n_rows"] == w["n_rows"], (where, name)
        a, b = torch.tensor(got[name]["values"], dtype=torch.float64), torch.tensor(w["values"], dtype=torch.float64)
        diff = (a - b).abs().max().item()
        assert diff <= 1e-12 * b.max().item(), (where, name, diff)


def test_eager_name_drops_the_wrapper_segments_only():
    assert uncompiled_name("_fsdp_wrapped_module.transformer.h.0._checkpoint_wrapped_module._fsdp_wrapped_module"
                           ".attn.c_proj.weight") == "transformer.h.0.attn.c_proj.weight"
    assert uncompiled_name("h.1._orig_mod.attn") == "h.1.attn"
    assert uncompiled_name("_fsdp_wrapped_module") == ""  # FSDP1's root wrapper and the module it wraps: one name
    for name in ("", "transformer.h.0.attn", "_private.fsdp_wrapped_module.x", "a._fsdp_wrapped_module_b"):
        assert uncompiled_name(name) == name  # other names byte-identical


# a plain model with activation checkpoint wrappers per block (no process group needed)
def test_checkpoint_wrapped_model_is_named_and_measured_as_the_plain_model():
    model = _checkpointed(_plain())
    assert "transformer.h.1._checkpoint_wrapped_module.attn.c_proj.weight" in dict(model.named_parameters())
    for kw in ({}, {"layers": LAYERS, "params": PARAM}, {"layers": "transformer.h.1", "params": "**.c_proj.weight"}):
        _assert_same(_spectra(model, **kw), _reference(**kw), kw)


def test_checkpoint_wrapped_model_still_matches_its_own_names():
    model = _checkpointed(_plain())
    got = _spectra(model, layers="transformer.h.1._checkpoint_wrapped_module.attn",
                   params="transformer.h.1._checkpoint_wrapped_module.attn.c_proj.weight")
    _assert_same(got, _reference(layers="transformer.h.1.attn", params=PARAM), "wrapped names")


# -- FSDP on 2 gloo ranks ---------------------------------------------------------------------------------

def _fsdp1(orig: bool, checkpoint: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = _plain()
    if checkpoint:
        _checkpointed(model)
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=orig,
                                    auto_wrap_policy=ModuleWrapPolicy({Block}))


def _fsdp2_checkpointed():
    from torch.distributed.fsdp import fully_shard

    model = _checkpointed(_plain())
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp1_case(orig, checkpoint, rank):
    model = _fsdp1(orig, checkpoint)
    return {"names": [n for n, _ in model.named_modules()],
            "default": _spectra(model, params=()), "layers": _spectra(model, layers=LAYERS, params=())}


def _fsdp2_case(rank):
    model = _fsdp2_checkpointed()
    return {"names": [n for n, _ in model.named_parameters()],
            "probe": _spectra(model, layers=LAYERS, params=PARAM), "default": _spectra(model)}


CASES = {
    "fsdp1_orig_params": functools.partial(_fsdp1_case, True, False),
    "fsdp1_flat_params": functools.partial(_fsdp1_case, False, False),
    "fsdp1_checkpointed": functools.partial(_fsdp1_case, True, True),
    "fsdp2_checkpointed": _fsdp2_case,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("fsdp_names"), CASES, WORLD, pg_timeout_s=30, join_s=300,
                          preload="torch.distributed.fsdp")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("fsdp1")])
def test_fsdp1_records_and_layers_use_the_unwrapped_names(results, case):
    for rank, r in enumerate(checked_case(results, case, None)):
        assert r["error"] is None, (case, rank, r["error"])
        got = r["value"]
        assert any("_fsdp_wrapped_module" in n for n in got["names"])  # the wrapper's names carry the segment
        _assert_same(got["default"], _reference(params=()), (case, rank, "default layers"))
        _assert_same(got["layers"], _reference(layers=LAYERS, params=()), (case, rank, LAYERS))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_with_checkpoint_wrappers_uses_the_unwrapped_names(results):
    for rank, r in enumerate(checked_case(results, "fsdp2_checkpointed", None)):
        assert r["error"] is None, (rank, r["error"])
        got = r["value"]
        assert "transformer.h.1._checkpoint_wrapped_module.attn.c_proj.weight" in got["names"]
        _assert_same(got["probe"], _reference(layers=LAYERS, params=PARAM), (rank, "probe"))
        _assert_same(got["default"], _reference(), (rank, "lens defaults"))
