"""Review 30 (revtplens), 3 gloo ranks: the record's round over a 1-D tensor-parallel mesh of three peers (the lens's
``group`` each rank's own), a regression guard (it passed before this review): rank 0's write failing (a full disk)
and the pool warning raised as an error on rank 2 (its ``-W error``), two causes at once: ranks 0 and 2 raise their
own error, rank 1 a ``RuntimeError`` naming both and quoting each; then all three measure in step again.

Rerun: ``PYTHONPATH=. python -m pytest -q -m slow tests/reliability/test_review30_revtplens_three.py``
"""

from __future__ import annotations

import pytest
from reliability.test_review29_drivertp import _writer
from reliability.test_review29_revtppeers_three import _lens
from reliability.test_review30_revtplens import POOL, failing_tail
from reliability.test_review30_tplens import DISK_FULL, RECORD
from reliability.test_tensor_parallel import _values
from support.ranks import checked_case, run_gloo_cases

WORLD = 3
PG_TIMEOUT_S = 20
DEADLINE_S = 15.0
JOIN_S = 120.0


def _two_causes_then_again(rank: int) -> dict:
    writer = _writer(rank, "revtplens_three")
    lens, out = _lens(rank, writer=writer), {}
    try:
        failing_tail(lens, writer, {2})
    except BaseException as exc:  # noqa: BLE001 - recorded
        out["first"] = f"{type(exc).__name__}: {exc}"
    if writer is not None:  # (failing_tail closed it: a fresh one, rank 0's own)
        writer = _writer(rank, "revtplens_three_again")
        lens.writer = writer
    lens._warn_pool_changed = lambda *args, **kwargs: None
    out["again"] = _values(lens.measure(4, 4))
    out["recorded"] = None if writer is None else sorted(writer.measured_steps())
    return out


CASES = {"two_causes_then_again": _two_causes_then_again}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtplens3"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_of_three_peers_failing_the_tail_with_other_causes_then_a_measurement_in_step(results):
    got = checked_case(results, "two_causes_then_again", DEADLINE_S)
    assert [r["error"] for r in got] == [None] * WORLD, got
    first = [r["value"]["first"] for r in got]
    assert first[0] == f"OSError: {DISK_FULL}" and first[2] == f"SpectralLensWarning: {POOL}", first
    assert first[1].startswith(f"RuntimeError: SpectralLens: {RECORD} failed on global rank(s) [0, 2] (global rank 0: "
                               f"OSError: {DISK_FULL}) (global rank 2: SpectralLensWarning: {POOL})"), first
    again = [r["value"]["again"] for r in got]
    assert again[0] == again[1] == again[2] and again[0], again
    assert [r["value"]["recorded"] for r in got] == [[4], None, None], got
