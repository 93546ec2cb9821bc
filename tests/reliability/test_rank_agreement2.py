"""A lens configured otherwise, a bad ``measure()`` argument, or a failure inside ``sync``'s collectives on ONE rank,
on 2 gloo CPU ranks: every rank raises at once, and the ranks are in step afterwards.

Before the fixes (each reproduced with a 10 s process-group timeout):

* ``measure(step="x")`` (or an unattached lens) on one rank raised there before any collective; the other rank
  ran its activation pass and waited in the first agreement until the process-group timeout.
* ``params=()`` on one rank only: the rank without a gradient protocol skipped its agreement and broadcast and met
  the other rank's in another collective (rank 0's windows broadcast): both ranks waited until the timeout.
* ``mask_fn=None`` or another ``autocast_dtype`` on one rank: no error; the ranks' rows (padded positions
  included on one rank only; rows in float16 on one rank) were summed into one statistic silently.
  (``precision=`` on one rank was refused by ``sync`` already, without naming the ranks; pools of different
  lengths, also without a ``len``, are refused on every rank already: not repeated here.)
* an out-of-memory in ``sync``'s d x d re-shift, or a Ctrl-C (SIGINT) during a sync or between two layers' syncs,
  on one rank: that rank raised; the other waited in the sync's next collective until the timeout.

Now the lens's settings and this rank's argument check are agreed in one ``all_reduce`` at the start of
``measure`` (one collective per measurement, none per batch); a failure between ``sync``'s collectives rides in its
last one (none added); a Ctrl-C is held back while the collectives run and agreed after them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, SpectralLens

from support.models import TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 30  # a rank left waiting fails after this
DEADLINE_S = 15.0  # every rank returns or raises well before the timeout
JOIN_S = 300.0
OOM = "injected: reshift out of memory on rank 1"


def _model():
    torch.manual_seed(0)
    return TinyLM().double()


def _padded_pool():
    """Dict batches whose last 5 positions are padding (``attention_mask`` 0)."""
    out = []
    for x, _ in lm_pool(n_batches=4):
        mask = torch.ones_like(x)
        mask[:, -5:] = 0
        out.append({"idx": x, "attention_mask": mask})
    return out


def _measure(rank, **kwargs):
    kwargs = {"params": (), "progress": False, **kwargs}
    m = SpectralLens(_model(), kwargs.pop("pool", None) or lm_pool(n_batches=4), **kwargs).measure(1, 1)
    return {k: s.n_rows for k, s in m.spectra.items()}


def _sigint_here() -> None:
    """Ctrl-C on this rank alone: a SIGINT to this process (Python's handler raises, or a held-back one records)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the handler runs here at the latest


def _with_python_sigint(fn):
    """``fn()`` with Python's own SIGINT handler (a spawned rank may inherit another), restored after."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGINT, before)


def _in_reshift_on_rank1(rank, action, fn):
    """``fn()`` with ``sync``'s re-shift calling ``action()`` first on rank 1 (after the sync's first collective)."""
    import spectral_lens._sync as sync

    reshift = sync.reshift

    def failing(*args, **kwargs):
        action()
        return reshift(*args, **kwargs)

    if rank == 1:
        sync.reshift = failing
    try:
        return _with_python_sigint(fn)
    finally:
        sync.reshift = reshift


def _oom():
    raise torch.OutOfMemoryError(OOM)


# ---------------------------------------------------------------- the cases, each on both ranks
def _bad_step_on_rank1(rank):
    SpectralLens(_model(), lm_pool(n_batches=4), params=(), progress=False).measure("x" if rank else 1, 1)


def _unattached_lens_on_rank1(rank):
    model = None if rank == 1 else _model()
    SpectralLens(model, lm_pool(n_batches=4), params=(), progress=False).measure(1, 1)


def _params_on_rank0_only(rank):
    return _measure(rank, params=None if rank == 0 else ())


def _mask_off_on_rank1(rank):
    return _measure(rank, pool=_padded_pool(), forward_fn=lambda m, b: m(b["idx"]),
                    **({"mask_fn": None} if rank == 1 else {}))


def _float16_on_rank1(rank):
    return _measure(rank, autocast_dtype=torch.float16 if rank == 1 else None)


def _precision_on_rank1(rank):
    return _measure(rank, precision="float64" if rank == 1 else "exact")


def _oom_in_sync_on_rank1(rank):
    return _in_reshift_on_rank1(rank, _oom, lambda: _measure(rank))


def _ctrl_c_in_sync_on_rank1(rank):
    return _in_reshift_on_rank1(rank, _sigint_here, lambda: _measure(rank))


def _ctrl_c_between_two_layers_syncs_on_rank1(rank):
    sync, calls = ActivationCovarianceAccumulator.sync, []

    def second_sync_interrupted(self, group=None):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            _sigint_here()
        return sync(self, group)

    ActivationCovarianceAccumulator.sync = second_sync_interrupted
    try:
        return _with_python_sigint(lambda: _measure(rank, layers="all"))
    finally:
        ActivationCovarianceAccumulator.sync = sync


def _ctrl_c_in_an_accumulators_sync_on_rank1(rank):
    """The accumulator's own ``sync()``, outside a lens; afterwards its state is unchanged and a second sync
    (no interrupt) sums the ranks' rows."""
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(5 + rank, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)))
    error = None
    try:
        _in_reshift_on_rank1(rank, _sigint_here, acc.sync)
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        error = f"{type(exc).__name__}: {exc}"
    kept = acc.n_rows
    acc.sync()
    return {"error": error, "kept": kept, "synced": acc.n_rows}


