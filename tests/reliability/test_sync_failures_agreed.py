"""``ActivationCovarianceAccumulator.sync``: the two failures on one rank that were not agreed across ranks.

* A rank without rows joins the sums with a zero state (a float64 d x d): when that allocation ran out of memory,
  the rank raised after the status collective and the other ranks waited in the sums' first one until the
  process-group timeout. Now its failure rides in that first collective (a flag per rank beside the totals, no
  collective added) and every rank stops after it, before the d x d sum.
* A Ctrl-C during the sync's last collective came too late to ride in it: the interrupted rank raised before its
  commit while the others committed, so the ranks' states differed (one summed, one not). Now every rank commits
  the same sums and the interrupted rank then raises ``KeyboardInterrupt``, as a Ctrl-C just after the sync would.

Fast tests simulate the second rank in this process (a patched ``all_reduce``); the slow one runs 2 gloo ranks."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator

from support.ranks import checked_case, run_gloo_cases

OOM = "injected: zero state out of memory"
D = 4


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM)


def _sigint_here() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs here at the latest


def _is_last(t: torch.Tensor, world: int = 2) -> bool:
    """Whether ``t`` is the sync's last all_reduce: ``2 * world + 2`` int64 flags."""
    return t.dtype == torch.int64 and t.numel() == 2 * world + 2


@pytest.fixture
def peer(monkeypatch):
    """This process as rank 0 of 2 (gloo); ``state["peer"]``: a function of this rank's tensor giving the other
    rank's, merged in by the patched ``all_reduce`` (as MAX; as a SUM for float tensors: the totals and sums);
    ``state["calls"]``: the tensors all-reduced; ``state["during"]``: called inside each all_reduce."""
    import torch.distributed as dist

    state = {"calls": [], "peer": None, "during": lambda t: None}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())
        if state["peer"] is not None:
            theirs = state["peer"](t)
            t.copy_(torch.maximum(t, theirs) if op is not None else t + theirs)
        state["during"](t)

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def test_a_zero_state_out_of_memory_rides_in_the_first_sum_and_stops_there(peer, monkeypatch):
    """This rank has no rows (dim=): its zero state runs out of memory. It still makes the sums' first all_reduce,
    with its failure flag set, and raises its own error there; no d x d sum follows (before: it raised after the
    status all_reduce alone, the other ranks waiting in the first sum)."""
    from spectral_lens import accumulate

    acc = ActivationCovarianceAccumulator(dim=D, precision="float64")
    monkeypatch.setattr(accumulate, "_zero_state", _oom)
    with pytest.raises(torch.OutOfMemoryError, match=OOM):
        acc.sync()
    calls = peer["calls"]
    assert len(calls) == 2, calls  # the status, then the totals with a flag per rank
    assert calls[1].dtype == torch.float64 and calls[1].tolist()[-2:] == [1.0, 0.0], calls[1]
    assert not acc.initialized and not acc._synced


def test_another_ranks_failure_before_the_sums_stops_this_rank_after_the_first(peer):
    """The other rank (simulated) flags a failure in the totals: this rank raises the RuntimeError naming it after
    that all_reduce, without the d x d sum, its state unchanged."""
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    before = acc.state_dict()

    def theirs(t):
        out = torch.zeros_like(t)
        if t.dtype == torch.float64 and t.numel() == D + 1 + 2:  # the totals: rank 1's flag
            out[-1] = 1
        return out if t.dtype == torch.float64 else t.clone()

    peer["peer"] = theirs
    with pytest.raises(RuntimeError, match=r"sync across 2 ranks failed on global rank\(s\) \[1\]"):
        acc.sync()
    assert len(peer["calls"]) == 2, peer["calls"]
    after = acc.state_dict()
    assert not acc._synced and all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))


def test_a_ctrl_c_during_the_last_collective_is_raised_after_the_commit(peer):
    """A Ctrl-C arriving during the last all_reduce (after this rank's flags were sent, so the other rank commits):
    this rank commits the sums too, then raises KeyboardInterrupt (before: it raised before its commit, its state
    unsynced while the other rank's was synced). The simulated peer adds nothing (its all_reduce leaves the
    tensors): the synced state holds this rank's rows, equal to their float64 covariance."""
    rows = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(rows)
    peer["during"] = lambda t: _sigint_here() if _is_last(t) else None
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            acc.sync()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(peer["calls"]) == 5 and _is_last(peer["calls"][-1]), peer["calls"]
    assert peer["calls"][-1].tolist()[-2:] == [0, -1]  # the interrupt came after this rank's flag was sent
    assert acc._synced and acc.n_rows == 7
    torch.testing.assert_close(acc.covariance(), torch.cov(rows.T), rtol=1e-12, atol=1e-12)


