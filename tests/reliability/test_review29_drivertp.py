"""Review 29 (drivertp), 2 gloo ranks: the integrations' driver (:class:`LensDriver`, under the Hugging Face and
Lightning callbacks) with a tensor-parallel model (a 1-D mesh of both ranks) and the lens's ``group`` each rank's
own (one rank of the mesh: the documented data-parallel group of a single replica), so that the driver's agreements
over the group do not reach the mesh peer.

Before (process-group timeout 20 s here; both cases timed out, the ranks out of step afterwards):

* the user closed rank 0's ``RunWriter`` (after ``train()``), then evaluated: ``LensDriver.measure`` skipped the
  measurement on rank 0 (its group's rank 0 holds the closed writer), while rank 1, rank 0 of its own group without
  a writer, measured and waited in the peers' check of the measurement until the timeout;
* a resume from a checkpoint at a step that rank 0's run record holds a measurement at (``LensDriver.resumed``),
  then an evaluation there (``eval_on_start``): rank 0 counted the step as measured and kept the loss, rank 1 (a
  fresh process: an empty history) measured alone and waited in the peers' check until the timeout.

Now the decisions are or-ed over the mesh peers (:func:`spectral_lens._agree.peers_any`): both skip, or both keep the
loss, at once; and a failure of rank 0's writer in ``resumed`` (``drop_after``: a full disk), agreed over rank 0's group
only, raises on the mesh peer too (before, rank 1 went on, into the training's next forward, alone). Cost: one ``all_reduce`` in each of ``measure`` and ``resumed`` for such a tensor-parallel model only;
none for a plain model or one replica (counted).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch.distributed as dist
from reliability.test_review28_revtp import _counted
from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens.integrations._driver import LensDriver
from spectral_lens.records import RunInfo, RunWriter

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: both cases by the timeout)
DEADLINE_S = 15.0
JOIN_S = 400.0


def _lens(rank: int, writer=None, tp: bool = True, own: bool = True) -> SpectralLens:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    model = _tp(_plain(), _mesh()) if tp else _plain()
    return SpectralLens(model, _pool(2), layers=LAYERS, precision="float64", mask_fn=None, progress=False,
                        params=(), group=groups[rank] if own else None, writer=writer)


def _writer(rank: int, name: str):
    """Rank 0's run record (the other ranks have none), in a directory rank 0 makes its own."""
    if rank != 0:
        return None
    import tempfile
    from pathlib import Path

    return RunWriter(Path(tempfile.mkdtemp(prefix=f"drivertp_{name}_")) / "run", RunInfo("r", total_tokens=1000),
                     fsync=False)


def _closed_writer(rank: int) -> dict:
    """Rank 0's writer closed, then an evaluation's measurement on both ranks; then, the writer taken away, both
    measure in step again (the spectra of a plain measurement)."""
    return closed_writer(_writer(rank, "closed"), functools.partial(_lens, rank))


def closed_writer(writer, make_lens) -> dict:
    """:func:`_closed_writer` with this rank's ``writer`` (``None`` off rank 0) and ``make_lens(writer)`` (the 4-rank
    file's too)."""
    lens = make_lens(writer)
    driver = LensDriver(lens, (), None)
    if writer is not None:
        writer.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = driver.measure(3, 3)
    lens.writer = None
    driver.measure(4, 4)
    return {"skipped": skipped, "warned": any("is closed" in str(w.message) for w in caught),
            "history": [m.step for m in lens.history], "same": _values(lens.history[-1]) == _values(
                make_lens(None).measure(4, 4))}


def _resumed_then_evaluated(rank: int) -> dict:
    """Both ranks measure at step 2 (rank 0 records it); a fresh lens and driver on each (a restarted process: an
    empty history) resume at step 2, and an evaluation there measures unless the step counts as measured (the
    callbacks' rule: ``step == driver.last_step`` keeps the loss with ``record_val_loss``)."""
    return resumed_then_evaluated(_writer(rank, "resumed"), functools.partial(_lens, rank))


