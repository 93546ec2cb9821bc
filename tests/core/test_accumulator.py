"""ActivationCovarianceAccumulator against float64 references on adversarial data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError, NonFiniteRowsWarning, StateFormatError

from support.data import as_tensor, reference_eigenvalues, rows_with_spectrum

# Tolerances per precision mode, relative to the largest eigenvalue (entries and eigenvalues):
# float64 products are at round-off level; fp32 products (chunk sums merged in float64) at ~1e-6.
TOL = {"float64": 1e-10, "exact": 2e-5}
INPUT_DTYPE = {"float64": torch.float64, "exact": torch.float32}


def _accumulate(rows: torch.Tensor, sizes: list[int], precision: str, **kw) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(precision=precision, **kw)
    start = 0
    for size in sizes:
        if size:
            acc.update(rows[start : start + size])
        start += size
    if start < rows.shape[0]:
        acc.update(rows[start:])
    return acc


def _assert_matches(acc, rows_np: np.ndarray, tol: float) -> None:
    ref_cov = np.cov(rows_np, rowvar=False)
    ref_eig = np.linalg.eigvalsh(ref_cov)[::-1]
    scale = ref_eig[0]
    cov = acc.covariance().numpy()
    assert np.abs(cov - ref_cov).max() <= tol * scale
    spectrum = acc.compute()
    assert spectrum.n_rows == rows_np.shape[0]
    assert np.abs(spectrum.values.numpy() - np.clip(ref_eig, 0, None)).max() <= tol * scale
    assert np.allclose(acc.mean.numpy(), rows_np.mean(0), rtol=0, atol=tol * (np.abs(rows_np).max() + 1))


@st.composite
def pools(draw):
    d = draw(st.integers(2, 24))
    n = draw(st.integers(d + 2, 400))
    log_cond = draw(st.floats(0, 12))
    mean_scale = 10 ** draw(st.floats(-1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    eig = np.logspace(0, -log_cond, d)
    rows = rows_with_spectrum(n, eig, mean_scale, rng)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    sizes = np.diff([0, *cuts, n]).tolist()
    return rows, sizes, seed


@pytest.mark.parametrize("precision", ["float64", "exact"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=pools())
def test_random_chunkings_equal_one_float64_pass(precision, pool):
    rows, sizes, _ = pool
    x = as_tensor(rows, INPUT_DTYPE[precision])
    acc = _accumulate(x, sizes, precision, max_chunk_rows=97)
    _assert_matches(acc, x.double().numpy(), TOL[precision])


@pytest.mark.parametrize("precision", ["float64", "exact"])
@settings(max_examples=30, deadline=None)
@given(pool=pools(), data=st.data())
def test_merges_in_any_order_equal_one_pass(precision, pool, data):
    rows, sizes, seed = pool
    x = as_tensor(rows, INPUT_DTYPE[precision])
    parts, start = [], 0
    for size in [*sizes]:
        parts.append(x[start : start + size])
        start += size
    parts = [p for p in parts if p.shape[0]]
    order = data.draw(st.permutations(range(len(parts))))
    accs = []
    for i in order:
        a = ActivationCovarianceAccumulator(precision=precision)
        a.update(parts[i])
        accs.append(a)
    # merge as a random binary tree
    rng = np.random.default_rng(seed)
    while len(accs) > 1:
        i, j = sorted(rng.choice(len(accs), 2, replace=False))
        merged = accs[i].merge(accs.pop(j))
        accs[i] = merged
    _assert_matches(accs[0], x.double().numpy(), TOL[precision])


@pytest.mark.parametrize("precision", ["float64", "exact"])
@settings(max_examples=25, deadline=None)
@given(pool=pools(), offsets=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=6))
def test_drifting_pool_means(precision, pool, offsets):
    """Chunks whose means jump by up to 1e4 from chunk to chunk: each chunk's own shift keeps fp32 exact."""
    rows, sizes, _ = pool
    rows = rows.copy()
    start = 0
    for size, off in zip(sizes, offsets * len(sizes)):
        rows[start : start + size] += off
        start += size
    x = as_tensor(rows, INPUT_DTYPE[precision])
    acc = _accumulate(x, sizes, precision)
    _assert_matches(acc, x.double().numpy(), TOL[precision])


def test_merge_into_empty_and_from_empty():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rows_with_spectrum(300, np.logspace(0, -3, 8), 100.0, rng))
    full = ActivationCovarianceAccumulator(precision="float64")
    full.update(x)
    empty = ActivationCovarianceAccumulator(precision="float64")
    empty.merge(full)
    full.merge(ActivationCovarianceAccumulator(precision="float64"))
    _assert_matches(empty, x.numpy(), 1e-10)
    _assert_matches(full, x.numpy(), 1e-10)


