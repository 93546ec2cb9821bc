"""Review 29 (drivertp2), 2 gloo ranks: rank 0's agreed work in the integrations' driver (``LensDriver.
_agreed_on_rank0``: a measurement's sinks and the loggers, the run record's ``train_loss``/``val_loss`` writes, pending
warnings raised as errors) with a tensor-parallel model (a 1-D mesh of both ranks) and the lens's ``group`` each
rank's own (one rank of the mesh), so that the agreement over the group does not reach the mesh peer.

Before (process-group timeout 20 s here): rank 0's failure (its writer's ``log`` raising ``OSError``, a full disk, in
``record_train_loss``; a sink raising in ``log_measurement``) raised on rank 0 only, while rank 1 returned and went
into the training's next step, a forward of the tensor-parallel model, alone: it waited there until the timeout. Now
the success is agreed with the mesh peers too (one ``all_reduce`` over the mesh, for such a group only; none for a
plain model or one replica, counted): rank 0 raises its own error, rank 1 a ``RuntimeError`` naming global rank 0 and
what failed, at once, and no forward is left waiting.
"""

from __future__ import annotations

import functools

import pytest
from reliability.test_review28_revtp import _counted
from reliability.test_review29_drivertp import _lens, _writer
from reliability.test_tensor_parallel import _pool
from support.ranks import checked_case, run_gloo_cases

from spectral_lens.integrations._driver import LensDriver

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: both failing cases by the timeout)
DEADLINE_S = 15.0
JOIN_S = 400.0
DISK_FULL = "no space left on device (simulated)"
SINK = "the sink failed (simulated)"


def failing_log(writer) -> None:
    """``writer.log`` (a run record's ``log.jsonl`` append) fails as on a full disk."""
    def log(*args, **kwargs):
        raise OSError(DISK_FULL)

    writer.log = log


class FailingSink:
    """A sink whose ``log_measurement`` raises on global rank 0 only."""

    def log_measurement(self, measurement, tail=None, head=None) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            raise RuntimeError(SINK)


def then_forward(lens, work) -> dict:
    """``work()``; where it returns, the training's next step: a forward of the (tensor-parallel) model."""
    work()
    lens.model(_pool(1)[0][0])
    return {"forward": True}


def train_loss_fails(writer, lens) -> dict:
    driver = LensDriver(lens, (), None)
    if writer is not None:
        failing_log(writer)
    try:
        return then_forward(lens, functools.partial(driver.record_train_loss, 5, 1.5, 40))
    finally:
        if writer is not None:
            writer.close()


def sink_fails(lens) -> dict:
    driver = LensDriver(lens, (FailingSink(),), None)
    return then_forward(lens, functools.partial(driver.measure, 3, 3))


def _train_loss_fails(rank: int) -> dict:
    writer = _writer(rank, "train_loss")
    return train_loss_fails(writer, _lens(rank, writer))


def _sink_fails(rank: int) -> dict:
    return sink_fails(_lens(rank))


def _counts(rank: int) -> dict:
    """The collectives of ``record_train_loss`` and ``record_val_loss`` (a successful write: rank 0's writer): a plain
    model (the world group, each rank's own), one tensor-parallel replica, and the tensor-parallel model under each
    rank's own group."""
    out = {}
    for where, kwargs in (("plain_world", {"tp": False, "own": False}), ("plain_own", {"tp": False}),
                          ("replica", {"own": False}), ("tp_own", {})):
        writer = _writer(rank, f"counts_{where}")
        driver = LensDriver(_lens(rank, writer, **kwargs), (), 8)
        out[where] = {"train": _counted(functools.partial(driver.record_train_loss, 1, 2.5, 8)),
                      "val": _counted(functools.partial(driver.record_val_loss, 1, 8, 2.0))}
        if writer is not None:
            writer.close()
    return out


CASES = {"counts": _counts, "train_loss_fails": _train_loss_fails, "sink_fails": _sink_fails}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("drivertp2"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def peer_error(what: str, rank: int, failed: int = 0) -> str:
    return (f"RuntimeError: spectral-lens callback: {what} failed on a tensor-parallel mesh peer of global rank {rank} "
            f"(this rank) or in that peer's group=: on global rank {failed} ")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own, what", [
    ("train_loss_fails", f"OSError: {DISK_FULL}", "recording the training loss (rank 0 writes it)"),
    ("sink_fails", f"RuntimeError: {SINK}", "a sink's log_measurement or the trainer's loggers"),
], ids=["train_loss_write", "sink"])
def test_a_failure_of_rank_0s_agreed_work_raises_on_its_mesh_peer_before_the_next_forward(results, case, own, what):
    r0, r1 = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert r0 == own, r0
    assert r1.startswith(peer_error(what, 1)), r1


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_over_the_mesh_for_a_loss_event_under_a_group_of_one_rank_of_the_mesh_only(results):
    for got in (r["value"] for r in checked_case(results, "counts", None)):
        for where, c in got.items():
            # in a group > 1: the agreement on rank 0's write; under tp_own (each rank its own group): the mesh's
            alone = where == "plain_own"
            assert c["train"] == ({} if alone else {"all_reduce": 1}), (where, c)
            assert c["val"] == ({} if alone else {"all_reduce": 1}), (where, c)
