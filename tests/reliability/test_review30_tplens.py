"""Review 30 (tplens), 2 gloo ranks: the end of ``SpectralLens.measure`` (rank 0's summaries, window and pool
warnings and run-record write) and the callbacks' closed-writer decision (``LensDriver.measure``), with a
tensor-parallel model (a 1-D mesh of both ranks) and the lens's ``group`` each rank's own (one rank of the mesh), so
that the lens's agreement over its group does not reach the mesh peer.

Before (process-group timeout 20 s here; every failing case by the timeout, the ranks out of step afterwards):

* rank 0's ``writer.log_measurement`` raising (``OSError``, a full disk), or a warning there raised as an error
  (``-W error`` on rank 0), was agreed over rank 0's own group only: rank 1 returned the measurement and waited in
  the training's next forward (a collective of the mesh) until the timeout; under ``LensDriver.measure`` it waited
  in the driver's mesh all-reduce after the measurement instead;
* a Ctrl-C reaching one rank as the closed-writer broadcast returned (``LensDriver.measure``) raised there alone;
  its peer waited in the mesh's or-ing of that decision until the timeout.

Now the record's success is agreed with the mesh peers too (one ``all_reduce`` over the mesh, for such a group only;
none for a plain model, one replica or each rank alone: counted), and the closed-writer decision's failure rides in
its mesh all-reduce: every rank raises at once (the failed rank its own error, the peer a ``RuntimeError`` naming
the failed global rank and quoting its error).

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_tplens.py``
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch.distributed as dist
from reliability.test_review28_revtp import _counted
from reliability.test_review29_drivertp import _lens, _writer
from reliability.test_review29_drivertp2 import then_forward
from support.ranks import checked_case, run_gloo_cases

from spectral_lens._warnings import SpectralLensWarning
from spectral_lens.integrations import _driver
from spectral_lens.integrations._driver import LensDriver

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: every failing case by the timeout)
DEADLINE_S = 15.0
JOIN_S = 400.0
DISK_FULL = "no space left on device (simulated)"
WINDOW = "the tail window is short (simulated)"
RECORD = "summarizing or writing the run record (rank 0 writes it)"


def full_disk(writer) -> None:
    """``writer.log_measurement`` (the run record's measurement write) fails as on a full disk."""
    def log_measurement(*args, **kwargs):
        raise OSError(DISK_FULL)

    writer.log_measurement = log_measurement


def record_write_fails(writer, lens) -> dict:
    """A direct ``measure`` whose record write fails on rank 0; where it returns, the training's next forward."""
    if writer is not None:
        full_disk(writer)
    try:
        return then_forward(lens, functools.partial(lens.measure, 3, 3))
    finally:
        if writer is not None:
            writer.close()


def warning_as_error(lens) -> dict:
    """A window warning (given on every rank) raised as an error on global rank 0 only (its ``-W error``)."""
    def warn_window(*args, **kwargs):
        warnings.warn(WINDOW, SpectralLensWarning, stacklevel=2)

    lens._warn_window = warn_window
    with warnings.catch_warnings():
        warnings.simplefilter("error" if dist.get_rank() == 0 else "ignore")
        return then_forward(lens, functools.partial(lens.measure, 3, 3))


def driver_record_write_fails(writer, lens) -> dict:
    """:func:`record_write_fails` under the callbacks' driver."""
    if writer is not None:
        full_disk(writer)
    try:
        return then_forward(lens, functools.partial(LensDriver(lens, (), None).measure, 3, 3))
    finally:
        if writer is not None:
            writer.close()


def interrupted_closed_broadcast(lens, interrupted: int) -> dict:
    """``LensDriver.measure`` with a Ctrl-C reaching global rank ``interrupted`` as the closed-writer broadcast
    returns (the signal's ``KeyboardInterrupt`` is raised when the collective hands control back to Python)."""
    real = _driver.from_rank0

    def from_rank0(*args, **kwargs):
        value = real(*args, **kwargs)
        if dist.get_rank() == interrupted:
            raise KeyboardInterrupt
        return value

    _driver.from_rank0 = from_rank0
    try:
        return then_forward(lens, functools.partial(LensDriver(lens, (), None).measure, 3, 3))
    finally:
        _driver.from_rank0 = real


def _record_write_fails(rank: int) -> dict:
    writer = _writer(rank, "tplens_record")
    return record_write_fails(writer, _lens(rank, writer))


def _warning_as_error(rank: int) -> dict:
    return warning_as_error(_lens(rank))


def _driver_record_write_fails(rank: int) -> dict:
    writer = _writer(rank, "tplens_driver")
    return driver_record_write_fails(writer, _lens(rank, writer))


def _interrupted_on_rank0(rank: int) -> dict:
    return interrupted_closed_broadcast(_lens(rank), 0)


def _interrupted_on_rank1(rank: int) -> dict:
    return interrupted_closed_broadcast(_lens(rank), 1)


def _counts(rank: int) -> dict:
    """The collectives of ``measure`` (a successful record write: rank 0's writer) and of ``LensDriver.measure``:
    a plain model (the world group, each rank's own), one tensor-parallel replica, and the tensor-parallel model
    under each rank's own group."""
    out = {}
    for where, kwargs in (("plain_world", {"tp": False, "own": False}), ("plain_own", {"tp": False}),
                          ("replica", {"own": False}), ("tp_own", {})):
        writer = _writer(rank, f"tplens_counts_{where}")
        lens = _lens(rank, writer, **kwargs)
        out[where] = {"measure": _counted(functools.partial(lens.measure, 1, 1)),
                      "driver": _counted(functools.partial(LensDriver(lens, (), None).measure, 2, 2))}
        if writer is not None:
            writer.close()
    return out


CASES = {"counts": _counts, "record_write_fails": _record_write_fails, "warning_as_error": _warning_as_error,
         "driver_record_write_fails": _driver_record_write_fails, "interrupted_on_rank0": _interrupted_on_rank0,
         "interrupted_on_rank1": _interrupted_on_rank1}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tplens"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def quoted(failed: int, cause: str, what: str = RECORD) -> str:
    """The peers' ``RuntimeError`` naming global rank ``failed`` and quoting its error ``cause``."""
    return f"RuntimeError: SpectralLens: {what} failed on global rank(s) [{failed}] (global rank {failed}: {cause})"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [
    ("record_write_fails", f"OSError: {DISK_FULL}"),
    ("warning_as_error", f"SpectralLensWarning: {WINDOW}"),
    ("driver_record_write_fails", f"OSError: {DISK_FULL}"),
], ids=["log_measurement", "werror", "driver"])
def test_a_failure_of_rank_0s_record_write_raises_on_its_mesh_peer_before_the_next_forward(results, case, own):
    r0, r1 = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert r0 == own, r0
    assert r1.startswith(quoted(0, own)), r1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("interrupted", [0, 1])
