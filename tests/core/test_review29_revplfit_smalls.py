"""Review of review 29's small fixes (smalls29): Thm. 7's recruitment time at the edge of float64, against exact
rational arithmetic (``Fraction``: ``R^q`` exact for integer ``q``)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from examples.toy import theory as th


def _exact(R, delta, eta, q):
    """``log(1/delta) R^q / eta`` in exact rational arithmetic, rounded once (inf past float64)."""
    t = Fraction(-math.log(delta)) * Fraction(R) ** q / Fraction(eta)
    return math.inf if t > Fraction(th.np.finfo(float).max) else float(t)


@pytest.mark.parametrize("R, q, delta, eta", [
    (2.0, 1024, 0.5, 4.0),        # q log R rounds to log(max float64) exactly: R**q raised OverflowError
    (2.0, 1024, 0.5, 1.0),        # the same, a time past float64 (inf, not OverflowError)
    (10.0, 308, 1e-10, 100.0),    # R**q in range, log(1/delta) R**q past it, the time in range (was inf)
    (10.0, 307, 1e-300, 1e10),    # the same with a large log(1/delta)
    (10.0, 308, 0.1, 1.0),        # R**q in range, the time past it: inf
])
def test_recruitment_time_at_the_edge_of_float64_matches_exact_arithmetic(R, q, delta, eta):
    got, ref = th.recruitment_time(R, delta, eta, q), _exact(R, delta, eta, q)
    assert got == ref if math.isinf(ref) else abs(got - ref) <= 1e-12 * ref, (got, ref)


# ---- accumulator_bytes of masked CPU updates (the compacted path), against the real allocations ---------------

import tracemalloc  # noqa: E402

import torch  # noqa: E402

from spectral_lens import ActivationCovarianceAccumulator, _chunk_sums  # noqa: E402
from spectral_lens._memory import accumulator_bytes  # noqa: E402

from core.test_measurement_memory import _LiveBytes  # noqa: E402


@pytest.mark.parametrize("precision", ["exact", "float64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, chunk", [(2000, 131072), (5000, 131072), (3000, 1000)])
def test_a_masked_cpu_update_is_counted_with_its_copies(precision, dtype, rows, chunk):
    """The torch side (gather buffer; a several-chunk call's compacted chunk) with the
    suite's dispatch-mode counter, the NumPy side (the sample's copy and fp32 cast) with tracemalloc; below
    8,192 rows (no syrk product after them) the two peaks add. 1 row in 64 masked: the estimate counts every
    row, so it may exceed by the masked rows' share; the row indices (NumPy int64) are not counted. The two are
    measured in two updates: the torch counter's own ``weakref.finalize`` entries are Python allocations too (a
    resize of the process's finalizer registry, 147 KB after the rest of the suite, was read as the update's)."""
    d = 128
    torch.manual_seed(0)
    acc = ActivationCovarianceAccumulator(d, precision=precision, max_chunk_rows=chunk)
    x = (torch.randn(4, rows, d, dtype=torch.float64) + 3).to(dtype)
    mask = torch.ones(4, rows, dtype=torch.bool)
    mask[:, ::64] = False
    acc.update(x[0], mask[0])
    with _LiveBytes():  # warm: what a first dispatch mode imports is not the update's
        acc.update(x[1], mask[1])
    if hasattr(_chunk_sums._SCRATCH, "chunks"):  # the recycled scratch, allocated anew as on a first call
        del _chunk_sums._SCRATCH.chunks
    live = _LiveBytes()
    start = live.track(acc)
    with live:
        acc.update(x[2], mask[2])
    tracemalloc.start()
    try:
        acc.update(x[3], mask[3])
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    real = live.peak - start + numpy_peak
    est = accumulator_bytes(d, precision, rows, device_type="cpu", rows_half=dtype != torch.float32,
                            max_chunk_rows=chunk, masked=True)[1]
    slack = 64 * d + 32 * rows + (rows // 64 + 1) * d * 12
    assert -slack <= est - real <= slack, (est, real, live.peak - start, numpy_peak)
