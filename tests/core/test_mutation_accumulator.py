"""Tests added by a hand mutation audit of the activation-covariance core: each pins a result that a
small change of ``spectral_lens/accumulate.py`` altered while the rest of the suite still passed.
References are float64 (NumPy) or the documented promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator


def _assert_cov(acc: ActivationCovarianceAccumulator, rows: np.ndarray, tol: float) -> None:
    ref = np.cov(rows, rowvar=False)
    scale = np.linalg.eigvalsh(ref)[-1]
    assert acc.n_rows == rows.shape[0]
    assert np.abs(acc.covariance().numpy() - ref).max() <= tol * scale
    ref_eig = np.clip(np.linalg.eigvalsh(ref)[::-1], 0, None)
    assert np.abs(acc.compute().values.numpy() - ref_eig).max() <= tol * scale


def _far_rows(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * np.logspace(0, -3, d) + 1e8 * rng.uniform(0.5, 1.5, d)


@pytest.mark.parametrize("empties", [2, 3])
def test_several_updates_without_valid_rows_then_rows_far_from_zero(empties):
    """Two or more all-masked CPU updates before the first rows: each empty update's shift is an
    arbitrary 0, and the state must still take its shift from the first real rows (killed mutant:
    ``has_rows = True`` after any CPU update, which kept the 0 of the second empty chunk and lost every
    digit of rows with a mean of 1e8 and a spread of 1)."""
    rows = _far_rows()
    d = rows.shape[1]
    acc = ActivationCovarianceAccumulator(precision="float64")
    for _ in range(empties):
        acc.update(torch.zeros(5, d, dtype=torch.float64), mask=torch.zeros(5, dtype=torch.bool))
    acc.update(torch.from_numpy(rows[:150]))
    acc.update(torch.from_numpy(rows[150:]))
    _assert_cov(acc, rows, 1e-10)


def test_rows_just_above_the_float32_floor_are_measured_accurately():
    """The documented floor is a largest variance of 2^-100: float32 rows whose largest variance is
    2^-97 (directions down to 1e-4 of it) are still accurate in float32 products and must not be refused
    (killed mutant: the floor raised to 2^-80, which refused them)."""
    from support.data import rows_with_spectrum

    rng = np.random.default_rng(5)
    eig = np.logspace(0, -4, 10) * 2.0 ** -97
    rows = rows_with_spectrum(500, eig, 3 * 2.0 ** -48, rng).astype(np.float32).astype(np.float64)
    acc = ActivationCovarianceAccumulator(precision="exact")
    acc.update(torch.from_numpy(rows).float())
    _assert_cov(acc, rows, 2e-5)


def test_two_rows_are_enough_and_one_is_not():
    """``compute`` needs at least 2 rows (killed mutant: ``rows <= k``, which refused exactly 2)."""
    x = np.array([[1.0, 2.0, -1.0], [3.0, -2.0, 0.5]])
    acc = ActivationCovarianceAccumulator(precision="float64", name="blocks.1")
    acc.update(torch.from_numpy(x[:1]))
    with pytest.raises(ValueError, match=r"blocks\.1: need at least 2 rows, have 1"):
        acc.compute()
    acc.update(torch.from_numpy(x[1:]))
    ref = np.cov(x, rowvar=False)
    assert np.allclose(acc.covariance().numpy(), ref, rtol=0, atol=1e-14)
    assert np.allclose(acc.compute().values.numpy(), np.clip(np.linalg.eigvalsh(ref)[::-1], 0, None), rtol=0, atol=1e-13)


def test_merge_names_the_bad_update_by_its_index_in_the_merged_stream():
    """After ``a.merge(b)`` the merged stream is a's updates, then b's: b's update #1 is update
    #(a's updates + 1) (killed mutant: b's index taken as is, which named update #1, a clean one)."""
    from spectral_lens import NonFiniteError

    clean = torch.randn(6, 3, dtype=torch.float64)
    bad = clean.clone()
    bad[2, 1] = float("nan")
    a = ActivationCovarianceAccumulator(name="blocks.2")
    for _ in range(3):
        a.update(clean)
    b = ActivationCovarianceAccumulator()
    b.update(clean)
    b.update(bad)
    a.merge(b)
    with pytest.raises(NonFiniteError, match=r"blocks\.2: .*update #4 "):
        a.compute()
    # the earlier bad update wins: a's own update #1, not b's
    c = ActivationCovarianceAccumulator(name="blocks.3")
    c.update(clean)
    c.update(bad)
    d = ActivationCovarianceAccumulator()
    d.update(bad)
    c.merge(d)
    with pytest.raises(NonFiniteError, match=r"blocks\.3: .*update #1 "):
        c.compute()


