"""Review 30 (tplens), 4 gloo ranks: the end of ``SpectralLens.measure`` (rank 0's summaries, warnings and run-record
write) with two data-parallel replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``: meshes [0, 1] and [2, 3]) and
``group=`` the data-parallel group ([0, 2] and [1, 3]); only global rank 0 has a ``RunWriter``.

Before (process-group timeout 20 s): a failed record write (``OSError``) or a warning raised as an error on global
rank 0 raised on ranks 0 and 2 (their group's agreement) while ranks 1 and 3 returned the measurement and waited in
the next forward of the tensor-parallel model (or, under ``LensDriver.measure``, in the driver's mesh all-reduce)
until the timeout. Now all four raise at once: rank 0 its own error, rank 1 (its mesh peer) a ``RuntimeError``
quoting it, rank 2 its group's ``RuntimeError`` naming global rank 0, rank 3 its group's naming global rank 1. One
``all_reduce`` more per measurement (counted).

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_tplens_dp.py``
"""

from __future__ import annotations

import functools

import pytest
from reliability.test_review28_revtp import _counted
from reliability.test_review29_drivertp import _writer
from reliability.test_review29_drivertp_dp import _lens
from reliability.test_review30_tplens import (
    DISK_FULL,
    RECORD,
    WINDOW,
    driver_record_write_fails,
    quoted,
    record_write_fails,
    warning_as_error,
)
from support.ranks import checked_case, run_gloo_cases

from spectral_lens.integrations._driver import LensDriver

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _record_write_fails(rank: int) -> dict:
    writer = _writer(rank, "tplens_record_dp")
    return record_write_fails(writer, _lens(rank, writer))


def _warning_as_error(rank: int) -> dict:
    return warning_as_error(_lens(rank))


def _driver_record_write_fails(rank: int) -> dict:
    writer = _writer(rank, "tplens_driver_dp")
    return driver_record_write_fails(writer, _lens(rank, writer))


def _counts(rank: int) -> dict:
    """The collectives of a successful ``measure`` and ``LensDriver.measure`` (global rank 0's writer)."""
    writer = _writer(rank, "tplens_counts_dp")
    lens = _lens(rank, writer)
    out = {"measure": _counted(functools.partial(lens.measure, 1, 1)),
           "driver": _counted(functools.partial(LensDriver(lens, (), None).measure, 2, 2))}
    if writer is not None:
        writer.close()
    return out


CASES = {"counts": _counts, "record_write_fails": _record_write_fails, "warning_as_error": _warning_as_error,
         "driver_record_write_fails": _driver_record_write_fails}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tplens_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [
    ("record_write_fails", f"OSError: {DISK_FULL}"),
    ("warning_as_error", f"SpectralLensWarning: {WINDOW}"),
    ("driver_record_write_fails", f"OSError: {DISK_FULL}"),
], ids=["log_measurement", "werror", "driver"])
def test_a_failure_of_global_rank_0s_record_write_raises_on_all_four_ranks_before_the_next_forward(results, case,
                                                                                                  own):
    got = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert got[0] == own, got
    assert got[1].startswith(quoted(0, own)), got
    assert got[2].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [0]; "), got
    assert got[3].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [1]; "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_more_per_measurement_under_a_data_parallel_group_of_a_tensor_parallel_model(results):
    got = checked_case(results, "counts", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    before = {"measure": BEFORE_MEASURE, "driver": BEFORE_DRIVER}  # main at a82507a, counted by _counts
    for r in got:
        for where, c in r["value"].items():
            assert c == {**before[where], "all_reduce": before[where]["all_reduce"] + 1}, (where, c)


BEFORE_MEASURE = {"all_reduce": 22, "broadcast_object_list": 1}
BEFORE_DRIVER = {"all_reduce": 25, "broadcast_object_list": 2}