def test_uncentered_accumulation_would_fail_but_shifted_does_not():
    """The accuracy trap of gpu-anchors.md, reproduced in fp32: raw moments lose the tail, shifted sums keep it."""
    rng = np.random.default_rng(1)
    eig = np.arange(1, 65, dtype=np.float64) ** -1.2
    rows = rows_with_spectrum(20000, eig, 5e3, rng).astype(np.float32)
    ref = reference_eigenvalues(rows)
    x = torch.from_numpy(rows)
    raw = (x.T @ x).double() / len(x) - torch.outer(x.double().mean(0), x.double().mean(0))
    raw_err = np.abs(np.linalg.eigvalsh(raw.numpy())[::-1][32:] - ref[32:]) / ref[32:]
    acc = ActivationCovarianceAccumulator(precision="exact")
    for c in x.split(4096):
        acc.update(c)
    ours = acc.compute().values.numpy()
    ours_err = np.abs(ours[32:] - ref[32:]) / ref[32:]
    assert raw_err.max() > 0.5  # the trap is real
    assert ours_err.max() < 1e-3


def test_leading_dims_flattened_and_mask_drops_rows():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rows_with_spectrum(2 * 3 * 50, np.logspace(0, -2, 6), 10.0, rng)).reshape(2, 3, 50, 6)
    mask = torch.from_numpy(rng.random((2, 3, 50)) > 0.3)
    x_with_garbage = x.clone()
    x_with_garbage[~mask] = float("nan")  # padding positions may hold anything
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(x_with_garbage, mask=mask)
    _assert_matches(acc, x[mask].numpy(), 1e-10)


def test_resume_mid_pool_equals_uninterrupted(tmp_path):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rows_with_spectrum(1000, np.logspace(0, -6, 16), 1e3, rng)).float()
    chunks = x.split(128)
    full = ActivationCovarianceAccumulator(precision="exact")
    for c in chunks:
        full.update(c)
    first = ActivationCovarianceAccumulator(precision="exact")
    for c in chunks[:3]:
        first.update(c)
    path = first.save(tmp_path / "state.npz")
    resumed = ActivationCovarianceAccumulator.load(path)
    via_dict = ActivationCovarianceAccumulator(precision="exact")
    via_dict.load_state_dict(first.state_dict())
    for acc in (resumed, via_dict):
        for c in chunks[3:]:
            acc.update(c)
        assert torch.equal(acc.covariance(), full.covariance())  # same operations, same order: bit-identical
        assert torch.equal(acc.compute().values, full.compute().values)