def test_updates_after_a_merge_are_numbered_after_both_streams():
    """A merge adds other's update count: the next update of a 2 + 3 update merge is update #5
    (killed mutant: the larger of the two counts kept, which named it #3)."""
    from spectral_lens import NonFiniteError

    clean = torch.randn(6, 3, dtype=torch.float64)
    bad = clean.clone()
    bad[0, 0] = float("inf")
    a, b = ActivationCovarianceAccumulator(name="blocks.4"), ActivationCovarianceAccumulator()
    for _ in range(2):
        a.update(clean)
    for _ in range(3):
        b.update(clean)
    a.merge(b)
    a.update(bad)
    with pytest.raises(NonFiniteError, match=r"blocks\.4: .*update #5 "):
        a.compute()


def test_merge_adds_the_skipped_row_counts_of_both_sides():
    """nonfinite='skip': the merged state counts both sides' dropped rows and equals the clean rows
    (killed mutant: other's skipped count dropped in merge)."""
    from spectral_lens import NonFiniteRowsWarning

    rng = np.random.default_rng(7)
    rows = rng.standard_normal((40, 4)) + 1e3
    poisoned = rows.copy()
    poisoned[[3, 11], 1] = np.nan
    poisoned[25, 2] = np.inf
    a = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
    b = ActivationCovarianceAccumulator(precision="float64", nonfinite="skip")
    a.update(torch.from_numpy(poisoned[:20]))
    b.update(torch.from_numpy(poisoned[20:]))
    a.merge(b)
    with pytest.warns(NonFiniteRowsWarning, match="skipped 3 rows"):
        spectrum = a.compute()
    assert spectrum.metadata["skipped_rows"] == 3
    keep = np.isfinite(poisoned).all(1)
    with pytest.warns(NonFiniteRowsWarning):
        cov = a.covariance().numpy()
    ref = np.cov(rows[keep], rowvar=False)
    assert np.abs(cov - ref).max() <= 1e-10 * np.linalg.eigvalsh(ref)[-1]


@pytest.mark.parametrize("key,value", [("first_bad", -2), ("bad_rows", -1), ("n", -1)])
def test_load_refuses_counts_out_of_range(key, value):
    """first_bad is -1 (none) or an update index, bad_rows and n are >= 0 (killed mutant: first_bad
    down to -2 accepted; a later bad update would then be named update #index - 1)."""
    from spectral_lens import StateFormatError

    acc = ActivationCovarianceAccumulator(name="blocks.6")
    acc.update(torch.randn(5, 3, dtype=torch.float64))
    state = acc.state_dict()
    state[key] = torch.tensor(value, dtype=torch.int64)
    fresh = ActivationCovarianceAccumulator(name="blocks.6")
    with pytest.raises(StateFormatError, match=r"blocks\.6: cannot load state_dict: counts out of range"):
        fresh.load_state_dict(state)
    assert not fresh.initialized


