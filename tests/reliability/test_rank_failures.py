"""A failure on one rank during a ``SpectralLens`` measurement, on 2 gloo CPU ranks: no rank waits longer than it
must, and every rank raises.

Where every forward of the measurement is itself a collective (FSDP's all-gathers, a pipeline's sends and
receives, tensor parallelism's all-reduces), a forward that fails on one rank leaves the other ranks inside
that forward's collective: nothing the lens does can reach them before the process group's timeout. Before
the fix, the failed rank then went into the lens's agreement (an ``all_reduce``), which met the other ranks'
collectives out of step: under FSDP it waited there for the timeout before raising its own error (8.5 s
here; under NCCL the watchdog may abort it first, so that its error is never raised); in a pipeline the
agreement met the other stage's next-round pool comparison, which then raised a false "the ranks' pools gave
different numbers of batches" (after waiting for the timeout in the agreement that followed). Now the failed
rank raises its own error at once, with a note naming the timeout (``init_process_group(timeout=...)``,
``TORCH_NCCL_ASYNC_ERROR_HANDLING``), and the other ranks raise torch's timeout error after one timeout, with
a note, and try no agreement after it (which could only wait for another timeout).

Each out-of-step case runs in a process group of its own (it leaves the group unusable): the slow tier.

What can be checked before those forwards is agreed there: the pools' lengths, and now the layers too. On
one tensor-parallel replica (every rank runs every batch) the ranks' rows are compared after the pass, one
collective per layer, and the layers were compared nowhere: other layers on one rank left that comparison's
collectives mismatched (gloo failed on one rank only; NCCL would hang), or compared one rank's ``h.0`` with
the other's ``h.1`` ("the outputs differ between the tensor-parallel ranks"). Now every rank raises the same
``ValueError`` naming its layers, before any forward, with the ranks in step afterwards.
"""

from __future__ import annotations

import time
import warnings

import pytest

from support.fsdp_pools import fsdp2 as _fsdp2
from support.fsdp_pools import pool as _pool
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 2
PG_TIMEOUT_S = 8  # the other ranks wait this long inside the failed forward's collective
AGREED_TIMEOUT_S = 30  # the agreed cases: a regression waits this long (the model's set-up takes seconds)


def _note(error, caught) -> str:
    """The note ``mark_out_of_step`` gave ``error``: ``add_note`` on Python >= 3.11; on Python 3.10 (no
    ``add_note``) a ``RuntimeWarning`` instead (documented), recorded in ``caught``."""
    if hasattr(error, "add_note"):
        return "\n".join(getattr(error, "__notes__", []))
    return "\n".join(str(w.message) for w in caught if w.category is RuntimeWarning)


JOIN_S = 150.0
INJECTED = "injected: CUDA out of memory on rank 1"


def _outcome(measure) -> dict:
    """The measurement's error on this rank: type, message, notes (``add_note``) and seconds (no harness barrier
    in them)."""
    start = time.monotonic()
    try:
        measure()
        error = None
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        error = {"type": type(exc).__name__, "message": str(exc), "notes": list(getattr(exc, "__notes__", []))}
    return {"error": error, "seconds": time.monotonic() - start}


def _failing_forward(rank: int, at: int, forward):
    """``forward`` that raises on rank 1 at its ``at``-th call (an out-of-memory in user code)."""
    calls = []

    def forward_fn(model, batch):
        calls.append(1)
        if rank == 1 and len(calls) == at:
            raise RuntimeError(INJECTED)
        return forward(model, batch)

    return forward_fn


def _fsdp_forward_fails_on_rank1(rank: int) -> dict:
    """FSDP2, 4 batches (2 rounds): rank 1's second forward (the pool's batch 3) raises before the model runs;
    rank 0 waits in the all-gather of its batch 2's forward."""
    lens = SpectralLens(_fsdp2(), _pool(4), params=(), precision="float64", progress=False,
                        forward_fn=_failing_forward(rank, 2, lambda m, b: m(b[0])))
    return _outcome(lambda: lens.measure(1, 1))