CASES = {
    "bad_step_on_rank1": _bad_step_on_rank1,
    "unattached_lens_on_rank1": _unattached_lens_on_rank1,
    "params_on_rank0_only": _params_on_rank0_only,
    "mask_off_on_rank1": _mask_off_on_rank1,
    "float16_on_rank1": _float16_on_rank1,
    "precision_on_rank1": _precision_on_rank1,
    "oom_in_sync_on_rank1": _oom_in_sync_on_rank1,
    "ctrl_c_in_sync_on_rank1": _ctrl_c_in_sync_on_rank1,
    "ctrl_c_between_two_layers_syncs_on_rank1": _ctrl_c_between_two_layers_syncs_on_rank1,
    "ctrl_c_in_an_accumulators_sync_on_rank1": _ctrl_c_in_an_accumulators_sync_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("rank_agreement2"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="spectral_lens")


def _errors(results, case) -> list[str]:
    got = checked_case(results, case, DEADLINE_S)  # every rank within the deadline, in step afterwards
    assert all(r["error"] is not None for r in got), got
    return [r["error"] for r in got]


@pytest.mark.slow  # one spawn of 2 ranks, ten cases: ~30 s on the 2-core CPU
@pytest.mark.distributed
@pytest.mark.parametrize("case, own", [
    ("bad_step_on_rank1", "TypeError: SpectralLens.measure: step and tokens must be integers"),
    ("unattached_lens_on_rank1", "RuntimeError: SpectralLens is not attached to a model"),
])
def test_a_bad_argument_on_one_rank_stops_every_rank_at_once(results, case, own):
    errors = _errors(results, case)
    assert errors[1].startswith(own), errors
    assert errors[0].startswith("RuntimeError: SpectralLens: checking measure()'s arguments and the lens failed on "
                                "global rank(s) [1]"), errors


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, rank0, rank1", [
    ("params_on_rank0_only", "params=<probed matrices>", "params=() (no gradient protocol)"),
    ("mask_off_on_rank1", "mask_fn=spectral_lens._pools.attention_mask", "mask_fn=None"),
    ("float16_on_rank1", "autocast_dtype=None", "autocast_dtype=torch.float16"),
    ("precision_on_rank1", "precision='exact'", "precision='float64'"),
])
def test_a_lens_configured_otherwise_on_one_rank_is_refused_on_every_rank(results, case, rank0, rank1):
    errors = _errors(results, case)
    want = (f"ValueError: SpectralLens: the ranks' lenses are configured differently ({rank0} on global rank 0, "
            f"{rank1} on global rank 1)")
    assert [e.startswith(want) for e in errors] == [True, True], (want, errors)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, own, others", [
    ("oom_in_sync_on_rank1", f"OutOfMemoryError: {OOM}",
     "RuntimeError: ActivationCovarianceAccumulator: sync across 2 ranks failed on global rank(s) [1]"),
    ("ctrl_c_in_sync_on_rank1", "KeyboardInterrupt",
     "RuntimeError: SpectralLens: computing the activation spectra failed on global rank(s) [1]"),
    ("ctrl_c_between_two_layers_syncs_on_rank1", "KeyboardInterrupt",
     "RuntimeError: SpectralLens: computing the activation spectra failed on global rank(s) [1]"),
])
def test_a_failure_inside_the_sync_on_one_rank_stops_every_rank_at_once(results, case, own, others):
    errors = _errors(results, case)
    assert errors[1].startswith(own) and errors[0].startswith(others), errors


@pytest.mark.slow
@pytest.mark.distributed
def test_a_ctrl_c_in_an_accumulators_own_sync_is_agreed_and_leaves_its_state(results):
    got = checked_case(results, "ctrl_c_in_an_accumulators_sync_on_rank1", DEADLINE_S)
    assert [r["error"] for r in got] == [None, None], got
    values = [r["value"] for r in got]
    assert values[1]["error"].startswith("KeyboardInterrupt"), values
    assert values[0]["error"].startswith("RuntimeError: ActivationCovarianceAccumulator: sync across 2 ranks failed "
                                         "on global rank(s) [1]"), values
    assert [v["kept"] for v in values] == [5, 6] and [v["synced"] for v in values] == [11, 11], values


