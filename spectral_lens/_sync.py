"""``ActivationCovarianceAccumulator.sync``'s collectives: the ranks' agreement on the configuration
(:func:`_sync_status`) and the sum of their float64 sufficient statistics around a common shift (:func:`_summed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading

import torch

from ._agree import _OUT_OF_STEP, out_of_step
from ._persistence import _NONFINITE
from .spectra.moments import PRECISIONS, representable_shift, reshift


def _sync_status(group, dev: torch.device, label: str, name: str | None, dim: int | None, nonfinite: str,
                 precision: str, synced: bool) -> None:
    """Collective agreement before any sum: every rank raises the same error, or none does.

    Each rank contributes ``(dim or -1, nonfinite code, precision code, already synced, name digest
    or -1)``; one ``all_reduce(MAX)`` of ``(v, -v)`` gives every rank the maximum and the minimum of
    each field. The names must agree: all ranks' accumulators unnamed, or all named alike (a named
    one and an unnamed one are refused too, an unnamed ``-1`` being the minimum of any digest).
    ``label`` ... ``synced`` are this rank's accumulator's (``label`` names it in the errors).
    """
    import torch.distributed as dist

    local = [
        dim if dim is not None else -1,
        _NONFINITE.index(nonfinite),
        PRECISIONS.index(precision),
        int(synced),
        -1 if name is None else int.from_bytes(hashlib.blake2b(name.encode()).digest()[:7], "big"),
    ]
    v = torch.tensor(local, dtype=torch.int64, device=dev)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[:5].tolist(), (-both[5:]).tolist()
    where = f"{label}: sync across {dist.get_world_size(group)} ranks refused"
    if hi[3]:
        raise RuntimeError(f"{where}: a rank is already synced; reset() on every rank before accumulating again")
    if lo[4] >= 0 and lo[4] != hi[4]:
        raise ValueError(
            f"{where}: the ranks' accumulators have different names (this rank's: {name!r}), so they "
            "measure different layers; sync on every rank the accumulator of the same layer"
        )
    if lo[4] != hi[4]:  # some ranks' accumulators are named (attached to a module), others not
        raise ValueError(
            f"{where}: some ranks' accumulators have a name and others none (this rank's: {name!r}), so "
            "they may measure different layers; build the accumulator the same way on every rank (attach it "
            "to the same module, or pass the same name=)"
        )
    if lo[0] < 0:
        raise RuntimeError(
            f"{where}: a rank saw no rows and has no dim; pass dim= to the accumulator so an empty rank can join"
        )
    if lo[0] != hi[0]:
        raise ValueError(f"{where}: ranks disagree on d (min {lo[0]}, max {hi[0]})")
    if lo[1] != hi[1]:
        raise ValueError(f"{where}: ranks disagree on nonfinite (both {_NONFINITE} are in use); use one policy")
    if lo[2] != hi[2]:
        raise ValueError(
            f"{where}: ranks disagree on precision ({PRECISIONS[lo[2]]!r} .. {PRECISIONS[hi[2]]!r}); use one precision"
        )


def _summed(group, state: tuple[torch.Tensor, ...] | BaseException, d: int, dev: torch.device, precision: str,
            low_products: bool, underflowed: bool, interrupted: list[bool]):
    """The sum over the ranks of ``group`` of each rank's ``state`` ``(n, m, S, shift, bad_rows, first_bad)``
    (as :func:`~spectral_lens.accumulate._zero_state` orders it; width ``d``, on ``dev``), re-shifted exactly to a
    common shift (the global mean): ``((n, m, S, shift, bad_rows, first_bad), (bad_ranks, low_products,
    underflowed, has_rows))``, ``bad_ranks`` being ``(global rank, first update with NaN/Inf rows)`` per rank that
    had such rows. Touches no accumulator: a collective that fails part-way leaves every state as it was.

    A failure of this rank's local work between the collectives does not leave the other ranks waiting in the next
    collective. Before the first sum (``state`` is the exception: the zero state of a rank without rows out of
    memory) it rides in the first collective, a flag per rank beside the totals, and every rank stops after it (no
    d x d sum). After it (an out-of-memory in the d x d re-shift), and for a Ctrl-C held by the caller's
    :func:`deferred_interrupt` (whose list ``interrupted`` is, from before the status collective on), this rank
    takes part in the remaining ones with zeros and its failure rides in the last one. Then every rank
    raises: this one its own exception, the others a ``RuntimeError`` naming it. A held Ctrl-C is raised here in
    any case (``KeyboardInterrupt``, this rank's other error as its cause), but for one that came during the last
    collective, too late to ride in it: the sums are returned, as on the other ranks, for the caller to commit
    before it raises the interrupt."""
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    error = state if isinstance(state, BaseException) else None
    totals = torch.zeros(d + 1 + world, dtype=torch.float64, device=dev)  # sum(n m_i + n shift), n, failed per rank
    try:
        if error is None:
            n, m0, s0, shift, bad, first = state
            n64 = n.to(torch.float64)
            totals[:d] = m0 + n64 * shift
            totals[d] = n64
    except BaseException as exc:  # an interrupt too, where it is not held back
        error = exc
    totals[d + 1 + me] = float(error is not None)  # (a Ctrl-C held so far rides in the last collective, below)
    dist.all_reduce(totals, group=group)
    early = totals[d + 1:].tolist()
    if any(f > 0 for f in early):  # a rank failed before any sum: every rank stops here, no other collective
        _raise_failed(group, world, error, interrupted, early)
    try:
        common = shift if float(totals[d]) == 0 else representable_shift(totals[:d] / totals[d], precision)
        m, s = reshift(n, m0, s0, shift, common)
        packed = torch.cat([m, n64.view(1), bad.to(torch.float64).view(1)])
    except BaseException as exc:  # zeros in the sums: every rank raises below, nothing is kept
        error, s, packed = exc, torch.zeros(d, d, dtype=torch.float64, device=dev), torch.zeros(
            d + 2, dtype=torch.float64, device=dev)
    dist.all_reduce(s, group=group)
    dist.all_reduce(packed, group=group)
    # each rank's first update with NaN/Inf rows (-1: none), so that the errors can name the ranks;
    # any rank's products below float64 -> all ranks check their range; each rank's failure above
    flags = torch.full((2 * world + 2,), -1, dtype=torch.int64, device=first.device)
    flags[me] = first
    flags[world] = int(low_products)
    flags[world + 1] = int(underflowed)
    held = bool(interrupted)  # a Ctrl-C from now on comes too late to ride in the last collective
    flags[world + 2 + me] = int(error is not None or held)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    failed = flags[world + 2:].tolist()
    if held or error is not None or any(f > 0 for f in failed):  # (a late Ctrl-C too, where every rank raises)
        _raise_failed(group, world, error, interrupted, failed)
    per_rank = flags[:world].tolist()
    bad_ranks = tuple((r if group is None else dist.get_global_rank(group, r), i)
                      for r, i in enumerate(per_rank) if i >= 0)
    n_all, bad_rows = packed[-2].round().to(torch.int64), packed[-1].round().to(torch.int64)
    first_bad = torch.tensor(min((i for _, i in bad_ranks), default=-1), device=first.device)
    sums = (n_all, packed[:-2], s, common, bad_rows, first_bad)
    return sums, (bad_ranks, bool(flags[world]), bool(flags[world + 1]), float(totals[d]) > 0)


def _raise_failed(group, world: int, error: BaseException | None, interrupted: list[bool], failed: list) -> None:
    """After a collective that carried each rank's failure flag (``failed``, per group rank): this rank's held
    Ctrl-C (``KeyboardInterrupt``, its other error as the cause), else its own error, else a ``RuntimeError``
    naming the ranks that failed; nothing when none did."""
    import torch.distributed as dist

    if interrupted and not isinstance(error, KeyboardInterrupt):
        raise KeyboardInterrupt from error
    if error is not None:
        raise error
    failed = [r if group is None else dist.get_global_rank(group, r) for r, f in enumerate(failed) if f > 0]
    if failed:
        raise RuntimeError(
            f"ActivationCovarianceAccumulator: sync across {world} ranks failed on global rank(s) {failed} between "
            "its collectives (an error or a Ctrl-C there); this rank stopped too, its state unchanged, so that no "
            f"rank waits in a collective. See the error raised on rank(s) {failed} for the cause"
        )


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back a Ctrl-C (SIGINT) while the ranks' collectives run, so that one rank does not leave them midway
    and the others waiting in the next one until the process-group timeout: yields a list that a Ctrl-C makes
    ``[True]``, for the caller to agree on with the other ranks and then raise; a second Ctrl-C raises at once.
    Only where Ctrl-C would raise ``KeyboardInterrupt`` (Python's own SIGINT handler, the main thread), and not
    inside another ``deferred_interrupt`` (that one holds it); the handler is restored on exit. A held Ctrl-C is
    never lost: an exception leaving the block while one is held becomes the ``KeyboardInterrupt``'s cause."""
    got: list[bool] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield got
        return

    def hold(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(True)

    signal.signal(signal.SIGINT, hold)
    try:
        yield got
    except BaseException as exc:
        if got and not isinstance(exc, KeyboardInterrupt):  # (all ranks raise here anyway, or are out of step)
            interrupt = KeyboardInterrupt()
            if out_of_step(exc):  # no agreement is tried after it either
                setattr(interrupt, _OUT_OF_STEP, True)
            raise interrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
