"""``sync`` across gloo ranks with lopsided shares: against a float64 one-process reference, and a
collective that fails part-way.

``tests/core/test_sync.py`` checks uneven pools, very different means and an empty rank (with
``dim=``); these cases add a rank whose mask drops every row (dim inferred), a rank of one row,
NaN/Inf rows on one rank under ``nonfinite="skip"``, a sub-group, and a sync whose collective fails
after the status agreement (a peer that stopped answering): before the fix, an accumulator without
rows came out of that failed sync initialized (a zero state pinned to the collective's device)
instead of as it was. Ranks run as plain processes joined with a deadline, so a hang fails the test.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens._sync import _sync_status

from support.ranks import case_results, free_port, gloo_group, run_ranks, write_case

D = 5
JOIN_S = 90.0  # process start-up (imports) plus the cases, the failing one's included; a hang fails the test here


def _rows(rank: int, n: int, mean: float) -> np.ndarray:
    rng = np.random.default_rng(200 + rank)
    return rng.standard_normal((n, D)) * np.linspace(1.0, 0.01, D) + mean


# rank 0: 6 rows, all masked out; rank 1: one row near 1e6; rank 2: 30 rows near -1e6
_MASKED = {0: (_rows(0, 6, 0.0), False), 1: (_rows(1, 1, 1e6), True), 2: (_rows(2, 30, -1e6), True)}


def _nan_rows(rank: int) -> np.ndarray:  # rank 1 alone has NaN/Inf rows (2 of its 8)
    x = _rows(10 + rank, 8, 1e6 * rank)
    if rank == 1:
        x[2, 1], x[5, 4] = np.nan, np.inf
    return x


def _accumulator_cases(rank: int) -> dict:
    out = {}
    x, keep = _MASKED[rank]
    acc = ActivationCovarianceAccumulator(precision="float64")  # dim inferred on every rank, rows or not
    acc.update(torch.from_numpy(x), torch.full((len(x),), keep))
    acc.sync()
    out["masked_and_one_row"] = {"cov": acc.covariance().tolist(), "n": acc.n_rows}

    acc = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
    acc.update(torch.from_numpy(_nan_rows(rank)))
    acc.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spectrum = acc.compute()
    out["skip_nan_on_one_rank"] = {"cov": acc.covariance().tolist(), "n": acc.n_rows,
                                   "skipped": spectrum.metadata["skipped_rows"],
                                   "warned": [str(w.message) for w in caught]}

    acc = ActivationCovarianceAccumulator(D, precision="float64")  # nonfinite="raise"
    acc.update(torch.from_numpy(_rows(30 + rank, 6, 0.0)))
    if rank == 1:
        acc.update(torch.from_numpy(_nan_rows(1)))  # this rank's update #1 has NaN/Inf rows
    acc.sync()
    try:
        acc.compute()
        out["raise_nan_on_one_rank"] = {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the parent
        out["raise_nan_on_one_rank"] = {"error": f"{type(exc).__name__}: {exc}"}

    # user-built accumulators over different layers of one width: rank 1 names another layer
    acc = ActivationCovarianceAccumulator(D, precision="float64", name="blocks.1" if rank == 1 else "blocks.0")
    acc.update(torch.from_numpy(_rows(40 + rank, 6, 0.0)))
    try:
        acc.sync()
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded for the parent
        error = f"{type(exc).__name__}: {exc}"
    out["different_names"] = {"error": error, "n": acc.n_rows, "synced": acc._synced}
    acc = ActivationCovarianceAccumulator(D, precision="float64", name="blocks.0")  # same name: syncs
    acc.update(torch.from_numpy(_rows(40 + rank, 6, 0.0)))
    out["same_names"] = {"n": acc.sync().n_rows}

    group = dist.new_group([0, 2])  # every rank creates it; rank 1 is not a member and does not sync
    if rank != 1:
        acc = ActivationCovarianceAccumulator(D, precision="float64")
        acc.update(torch.from_numpy(_rows(20 + rank, 7 + 9 * rank, 1e6 * rank)))
        acc.sync(group)
        out["subgroup"] = {"cov": acc.covariance().tolist(), "n": acc.n_rows}
    else:
        out["subgroup"] = {}
    return out


def _worker(rank: int, port: int, out: str) -> None:
    """The 3-rank cases; then ranks 0 and 1 of the same processes run the failing-collective case in a
    fresh 2-rank group on a port rank 0 picked (one process start per rank for the whole module)."""
    with gloo_group(rank, port, 3, 30):
        for case, result in _accumulator_cases(rank).items():
            write_case(out, case, rank, result)
        second = [free_port() if rank == 0 else None]
        dist.broadcast_object_list(second, src=0)
    if rank < 2:
        _failing_worker(rank, second[0], out)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sync_ranks")
    hung = run_ranks(_worker, 3, out, JOIN_S)
    return {"_hung": hung, **case_results(out, [*CASES, "failed_collective"], 3)}


CASES = ["masked_and_one_row", "skip_nan_on_one_rank", "raise_nan_on_one_rank", "different_names", "same_names",
         "subgroup"]


def _close(cov, rows: np.ndarray) -> None:
    ref = np.cov(rows, rowvar=False)
    scale = np.linalg.eigvalsh(ref)[-1]
    assert np.abs(np.asarray(cov) - ref).max() <= 1e-12 * scale


def _got(results, case) -> list[dict]:
    got = results[case]
    assert None not in got, f"{case}: no result from some rank; hung (killed): {results['_hung']}"
    return got


@pytest.mark.distributed
def test_masked_rank_and_one_row_rank_equal_one_process(results):
    rows = np.concatenate([x for x, keep in _MASKED.values() if keep])
    for r in _got(results, "masked_and_one_row"):
        assert r["n"] == 31
        _close(r["cov"], rows)


@pytest.mark.distributed
def test_skipped_rows_on_one_rank_are_dropped_and_counted_everywhere(results):
    rows = np.concatenate([_nan_rows(r) for r in range(3)])
    rows = rows[np.isfinite(rows).all(1)]
    for r in _got(results, "skip_nan_on_one_rank"):
        assert r["n"] == 22 and r["skipped"] == 2
        assert any("skipped 2 rows containing NaN/Inf (first in global rank 1's update #0)" in w
                   for w in r["warned"]), r["warned"]
        _close(r["cov"], rows)


@pytest.mark.distributed
def test_nonfinite_rows_of_one_rank_are_named_by_rank_on_every_rank(results):
    """After a sync the NaN/Inf error is raised on every rank; it said "update #1" there, which on the
    ranks without NaN rows named one of their own clean updates (or one they never made). Now it
    names the rank the rows came from and that rank's update."""
    for r in _got(results, "raise_nan_on_one_rank"):
        assert r["error"] is not None and r["error"].startswith("NonFiniteError"), r
        assert "non-finite values (NaN/Inf) in the rows of global rank 1's update #1 (0-based)" in r["error"], r