# ---------------------------------------------------------------- in one process, a second rank simulated
@pytest.fixture
def peer(monkeypatch):
    """This process as rank 0 of 2 (gloo); ``state["peer"]``: the other rank's ``(slot values, settings)``, which
    the patched ``all_reduce(MAX)`` and ``all_gather_object`` merge in; ``state["calls"]``: the all_reduces."""
    import torch.distributed as dist

    state = {"calls": [], "peer": None}

    def all_reduce(t, op=None, group=None):
        state["calls"].append(t.clone())
        if state["peer"] is not None:
            t.copy_(torch.maximum(t, state["peer"][0](t)))

    def all_gather_object(out, obj, group=None):
        out[0], out[1] = obj, state["peer"][1]

    for name, value in {"is_initialized": lambda: True, "get_rank": lambda group=None: 0,
                        "get_world_size": lambda group=None: 2, "get_backend": lambda group=None: "gloo",
                        "all_reduce": all_reduce, "all_gather_object": all_gather_object}.items():
        monkeypatch.setattr(dist, name, value)
    return state


def test_settings_of_another_rank_are_named_before_any_forward(peer):
    """Fast: rank 1 (simulated) has ``mask_fn=None``; rank 0's measure raises the ValueError naming both values
    after its first all_reduce, before any forward (before: no check; the rows were mixed)."""
    forwards = []
    lens = SpectralLens(_model(), _padded_pool(), params=(), progress=False,
                        forward_fn=lambda m, b: forwards.append(1) or m(b["idx"]))
    peer["calls"].clear()  # (the lens's constructor made one: its agreement)
    theirs = {**lens._settings(), "mask_fn": "None"}
    text = "\n".join(f"{k}={v}" for k, v in sorted(theirs.items()))
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
    peer["peer"] = (lambda t: torch.tensor([0, 1, 0, digest], dtype=t.dtype), theirs)
    with pytest.raises(ValueError, match=r"mask_fn=spectral_lens\._pools\.attention_mask on global rank 0, "
                                         r"mask_fn=None on global rank 1"):
        lens.measure(1, 1)
    assert forwards == [] and len(peer["calls"]) == 1


def test_a_failure_between_syncs_collectives_takes_part_in_the_rest_and_rides_in_the_last(peer, monkeypatch):
    """Fast: an out-of-memory in the re-shift (after the first of the sync's 4 all_reduces) on this rank: it still
    makes the other 3 (zeros in the sums), flags its failure in the last, then raises its own error, and the
    accumulator is unchanged (before: it raised after 1 of 4, the other ranks waiting in the second)."""
    import spectral_lens._sync as sync

    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(7, 4, dtype=torch.float64))
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in acc.state_dict().items()}
    monkeypatch.setattr(sync, "reshift", lambda *a, **k: _oom())
    with pytest.raises(torch.OutOfMemoryError, match=OOM):
        acc.sync()
    calls = peer["calls"]
    assert len(calls) == 5, calls  # the status, then the sums' 4
    assert calls[-1].tolist()[-2:] == [1, -1], calls[-1]  # this rank's failure flag (group rank 0) set
    after = acc.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k


def test_another_ranks_failure_between_syncs_collectives_is_raised_here(peer):
    """Fast: the other rank (simulated) flags a failure in the sync's last all_reduce: this rank raises a
    RuntimeError naming it and keeps its state (before: no such flag; the sync went on)."""
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.randn(7, 4, dtype=torch.float64))
    n = acc.n_rows

    def theirs(t):  # the same as this rank's, but the last all_reduce (2 * world + 2 flags): rank 1 failed
        out = t.clone()
        if t.numel() == 6 and not t.is_floating_point():
            out[-1] = 1
        return out

    peer["peer"] = (theirs, None)
    with pytest.raises(RuntimeError, match=r"sync across 2 ranks failed on global rank\(s\) \[1\]"):
        acc.sync()
    assert acc.n_rows == n and not acc._synced


def test_a_ctrl_c_during_the_collectives_is_held_back_then_given_to_the_caller():
    """Fast: inside ``deferred_interrupt`` a SIGINT raises nothing and is recorded; a second raises at once; Python's
    handler is back afterwards (before: no such hold; the KeyboardInterrupt left the other ranks waiting)."""
    from spectral_lens._sync import deferred_interrupt

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with deferred_interrupt() as interrupted:
            _sigint_here()
            held = list(interrupted)
            with pytest.raises(KeyboardInterrupt):
                _sigint_here()
        assert held == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
