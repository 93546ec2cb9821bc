"""Review of the FSDP pools, tensor parallelism, PEFT and DeepSpeed changes: 2 gloo CPU ranks, one spawn.

Under FSDP every forward all-gathers the weights, so a rank that stops while the others forward leaves
them waiting in the all-gather until the process-group timeout. Pools without a ``len`` were already
loaded in rounds of ``world`` batches compared before each round's forwards (``test_fsdp_pools.py``);
pools *with* a ``len`` were compared once, before any forward, and then loaded between forwards
without an agreement. Before this fix, under FSDP with a list or sized pool:

1. an exception while loading one rank's batch (a broken file, a ``KeyboardInterrupt``) or from its
   ``mask_fn`` left the other rank in the all-gather of its next forward: the process-group timeout
   (10 s here, 30 min by default), the group unusable afterwards.

2. one tensor-parallel replica (the lens's group is the mesh: every rank runs every batch, each forward
   an all-reduce over the mesh) did not compare its ranks' pools at all: a loading failure on one rank,
   or pools of different lengths, left the other rank in a forward's all-reduce (the timeout, or a gloo
   abort where it met the other rank's agreement);
3. FSDP2 with tensor parallelism on a 2-D ``(dp, tp)`` mesh: the lens took the ``DTensor``s for FSDP's,
   split the pool across the ranks of one replica and measured a wrong spectrum, silently;
4. a ``fully_shard``ed ``PeftModel`` (its class becomes ``FSDPPeftModel``, defined in torch) was no longer
   recognized as PEFT: ``layers=``/``params=`` typed as for the base model matched nothing.

Now every FSDP pool takes the round loop (one ``all_reduce`` of ``world`` integers per round of ``world``
batches, FSDP only), and so does one tensor-parallel replica (rounds of one batch): the failed rank raises
its own error and the others a ``RuntimeError`` naming it, at once, the ranks in step; pools of different
lengths the same ``ValueError`` on every rank. Sized pools of equal lengths (a multiple of the world, one
more, exactly ``world`` batches) measure the unwrapped model's spectra (float64); an empty pool raises the
same error on every rank; the non-FSDP path's collectives are unchanged (counted against an unsized
pool's). FSDP2 + TP on a 2-D mesh is a ``ValueError`` on every rank (HSDP's 2-D mesh is measured), and a
fully sharded PEFT model's records and spectra equal the unsharded model's.
"""

from __future__ import annotations

import pytest
import torch
from support.fsdp_pools import Unsized, errors, gloo
from support.fsdp_pools import assert_equal_spectra as _assert_equal_spectra
from support.fsdp_pools import counted as _counted
from support.fsdp_pools import fsdp2 as _fsdp2
from support.fsdp_pools import measure as _measure
from support.fsdp_pools import ok as _ok
from support.fsdp_pools import plain as _plain
from support.fsdp_pools import pool as _pool
from support.fsdp_pools import spectra as _spectra
from support.ranks import run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 2
PG_TIMEOUT_S = 10  # a collective left waiting fails after this (the default is 30 min for gloo)
DEADLINE_S = 7.0  # an agreed error comes at once, well inside the timeout


class Sized:
    """A pool with a ``len`` whose loading of batch ``fail_at`` raises ``error`` (a broken file on one rank)."""

    def __init__(self, batches, fail_at=None, error=None):
        self.batches, self.fail_at, self.error = batches, fail_at, error

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                raise self.error
            yield batch


# ---------------------------------------------------------------- cases
def _sized_equal(rank):
    """Sized pools of 2 (exactly world), 3 and 4 batches on both ranks: spectra and all_reduce calls, against
    the same batches without a len."""
    out = {}
    for n in (2, 3, 4):
        m, listed = _counted(lambda n=n: _measure(_fsdp2(), _pool(n)))
        _, unsized = _counted(lambda n=n: _measure(_fsdp2(), Unsized(_pool(n))))
        out[str(n)] = {"spectra": _spectra(m), "listed": listed, "unsized": unsized}
    return out


