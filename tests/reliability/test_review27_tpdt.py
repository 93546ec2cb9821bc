"""Review 27 (tpdt): tensor parallelism as torchtitan-style users run it, 2 gloo CPU ranks.

The model and references are those of ``test_tensor_parallel.py`` (Megatron-style MLPs: ``c_fc``
``ColwiseParallel``, ``c_proj`` ``RowwiseParallel``, over a 1-D mesh of both ranks; float64 references from
the plain model in one process).

Before the fixes, under a ``group=`` holding one rank of the mesh (each rank's own group, or the data-parallel
group of a 2-D mesh), whose agreement does not reach the mesh's other ranks:

* other layers on the two ranks (``["h.0"]`` and ``["h.0", "h.1"]``; also under the default group with a pool
  without ``len``): the replication check all-reduced digests of different sizes, gloo aborted rank 0's
  process (``op.preamble.length <= op.nbytes. 56 vs 32 ... collective mismatch``) and rank 1 failed with
  ``Connection reset by peer``;
* pools of 4 and 3 batches: rank 0 ran a fourth forward alone, gloo aborted its process (``1536 vs 8``);
* gradient pools of 2 and 1 batches: rank 1 returned a spectrum, rank 0 waited in its second batch's forward
  until the 20 s process-group timeout.

Now each raises the same ``ValueError`` on both ranks (the pools' counts before any forward). Regression
guards (they passed before): padding masks on a tensor-parallel model, ``weight_spectra`` of the
``ColwiseParallel``/``RowwiseParallel`` shards (the full matrices' spectra on every rank), a tensor-parallel
model compiled with ``torch.compile(backend="eager")``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spectral_lens import SpectralLens
from spectral_lens.weights import weight_spectra

from support.ranks import checked_case, run_gloo_cases

from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values

WORLD = 2
PG_TIMEOUT_S = 20
JOIN_S = 300.0


def _masked_pool():
    """The pool with a padding mask per batch (the last positions of some sequences padded)."""
    out = []
    for i, (x, y) in enumerate(_pool()):
        mask = torch.ones(x.shape, dtype=torch.bool)
        mask[i % 4, 12 - 2 * (i + 1):] = False
        out.append({"x": x, "mask": mask})
    return out


def _fwd(model, batch):
    return model(batch["x"])


def _masked(rank: int) -> dict:
    lens = SpectralLens(_tp(_plain(), _mesh()), _masked_pool(), layers=LAYERS, params=(), precision="float64",
                        mask_fn=lambda b: b["mask"], forward_fn=_fwd, progress=False)
    return _values(lens.measure(1, 1))


def _weights(rank: int) -> dict:
    model = _tp(_plain(), _mesh())
    return {k: {"values": s.values.tolist(), "n_rows": s.n_rows, "shape": s.metadata["matrix_shape"]}
            for k, s in weight_spectra(model).items()}


def _compiled(rank: int) -> dict:
    model = torch.compile(_tp(_plain(), _mesh()), backend="eager")
    lens = SpectralLens(model, _pool(), layers=LAYERS, params="lm_head.weight", precision="float64", mask_fn=None,
                        progress=False)
    return _values(lens.measure(1, 1))


def _other_layers_own_groups(rank: int) -> dict:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    lens = SpectralLens(_tp(_plain(), _mesh()), _pool(), layers=["h.0"] if rank == 0 else LAYERS, params=(),
                        precision="float64", mask_fn=None, progress=False, group=groups[rank])
    return _values(lens.measure(1, 1))


class _NoLen:
    """A re-iterable pool without ``len`` (the lens cannot compare the ranks' layers before the pass)."""

    def __iter__(self):
        return iter(_pool())


def _other_layers_world(rank: int) -> dict:
    lens = SpectralLens(_tp(_plain(), _mesh()), _NoLen(), layers=["h.0"] if rank == 0 else LAYERS, params=(),
                        precision="float64", mask_fn=None, progress=False)
    return _values(lens.measure(1, 1))


def _other_lengths_own_groups(rank: int) -> dict:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    lens = SpectralLens(_tp(_plain(), _mesh()), _pool(4 if rank == 0 else 3), layers=LAYERS, params=(),
                        precision="float64", mask_fn=None, progress=False, group=groups[rank])
    return _values(lens.measure(1, 1))


def _other_gradient_pools_own_groups(rank: int) -> dict:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    lens = SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, params="lm_head.weight",
                        gradient_pool=_pool(2 if rank == 0 else 1, seed=5), precision="float64", mask_fn=None,
                        progress=False, group=groups[rank])
    return _values(lens.measure(1, 1))


