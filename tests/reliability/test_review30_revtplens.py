"""Review 30 (revtplens), 2 gloo ranks: Ctrl-C around the end of ``SpectralLens.measure`` with a tensor-parallel model
(a 1-D mesh of both ranks) and the lens's ``group`` each rank's own (one rank of the mesh), so that the lens's
agreement over its group does not reach the mesh peer (``test_review30_tplens``'s set-up).

Before (process-group timeout 20 s here; every failing case by the timeout):

* a Ctrl-C raised on one rank as the broadcast of rank 0's summary windows returned (just before the local work that
  the record round agrees) left that rank at once; its mesh peer waited in the record's round over the mesh;
* a Ctrl-C raised on one rank as the record round's ``all_reduce`` returned, where rank 0's record write had failed:
  that rank left before the round's second ``all_reduce`` (the failed rank's error text, quoted), in which its peer
  waited (``agree_round(..., quote=True)``: every round of the mesh quotes, the pools' rounds too).

Now the first is agreed in the record round (the peer raises a ``RuntimeError`` naming the interrupted rank), and
a Ctrl-C is held across an agreement's two collectives and raised after them (:func:`spectral_lens._agree._held`).
Also checked (a regression guard): after an agreed failure of rank 0's write both ranks measure in step again, and
the SIGINT handler is Python's own afterwards.

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_revtplens.py``
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time

import pytest
import torch.distributed as dist
from reliability.test_review29_drivertp import _lens, _writer
from reliability.test_review29_drivertp2 import then_forward
from reliability.test_review30_tplens import DISK_FULL, RECORD, full_disk, quoted
from support.ranks import checked_case, run_gloo_cases

import spectral_lens.lens as lens_module
from spectral_lens._warnings import SpectralLensWarning

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: every failing case by the timeout)
DEADLINE_S = 15.0
JOIN_S = 400.0


def sigint_here() -> None:
    """A real SIGINT to this process, handled before this returns (Python's handler raises ``KeyboardInterrupt``
    here; a handler that holds it, :func:`~spectral_lens._sync.deferred_interrupt`, records it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs here at the latest


def interrupted_windows_broadcast(lens, interrupted: int) -> dict:
    """``measure`` with a Ctrl-C reaching global rank ``interrupted`` as the windows' ``from_rank0`` returns."""
    real = lens_module.from_rank0

    def from_rank0(*args, **kwargs):
        value = real(*args, **kwargs)
        if dist.get_rank() == interrupted:
            sigint_here()
        return value

    lens_module.from_rank0 = from_rank0
    try:
        return then_forward(lens, functools.partial(lens.measure, 3, 3))
    finally:
        lens_module.from_rank0 = real


def interrupted_record_round(lens, writer, interrupted: int) -> dict:
    """Rank 0's record write fails (a full disk) and a Ctrl-C reaches global rank ``interrupted`` as the first
    ``all_reduce`` of the record's round over the mesh returns (before that round's second one, the quoted error)."""
    if writer is not None:
        full_disk(writer)
    real_round, real_reduce, armed = lens_module.agree_round, dist.all_reduce, []

    def agree_round(group, count, digest, error, what, *args, **kwargs):
        armed[:] = [what == RECORD and dist.get_rank() == interrupted]
        try:
            return real_round(group, count, digest, error, what, *args, **kwargs)
        finally:
            armed.clear()

    def all_reduce(t, *args, **kwargs):
        out = real_reduce(t, *args, **kwargs)
        if armed and armed[0]:
            armed[:] = [False]
            sigint_here()
        return out

    lens_module.agree_round, dist.all_reduce = agree_round, all_reduce
    try:
        return then_forward(lens, functools.partial(lens.measure, 3, 3))
    finally:
        lens_module.agree_round, dist.all_reduce = real_round, real_reduce
        if writer is not None:
            writer.close()


def again_after_a_failed_write(lens, writer) -> dict:
    """Rank 0's write fails at step 3 (agreed: both raise); then both measure step 4 with the writer working."""
    got = {}
    if writer is not None:
        working = writer.log_measurement
        full_disk(writer)
    try:
        lens.measure(3, 3)
    except BaseException as exc:  # noqa: BLE001 - recorded
        got["first"] = f"{type(exc).__name__}: {exc}"
    if writer is not None:
        writer.log_measurement = working
    m = lens.measure(4, 4)
    then_forward(lens, lambda: None)
    got["second"] = sorted(m.spectra)
    got["recorded"] = None if writer is None else sorted(writer.measured_steps())
    if writer is not None:
        writer.close()
    return got


POOL = "SpectralLens: the pool changed (simulated)"


def failing_tail(lens, writer, werror: set[int]) -> dict:
    """Rank 0's write fails where ``writer`` is given (a full disk), and the pool warning (each rank's own, after the
    summaries) is raised as an error on the global ranks ``werror`` only (their ``-W error``); then the next forward.
    """
    import warnings

    if writer is not None:
        full_disk(writer)

    def warn_pool_changed(*args, **kwargs):
        warnings.warn(POOL, SpectralLensWarning, stacklevel=2)

    lens._warn_pool_changed = warn_pool_changed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dist.get_rank() in werror:
                warnings.filterwarnings("error", message=re.escape(POOL))
            return then_forward(lens, functools.partial(lens.measure, 3, 3))
    finally:
        if writer is not None:
            writer.close()


def _windows_rank0(rank: int) -> dict:
    return interrupted_windows_broadcast(_lens(rank), 0)


def _windows_rank1(rank: int) -> dict:
    return interrupted_windows_broadcast(_lens(rank), 1)


def _round_rank0(rank: int) -> dict:
    writer = _writer(rank, "revtplens_round0")
    return interrupted_record_round(_lens(rank, writer), writer, 0)


def _round_rank1(rank: int) -> dict:
    writer = _writer(rank, "revtplens_round1")
    return interrupted_record_round(_lens(rank, writer), writer, 1)


def _again(rank: int) -> dict:
    writer = _writer(rank, "revtplens_again")
    return again_after_a_failed_write(_lens(rank, writer), writer)


def _handler(rank: int) -> dict:
    """The SIGINT handler after the cases above (Python's own: every held one restored)."""
    return {"default": signal.getsignal(signal.SIGINT) is signal.default_int_handler}


CASES = {"windows_rank0": _windows_rank0, "windows_rank1": _windows_rank1, "round_rank0": _round_rank0,
         "round_rank1": _round_rank1, "again": _again, "handler": _handler}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtplens"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("interrupted", [0, 1])
def test_a_ctrl_c_as_the_windows_broadcast_returns_raises_on_the_mesh_peer_at_once(results, interrupted):
    got = [r["error"] or "" for r in checked_case(results, f"windows_rank{interrupted}", DEADLINE_S)]
    assert got[interrupted] == "KeyboardInterrupt: ", got
    assert got[1 - interrupted].startswith(quoted(interrupted, "KeyboardInterrupt: ")), got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_ctrl_c_on_the_failed_rank_in_the_record_round_is_held_until_its_peer_has_the_quoted_error(results):
    r0, r1 = [r["error"] or "" for r in checked_case(results, "round_rank0", DEADLINE_S)]
    assert r0 == "KeyboardInterrupt: ", r0  # (caused by its OSError, which the peer quotes)
    assert r1.startswith(quoted(0, f"OSError: {DISK_FULL}")), r1


@pytest.mark.slow
@pytest.mark.distributed
def test_a_ctrl_c_on_the_peer_in_the_record_round_is_held_until_the_round_ended(results):
    r0, r1 = [r["error"] or "" for r in checked_case(results, "round_rank1", DEADLINE_S)]
    assert r0 == f"OSError: {DISK_FULL}", r0
    assert r1 == "KeyboardInterrupt: ", r1


@pytest.mark.slow
@pytest.mark.distributed
def test_after_an_agreed_failure_of_the_write_both_ranks_measure_in_step_again(results):
    got = checked_case(results, "again", DEADLINE_S)
    assert [r["error"] for r in got] == [None] * WORLD, got
    first = [r["value"]["first"] for r in got]
    assert first[0] == f"OSError: {DISK_FULL}" and first[1].startswith(quoted(0, f"OSError: {DISK_FULL}")), first
    assert got[0]["value"]["second"] == got[1]["value"]["second"] and got[0]["value"]["second"], got
    assert got[0]["value"]["recorded"] == [4] and got[1]["value"]["recorded"] is None, got


@pytest.mark.slow
@pytest.mark.distributed
def test_the_sigint_handler_is_pythons_own_afterwards(results):
    got = checked_case(results, "handler", None)
    assert [r["value"] for r in got] == [{"default": True}] * WORLD, got


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test (pytest's or a runner's may be another), restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def peer(monkeypatch):
    """Fast: this process as rank 0 of 2 (gloo); ``calls``: the sizes of the all_reduces made; ``peer_failed``: the
    other rank's slots say it failed; a real SIGINT reaches this rank as the first all_reduce returns."""
    state = {"calls": [], "peer_failed": False}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.numel())
        if len(state["calls"]) == 1:  # the round's slots: the other rank's count slot and code
            t[1], t[3] = (0, 1) if state["peer_failed"] else (1, 0)
            sigint_here()

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce}.items():
        monkeypatch.setattr(dist, name, value)
    return state