def _empty_pools(rank):
    """An empty pool (a list, and one without a len) on both ranks: each rank's error."""
    errors = {}
    for kind, pool in (("listed", []), ("unsized", Unsized([]))):
        try:
            _measure(_fsdp2(), pool)
        except Exception as exc:  # noqa: BLE001 - compared across ranks by the parent
            errors[kind] = f"{type(exc).__name__}: {exc}"
    return errors


def _non_fsdp_collectives(rank):
    """Without FSDP: the all_reduce calls for a list pool and the same pool without a len (the plain path:
    no per-batch or per-round agreement on either)."""
    model = _plain().float()

    def run(pool):
        return SpectralLens(model, pool, params=(), progress=False).measure(1, 1)

    return {"unsized": _counted(lambda: run(Unsized(_pool(5))))[1], "listed": _counted(lambda: run(_pool(5)))[1]}


def _sized_fails_on_rank1(rank):
    """Loading rank 1's third batch of a sized pool raises (after one round's forwards)."""
    _measure(_fsdp2(), Sized(_pool(4), fail_at=2 if rank == 1 else None, error=OSError("batch 2 could not be read")))


def _sized_interrupted_on_rank1(rank):
    """A KeyboardInterrupt while loading rank 1's second batch of a sized pool."""
    _measure(_fsdp2(), Sized(_pool(4), fail_at=1 if rank == 1 else None, error=KeyboardInterrupt()))


def _listed_mask_fn_fails_on_rank1(rank):
    """A list pool of 4 batches whose mask_fn raises on rank 1's second batch (before its forward)."""
    seen = []

    def mask_fn(batch):
        seen.append(1)
        if rank == 1 and len(seen) == 2:
            raise KeyError("attention_mask")

    _measure(_fsdp2(), _pool(4), mask_fn=mask_fn)


def _tensor_parallel():
    """The plain model with every block's MLP split over a 1-D mesh of both ranks (c_fc column-parallel,
    c_proj row-parallel: its output replicated): one replica, every forward an all-reduce over both ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model, mesh = _plain(), init_device_mesh("cpu", (WORLD,))
    for block in model.transformer.h:
        parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    return model


def _tp_equal(rank):
    """One tensor-parallel replica, the same 3 batches with a len and without: spectra and all_reduce calls."""
    out = {}
    for kind, pool in (("listed", _pool(3)), ("unsized", Unsized(_pool(3)))):
        m, calls = _counted(lambda pool=pool: _measure(_tensor_parallel(), pool))
        out[kind] = {"spectra": _spectra(m), "calls": calls}
    return out


def _tp_fails_on_rank1(rank):
    """One tensor-parallel replica: loading rank 1's third batch raises."""
    _measure(_tensor_parallel(), Sized(_pool(4), fail_at=2 if rank == 1 else None,
                                       error=OSError("batch 2 could not be read")))


def _tp_unsized_longer_on_rank0(rank):
    """One tensor-parallel replica: rank 0's pool (no len) gives 3 batches, rank 1's 2."""
    _measure(_tensor_parallel(), Unsized(_pool(3 - rank)))


def _tp_listed_longer_on_rank0(rank):
    """One tensor-parallel replica: rank 0's list holds 3 batches, rank 1's 2."""
    _measure(_tensor_parallel(), _pool(3 - rank))


def _tp_gradient_pools_differ(rank):
    """One tensor-parallel replica (every rank runs the gradient protocol): rank 0's gradient pool holds 3
    batches, rank 1's 2."""
    _measure(_tensor_parallel(), _pool(2), params="lm_head.weight", gradient_pool=_pool(3 - rank, seed=2))


def _fsdp_and_tp_on_a_2d_mesh(rank):
    """FSDP2 and tensor parallelism on a (dp=1, tp=2) mesh: both ranks are one replica. Before: the lens
    took the DTensors for FSDP's, split the pool across the two ranks and measured a wrong spectrum."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh, model = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp")), _plain()
    for block in model.transformer.h:
        parallelize_module(block.mlp, mesh["tp"], {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return _spectra(_measure(model, _pool(4)))


def _hsdp(rank):
    """HSDP on a (replicate=1, shard=2) mesh (placements (Replicate(), Shard(0))): not taken for tensor
    parallelism; the spectra."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh, model = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard")), _plain()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _spectra(_measure(model, _pool(3)))


