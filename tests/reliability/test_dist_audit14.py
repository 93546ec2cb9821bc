"""Fourteenth audit, across 2 gloo ranks: ``sync`` of a named accumulator on one rank and an unnamed one on
the other, and a tensor-parallel (``DTensor``) module output reaching a capture.

Before the fixes: the names were compared only when every rank's accumulator had one, so a named and an
unnamed accumulator (most likely other layers of one width) were summed silently; a ``DTensor`` output
failed deep inside the accumulator with ``RuntimeError: .numpy() is not supported for tensor subclasses``
(naming neither the module nor what to do).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator

from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 30
DEADLINE_S = 10.0
JOIN_S = 240.0


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(5 + rank, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)


def _named_and_unnamed(rank: int) -> dict:
    acc = ActivationCovarianceAccumulator(name="h.1" if rank == 0 else None)
    acc.update(_rows(rank))
    error = None
    try:
        acc.sync()
    except ValueError as exc:
        error = str(exc)
    return {"error": error, "n": acc.n_rows, "synced": acc._synced}


def _both_unnamed(rank: int) -> int:
    acc = ActivationCovarianceAccumulator()
    acc.update(_rows(rank))
    return acc.sync().n_rows


def _dtensor_api() -> tuple:
    """``(DeviceMesh, Shard, distribute_tensor)``: public in ``torch.distributed.tensor`` from torch 2.5, in
    ``torch.distributed._tensor`` in torch 2.4 (tools/check_floors.sh)."""
    try:
        from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DeviceMesh, Shard, distribute_tensor
    return DeviceMesh, Shard, distribute_tensor


class _Sharded(nn.Module):
    """A tensor-parallel layer in miniature: a linear map whose output is a DTensor sharded over the features."""

    def __init__(self, mesh) -> None:
        super().__init__()
        self.mesh = mesh
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 6).double()

    def forward(self, x):
        _, Shard, distribute_tensor = _dtensor_api()
        return distribute_tensor(self.lin(x), self.mesh, [Shard(1)])


def _dtensor_output(rank: int) -> dict:
    DeviceMesh = _dtensor_api()[0]

    model = nn.Sequential(_Sharded(DeviceMesh("cpu", list(range(WORLD)))))
    x = _rows(0)  # the same input on every rank, as tensor parallelism runs it
    out = {}
    with sl.attach(model, "0") as capture:
        try:
            with torch.no_grad():
                model(x)
        except TypeError as exc:
            out["hook"] = str(exc)
        out["hook_rows"] = capture.accumulators["0"].n_rows
    try:
        with torch.no_grad():
            ActivationCovarianceAccumulator(name="direct").update(model(x))
    except TypeError as exc:
        out["update"] = str(exc)
    # the remedy the error names: the whole tensor, gathered in the pick (every rank runs the forward)
    with sl.attach(model, "0", pick=lambda o: o.full_tensor(), precision="float64") as capture:
        with torch.no_grad():
            model(x)
        out["full"] = capture.compute()["0"].values.tolist()
    with torch.no_grad():
        y = model[0].lin(x)
    out["want"] = np.linalg.eigvalsh(np.cov(y.numpy().T))[::-1].tolist()
    return out


def _lens_in_a_tensor_parallel_mesh(rank: int) -> dict:
    """A lens on each rank of one tensor-parallel mesh (one replica: its data-parallel group is the rank
    alone), reading the sharded output whole with pick=full_tensor (the ranks run the same batches)."""
    DeviceMesh = _dtensor_api()[0]

    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    model = nn.Sequential(_Sharded(DeviceMesh("cpu", list(range(WORLD)))))
    pool = [_rows(0), _rows(1)]
    out = {}
    lens = sl.SpectralLens(model, pool, layers="0", params=(), mask_fn=None, progress=False, group=groups[rank])
    try:
        lens.measure(0, 0)
    except TypeError as exc:
        out["refused"] = str(exc)
    lens = sl.SpectralLens(model, pool, layers="0", params=(), mask_fn=None, progress=False, group=groups[rank],
                           pick=lambda o: o.full_tensor())
    out["full"] = lens.measure(0, 0).spectra["act:0"].values.tolist()
    with torch.no_grad():
        y = model[0].lin(torch.cat(pool))
    out["want"] = np.linalg.eigvalsh(np.cov(y.numpy().T))[::-1].tolist()
    return out


CASES = {
    "named_and_unnamed": _named_and_unnamed,
    "both_unnamed": _both_unnamed,
    "dtensor_output": _dtensor_output,
    "lens_in_a_tensor_parallel_mesh": _lens_in_a_tensor_parallel_mesh,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    # DTensor's import (seconds) is not part of a case
    return run_gloo_cases(tmp_path_factory.mktemp("dist_audit14"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor")


def _values(results, case, deadline: bool = True) -> list:
    # with deadline: a refused sync, so every rank raises at once, none waits for the process-group timeout
    got = checked_case(results, case, DEADLINE_S if deadline else None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    return [r["value"] for r in got]


@pytest.mark.distributed
def test_a_named_and_an_unnamed_accumulator_are_refused_on_every_rank(results):
    got = _values(results, "named_and_unnamed")
    for rank, r in enumerate(got):
        assert r["error"] is not None, f"rank {rank} summed a named and an unnamed accumulator: {r}"
        assert "have a name and others none" in r["error"], r
        assert f"(this rank's: {'h.1' if rank == 0 else None!r})" in r["error"], r
        assert r["n"] == 5 + rank and not r["synced"]  # the refused sync left the state as it was
    assert _values(results, "both_unnamed") == [11, 11]  # unnamed on every rank: summed as before


@pytest.mark.distributed
def test_a_dtensor_output_is_refused_naming_the_module_and_full_tensor_measures_it(results):
    for r in _values(results, "dtensor_output", deadline=False):  # DTensor's first use takes seconds
        assert r["hook"].startswith("0: the module output is a DTensor"), r["hook"]
        assert "pick=lambda out: out.full_tensor()" in r["hook"] and "Shard(dim=1)" in r["hook"]
        assert r["hook_rows"] == 0
        assert r["update"].startswith("direct: the input is a DTensor") and "update(x.full_tensor())" in r["update"]
        np.testing.assert_allclose(r["full"], r["want"], rtol=1e-10, atol=1e-12 * r["want"][0])


@pytest.mark.distributed
def test_a_lens_per_rank_of_a_tensor_parallel_mesh_measures_the_whole_output_with_full_tensor(results):
    for r in _values(results, "lens_in_a_tensor_parallel_mesh", deadline=False):
        assert r["refused"].startswith("0: the module output is a DTensor"), r["refused"]
        np.testing.assert_allclose(r["full"], r["want"], rtol=1e-10, atol=1e-12 * r["want"][0])