def test_a_late_ctrl_c_in_a_sync_that_fails_anyway_is_not_lost(peer):
    """The other rank (simulated) failed between the collectives and a Ctrl-C comes during the last one: every rank
    raises anyway, and this one raises the KeyboardInterrupt (regression guard: a held Ctrl-C is never dropped)."""
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))

    def theirs(t):
        out = t.clone() if _is_last(t) else torch.zeros_like(t) if t.is_floating_point() else t.clone()
        if _is_last(t):
            out[-1] = 1  # rank 1 failed
        return out

    peer["peer"] = theirs
    peer["during"] = lambda t: _sigint_here() if _is_last(t) else None
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            acc.sync()
    finally:
        signal.signal(signal.SIGINT, before)
    assert not acc._synced and acc.n_rows == 7


# ---------------------------------------------------------------- 2 gloo ranks
WORLD = 2
PG_TIMEOUT_S = 30  # a rank left waiting fails after this
DEADLINE_S = 15.0  # every rank returns or raises well before the timeout


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(5 + rank, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))


def _zero_state_oom_on_rank1(rank):
    """Rank 1 has no rows (dim=) and its zero state runs out of memory; a second sync (no failure) afterwards
    sums the ranks' rows: the group is usable and every state was kept."""
    from spectral_lens import accumulate

    acc = ActivationCovarianceAccumulator(dim=D, precision="float64")
    if rank == 0:
        acc.update(_rows(0))
    zero_state, error = accumulate._zero_state, None
    if rank == 1:
        accumulate._zero_state = _oom
    try:
        acc.sync()
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        error = f"{type(exc).__name__}: {exc}"
    finally:
        accumulate._zero_state = zero_state
    kept = acc.n_rows
    acc.sync()
    return {"error": error, "kept": kept, "synced": acc.n_rows}


def _ctrl_c_in_the_last_collective_on_rank1(rank):
    """A SIGINT on rank 1 during the sync's last all_reduce (after the collective itself); both states synced."""
    import torch.distributed as dist

    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(_rows(rank))
    all_reduce, error = dist.all_reduce, None

    def interrupted(t, *args, **kwargs):
        out = all_reduce(t, *args, **kwargs)
        if _is_last(t, WORLD):
            _sigint_here()
        return out

    if rank == 1:
        dist.all_reduce = interrupted
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        acc.sync()
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        error = f"{type(exc).__name__}: {exc}"
    finally:
        dist.all_reduce = all_reduce
        signal.signal(signal.SIGINT, before)
    return {"error": error, "synced": acc.n_rows, "mean": acc.mean.tolist()}


CASES = {"zero_state_oom_on_rank1": _zero_state_oom_on_rank1,
         "ctrl_c_in_the_last_collective_on_rank1": _ctrl_c_in_the_last_collective_on_rank1}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("sync_failures"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=300.0, preload="spectral_lens")


@pytest.mark.slow  # one spawn of 2 ranks, two cases
@pytest.mark.distributed
def test_a_zero_state_out_of_memory_on_one_rank_stops_every_rank_at_once(results):
    got = checked_case(results, "zero_state_oom_on_rank1", DEADLINE_S)
    assert [r["error"] for r in got] == [None, None], got
    values = [r["value"] for r in got]
    assert values[1]["error"] == f"OutOfMemoryError: {OOM}", values
    assert values[0]["error"].startswith("RuntimeError: ActivationCovarianceAccumulator: sync across 2 ranks failed "
                                         "on global rank(s) [1]"), values
    assert [v["kept"] for v in values] == [5, 0] and [v["synced"] for v in values] == [5, 5], values


@pytest.mark.slow
@pytest.mark.distributed
def test_a_ctrl_c_in_the_last_collective_leaves_every_rank_synced_alike(results):
    got = checked_case(results, "ctrl_c_in_the_last_collective_on_rank1", DEADLINE_S)
    values = [r["value"] for r in got]
    assert values[0]["error"] is None and values[1]["error"] == "KeyboardInterrupt: ", values
    assert [v["synced"] for v in values] == [11, 11], values
    ref = torch.cat([_rows(0), _rows(1)]).mean(0)
    for v in values:
        torch.testing.assert_close(torch.tensor(v["mean"], dtype=torch.float64), ref, rtol=1e-12, atol=1e-12)