# the cases that broke the process group before the fix run last (a timeout leaves the group unusable)
CASES = {
    "sized_equal": _sized_equal,
    "empty_pools": _empty_pools,
    "non_fsdp_collectives": _non_fsdp_collectives,
    "tp_equal": _tp_equal,
    "fsdp_and_tp_on_a_2d_mesh": _fsdp_and_tp_on_a_2d_mesh,
    "hsdp": _hsdp,
    "tp_fails_on_rank1": _tp_fails_on_rank1,
    "tp_unsized_longer_on_rank0": _tp_unsized_longer_on_rank0,
    "tp_listed_longer_on_rank0": _tp_listed_longer_on_rank0,
    "tp_gradient_pools_differ": _tp_gradient_pools_differ,
    "sized_fails_on_rank1": _sized_fails_on_rank1,
    "sized_interrupted_on_rank1": _sized_interrupted_on_rank1,
    "listed_mask_fn_fails_on_rank1": _listed_mask_fn_fails_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("review17"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=300, preload="torch.distributed.fsdp")


def _errors(results, case) -> list[str]:
    return errors(results, case, DEADLINE_S)


@gloo
def test_sized_fsdp_pools_measure_the_unwrapped_models_spectra_in_rounds(results):
    for got in _ok(results, "sized_equal"):
        for n in (2, 3, 4):
            _assert_equal_spectra(got[str(n)]["spectra"], _measure(_plain(), _pool(n)))
            # the same rounds as without a len, plus the length check before any forward
            assert got[str(n)]["listed"] == got[str(n)]["unsized"] + 1, got[str(n)]


@gloo
def test_an_empty_fsdp_pool_raises_the_same_error_on_every_rank(results):
    r0, r1 = _ok(results, "empty_pools")
    assert sorted(r0) == ["listed", "unsized"] and r0 == r1, (r0, r1)


@gloo
def test_the_non_fsdp_paths_collectives_do_not_depend_on_the_pools_length(results):
    for got in _ok(results, "non_fsdp_collectives"):
        assert got["unsized"] == got["listed"], got


@gloo
def test_a_loading_failure_in_one_ranks_sized_fsdp_pool_is_agreed(results):
    what = "RuntimeError: SpectralLens: loading the pool's batches or their masks (mask_fn) failed on global rank(s) [1]"
    r0, r1 = _errors(results, "sized_fails_on_rank1")
    assert r1 == "OSError: batch 2 could not be read", r1
    assert r0.startswith(what), r0
    r0, r1 = _errors(results, "sized_interrupted_on_rank1")
    assert r1 == "KeyboardInterrupt: ", r1
    assert r0.startswith(what), r0
    r0, r1 = _errors(results, "listed_mask_fn_fails_on_rank1")
    assert r1 == "KeyError: 'attention_mask'", r1
    assert r0.startswith(what), r0


@gloo
def test_one_tensor_parallel_replica_measures_the_plain_models_spectra(results):
    for got in _ok(results, "tp_equal"):
        for kind in ("listed", "unsized"):
            _assert_equal_spectra(got[kind]["spectra"], _measure(_plain(), _pool(3)))
        # one all_reduce per batch and one at the pool's end; the list's length check before the forwards
        assert got["listed"]["calls"] == got["unsized"]["calls"] + 1, got


@gloo
def test_one_tensor_parallel_replicas_pools_are_compared_as_they_go(results):
    """The ranks of one replica run every forward together (RowwiseParallel's all-reduce). Before, a loading
    failure on one rank, or pools of different lengths, left the other rank in a forward's all-reduce: the
    process-group timeout (or a gloo abort where it met the other rank's agreement)."""
    r0, r1 = _errors(results, "tp_fails_on_rank1")
    assert r1 == "OSError: batch 2 could not be read", r1
    assert r0.startswith("RuntimeError: SpectralLens: loading the pool's batches or their masks (mask_fn) failed on "
                         "global rank(s) [1]"), r0
    for error in _errors(results, "tp_unsized_longer_on_rank0"):  # rounds of one batch: rank 0's filled its round
        assert error.startswith("ValueError: SpectralLens: the ranks' pools gave different numbers of batches "
                                "(global rank 0: 3 or more, global rank 1: 2)"), error
    for error in _errors(results, "tp_listed_longer_on_rank0"):
        assert error.startswith("ValueError: SpectralLens: the ranks' pools gave different numbers of batches "
                                "(2 to 3)"), error


@gloo
def test_one_tensor_parallel_replicas_gradient_pools_are_compared_as_they_go(results):
    """Every rank of the replica runs the gradient protocol, each pass an all-reduce over the mesh. Before, a
    rank whose gradient pool ended first left the other in a pass's all-reduce (the process-group timeout)."""
    for error in _errors(results, "tp_gradient_pools_differ"):
        assert error.startswith("ValueError: SpectralLens: the ranks' gradient pools differ at batch 3: global rank "
                                "0: 4 samples, global rank 1: none left"), error


@gloo
def test_fsdp_with_tensor_parallelism_on_a_2d_mesh_is_refused(results):
    """Before: a wrong spectrum, silently (top eigenvalue of act:transformer.h.1 7.3807 against 7.5851)."""
    for error in _errors(results, "fsdp_and_tp_on_a_2d_mesh"):
        assert error.startswith("ValueError: SpectralLens: the model is sharded with FSDP and another parallelism on "
                                "a multi-dimensional mesh (transformer."), error
        assert "(dims ('dp', 'tp'))" in error, error
    for got in _ok(results, "hsdp"):  # HSDP's 2-D mesh: measured, not refused
        _assert_equal_spectra(got, _measure(_plain(), _pool(3)))


# ---------------------------------------------------------------- PEFT under FSDP2 (one process)
class _Sharded:
    """Stands in for ``torch.distributed.fsdp.FSDPModule``: ``fully_shard`` swaps a module's class for
    ``type(f"FSDP{cls.__name__}", (FSDPModule, cls), ...)``, a class defined in ``torch.distributed.fsdp``."""


def _as_fully_shard_does(module):
    cls = type(module)
    module.__class__ = type(f"FSDP{cls.__name__}", (_Sharded, cls), {})
    assert not type(module).__module__.startswith("peft")
    return module


def test_a_fully_sharded_peft_model_keeps_the_base_models_names():
    """fully_shard on a PeftModel (and its LoRA layers) changes their classes to subclasses defined in torch.
    Before, the lens no longer recognized the PeftModel: layers= and params= typed as for the base model
    matched nothing ('no module matches target model.layers.1'), and records carried base_model.model.
    (checked with a real fully_shard on one gloo rank too). Now the records and spectra equal the unsharded
    model's (float64)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def llama():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       tie_word_embeddings=False)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False,
                               modules_to_save=["lm_head"])
        return peft.get_peft_model(transformers.LlamaForCausalLM(cfg).double(), lora)

    g = torch.Generator().manual_seed(1)
    pool = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 61, (2, 3, 10), generator=g)]
    kwargs = {"layers": "model.layers.1", "params": ("model.layers.1.self_attn.o_proj.weight", "lm_head.weight"),
              "precision": "float64", "progress": False}
    want = SpectralLens(llama(), pool, **kwargs).measure(1, 1)
    model = llama()
    for m in [model, *model.base_model.model.model.layers, model.base_model.model.model.layers[1].self_attn.o_proj,
              model.base_model.model.lm_head]:
        _as_fully_shard_does(m)
    got = SpectralLens(model, pool, **kwargs).measure(1, 1)
    assert sorted(got.spectra) == sorted(want.spectra) == ["act:model.layers.1", "grad:lm_head.weight",
                                                           "grad:model.layers.1.self_attn.o_proj.weight"]
    for name, spectrum in want.spectra.items():
        assert got.spectra[name].n_rows == spectrum.n_rows
        torch.testing.assert_close(got.spectra[name].values, spectrum.values, rtol=1e-12, atol=1e-12 * spectrum.values.max().item())
