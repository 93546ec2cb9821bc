"""Both update paths against float64 on adversarial streams: masks, NaN/Inf rows, chunkings.

``update`` takes the generic path (``_chunk_sums._call_sums`` -> ``_commit``; every CUDA update) for calls
longer than ``max_chunk_rows``, and the CPU one-chunk path (``_cpu_update``) for CPU rows (half
precision ones converted to fp32 first). Here bf16 rows are also sent down the generic path on
purpose (``_chunk_sums._CPU_HALF`` emptied), the way CUDA rows go. Both keep the call's shift in the dtype it is subtracted
in, read row counts on the device (generic path) and track the first update with NaN/Inf rows in
the state's ``first_bad``; the CPU path checks the rows for NaN/Inf only when a column sum is not
finite. Here mixed streams of both paths are checked against one float64 pass over the rows that
should count, and the NaN/Inf bookkeeping against the updates that held such rows.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import spectral_lens._chunk_sums as chunk_sums
from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError, NonFiniteRowsWarning
from spectral_lens.spectra import fast_moments
from spectral_lens.spectra.moments import chunk_moments, representable_shift, shift_dtype

from support.data import rows_with_spectrum

TOL = 2e-5  # fp32 products merged in float64, relative to the top eigenvalue (as test_accumulator.py)
# how a part enters update: dtype and max_chunk_rows (16: a part over 16 rows takes several chunks)
# "bf16-generic": bf16 rows on the generic path (what CUDA rows take), not converted to fp32
ROUTES = {"bf16": (torch.bfloat16, 131072), "bf16-generic": (torch.bfloat16, 131072), "fp32": (torch.float32, 131072),
          "fp32-chunked": (torch.float32, 16)}


def _route(route: str):
    """A context in which ``update`` takes ``route``'s path."""
    return mock.patch.object(chunk_sums, "_CPU_HALF", () if route == "bf16-generic" else chunk_sums._CPU_HALF)


@st.composite
def streams(draw):
    """Updates of one drifting, ill-conditioned pool, each through a drawn route, with drawn masks
    and NaN/Inf entries (in valid and in masked-out rows)."""
    d = draw(st.integers(1, 12))
    count = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    eig = np.logspace(0, -draw(st.floats(0, 8)), d)
    mean_scale = 10 ** draw(st.floats(-1, 4))
    parts = []
    for _ in range(count):
        k = draw(st.integers(1, 40))
        rows = rows_with_spectrum(k, eig, mean_scale, rng) + draw(st.sampled_from([0.0, 1e2, 1e4])) * rng.uniform(-1, 1, d)
        mask = rng.random(k) > 0.4 if draw(st.booleans()) else None
        poisoned = draw(st.sets(st.integers(0, k - 1), max_size=2))
        for i in poisoned:
            rows[i, rng.integers(d)] = rng.choice([np.nan, np.inf, -np.inf])
        parts.append((draw(st.sampled_from(sorted(ROUTES))), rows, mask))
    return parts, draw(st.sampled_from(["exact", "fast"]))


def _expected(parts, dtypes):
    """Rows that should count (valid and finite, as the route's dtype stores them), skipped count,
    first update with a non-finite valid row."""
    kept, skipped, first = [], 0, -1
    for i, ((_, rows, mask), dtype) in enumerate(zip(parts, dtypes)):
        stored = torch.from_numpy(rows).to(dtype).double().numpy()
        valid = np.ones(len(rows), bool) if mask is None else mask
        finite = np.isfinite(stored).all(1)
        bad = int((valid & ~finite).sum())
        skipped += bad
        if bad and first < 0:
            first = i
        kept.append(stored[valid & finite])
    return np.concatenate(kept), skipped, first


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), nonfinite=st.sampled_from(["raise", "skip"]))
def test_mixed_paths_match_float64(stream, nonfinite):
    parts, precision = stream
    acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, name="blocks.2")
    dtypes = []
    for route, rows, mask in parts:
        dtype, max_chunk_rows = ROUTES[route]
        dtypes.append(dtype)
        acc.max_chunk_rows = max_chunk_rows
        with _route(route):
            acc.update(torch.from_numpy(rows).to(dtype), mask=None if mask is None else torch.from_numpy(mask))
    kept, skipped, first = _expected(parts, dtypes)
    if nonfinite == "raise" and first >= 0:
        with pytest.raises(NonFiniteError, match=rf"blocks\.2: non-finite values .* update #{first} "):
            acc.compute()
        return
    assert acc.n_rows == len(kept)
    assert int(acc.state_dict()["bad_rows"]) == skipped
    assert int(acc.state_dict()["first_bad"]) == first
    if len(kept) < 2:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteRowsWarning)
        cov = acc.covariance().numpy()
        mean = acc.mean.numpy()
    ref = np.cov(kept, rowvar=False).reshape(cov.shape)
    scale = max(float(np.linalg.eigvalsh(ref)[-1]), 1e-300)
    assert np.abs(cov - ref).max() <= TOL * scale
    assert np.abs(mean - kept.mean(0)).max() <= TOL * (np.abs(kept).max() + 1)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_first_bad_update_is_kept(route):
    """The first update with NaN/Inf in a valid row is the one named; NaN in masked-out rows and
    later bad updates change nothing."""
    dtype, max_chunk_rows = ROUTES[route]
    g = torch.Generator().manual_seed(3)

    def rows():
        return (torch.randn(30, 4, generator=g) + 100).to(dtype)

    masked_nan, bad, worse = rows(), rows(), rows()
    masked_nan[5] = float("nan")
    bad[7, 2] = float("inf")
    worse[:] = float("nan")
    keep = torch.ones(30, dtype=torch.bool)
    keep[5] = False
    for nonfinite in ("raise", "skip"):
        acc = ActivationCovarianceAccumulator(nonfinite=nonfinite, max_chunk_rows=max_chunk_rows, name="mlp")
        with _route(route):
            acc.update(rows())
            acc.update(masked_nan, mask=keep)  # update #1: the NaN row is masked out
            acc.update(rows())
            acc.update(bad)  # update #3
            acc.update(worse)
            acc.update(rows())
        if nonfinite == "raise":
            with pytest.raises(NonFiniteError, match=r"mlp: non-finite values .* update #3 "):
                acc.compute()
        else:
            with pytest.warns(NonFiniteRowsWarning, match=re.escape("mlp: skipped 31 rows containing NaN/Inf (first in update #3)")):
                assert acc.compute().n_rows == 29 + 30 + 30 + 29 + 30