@pytest.mark.parametrize("precision, tol", [("exact", 2e-5), ("fast", 2e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_any_input_dtype(dtype, precision, tol):
    """Every input dtype in every precision against float64 sums of the same (rounded) rows: half
    rows on the CPU are converted to fp32 exactly, so float64 precision stays float64-exact."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rows_with_spectrum(500, np.logspace(0, -2, 8), 3.0, rng)).to(dtype)
    acc = ActivationCovarianceAccumulator(precision=precision)
    acc.update(x[:137])
    acc.update(x[137:])
    _assert_matches(acc, x.double().numpy(), tol)


def test_nonfinite_raise_names_module_and_update():
    acc = ActivationCovarianceAccumulator(name="blocks.11")
    acc.update(torch.randn(10, 4))
    bad = torch.randn(10, 4)
    bad[3, 1] = float("inf")
    acc.update(bad)
    acc.update(torch.randn(10, 4))
    with pytest.raises(NonFiniteError, match=r"blocks\.11.*update #1"):
        acc.compute()


def test_nonfinite_skip_counts_and_equals_clean_rows():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rows_with_spectrum(200, np.logspace(0, -3, 5), 50.0, rng))
    dirty = x.clone()
    dirty[[0, 17, 150], 2] = float("nan")
    dirty[42, 0] = float("-inf")
    acc = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip", name="h")
    acc.update(dirty[:100])
    acc.update(dirty[100:])
    keep = torch.ones(200, dtype=torch.bool)
    keep[[0, 17, 150, 42]] = False
    with pytest.warns(NonFiniteRowsWarning, match="skipped 4 rows"):
        spectrum = acc.compute()
    assert spectrum.metadata["skipped_rows"] == 4
    assert spectrum.n_rows == 196
    with pytest.warns(NonFiniteRowsWarning):
        _assert_matches(acc, x[keep].numpy(), 1e-10)


def test_bad_inputs_have_clear_errors(tmp_path):
    acc = ActivationCovarianceAccumulator(8, name="layer.3")
    with pytest.raises(ValueError, match=r"layer\.3.*d=8.*\(5, 7\)"):
        acc.update(torch.randn(5, 7))
    with pytest.raises(TypeError, match=r"layer\.3.*floating point.*int64"):
        acc.update(torch.ones(5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"need at least 2 rows, have 0"):
        acc.compute()
    acc.update(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"need at least 2 rows, have 1"):
        acc.compute()
    with pytest.raises(ValueError, match=r"mask shape \(4,\)"):
        acc.update(torch.randn(5, 8), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        acc.update(torch.randn(5, 8), mask=torch.ones(5))
    with pytest.raises(ValueError, match="precision"):
        ActivationCovarianceAccumulator(precision="tf16")
    with pytest.raises(ValueError, match="cannot merge d=3 into d=8"):
        other = ActivationCovarianceAccumulator()
        other.update(torch.randn(4, 3))
        acc.merge(other)


def test_corrupted_state_files(tmp_path):
    acc = ActivationCovarianceAccumulator(precision="exact")
    acc.update(torch.randn(20, 4))
    good = acc.save(tmp_path / "good.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (garbage, truncated):
        with pytest.raises(StateFormatError, match=str(path.name)):
            ActivationCovarianceAccumulator.load(path)
    sd = acc.state_dict()
    wrong = ActivationCovarianceAccumulator(precision="exact")
    with pytest.raises(StateFormatError, match=r"'s' must be a tensor of shape \(4, 4\)"):
        wrong.load_state_dict({**sd, "s": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(StateFormatError, match="precision 'exact' differs"):
        ActivationCovarianceAccumulator(precision="float64").load_state_dict(sd)
    with pytest.raises(StateFormatError, match="not an ActivationCovarianceAccumulator state"):
        wrong.load_state_dict({"format": "something else"})
    # a spectrum file is not an accumulator state
    spectrum_file = acc.compute().save(tmp_path / "spectrum.npz")
    with pytest.raises(StateFormatError):
        ActivationCovarianceAccumulator.load(spectrum_file)


def test_update_after_sync_is_refused_and_reset_recovers():
    acc = ActivationCovarianceAccumulator(name="x")
    acc.update(torch.randn(8, 3))
    acc._synced = True  # as after a multi-rank sync
    with pytest.raises(RuntimeError, match="reset"):
        acc.update(torch.randn(8, 3))
    acc.reset()
    acc.update(torch.randn(8, 3))
    assert acc.n_rows == 8


@pytest.mark.parametrize("d", [1, 5, 200, 700])
def test_symmetric_block_product_equals_one_gemm(d):
    from spectral_lens.spectra.moments import symmetric_product

    y = torch.randn(300, d, dtype=torch.float64)
    assert torch.allclose(symmetric_product(y, blocks=True), y.t() @ y, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d", [(1, 1), (300, 5), (64, 257), (2, 300)])
def test_symmetric_product_cpu_syrk(dtype, n, d):
    """The CPU default (BLAS syrk via SciPy) is exactly symmetric and matches float64 to rounding,
    also for non-contiguous input."""
    from spectral_lens.spectra.moments import symmetric_product

    y = (torch.randn(d, n, dtype=torch.float64) + 3.0).t().to(dtype)  # transposed: not contiguous
    s = symmetric_product(y)
    assert s.dtype == dtype and s.shape == (d, d) and torch.equal(s, s.t())
    ref = y.double().t() @ y.double()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert ((s.double() - ref).abs() <= tol * ref.abs().max()).all()


@pytest.mark.parametrize("how", ["one_chunk", "chunks", "merge", "merge_empty_first", "skip_nan", "reload"])
def test_rows_far_from_zero_after_an_update_without_valid_rows(how, tmp_path):
    """A first update whose rows are all masked (or all NaN under nonfinite='skip') has no rows to take a
    shift from; the shift it got (0) used to stay the state's, so rows with a mean of 1e8 and a spread of
    1 were re-shifted around 0 and their covariance lost every digit (eigenvalues off by 10x the largest).
    The first rows now give the shift, on every path: one-chunk CPU updates, chunked calls (an all-masked
    first chunk), merges and a saved-and-reloaded empty state."""
    rng = np.random.default_rng(3)
    d = 12
    rows = rng.standard_normal((600, d)) * np.logspace(0, -3, d) + 1e8 * rng.uniform(0.5, 1.5, d)
    x = torch.from_numpy(rows)
    none = torch.zeros(5, dtype=torch.bool)
    acc = ActivationCovarianceAccumulator(precision="float64", max_chunk_rows=4 if how == "chunks" else 131072,
                                          nonfinite="skip" if how == "skip_nan" else "raise")
    if how == "chunks":  # an empty state, then a chunked call whose first chunk holds only masked rows
        acc.update(torch.zeros(5, d, dtype=torch.float64), mask=none)
        mask = torch.ones(x.shape[0] + 4, dtype=torch.bool)
        mask[:4] = False
        acc.update(torch.cat([torch.zeros(4, d, dtype=torch.float64), x]), mask=mask)
    elif how == "skip_nan":
        with pytest.warns(NonFiniteRowsWarning):
            acc.update(torch.full((5, d), float("nan"), dtype=torch.float64))
            acc.update(x)
            _assert_matches(acc, rows, 1e-10)
        return
    elif how.startswith("merge"):
        empty = ActivationCovarianceAccumulator(precision="float64")
        empty.update(torch.zeros(5, d, dtype=torch.float64), mask=none)
        full = ActivationCovarianceAccumulator(precision="float64")
        full.update(x[:300], mask=torch.ones(300, dtype=torch.bool))  # a mask: row count not known on the host
        if how == "merge":
            acc = empty.merge(full)
        else:  # merged into a state that has no rows yet, then plain updates
            acc = empty
            acc.update(x[:300])
        acc.update(x[300:])
    else:
        acc.update(torch.zeros(5, d, dtype=torch.float64), mask=none)
        if how == "reload":
            acc = ActivationCovarianceAccumulator.load(acc.save(tmp_path / "empty"))
        acc.update(x)
    _assert_matches(acc, rows, 1e-10)


@pytest.mark.parametrize("max_chunk_rows", [131072, 2048])  # the CPU one-chunk path; the generic path in chunks
def test_mask_that_misses_every_evenly_spaced_row(max_chunk_rows):
    """A mask keeping the last token of each 64-token sequence never meets the row sample of a chunk taken
    with a stride of 2 or 4 (every second or fourth of 2048-4096 rows): the chunk's shift used to be the
    mean of no rows, 0, and rows with a mean of ~300 then lost their tail in the float32 products (1.4e-2 of
    the largest eigenvalue, the smallest ones wrong by 100%). The sample is now spaced among the valid rows."""
    rng = np.random.default_rng(0)
    b, t, d = 64, 64, 16
    rows = rows_with_spectrum(b * t, np.arange(1, d + 1) ** -1.5, 300.0, rng).reshape(b, t, d)
    x = torch.from_numpy(rows).float()
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, -1] = True
    acc = ActivationCovarianceAccumulator(max_chunk_rows=max_chunk_rows)
    acc.update(x, mask=mask)
    _assert_matches(acc, x[mask].double().numpy(), TOL["exact"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=pools(), data=st.data())
def test_masked_streams_chunked_and_merged_equal_one_float64_pass(pool, data):
    """Masked updates (a chunk may lose all its rows), every chunk size down to 1 row, merged as a random
    tree, rows with means up to 1e8 times their spread: float64 round-off of the whole pool's covariance."""
    rows, sizes, seed = pool
    rng = np.random.default_rng(seed)
    rows = rows + 10 ** data.draw(st.floats(0, 8)) * rng.uniform(0.5, 1.5, rows.shape[1])
    keep = rng.random(rows.shape[0]) < data.draw(st.floats(0.1, 1.0))
    keep[rng.choice(rows.shape[0], 2, replace=False)] = True
    x, mask = torch.from_numpy(rows), torch.from_numpy(keep)
    max_chunk_rows = data.draw(st.sampled_from([1, 2, 5, 131072]))
    accs, start = [], 0
    for size in [*sizes]:
        acc = ActivationCovarianceAccumulator(precision="float64", max_chunk_rows=max_chunk_rows)
        for piece in np.array_split(np.arange(start, start + size), data.draw(st.integers(1, 3))):
            if piece.size:
                acc.update(x[piece], mask=mask[piece])
        accs.append(acc)
        start += size
    while len(accs) > 1:
        i, j = sorted(rng.choice(len(accs), 2, replace=False))
        b, a = accs.pop(j), accs.pop(i)
        accs.append(a.merge(b) if rng.random() < 0.5 else b.merge(a))
    _assert_matches(accs[0], rows[keep], 1e-10)
