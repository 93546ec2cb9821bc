"""Masked CPU updates: only the kept rows are centred and multiplied (``_cpu_compacted`` on the one-chunk
path, a row gather in ``_call_sums`` on the general one), against float64.

The float64 reference is one ``np.cov`` pass over the kept, finite rows of every call (in the rows'
dtype, then float64). Adversarial pools: means up to 1e6 that drift between calls, spectra conditioned
up to 1e10, masks keeping no row, one row, some, all, or the last position of each sequence (the toy's
``last_position_mask``), NaN/Inf in masked rows (never read) and in kept ones (``nonfinite`` "raise"
names the first such update, "skip" drops and counts them), calls cut into chunks of random length
(``max_chunk_rows``) and the stream split over two accumulators that are merged.
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

TOL = {"float64": 1e-10, "exact": 2e-5}  # relative to the top eigenvalue, as tests/core/test_cpu_update.py
KINDS = ("none", "zero", "one", "some", "all", "last")


def _mask(kind: str, b: int, t: int, rng: np.random.Generator) -> np.ndarray | None:
    if kind == "none":
        return None
    mask = np.zeros((b, t), dtype=bool)
    if kind == "one" and b * t:
        mask.flat[rng.integers(b * t)] = True
    elif kind == "some":
        mask[:] = rng.random((b, t)) < rng.uniform(0.02, 0.95)
    elif kind == "all":
        mask[:] = True
    elif kind == "last":
        mask[:, -1] = True
    return mask


@st.composite
def masked_streams(draw):
    """Calls of (B, T, d) rows of one drifting, ill-conditioned pool, each with a mask of some kind;
    NaN/Inf poured into masked rows, and into kept rows when ``bad_kept``."""
    d = draw(st.sampled_from([1, 2, 5, 17, 64, 130]))
    shapes = draw(st.lists(st.tuples(st.integers(0, 6), st.sampled_from([1, 3, 64, 400])), min_size=1, max_size=6))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=len(shapes), max_size=len(shapes)))
    log_cond = draw(st.floats(0, 10))
    mean_scale = 10 ** draw(st.floats(0, 6))
    drift = draw(st.sampled_from([0.0, 1.0, 1e3, 1e6]))
    bad_kept = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    eig = np.logspace(0, -log_cond, d)
    calls = []
    for (b, t), kind in zip(shapes, kinds):
        x = (rows_with_spectrum(b * t, eig, mean_scale, rng) + drift * rng.uniform(-1, 1, d)).reshape(b, t, d)
        mask = _mask(kind, b, t, rng)
        if mask is not None and (~mask).any():  # masked rows hold anything
            where = np.argwhere(~mask)[rng.integers((~mask).sum(), size=3)]
            for (i, j), v in zip(where, (np.nan, np.inf, -np.inf)):
                x[i, j, rng.integers(d)] = v
        if bad_kept and b * t and rng.random() < 0.5:
            keep = np.ones((b, t), bool) if mask is None else mask
            if keep.any():
                i, j = np.argwhere(keep)[rng.integers(keep.sum())]
                x[i, j, rng.integers(d)] = np.nan
        calls.append((x, mask))
    return calls


def _kept_rows(calls, np_dtype) -> tuple[np.ndarray, int, int]:
    """The kept rows (rounded to the rows' dtype, then float64), the count of kept non-finite rows, and the
    index of the first call with one (-1: none)."""
    rows, bad, first = [], 0, -1
    for i, (x, mask) in enumerate(calls):
        r = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        finite = np.isfinite(r).all(-1)
        if (~finite).any() and first < 0:
            first = i
        bad += int((~finite).sum())
        rows.append(r[finite])
    d = calls[0][0].shape[-1]
    return np.concatenate(rows).reshape(-1, d).astype(np_dtype).astype(np.float64), bad, first


def _feed(acc, calls, dtype):
    for x, mask in calls:
        acc.update(torch.from_numpy(x).to(dtype), None if mask is None else torch.from_numpy(mask))
    return acc


@pytest.mark.parametrize("precision,dtype", [("exact", torch.float32), ("exact", torch.bfloat16),
                                             ("float64", torch.float32), ("float64", torch.float64)])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=masked_streams(), nonfinite=st.sampled_from(["raise", "skip"]),
       max_chunk_rows=st.sampled_from([7, 100, 131072]), split=st.integers(0, 6))
def test_masked_updates_match_float64(precision, dtype, calls, nonfinite, max_chunk_rows, split):
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.float32}[dtype]
    if dtype == torch.bfloat16:  # the reference sees the bf16 values
        calls = [(torch.from_numpy(x).to(dtype).double().numpy(), m) for x, m in calls]
    rows, bad, first = _kept_rows(calls, np_dtype)
    whole = _feed(ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite), calls, dtype)
    split = min(split, len(calls))
    parts = _feed(ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite,
                                                  max_chunk_rows=max_chunk_rows), calls[:split], dtype)
    parts.merge(_feed(ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite,
                                                      max_chunk_rows=max_chunk_rows), calls[split:], dtype))
    if nonfinite == "raise" and bad:
        with pytest.raises(NonFiniteError, match=f"update #{first} "):
            whole.compute()
        with pytest.raises(NonFiniteError, match="non-finite"):
            parts.compute()
        return
    for acc in (whole, parts):
        assert acc.n_rows == rows.shape[0]
        if nonfinite == "skip":
            assert int(acc.state_dict().get("bad_rows", 0)) == bad  # (no key: no row reached the state)
        if rows.shape[0] < 2:
            continue
        ref = np.cov(rows, rowvar=False).reshape(rows.shape[1], rows.shape[1])
        scale = max(float(np.linalg.eigvalsh(ref)[-1]), 1e-300)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped-rows warning
            cov = acc.covariance().numpy()
        assert np.abs(cov - ref).max() <= TOL[precision] * scale
        assert np.abs(acc.mean.numpy() - rows.mean(0)).max() <= TOL[precision] * (np.abs(rows).max() + 1)


def _product_heights(monkeypatch) -> list[int]:
    """Record the row count of every CPU product the accumulator forms for rows of width d < 128: the
    one-chunk path's single GEMM (``torch.mm`` into its scratch) or ``syrk``, and the general path's
    ``symmetric_product`` (one GEMM below d = 128)."""
    heights = []
    mm, product = torch.mm, moments.symmetric_product

    def spy_mm(a, b, **k):
        heights.append(b.shape[0])
        return mm(a, b, **k)

    def spy_product(y, *a, **k):
        heights.append(y.shape[0])
        return product(y, *a, **k)

    monkeypatch.setattr(torch, "mm", spy_mm)
    monkeypatch.setattr(chunk_sums, "symmetric_product", spy_product)
    monkeypatch.setattr(moments, "symmetric_product", spy_product)
    return heights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_chunk_rows", [131072, 5000])
def test_masked_rows_enter_no_product(monkeypatch, dtype, max_chunk_rows):
    """The toy's activation pass (256 sequences x 64 positions, the last one kept) multiplied all
    16,384 rows, 16,128 of them zeroed; now the product sees the 256 kept rows, on the one-chunk path
    and, chunk by chunk, on the general one (calls longer than ``max_chunk_rows``). Unmasked rows and
    masks keeping every row still form one product of all rows."""
    heights = _product_heights(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 64, 24, generator=g) + 7).to(dtype)
    mask = torch.zeros(256, 64, dtype=torch.bool)
    mask[:, -1] = True
    acc = ActivationCovarianceAccumulator(max_chunk_rows=max_chunk_rows)
    acc.update(x, mask)
    # chunk k of the general path holds the last positions among rows [5000 k, 5000 (k + 1))
    expected = [len(range(s + 63 - s % 64, min(s + max_chunk_rows, 16384), 64)) for s in range(0, 16384, max_chunk_rows)]
    assert heights == expected and sum(heights) == 256
    ref = np.cov(x[mask].double().numpy(), rowvar=False)
    assert np.abs(acc.covariance().numpy() - ref).max() <= 2e-5 * np.linalg.eigvalsh(ref)[-1]
    heights.clear()
    acc.update(x, torch.ones(256, 64, dtype=torch.bool))
    acc.update(x)
    assert sum(heights) == 2 * 16384


def test_compacted_shift_is_the_sample_of_the_whole_chunk():
    """The shift of a compacted chunk is, bit for bit, the mean of the rows the shift-sampling rules pick
    on the whole chunk: the valid ones among ``_sample_index(n_rows)``'s rows, summed in the rows' dtype
    (fp32 for half rows), else (every sampled row masked) that sample of the valid rows."""
    rng = np.random.default_rng(3)
    for n_rows, mask in ((16384, np.arange(16384) % 64 == 63), (5000, rng.random(5000) < 0.3),
                         (700, rng.random(700) < 0.5)):
        base = rng.standard_normal((n_rows, 6)) * 3 + 1e4
        for dtype, precision in ((torch.float32, "exact"), (torch.float32, "float64"), (torch.bfloat16, "exact"),
                                 (torch.bfloat16, "float64"), (torch.float64, "exact")):
            x = torch.from_numpy(base).to(dtype)
            acc = ActivationCovarianceAccumulator(precision=precision)
            acc.update(x, torch.from_numpy(mask))
            values = x.float().numpy() if dtype != torch.float64 else x.numpy()
            index = chunk_sums._sample_index(n_rows)
            sample = values[index][mask[index]]
            if not sample.shape[0]:
                kept = np.flatnonzero(mask)
                sample = values[kept[chunk_sums._sample_index(kept.size)]]
            mean = np.add.reduce(sample, 0) / sample.shape[0]
            wide = precision == "float64" or dtype == torch.float64
            expected = mean.astype(np.float64 if wide else np.float32).astype(np.float64)
            assert np.array_equal(acc._shift.numpy(), expected), (n_rows, dtype, precision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compacted_scratch_is_recycled(monkeypatch, dtype):
    """Masked updates of a repeated batch shape reuse the same scratch buffers (the centred rows and the
    half-precision gather), whatever each mask keeps."""
    monkeypatch.setattr(chunk_sums._SCRATCH, "chunks", {}, raising=False)
    g = torch.Generator().manual_seed(1)
    acc = ActivationCovarianceAccumulator()
    seen = None
    for keep in (0.1, 0.5, 0.9, 0.1):
        acc.update((torch.randn(2048, 48, generator=g) + 5).to(dtype), torch.rand(2048, generator=g) < keep)
        cache = {k: v[0].data_ptr() if isinstance(v, tuple) else v.data_ptr()
                 for k, v in chunk_sums._SCRATCH.chunks.items()}
        assert seen is None or cache == seen
        seen = cache
    assert len(seen) == (2 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_underflow_flag_sees_only_kept_rows(dtype):
    """Kept rows of ~1e-24 whose float32 products underflow and whose column sums cancel exactly are
    refused (``_rows_underflowed`` reads the compacted rows); masked rows of ordinary size change
    nothing. Tiny rows that are masked out raise nothing."""
    z = np.random.default_rng(0).choice([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], size=(20, 4))
    tiny = np.concatenate([z, -z]) * 2.0**-80
    big = np.random.default_rng(1).standard_normal((40, 4)) + 3
    x = torch.from_numpy(np.concatenate([tiny, big])).to(dtype)
    keep_tiny = torch.arange(80) < 40
    acc = ActivationCovarianceAccumulator()
    acc.update(x, keep_tiny)
    with pytest.raises(NonFiniteError, match="too small for float32 products"):
        acc.compute()
    acc = ActivationCovarianceAccumulator()
    acc.update(x, ~keep_tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.compute().n_rows == 40 and not acc.state_dict()["products_underflowed"]


@pytest.mark.parametrize("where", ["lower_panels", "_add_lower", "_pending_factors", "_gather_scratch"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupted_masked_update_leaves_state_bit_for_bit(monkeypatch, where, exc):
    """A failure anywhere in a compacted update (the gather, between the product's GEMMs, in the float64
    add, in the flush of deferred terms) leaves the state as it was; the retried update equals one that
    never failed (the gathered rows left in the recycled scratch do not matter)."""
    from support.state import assert_same_state, snapshot

    monkeypatch.setattr(lower_s, "_PENDING", 4)
    monkeypatch.setattr(chunk_sums._SCRATCH, "chunks", {}, raising=False)  # no broken panels left in a shared cache
    g = torch.Generator().manual_seed(2)
    d = 130  # three GEMM panels (64, 64, 2 rows)
    chunks = [(torch.randn(40, d, generator=g) * 3 + 50 * k).bfloat16() for k in range(4)]
    masks = [torch.rand(40, generator=g) < 0.4 for _ in range(4)]

    def fed():
        acc = ActivationCovarianceAccumulator(name="blocks.0")
        for x, m in zip(chunks[:3], masks):
            acc.update(x, m)
        acc.update(chunks[0] * 2, masks[3])  # the 4th; the next one flushes the deferred terms
        return acc

    acc, clean = fed(), fed()
    before = snapshot(acc)
    module = lower_s if where in ("_add_lower", "_pending_factors") else chunk_sums
    real = getattr(module, where)
    if where == "lower_panels":
        def fail(y, out):
            panels = real(y, out)

            def first_then_fail():
                yield panels[0]
                raise exc

            return first_then_fail()
    else:
        def fail(*args, **kwargs):
            raise exc

    x, m = chunks[3] + 1e4, ~masks[3]
    with monkeypatch.context() as patch:
        patch.setattr(module, where, fail)
        with pytest.raises(type(exc)):
            acc.update(x, m)
    assert getattr(module, where) is real
    if where == "_add_lower":  # the float64 add into S in place, the commit's last step: the state is torn
        from support.state import assert_refused_until_reset

        assert_refused_until_reset(acc, x, m)
        return
    assert_same_state(snapshot(acc), before)
    acc.update(x, m)
    clean.update(x, m)
    assert_same_state(snapshot(acc), snapshot(clean))