def _pipeline_stage_fails_on_rank1(rank: int) -> dict:
    """A 2-stage GPipe pipeline, 3 batches each run by both stages: stage 1's forward of batch 1 raises after
    its schedule ran (stage 0 goes on to the next round's pool comparison)."""
    from reliability.test_pipeline_parallel import _forward_fn, _schedule, _stage_module
    from reliability.test_pipeline_parallel import _pool as _pp_pool

    module = _stage_module(rank)
    schedule = _schedule(module, rank)
    run = _forward_fn(schedule, rank)

    def forward_fn(model, batch, calls=[]):  # noqa: B006 - the call count
        calls.append(1)
        out = run(model, batch)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError(INJECTED)
        return out

    lens = SpectralLens(module, _pp_pool(3), layers="all", params=(), precision="float64", mask_fn=None,
                        progress=False, forward_fn=forward_fn)
    return _outcome(lambda: lens.measure(1, 1))


def _tp_layers(rank: int, layers: list, pool=None) -> None:
    from reliability.test_tensor_parallel import _mesh, _plain, _tp
    from reliability.test_tensor_parallel import _pool as _tp_pool

    SpectralLens(_tp(_plain(), _mesh()), pool or _tp_pool(2), layers=layers[rank], params=(), precision="float64",
                 mask_fn=None, progress=False).measure(1, 1)


def _tp_more_layers_on_rank1(rank: int) -> None:
    _tp_layers(rank, [["h.0"], ["h.0", "h.1"]])


def _tp_other_layer_on_rank1(rank: int) -> None:
    _tp_layers(rank, [["h.0"], ["h.1"]])


def _tp_shorter_batch_on_rank1(rank: int) -> None:
    """Rank 1's pool: its batch 1 a token shorter (a pool built another way on one rank); the replica's ranks
    run every batch together."""
    from reliability.test_tensor_parallel import _pool as _tp_pool

    pool = _tp_pool(3)
    if rank == 1:
        pool[1] = tuple(t[:, :-1] for t in pool[1])
    _tp_layers(rank, [["h.0"], ["h.0"]], pool)


AGREED = {"tp_more_layers_on_rank1": _tp_more_layers_on_rank1, "tp_other_layer_on_rank1": _tp_other_layer_on_rank1,
          "tp_shorter_batch_on_rank1": _tp_shorter_batch_on_rank1}


@pytest.fixture(scope="module")
def agreed(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("agreed"), AGREED, WORLD, pg_timeout_s=AGREED_TIMEOUT_S, join_s=JOIN_S,
                          preload="torch.distributed.tensor.parallel")


@pytest.mark.slow  # one spawn of 2 ranks with DTensor: ~35 s on the 2-core CPU
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["tp_more_layers_on_rank1", "tp_other_layer_on_rank1"])
def test_other_layers_on_one_tensor_parallel_rank_are_refused_on_every_rank(agreed, case):
    got = checked_case(agreed, case, AGREED_TIMEOUT_S / 2)  # no timeout, and the ranks in step afterwards
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith("ValueError: SpectralLens: the ranks measure "
                                                                "different layers"), (rank, r)
    assert "['h.0']" in got[0]["error"] and "h.1" in got[1]["error"], got


def _alone(tmp_path_factory, case, fn, preload: str) -> list[dict]:
    """``fn`` on every rank in a process group of its own; each rank's :func:`_outcome`."""
    results = run_gloo_cases(tmp_path_factory.mktemp(case), {case: fn}, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                             join_s=JOIN_S, preload=preload)
    got = results[case]
    assert None not in got, f"{case}: a rank wrote no result; still running at the deadline (killed): {results['_hung']}"
    return [r["value"] for r in got]


def _assert_failed_rank_raises_at_once(got: list[dict]) -> None:
    failed = got[1]["error"]
    assert failed is not None and failed["type"] == "RuntimeError" and failed["message"] == INJECTED, got
    assert got[1]["seconds"] < PG_TIMEOUT_S / 2, f"the failed rank waited: {got}"
    note = "\n".join(failed["notes"])
    assert "global rank 1" in note and "init_process_group(timeout=" in note, note
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in note, note


