"""``sync`` failure modes across 2 gloo ranks: every rank raises the same error within seconds.

Before the fix, a rank that could not join raised before any collective while the other waited in
``all_reduce`` until the process-group timeout, and mismatched ``nonfinite`` policies gave one rank
an error and the other a result. Each test runs its ranks as plain processes with a short
process-group timeout and joins them with a deadline, so a regression fails instead of blocking CI.
"""

from __future__ import annotations

import time

import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator

from support.ranks import case_results, gloo_group, run_ranks, write_case

DEADLINE_S = 10.0  # the promise: every rank has raised within this many seconds of calling sync()
JOIN_S = 90.0  # process start-up (imports) plus the deadline; a hang fails the test here


# per case: the accumulator arguments and rows of rank 0 and rank 1
CASES = {
    "empty_rank_without_dim": ((dict(), 5), (dict(), 0)),
    "mismatched_width": ((dict(), 5), (dict(), 5, 7)),
    "mismatched_nonfinite": ((dict(nonfinite="raise"), 5), (dict(nonfinite="skip"), 5)),
    "mismatched_precision": ((dict(precision="exact"), 5), (dict(precision="float64"), 5)),
    "already_synced_on_one_rank": ((dict(), 5), (dict(), 5)),
}


def _one_case(rank: int, case: str) -> dict:
    kwargs, rows, *width = CASES[case][rank]
    d = width[0] if width else 5
    acc = ActivationCovarianceAccumulator(**kwargs)
    if rows:
        acc.update(torch.randn(rows, d, dtype=torch.float64) + 100.0)
    if case == "already_synced_on_one_rank":
        acc._synced = rank == 1  # as after an earlier sync() without reset() on this rank only
    start = time.monotonic()
    try:
        acc.sync()
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded for the parent to compare
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "seconds": time.monotonic() - start}


def _worker(rank: int, port: int, out: str) -> None:
    # every case in one process group: after a refused sync the ranks have made the same collectives,
    # so the group stays usable (a broken agreement would show up as a hang or a mismatch here)
    with gloo_group(rank, port, 2, 30):
        for case in sorted(CASES):
            write_case(out, case, rank, _one_case(rank, case))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("sync")
    hung = run_ranks(_worker, 2, out, JOIN_S)
    found = case_results(out, CASES, 2)
    found["_hung"] = hung
    return found


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_raises_the_same_error_quickly(case, results):
    got = results[case]
    assert None not in got, f"{case}: no result from rank(s) {[r for r in range(2) if got[r] is None]}; " \
        f"ranks still running after {JOIN_S} s (killed): {results['_hung']}"
    errors = [r["error"] for r in got]
    assert errors[0] is not None and errors[1] is not None, f"{case}: {errors}"
    assert errors[0] == errors[1], f"{case}: ranks raised different errors: {errors}"
    assert all(r["seconds"] < DEADLINE_S for r in got), [r["seconds"] for r in got]
    expected = {
        "empty_rank_without_dim": "saw no rows and has no dim",
        "mismatched_width": "disagree on d",
        "mismatched_nonfinite": "disagree on nonfinite",
        "mismatched_precision": "disagree on precision",
        "already_synced_on_one_rank": "already synced",
    }[case]
    assert expected in errors[0]