def test_loading_an_empty_state_forgets_the_rows_held_before():
    """load_state_dict replaces the whole state: an accumulator that held rows and loads a state
    without rows has none afterwards, and then equals a fresh one on new rows (killed mutant: no
    reset before the stores, which kept the old rows under the loaded configuration)."""
    rng = np.random.default_rng(11)
    old, new = rng.standard_normal((30, 4)) * 5 + 100, rng.standard_normal((25, 4))
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.from_numpy(old))
    acc.load_state_dict(ActivationCovarianceAccumulator(4, precision="float64").state_dict())
    assert not acc.initialized and acc.n_rows == 0
    acc.update(torch.from_numpy(new))
    _assert_cov(acc, new, 1e-12)


@pytest.mark.parametrize("where", ["first", "middle"])
def test_chunk_of_masked_nan_rows_in_a_chunked_call(where):
    """A chunk whose rows are all masked and hold NaN (padding filled with NaN) has no valid row to take
    its shift from; the shift must still be finite, so that the chunk adds nothing (killed mutant: no
    nan_to_num on the sampled mean, which made the shift NaN and S NaN through the exact re-shift)."""
    rng = np.random.default_rng(13)
    rows = rng.standard_normal((12, 3)) * [1.0, 0.1, 0.01] + 1e3
    keep = np.ones(12, dtype=bool)
    bad = slice(0, 4) if where == "first" else slice(4, 8)
    rows[bad] = np.nan
    keep[bad] = False
    acc = ActivationCovarianceAccumulator(precision="float64", max_chunk_rows=4)
    acc.update(torch.from_numpy(rows), mask=torch.from_numpy(keep))
    _assert_cov(acc, rows[keep], 1e-10)


def test_rows_wider_than_one_lower_block_over_several_cpu_updates():
    """d = 264 > 256 (_LOWER_BLOCK): the CPU path adds the stored S by row blocks; every block, the
    diagonal ones included, must reach the state (killed mutant: the blocks cut at column r0, which
    left the diagonal blocks stale; no other test has d > 256 with several CPU updates)."""
    from support.data import rows_with_spectrum

    rng = np.random.default_rng(17)
    rows = rows_with_spectrum(400, np.logspace(0, -3, 264), 50.0, rng)
    x = torch.from_numpy(rows)
    acc = ActivationCovarianceAccumulator(precision="float64")
    for chunk in x.split(130):
        acc.update(chunk)
    _assert_cov(acc, rows, 1e-10)


@pytest.mark.parametrize("scale", [1e-24, 1e-30])
@pytest.mark.parametrize("max_chunk_rows", [131072, 50])
def test_rows_whose_float32_products_underflow_to_zero_are_refused(scale, max_chunk_rows):
    """Rows of size 1e-24 and below: their float32 products flush to exactly 0 (S = 0 on the CPU
    one-chunk path), so only the column sums m show the rows' size; compute must refuse them rather
    than return an all-zero spectrum (killed mutant: the floor's scale from diag(S)/n alone)."""
    from spectral_lens import NonFiniteError

    x = (torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * scale).float()
    acc = ActivationCovarianceAccumulator(precision="exact", max_chunk_rows=max_chunk_rows, name="blocks.7")
    acc.update(x)
    with pytest.raises(NonFiniteError, match=r"blocks\.7: the rows are too small for float32 products"):
        acc.compute()


def test_merge_into_an_empty_exact_accumulator_of_float64_rows_beyond_float32_range():
    """precision='exact' with float64 rows of size 1e100 (float64 products): merged into an empty
    accumulator, the state's shift must keep its float64 value, not become float32's Inf (killed
    mutant: representable_shift rounding every entry to float32, which made the state NaN)."""
    rng = np.random.default_rng(29)
    rows = rng.standard_normal((50, 3)) * [1.0, 0.1, 0.01] * 1e95 + 1e100
    b = ActivationCovarianceAccumulator(precision="exact")
    b.update(torch.from_numpy(rows))
    a = ActivationCovarianceAccumulator(precision="exact")
    a.merge(b)
    _assert_cov(a, rows, 1e-10)