def _assert_other_rank_waits_one_timeout(got: list[dict]) -> None:
    other = got[0]["error"]
    assert other is not None, got
    assert "pools gave different numbers" not in other["message"], f"a false diagnosis: {other}"
    assert got[0]["seconds"] < 1.6 * PG_TIMEOUT_S, f"more than one timeout: {got}"
    assert any("another rank" in n for n in other["notes"]), other


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_forward_failure_on_one_rank_is_raised_at_once(tmp_path_factory):
    got = _alone(tmp_path_factory, "fsdp_forward", _fsdp_forward_fails_on_rank1, "torch.distributed.fsdp")
    _assert_failed_rank_raises_at_once(got)
    _assert_other_rank_waits_one_timeout(got)


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_stage_failure_on_one_rank_is_raised_at_once(tmp_path_factory):
    got = _alone(tmp_path_factory, "pipeline_stage", _pipeline_stage_fails_on_rank1, "torch.distributed.pipelining")
    _assert_failed_rank_raises_at_once(got)
    _assert_other_rank_waits_one_timeout(got)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_batch_of_another_shape_on_one_tensor_parallel_rank_is_refused_on_every_rank_before_its_forward(agreed):
    got = checked_case(agreed, "tp_shorter_batch_on_rank1", AGREED_TIMEOUT_S / 2)
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith(
            "ValueError: SpectralLens: the pool's batch 1 differs in shape or dtype between the ranks"), (rank, r)
    assert "(int64[4, 12], int64[4, 12])" in got[0]["error"], got
    assert "(int64[4, 11], int64[4, 11])" in got[1]["error"], got


# ---------------------------------------------------------------- in one process, torch.distributed patched
@pytest.fixture
def two_ranks(monkeypatch):
    """Rank 0 of 2 (gloo); ``calls``: the all_reduce calls made, each failing with ``fail`` when it is set (a
    collective that timed out)."""
    import torch.distributed as dist

    state = {"calls": 0, "fail": None}

    def all_reduce(t, op=None, group=None):
        state["calls"] += 1
        if state["fail"] is not None:
            raise state["fail"]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return state


def test_no_agreement_is_tried_after_a_failure_inside_a_collective_pass(two_ranks):
    """An error from inside a pass that is a collective (a forward under FSDP) is raised at once, with a note
    naming the timeout, and the agreements after it raise it without a collective (the other ranks are inside
    the pass's collective: an agreement would wait for the timeout, under NCCL until the watchdog aborts)."""
    from spectral_lens._agree import agree, agree_counts, collective_pass

    with warnings.catch_warnings(record=True) as caught, pytest.raises(MemoryError) as info:
        warnings.simplefilter("always")
        with collective_pass("the activation pass's forward of the pool's batch 3"):
            raise MemoryError("out of memory")
    notes = _note(info.value, caught)
    assert "batch 3 failed on global rank 0" in notes and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in notes, notes
    for agreement in (lambda e: agree(None, e, "the activation pass"), lambda e: agree_counts(None, 1, e, "loading")):
        with pytest.raises(MemoryError):
            agreement(info.value)
    assert two_ranks["calls"] == 0


def test_a_failed_agreement_is_not_tried_again(two_ranks):
    """The agreement's own collective timed out (a rank left the others in a collective): its error is raised
    with a note, and the next agreement, given that error, raises it without a second collective (a second
    timeout)."""
    from spectral_lens._agree import agree, agree_counts

    two_ranks["fail"] = RuntimeError("gloo: Timed out waiting 8000ms")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="Timed out") as info:
        warnings.simplefilter("always")
        agree_counts(None, 1, None, "loading the pool's batches")
    assert "another rank" in _note(info.value, caught)
    with pytest.raises(RuntimeError, match="Timed out"):
        agree(None, info.value, "the activation pass")
    assert two_ranks["calls"] == 1


def test_a_batch_structure_names_its_tensors_shapes_and_dtypes():
    import torch

    from spectral_lens._agree import batch_digest, batch_structure

    batch = {"input_ids": torch.zeros(4, 12, dtype=torch.int64), "extra": [torch.ones(2, dtype=torch.bfloat16), "x"]}
    assert batch_structure(batch) == "{'extra': (bfloat16[2], str), 'input_ids': int64[4, 12]}"
    assert batch_digest(batch) == batch_digest({"extra": [torch.ones(2, dtype=torch.bfloat16), "y"],
                                                "input_ids": torch.ones(4, 12, dtype=torch.int64)})
    shorter = (torch.zeros(4, 11, dtype=torch.int64),)
    assert batch_digest(shorter) != batch_digest((torch.zeros(4, 12, dtype=torch.int64),)) and batch_digest(shorter) > 0