def test_generic_path_reads_nothing_on_the_host():
    """No value of a tensor is read by the host in the generic path (on CUDA that would be a sync):
    every ``.item()``, ``int(t)``, ``bool(t)`` dispatches ``_local_scalar_dense``."""

    class NoScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a host read of a tensor value"
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 6, generator=g) * 3 + 1e3).to(torch.bfloat16)
    x[3, 1] = float("nan")
    mask = torch.rand(50, generator=g) > 0.2
    for precision in ("exact", "fast", "float64"):
        for nonfinite in ("raise", "skip"):
            for max_chunk_rows in (131072, 16):
                acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, max_chunk_rows=max_chunk_rows)
                acc.update(x[:10])
                with NoScalarReads(), _route("bf16-generic"):
                    acc.update(x)
                    acc.update(x, mask=mask)
                    acc.update(x[:0])


@pytest.mark.parametrize("precision", ["exact", "fast", "float64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_shift_in_its_own_dtype_gives_the_same_sums(precision, dtype):
    """chunk_moments and center_cast take the shift as float64 or in shift_dtype (what the
    accumulator passes): the same sums bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(70, 9, generator=g) * 2 + 300).to(dtype)
    valid = torch.rand(70, generator=g) > 0.3
    shift64 = representable_shift(x[:20].double().mean(0), precision, dtype)
    low = shift64.to(shift_dtype(precision, dtype))
    assert torch.equal(low.double(), shift64)
    for a, b in zip(chunk_moments(x, shift64, precision, valid), chunk_moments(x, low, precision, valid)):
        assert torch.equal(a, b)
    if dtype != torch.float64:
        for a, b in zip(fast_moments.center_cast(x, shift64, valid, use_triton=False),
                        fast_moments.center_cast(x, low, valid, use_triton=False)):
            assert torch.equal(a, b)


def test_generic_path_kernel_count_does_not_grow(monkeypatch):
    """Kernel-launching aten ops per update of the generic path, as ``bench_covariance.py --fixed-cost``
    counts them (16 x 8 bf16 rows on the CPU). On CUDA the count is the same: one more there for the
    float64 add NumPy does here, one fewer for the centring, which the CPU runs as a conversion and a
    subtraction (a single mixed-dtype kernel on CUDA, a slow path on the CPU). Before the count was
    trimmed: 21/40/34/42 (exact) and 22/41/35/43 (fast), with the single centring op. Updates with a mask
    or ``nonfinite="skip"`` pay five more than at that trim (2026-11-27): their shift's row sample is
    spaced among the valid rows (``cumsum``, ``arange``, two integer ops, ``searchsorted``, ``index_select``,
    ``mean``, ``nan_to_num_`` instead of six masked-sum ops; see ``test_mask_that_misses_every_evenly_spaced_row``),
    and as their rows are counted on the device the host cannot tell whether the state holds rows yet
    (``gt``, ``where``: see ``test_rows_far_from_zero_after_an_update_without_valid_rows``)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_covariance

    threads = torch.get_num_threads()
    try:
        rows = bench_covariance.fixed_cost(updates=1, repeats=1)
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_covariance", None)
    counts = {(r["precision"], r["masked"], r["nonfinite"]): r["ops_per_update"] for r in rows if r["path"] == "generic"}
    most = {("exact", False, "raise"): 16, ("exact", False, "skip"): 31, ("exact", True, "raise"): 28,
            ("exact", True, "skip"): 33, ("fast", False, "raise"): 18, ("fast", False, "skip"): 33,
            ("fast", True, "raise"): 30, ("fast", True, "skip"): 35}
    assert counts.keys() == most.keys()
    assert all(counts[k] <= most[k] for k in most), counts


@pytest.mark.parametrize("precision", ["exact", "fast", "float64"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_device_path_runs_on_the_meta_device(precision, nonfinite):
    """The branches taken for non-CPU tensors (as on CUDA: torch adds instead of NumPy, the GEMM
    product, multi-chunk calls) run on the meta device, which has no data to read: no host reads,
    consistent dtypes and shapes."""
    acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, max_chunk_rows=16)
    x = torch.randn(40, 8, device="meta", dtype=torch.bfloat16)
    acc.update(x)
    acc.update(x, torch.ones(40, dtype=torch.bool, device="meta"))
    acc.update(x[:10].float())
    assert acc._s_lower.shape == (8, 8) and acc._s_lower.dtype == acc._shift.dtype == torch.float64
    assert acc._m.dtype == torch.float64 and acc._first_bad.dtype == acc._n.dtype == torch.int64
    assert acc._updates == 3