def test_an_interrupt_in_the_closed_writer_broadcast_raises_on_the_mesh_peer_at_once(results, interrupted):
    got = [r["error"] or "" for r in checked_case(results, f"interrupted_on_rank{interrupted}", DEADLINE_S)]
    peer = 1 - interrupted
    assert got[interrupted] == "KeyboardInterrupt: ", got
    assert got[peer].startswith(
        f"RuntimeError: spectral-lens callback: deciding whether rank 0's run record is closed failed on a "
        f"tensor-parallel mesh peer of global rank {peer} (this rank) or in that peer's group=: on global rank "
        f"{interrupted} "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_more_per_measurement_for_a_group_of_one_rank_of_the_mesh_only(results):
    got = checked_case(results, "counts", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    # before review 30, counted alike (params=(): the settings agreement, the activation pass's agreements and
    # syncs, the window broadcast, the record's agreement); the driver adds its closed-writer broadcast (and its
    # mesh all-reduce under tp_own) and the sinks' agreement
    for r in got:
        for where, c in r["value"].items():
            more = 1 if where == "tp_own" else 0
            assert c["measure"] == _plus(BEFORE[where]["measure"], more), (where, c)
            assert c["driver"] == _plus(BEFORE[where]["driver"], more), (where, c)


def _plus(counts: dict, more: int) -> dict:
    return {**counts, "all_reduce": counts.get("all_reduce", 0) + more} if more else counts


BEFORE = {  # main at a82507a, counted by this module's _counts
    "plain_world": {"measure": {"all_reduce": 16, "broadcast_object_list": 1},
                    "driver": {"all_reduce": 17, "broadcast_object_list": 2}},
    "plain_own": {"measure": {}, "driver": {}},
    "replica": {"measure": {"all_reduce": 10, "broadcast_object_list": 1},
                "driver": {"all_reduce": 11, "broadcast_object_list": 2}},
    "tp_own": {"measure": {"all_reduce": 7}, "driver": {"all_reduce": 9}},
}
