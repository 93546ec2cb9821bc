"""Review 29 (drivertp2), 4 gloo ranks: rank 0's agreed work in the integrations' driver with two data-parallel
replicas of a 2-rank tensor-parallel mesh (``(dp, tp)``: meshes [0, 1] and [2, 3]) and ``group=`` the data-parallel
group ([0, 2] and [1, 3]); only global rank 0 has a ``RunWriter``.

Before (process-group timeout 20 s): a failed ``train_loss`` write (``OSError``) or a sink's error on global rank 0
raised on ranks 0 and 2 (their group's agreement) while ranks 1 and 3 returned and waited in the next forward of the
tensor-parallel model until the timeout. Now all four raise at once: rank 0 its own error, rank 2 the group's
``RuntimeError``, ranks 1 and 3 one naming global rank 0 and what failed.
"""

from __future__ import annotations

import pytest
from reliability.test_review29_drivertp import _writer
from reliability.test_review29_drivertp2 import DISK_FULL, SINK, peer_error, sink_fails, train_loss_fails
from reliability.test_review29_drivertp_dp import _lens
from support.ranks import checked_case, run_gloo_cases

WORLD = 4
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 400.0


def _train_loss_fails(rank: int) -> dict:
    writer = _writer(rank, "train_loss_dp")
    return train_loss_fails(writer, _lens(rank, writer))


def _sink_fails(rank: int) -> dict:
    return sink_fails(_lens(rank))


CASES = {"train_loss_fails": _train_loss_fails, "sink_fails": _sink_fails}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("drivertp2_dp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _check(results, case: str, what: str, own: str) -> None:
    got = [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]
    assert got[0] == own, got
    assert got[2].startswith(f"RuntimeError: SpectralLens: {what} failed on global rank(s) [0]"), got
    assert got[1].startswith(peer_error(what, 1)), got
    assert got[3].startswith(peer_error(what, 3)), got


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_train_loss_write_on_global_rank_0_raises_on_all_four_ranks_before_the_next_forward(results):
    _check(results, "train_loss_fails", "recording the training loss (rank 0 writes it)", f"OSError: {DISK_FULL}")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_sink_error_on_global_rank_0_raises_on_all_four_ranks_before_the_next_forward(results):
    _check(results, "sink_fails", "a sink's log_measurement or the trainer's loggers", f"RuntimeError: {SINK}")
