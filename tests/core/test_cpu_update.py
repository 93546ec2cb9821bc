"""The CPU one-chunk update path (``ActivationCovarianceAccumulator._cpu_update``) against float64.

That path adds only the lower triangle of ``S`` (by row blocks), defers each update's rank-2
re-shift term and applies them as one GEMM every ``_PENDING`` updates or on the first read, and
forms the product from lower block-row panels (``moments._gemm_lower``). These tests drive it
across the flush boundary, with reads in between, mixed with the general (multi-chunk, half
precision) path, on adversarial pools: means up to 1e4 that drift between updates and
spectra conditioned up to 1e10. The float64 reference is one ``np.cov`` pass over the same rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spectral_lens._chunk_sums as chunk_sums
import spectral_lens._lower_s as lower_s
import spectral_lens.spectra.moments as moments
from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError

from support.data import rows_with_spectrum
from support.state import assert_refused_until_reset, assert_same_state as _assert_same_state, snapshot as _snapshot

TOL = {"float64": 1e-10, "exact": 2e-5}  # as tests/core/test_accumulator.py, relative to the top eigenvalue
DTYPE = {"float64": torch.float64, "exact": torch.float32}


def _assert_cov(acc: ActivationCovarianceAccumulator, rows: np.ndarray, tol: float) -> None:
    ref = np.cov(rows, rowvar=False).reshape(rows.shape[1], rows.shape[1])
    scale = max(float(np.linalg.eigvalsh(ref)[-1]), 1e-300)
    cov = acc.covariance().numpy()
    assert np.array_equal(cov, cov.T)
    assert np.abs(cov - ref).max() <= tol * scale
    assert acc.n_rows == rows.shape[0]
    mean_tol = tol * (np.abs(rows).max() + 1)
    assert np.abs(acc.mean.numpy() - rows.mean(0)).max() <= mean_tol


@st.composite
def update_streams(draw):
    """Many small updates of one drifting, ill-conditioned pool; some too long for one chunk."""
    d = draw(st.integers(1, 40))
    count = draw(st.integers(1, 80))
    sizes = draw(st.lists(st.integers(1, 90), min_size=count, max_size=count))
    log_cond = draw(st.floats(0, 10))
    mean_scale = 10 ** draw(st.floats(-1, 4))
    drift = draw(st.sampled_from([0.0, 1.0, 1e2, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    eig = np.logspace(0, -log_cond, d)
    parts = [rows_with_spectrum(k, eig, mean_scale, rng) + drift * rng.uniform(-1, 1, d) for k in sizes]
    reads = draw(st.sets(st.integers(0, count - 1), max_size=4))  # read the state after these updates
    masked = draw(st.booleans())
    masks = [rng.random(k) > 0.3 for k in sizes] if masked else None
    return parts, reads, masks, seed


@pytest.mark.parametrize("precision", ["exact", "float64"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=update_streams(), pending=st.sampled_from([1, 2, 5, 32]), max_chunk_rows=st.sampled_from([64, 131072]))
def test_many_small_updates_match_float64(precision, stream, pending, max_chunk_rows):
    """Deferred re-shifts flushed every ``pending`` updates and on reads (``state_dict``, ``mean``,
    ``covariance``), fast and general paths mixed (chunks over 64 rows take the general one)."""
    parts, reads, masks, _ = stream
    dtype = DTYPE[precision]
    previous = lower_s._PENDING
    lower_s._PENDING = pending
    try:
        acc = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=max_chunk_rows)
        kept = []
        for i, part in enumerate(parts):
            mask = None if masks is None else torch.from_numpy(masks[i])
            acc.update(torch.from_numpy(part).to(dtype), mask=mask)
            if i in reads:
                if acc.n_rows:  # every row so far may be masked out: mean needs one
                    acc.mean  # a read of m and n only: deferred terms stay deferred
                kept.append(acc.state_dict()["s"].clone())  # applies them
    finally:
        lower_s._PENDING = previous
    rows = [p if masks is None else p[masks[i]] for i, p in enumerate(parts)]
    rows = np.concatenate(rows).astype(np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)
    if rows.shape[0] < 2:
        return
    _assert_cov(acc, rows, TOL[precision])


@pytest.mark.parametrize("precision", ["exact", "float64"])
def test_wide_rows_many_updates_match_float64(precision):
    """d = 200 and 1,100: the panel product (64- and 128-wide panels, a partial last one), 40 updates
    (one flush of deferred terms and a remainder), a pool mean of 1e4 drifting by 1e3 per update and
    a 1e8-conditioned spectrum."""
    rng = np.random.default_rng(11)
    for d, count, rows_per in ((200, 40, 150), (1100, 3, 40)):
        eig = np.logspace(0, -8, d)
        parts = [rows_with_spectrum(rows_per, eig, 1e4, rng) + 1e3 * k for k in range(count)]
        acc = ActivationCovarianceAccumulator(precision=precision)
        for part in parts:
            acc.update(torch.from_numpy(part).to(DTYPE[precision]))
        rows = np.concatenate(parts)
        if precision == "exact":
            rows = rows.astype(np.float32).astype(np.float64)
        _assert_cov(acc, rows, TOL[precision])


@pytest.mark.parametrize("d", [128, 191, 256, 1100])
def test_panel_product_matches_float64(d):
    g = torch.Generator().manual_seed(d)
    y = torch.randn(37, d, generator=g, dtype=torch.float64) * torch.logspace(0, -6, d, dtype=torch.float64) + 3.0
    ref = y.t() @ y
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        low = moments._gemm_lower(y.to(dtype)).double()
        assert ((low - ref).tril().abs() <= tol * ref.abs().max()).all()


@pytest.mark.parametrize("where", ["product", "_add_lower", "_pending_factors"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupted_cpu_update_leaves_state_bit_for_bit(monkeypatch, where, exc):
    """A failure anywhere in the CPU path (between the product's GEMMs, in the float64 add, in the
    flush of deferred terms) leaves the state as it was; the retried update equals one that never
    failed (the recycled scratch buffers it left half-written do not matter)."""
    monkeypatch.setattr(lower_s, "_PENDING", 4)
    g = torch.Generator().manual_seed(1)
    d = 130  # three GEMM panels (64, 64, 2 rows)
    chunks = [torch.randn(20, d, generator=g) * 3 + 50 * k for k in range(4)]

    def fed():
        acc = ActivationCovarianceAccumulator(name="blocks.0")
        for x in chunks[:3]:  # 2 deferred terms after these (the first update has none)
            acc.update(x)
        acc.update(chunks[0] * 2)  # the 3rd; the next one flushes
        return acc

    acc, clean = fed(), fed()
    before = _snapshot(acc)
    if where == "product":
        real = chunk_sums._chunk_scratch

        def fail(*args, **kwargs):
            y, out, panels = real(*args, **kwargs)

            def first_then_fail():
                yield panels[0]
                raise exc

            return y, out, first_then_fail()
        where, module = "_chunk_scratch", chunk_sums
    else:
        module = lower_s
        real = getattr(module, where)

        def fail(*args, **kwargs):
            raise exc

    x = chunks[3] + 1e4
    with monkeypatch.context() as patch:
        patch.setattr(module, where, fail)
        with pytest.raises(type(exc)):
            acc.update(x)
    assert getattr(module, where) is real
    if where == "_add_lower":  # the float64 add into S in place, the commit's last step: the state is torn
        assert_refused_until_reset(acc, x)
        return
    _assert_same_state(_snapshot(acc), before)
    acc.update(x)
    clean.update(x)
    _assert_same_state(_snapshot(acc), _snapshot(clean))



def test_scratch_is_per_thread_and_bounded(monkeypatch):
    """Recycled chunk buffers: per thread (accumulators updated from two threads at once stay exact),
    at most _SCRATCH_SHAPES shapes, none above _SCRATCH_MAX_BYTES."""
    import threading

    monkeypatch.setattr(chunk_sums, "_SCRATCH_MAX_BYTES", 16 * 1024)
    rng = np.random.default_rng(4)
    pools = [rows_with_spectrum(600, np.logspace(0, -6, 24), 1e4, rng) for _ in range(2)]
    accs = [ActivationCovarianceAccumulator(precision="exact") for _ in pools]
    errors = []

    def feed(acc, rows):
        try:
            for start in range(0, rows.shape[0], 40):  # 40 x 24 fp32 rows: cached
                acc.update(torch.from_numpy(rows[start : start + 40]).float())
            acc.update(torch.from_numpy(rows).float())  # 600 x 24: over the byte bound, fresh buffers
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=feed, args=(a, p)) for a, p in zip(accs, pools)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for acc, rows in zip(accs, pools):
        both = np.concatenate([rows, rows]).astype(np.float32).astype(np.float64)
        _assert_cov(acc, both, TOL["exact"])
    for d in (5, 6, 7, 8, 9, 10):
        ActivationCovarianceAccumulator().update(torch.randn(3, d))
    cache = chunk_sums._SCRATCH.chunks
    assert len(cache) <= chunk_sums._SCRATCH_SHAPES
    assert all((n + d) * d * 4 <= 16 * 1024 for n, d, _ in cache)


def test_state_read_mid_stream_is_not_changed_by_later_updates():
    """A read applies the deferred terms into a new tensor; later updates never write into it."""
    acc = ActivationCovarianceAccumulator(5)
    g = torch.Generator().manual_seed(2)
    for k in range(7):
        acc.update(torch.randn(30, 5, generator=g) + 10 * k)
    sd = acc.state_dict()
    kept = {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for k in range(40):
        acc.update(torch.randn(30, 5, generator=g) - 10 * k)
    for key, value in kept.items():
        assert torch.equal(sd[key], value), key


def test_nonfinite_rows_warn_nothing_and_are_reported():
    """NaN/Inf rows and an fp64 row beyond fp32 range in 'exact' mode: no NumPy warning from the CPU
    path (users run with -W error); compute() names the first bad update, as on the other paths."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = ActivationCovarianceAccumulator(3, name="mlp")
        acc.update(torch.randn(8, 3))
        acc.update(torch.randn(8, 3))
        bad = torch.randn(8, 3)
        bad[2, 1] = float("inf")
        bad[5, 0] = float("nan")
        acc.update(bad)
        acc.update(torch.full((4, 3), 1e300, dtype=torch.float64))
        acc.update(torch.full((4, 3), -float("inf")))
        with pytest.raises(NonFiniteError, match="update #2"):
            acc.compute()
        skip = ActivationCovarianceAccumulator(3, nonfinite="skip")
        skip.update(torch.randn(8, 3))
        skip.update(bad)
        skip.update(torch.randn(8, 3) + 1e4)
        assert skip.n_rows == 22


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    precision=st.sampled_from(["exact", "fast", "float64"]),
    nonfinite=st.sampled_from(["raise", "skip"]),
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=5),
    d=st.integers(1, 20),
    masked=st.booleans(),
    poison=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_half_rows_give_the_bits_of_fp32_rows(dtype, precision, nonfinite, sizes, d, masked, poison, seed):
    """bf16/fp16 CPU rows are converted exactly into the one-chunk path's scratch and centred there:
    the state equals, bit for bit, that of the same values passed as fp32 rows (masks, NaN/Inf rows
    and both ``nonfinite`` policies included; scratch shapes reused across updates)."""
    g = torch.Generator().manual_seed(seed)
    half = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite)
    full = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite)
    for n in sizes:
        x = (torch.randn(n, d, generator=g) * 3 + 100).to(dtype)
        if poison:
            x[torch.randint(0, n, (1,), generator=g), torch.randint(0, d, (1,), generator=g)] = float("nan")
        mask = (torch.rand(n, generator=g) > 0.3) if masked else None
        half.update(x, mask)
        full.update(x.float(), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = half.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]) or (a[k].is_floating_point() and torch.equal(a[k].nan_to_num(), b[k].nan_to_num())), k
        else:
            assert a[k] == b[k], k