@pytest.mark.distributed
def test_accumulators_of_different_layers_are_refused_on_every_rank(results):
    """Accumulators named after different layers (of the same width) were summed silently; now every
    rank refuses at the status agreement, naming its own layer, keeps its rows, and the ranks stay in
    step (the sub-group sync after it completes). The same names sync as before."""
    for rank, r in enumerate(_got(results, "different_names")):
        name = "blocks.1" if rank == 1 else "blocks.0"
        assert r["error"] is not None and r["error"].startswith("ValueError"), r
        assert f"different names (this rank's: {name!r})" in r["error"], r
        assert (r["n"], r["synced"]) == (6, False), r
    assert [r["n"] for r in _got(results, "same_names")] == [18, 18, 18]


@pytest.mark.distributed
def test_subgroup_sync_equals_one_process_over_its_members(results):
    got = _got(results, "subgroup")
    rows = np.concatenate([_rows(20 + r, 7 + 9 * r, 1e6 * r) for r in (0, 2)])
    for r in (got[0], got[2]):
        assert r["n"] == len(rows)
        _close(r["cov"], rows)


PG_TIMEOUT_S = 3  # the failing collective of the case below times out after this


def _failing_worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, port, 2, PG_TIMEOUT_S):
        if rank == 0:  # no rows, dim= given: joins with a zero state
            acc = ActivationCovarianceAccumulator(D)
            start = time.monotonic()
            try:
                acc.sync()
                error = None
            except Exception as exc:  # noqa: BLE001 - recorded for the parent
                error = f"{type(exc).__name__}: {exc}"
            result = {"error": error, "seconds": time.monotonic() - start, "initialized": acc.initialized,
                      "synced": acc._synced, "dim": acc.dim}
            acc.update(torch.randn(4, D, dtype=torch.float64))  # still usable for rows of its own
            result["n_after_update"] = acc.n_rows
            write_case(out, "failed_collective", rank, result)
        else:  # agrees on the status, then stops answering (a rank that died or hangs elsewhere)
            acc = ActivationCovarianceAccumulator(D)
            acc.update(torch.randn(4, D, dtype=torch.float64))
            _sync_status(None, torch.device("cpu"), acc._label(), acc.name, acc.dim, acc.nonfinite, acc.precision,
                         acc._synced)
            # silent until rank 0 has given up on the collective and recorded what it saw (at most
            # PG_TIMEOUT_S + 4 s, the fixed sleep this was: ~4 s of it spent after rank 0 was done)
            deadline = time.monotonic() + PG_TIMEOUT_S + 4
            while not Path(out, "failed_collective.rank0.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            write_case(out, "failed_collective", rank, {})


@pytest.mark.distributed
def test_a_sync_failing_part_way_leaves_the_state_as_it_was(results):
    got = results["failed_collective"][0]  # run by ranks 0 and 1 after the module's 3-rank cases
    assert got is not None, f"rank 0 gave no result; hung (killed): {results['_hung']}"
    assert got["error"] is not None and got["seconds"] < PG_TIMEOUT_S + 10, got
    assert (got["initialized"], got["synced"], got["dim"]) == (False, False, D), got
    assert got["n_after_update"] == 4