def resumed_then_evaluated(writer, make_lens) -> dict:
    """:func:`_resumed_then_evaluated` with this rank's ``writer`` (``None`` off rank 0) and ``make_lens(writer)``
    (the 4-rank file's too)."""
    LensDriver(make_lens(writer), (), None).measure(2, 2)
    lens = make_lens(writer)
    driver = LensDriver(lens, (), None)
    driver.resumed(2)
    measured = driver.last_step == 2
    if measured:
        driver.record_val_loss(2, 2, 1.25)
    else:
        driver.measure(2, 2, val_loss=1.25)
    out = {"measured": measured, "history": [m.step for m in lens.history]}
    if writer is not None:
        out["val_loss_steps"] = sorted(writer.val_loss_steps())
        writer.close()
    return out


def _drop_after_fails(rank: int) -> dict:
    """Rank 0's ``RunWriter.drop_after`` fails (a full disk) in ``resumed``: its mesh peer raises too."""
    writer = _writer(rank, "drop")
    driver = LensDriver(_lens(rank, writer), (), None)
    if writer is not None:
        def drop_after(step):
            raise OSError("no space left on device (simulated)")

        writer.drop_after = drop_after
    try:
        driver.resumed(2)
    finally:
        if writer is not None:
            writer.close()
    return {"last_step": driver.last_step}


def _counts(rank: int) -> dict:
    """The collectives of ``LensDriver.measure`` and ``resumed`` beside those of the lens's own measurement: a plain
    model (the world group, each rank's own), one tensor-parallel replica (the world group is the mesh), and the
    tensor-parallel model under each rank's own group."""
    out = {}
    for where, kwargs in (("plain_world", {"tp": False, "own": False}), ("plain_own", {"tp": False}),
                          ("replica", {"own": False}), ("tp_own", {})):
        lens = _lens(rank, **kwargs)
        driver = LensDriver(lens, (), None)
        out[where] = {"lens": _counted(functools.partial(lens.measure, 1, 1)),
                      "driver": _counted(functools.partial(driver.measure, 2, 2)),
                      "resumed": _counted(functools.partial(driver.resumed, 2))}
    return out


CASES = {"counts": _counts, "closed_writer": _closed_writer, "resumed_then_evaluated": _resumed_then_evaluated,
         "drop_after_fails": _drop_after_fails}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("drivertp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_closed_writer_on_rank_0_skips_the_measurement_on_its_mesh_peer_too(results):
    got = [r["value"] for r in checked_case(results, "closed_writer", DEADLINE_S)]
    assert [g["skipped"] for g in got] == [{}, {}], got
    assert [g["warned"] for g in got] == [True, True], got
    assert [g["history"] for g in got] == [[4], [4]], got  # the skipped step is not measured; the next one is
    assert [g["same"] for g in got] == [True, True], got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_step_rank_0_recorded_counts_as_measured_on_its_mesh_peer_after_a_resume(results):
    got = [r["value"] for r in checked_case(results, "resumed_then_evaluated", DEADLINE_S)]
    assert [g["measured"] for g in got] == [True, True], got
    assert [g["history"] for g in got] == [[], []], got  # the evaluation kept its loss, measuring nothing again
    assert got[0]["val_loss_steps"] == [2], got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failure_of_rank_0s_writer_in_resumed_raises_on_its_mesh_peer_too(results):
    r0, r1 = [r["error"] or "" for r in checked_case(results, "drop_after_fails", DEADLINE_S)]
    assert r0 == "OSError: no space left on device (simulated)", r0
    assert r1.startswith("RuntimeError: spectral-lens callback: dropping the records after the checkpoint failed on a "
                         "tensor-parallel mesh peer of global rank 1 (this rank)"), r1


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_more_for_a_tensor_parallel_model_under_a_group_of_one_rank_of_the_mesh_only(results):
    for got in (r["value"] for r in checked_case(results, "counts", None)):
        for where, c in got.items():
            # in a group > 1: from_rank0 (the closed writer, in measure; the measured step, in resumed) and the
            # agreement on rank 0's work (the sinks; the dropped records); the peers' all_reduce under tp_own only
            alone = where in ("plain_own", "tp_own")
            agreed = {} if alone else {"all_reduce": 1, "broadcast_object_list": 1}
            # (drivertp2: measure's agreement on the sinks with the mesh too, a second all_reduce under tp_own)
            extra = 2 if where == "tp_own" else 0
            expected = {name: c["lens"].get(name, 0) + agreed.get(name, 0) + extra * (name == "all_reduce")
                        for name in {*c["lens"], *agreed}}
            assert c["driver"] == expected, (where, c)
            assert c["resumed"] == ({"all_reduce": 1} if extra else agreed), (where, c)