CASES = {
    "masked": _masked,
    "weights": _weights,
    "compiled": _compiled,
    "other_layers_own_groups": _other_layers_own_groups,
    "other_layers_world": _other_layers_world,
    "other_lengths_own_groups": _other_lengths_own_groups,  # last: on the old code gloo aborted rank 0's process
    "other_gradient_pools_own_groups": _other_gradient_pools_own_groups,  # old code: rank 0 waited 20 s
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tpdt"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _got(results, case) -> list:
    got = checked_case(results, case, None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    return [r["value"] for r in got]


def _reference(pool, forward=lambda m, b: m(b[0]), masks=None) -> dict:
    """The plain model's activation spectra over ``pool`` (numpy's covariance of the valid rows, float64)."""
    model, out = _plain(), {}
    for layer in LAYERS:
        rows = []
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: rows.append(o.detach()))
        with torch.no_grad():
            for b in pool:
                forward(model, b)
        handle.remove()
        if masks is not None:
            rows = [r[m] for r, m in zip(rows, masks)]
        x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).numpy()
        out[f"act:{layer}"] = {"values": np.linalg.eigvalsh(np.cov(x.T))[::-1].tolist(), "n_rows": len(x)}
    return out


def _assert_spectra(got: dict, want: dict, where: str) -> None:
    assert sorted(want) == sorted(k for k in got if k in want), where
    for name, w in want.items():
        assert got[name]["n_rows"] == w["n_rows"], (where, name, got[name]["n_rows"], w["n_rows"])
        np.testing.assert_allclose(got[name]["values"], w["values"], rtol=1e-9, atol=1e-12 * w["values"][0],
                                   err_msg=f"{where} {name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_padding_masks_on_a_tensor_parallel_model_equal_the_plain_models_valid_rows(results):
    pool = _masked_pool()
    want = _reference(pool, _fwd, [b["mask"] for b in pool])
    assert want["act:h.0"]["n_rows"] < 192  # some positions are padding
    for rank, got in enumerate(_got(results, "masked")):
        _assert_spectra(got, want, f"rank {rank}, masked")


@pytest.mark.slow
@pytest.mark.distributed
def test_weight_spectra_of_sharded_weights_are_the_full_matrices_on_every_rank(results):
    plain = weight_spectra(_plain())
    for rank, got in enumerate(_got(results, "weights")):
        assert sorted(got) == sorted(plain), rank
        for name, w in plain.items():
            assert got[name]["shape"] == w.metadata["matrix_shape"], (rank, name, got[name]["shape"])
            np.testing.assert_allclose(got[name]["values"], w.values.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=f"rank {rank} {name}")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_compiled_tensor_parallel_model_measures_the_plain_models_spectra(results):
    want = _reference(_pool())
    for rank, got in enumerate(_got(results, "compiled")):
        _assert_spectra(got, want, f"rank {rank}, torch.compile(eager)")
        assert got["grad:lm_head.weight"]["n_rows"] == 16, got["grad:lm_head.weight"]["n_rows"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["other_layers_world", "other_layers_own_groups"])
def test_other_layers_on_the_ranks_of_one_mesh_raise_the_same_error_on_every_rank(results, case):
    """Rank 0 measures ["h.0"], rank 1 ["h.0", "h.1"]: under the default group (a pool without len) and
    under each rank's own group, both ranks raise a ValueError naming their layers and meet in step."""
    got = checked_case(results, case, None)
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith("ValueError: SpectralLens:"), (rank, r)
        mine = "['h.0']" if rank == 0 else "['h.0', 'h.1']"
        assert "different layers" in r["error"] and mine in r["error"], (rank, r["error"])


@pytest.mark.slow
@pytest.mark.distributed
def test_pools_of_other_lengths_on_the_ranks_of_one_mesh_are_refused_before_any_forward(results):
    """Each rank's own group (the documented data-parallel group of a single replica), pools of 4 and 3 batches."""
    got = checked_case(results, "other_lengths_own_groups", None)
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith("ValueError: SpectralLens: the tensor-parallel ranks "
                                                                "[0, 1] would run different numbers of forwards "
                                                                f"(this rank: {4 - rank},"), (rank, r)


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_pools_of_other_lengths_on_the_ranks_of_one_mesh_are_refused_before_the_protocol(results):
    got = checked_case(results, "other_gradient_pools_own_groups", 15.0)  # before: a 20 s process-group timeout
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith("ValueError: SpectralLens: the tensor-parallel ranks "
                                                                "[0, 1] would run different numbers of gradient "
                                                                f"samples (gradient_pool) (this rank: {8 - 4 * rank},"), (rank, r)