@pytest.mark.parametrize("mine, peer_failed", [(True, False), (False, True), (True, True)],
                         ids=["this_rank_failed", "the_peer_failed", "both"])
def test_a_ctrl_c_as_a_quoted_rounds_first_all_reduce_returns_waits_for_the_second(peer, python_sigint, mine,
                                                                                   peer_failed):
    """Before: ``KeyboardInterrupt`` out of the first all_reduce, the second (the quoted error text, which the other
    rank makes: a rank failed) never made here, so that rank waited in it until the process-group timeout."""
    from spectral_lens._agree import CAUSE_BYTES, agree_round

    error = OSError(DISK_FULL) if mine else None
    peer["peer_failed"] = peer_failed
    with pytest.raises(KeyboardInterrupt) as got:
        agree_round(None, 0, 0, error, RECORD, quote=True)
    assert peer["calls"] == [4, 2 * CAUSE_BYTES], peer["calls"]
    assert got.value.__cause__ is error
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_a_round_where_none_failed_is_raised_after_it(peer, python_sigint):
    """No rank failed: one all_reduce, then the interrupt (as before: no collective follows to carry it)."""
    from spectral_lens._agree import agree_round

    with pytest.raises(KeyboardInterrupt):
        agree_round(None, 0, 0, None, RECORD, quote=True)
    assert peer["calls"] == [4], peer["calls"]


