"""Review 30 (revtplens), 4 gloo ranks: a Ctrl-C inside the broadcast of rank 0's summary windows at the end of
``SpectralLens.measure``, with two data-parallel replicas of a 2-rank tensor-parallel mesh (meshes [0, 1] and [2, 3])
and ``group=`` the data-parallel group ([0, 2] and [1, 3]), where that broadcast is a real one
(``broadcast_object_list``: two broadcasts, the size then the object). The SIGINT reaches one rank as the first of
the two returns (where Python raises it: the rank waited in that one).

Before (process-group timeout 20 s): that rank left between the two broadcasts; its group's other rank waited in the
second one and its mesh peer in the record's round until the timeout. Now the Ctrl-C is held until the broadcast
ended, then agreed like a failure of the local work after it: the interrupted rank raises ``KeyboardInterrupt``, its
mesh peer a ``RuntimeError`` quoting it, both groups' other ranks a ``RuntimeError`` naming their group's failed rank.

Also checked (regression guards, they passed before): the pool warning raised as an error on global rank 3 alone
(not a group's rank 0), and that with rank 0's write failing too (two ranks, two causes): all four raise at once.

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_revtplens_dp.py``
"""

from __future__ import annotations

import functools

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from reliability.test_review29_drivertp import _writer
from reliability.test_review29_drivertp2 import then_forward
from reliability.test_review29_drivertp_dp import _lens
from reliability.test_review30_revtplens import POOL, failing_tail, sigint_here
from reliability.test_review30_tplens import DISK_FULL, RECORD, quoted
from support.ranks import checked_case, run_gloo_cases

import spectral_lens.lens as lens_module

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 120.0  # (before the fix the ranks hung past any timeout: killed at this deadline)


def interrupted_between_the_broadcasts(lens, interrupted: int) -> dict:
    """``measure`` with a SIGINT reaching global rank ``interrupted`` as the first broadcast of the windows'
    ``broadcast_object_list`` returns."""
    real_from, real_broadcast, calls = lens_module.from_rank0, c10d.broadcast, []

    def from_rank0(*args, **kwargs):
        calls[:] = [0] if dist.get_rank() == interrupted else []
        try:
            return real_from(*args, **kwargs)
        finally:
            calls.clear()

    def broadcast(*args, **kwargs):
        out = real_broadcast(*args, **kwargs)
        if calls:
            calls[0] += 1
            if calls[0] == 1:
                sigint_here()
        return out

    lens_module.from_rank0, c10d.broadcast = from_rank0, broadcast
    try:
        return then_forward(lens, functools.partial(lens.measure, 3, 3))
    finally:
        lens_module.from_rank0, c10d.broadcast = real_from, real_broadcast


def _rank0(rank: int) -> dict:
    return interrupted_between_the_broadcasts(_lens(rank), 0)


def _rank3(rank: int) -> dict:
    return interrupted_between_the_broadcasts(_lens(rank), 3)


def _werror_rank3(rank: int) -> dict:
    return failing_tail(_lens(rank), None, {3})


def _two_causes(rank: int) -> dict:
    writer = _writer(rank, "revtplens_two_dp")
    return failing_tail(_lens(rank, writer), writer, {3})


CASES = {"rank0": _rank0, "rank3": _rank3, "werror_rank3": _werror_rank3, "two_causes": _two_causes}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtplens_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


MESH_PEER = {0: 1, 1: 0, 2: 3, 3: 2}
GROUP_PEER = {0: 2, 2: 0, 1: 3, 3: 1}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("interrupted", [0, 3])
def test_a_ctrl_c_between_the_windows_two_broadcasts_is_held_then_agreed_on_all_four_ranks(results, interrupted):
    got = [r["error"] or "" for r in checked_case(results, f"rank{interrupted}", DEADLINE_S)]
    peer, other = MESH_PEER[interrupted], GROUP_PEER[interrupted]
    assert got[interrupted] == "KeyboardInterrupt: ", got
    assert got[peer].startswith(quoted(interrupted, "KeyboardInterrupt: ")), got
    assert got[other].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [{interrupted}]; "), got
    last = MESH_PEER[other]  # its group's failed rank: the interrupted rank's mesh peer
    assert got[last].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [{peer}]; "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_warning_raised_as_an_error_on_rank_3_alone_raises_on_all_four_ranks(results):
    got = [r["error"] or "" for r in checked_case(results, "werror_rank3", DEADLINE_S)]
    assert got[3] == f"SpectralLensWarning: {POOL}", got
    assert got[2].startswith(quoted(3, f"SpectralLensWarning: {POOL}")), got
    assert got[1].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [3]; "), got
    assert got[0].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [2]; "), got


@pytest.mark.slow
@pytest.mark.distributed
def test_two_failures_with_other_causes_on_two_meshes_raise_on_all_four_ranks(results):
    got = [r["error"] or "" for r in checked_case(results, "two_causes", DEADLINE_S)]
    assert got[0] == f"OSError: {DISK_FULL}" and got[3] == f"SpectralLensWarning: {POOL}", got
    assert got[1].startswith(quoted(0, f"OSError: {DISK_FULL}")), got
    assert got[2].startswith(quoted(3, f"SpectralLensWarning: {POOL}")), got