def test_one_collective_holds_nothing_and_two_hold_a_ctrl_c_until_both_ended(python_sigint):
    """Fast: :func:`~spectral_lens._agree._held` replaces no handler for one collective (``quote=False``); for two
    it holds a real SIGINT and :func:`~spectral_lens._agree._raise_held` raises it, caused by this rank's error."""
    from spectral_lens._agree import _held, _raise_held

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with _held(False) as interrupted:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and interrupted == []
    error = OSError(DISK_FULL)
    with pytest.raises(KeyboardInterrupt) as got:
        with _held(True) as interrupted:
            sigint_here()  # held: the "second collective" runs
            ran = True
        _raise_held(interrupted, error)
    assert ran and got.value.__cause__ is error
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _raise_held([], None)  # nothing held: nothing raised


def test_a_ctrl_c_as_the_settings_round_returns_waits_for_the_gathering_of_settings_that_differ(monkeypatch,
                                                                                                 python_sigint):
    """Before: ``KeyboardInterrupt`` out of the settings' all_reduce; the other rank, the digests differing, waited
    in ``all_gather_object`` until the process-group timeout. Now this rank gathers too, then raises the interrupt,
    caused by the same ``ValueError`` the other rank raises."""
    from spectral_lens._agree import agree_settings

    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append("all_reduce")
        t[1], t[3] = 1, 12345  # the other rank: no failure, another settings digest
        sigint_here()

    def all_gather_object(out, obj, group=None):
        calls.append("all_gather_object")
        out[0], out[1] = obj, {"precision": "'float32'"}

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce, "all_gather_object": all_gather_object}.items():
        monkeypatch.setattr(dist, name, value)
    with pytest.raises(KeyboardInterrupt) as got:
        agree_settings(None, {"precision": "'float64'"}, None, "checking measure()'s arguments and the lens")
    assert calls == ["all_reduce", "all_gather_object"], calls
    assert isinstance(got.value.__cause__, ValueError) and "precision='float64' on global rank 0" in str(
        got.value.__cause__), got.value.__cause__
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
