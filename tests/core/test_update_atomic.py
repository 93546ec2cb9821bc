"""``ActivationCovarianceAccumulator.update`` is all or nothing, and its CPU hot path is exact.

The hot path sums a call's chunks into locals and swaps the new state in at the end; it adds only
lower triangles (the upper one is mirrored on first read) and recycles the previous state as a spare
buffer. These tests pin each of those against float64 references and bit-for-bit state comparisons.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectral_lens._chunk_sums as chunk_sums
import spectral_lens._lower_s as lower_s
import spectral_lens.accumulate as accumulate_module
import spectral_lens.spectra.moments as moments
from spectral_lens import ActivationCovarianceAccumulator

from support.data import rows_with_spectrum
from support.state import assert_refused_until_reset, assert_same_state as _assert_same_state, snapshot as _snapshot


def _raise_on_call(monkeypatch, module, name: str, call: int, exc: BaseException) -> None:
    """Make ``module.<name>`` raise ``exc`` on its ``call``-th call (1-based)."""
    real = getattr(module, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("prior_rows", [0, 17])
@pytest.mark.parametrize(
    "name, exc",
    [("chunk_moments", KeyboardInterrupt()), ("chunk_moments", RuntimeError("boom")),
     ("accumulate_shifted", RuntimeError("merge failed"))],
)
@pytest.mark.parametrize("mask", [False, True])
def test_interrupted_update_leaves_state_bit_for_bit(monkeypatch, prior_rows, name, exc, mask):
    """30 rows in chunks of 10; the 2nd chunk fails: nothing of the call may stay (the audit found 10 kept)."""
    g = torch.Generator().manual_seed(0)
    acc = ActivationCovarianceAccumulator(precision="exact", max_chunk_rows=10, name="blocks.3")
    if prior_rows:
        acc.update(torch.randn(prior_rows, 6, generator=g) * 3 + 50)
    before = _snapshot(acc)
    x = torch.randn(30, 6, generator=g) + 80.0  # a different mean: the merge needs a real re-shift
    m = (torch.rand(30, generator=g) > 0.3) if mask else None
    call = 2 if name == "chunk_moments" else 1  # accumulate_shifted first runs for the 2nd chunk
    with monkeypatch.context() as patch:
        _raise_on_call(patch, chunk_sums, name, call, exc)
        with pytest.raises(type(exc)):
            acc.update(x, mask=m)
    _assert_same_state(_snapshot(acc), before)
    assert acc.initialized == bool(prior_rows)
    if not prior_rows:
        assert acc.dim is None  # not even the width was taken from the failed call
    # The failed call left nothing behind: retrying equals never having failed.
    acc.update(x, mask=m)
    clean = ActivationCovarianceAccumulator(precision="exact", max_chunk_rows=10, name="blocks.3")
    if prior_rows:
        clean.update(torch.randn(prior_rows, 6, generator=torch.Generator().manual_seed(0)) * 3 + 50)
    clean.update(x, mask=m)
    _assert_same_state(_snapshot(acc), _snapshot(clean))


def test_state_read_before_an_update_is_not_changed_by_it():
    """The previous state becomes the next update's scratch only if nobody read it."""
    acc = ActivationCovarianceAccumulator(4)
    for k in range(3):
        acc.update(torch.randn(20, 4) + k)
    sd = acc.state_dict()
    kept = {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for k in range(4):
        acc.update(torch.randn(20, 4) * 10 + k)
    for key, value in kept.items():
        assert torch.equal(sd[key], value), key
    assert not torch.equal(acc.state_dict()["s"], kept["s"])


def test_empty_update_counts_but_adds_nothing():
    acc = ActivationCovarianceAccumulator(3)
    acc.update(torch.randn(5, 3))
    before = _snapshot(acc)
    acc.update(torch.empty(0, 3))
    after = _snapshot(acc)
    assert after.pop("updates") == before.pop("updates") + 1
    _assert_same_state(after, before)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 300),
    offset=st.floats(0, 1e3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    syrk=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_lower_products_match_float64(n, d, offset, dtype, syrk, seed):
    """Both CPU products (BLAS syrk, torch GEMM blocks): lower triangle = float64 ``y^T y`` to
    rounding; the full form is exactly symmetric."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(n, d, generator=g, dtype=torch.float64) + offset).to(dtype)
    ref = y.double().t() @ y.double()
    tol = (1e-12 if dtype == torch.float64 else 2e-6) * max(float(ref.abs().max()), 1e-300)
    previous = moments.SYRK_MIN_ROWS
    moments.SYRK_MIN_ROWS = 1 if syrk else 10**9
    try:
        low = moments.symmetric_product(y, lower_only=True)
        full = moments.symmetric_product(y)
    finally:
        moments.SYRK_MIN_ROWS = previous
    assert low.dtype == dtype and full.dtype == dtype and full.shape == (d, d)
    assert ((low.double() - ref).tril().abs() <= tol).all()
    assert torch.equal(full, full.t())
    assert ((full.double() - ref).abs() <= tol).all()


def test_mirror_lower_ignores_the_upper_triangle():
    s = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    junk = s.clone()
    junk[torch.ones(4, 4, dtype=torch.bool).triu(1)] = float("nan")
    out = moments.mirror_lower(junk)
    assert torch.equal(out, s.tril() + s.tril(-1).t())


@pytest.mark.parametrize("syrk", [True, False])
@pytest.mark.parametrize("precision", ["exact", "float64"])
def test_small_chunk_updates_match_float64(monkeypatch, syrk, precision):
    """Many small updates (the CPU small-batch case) on a pool with a large, drifting mean and an
    ill-conditioned spectrum: covariance within the precision's tolerance of one float64 pass."""
    monkeypatch.setattr(moments, "SYRK_MIN_ROWS", 1 if syrk else 10**9)
    rng = np.random.default_rng(3)
    d = 260  # >= 256: the GEMM path uses its 3-block form
    eig = np.logspace(0, -8, d)
    parts = [rows_with_spectrum(97, eig, 1e3, rng) + 50.0 * k for k in range(6)]
    rows = np.concatenate(parts)
    dtype = torch.float64 if precision == "float64" else torch.float32
    acc = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=64)
    for part in parts:
        acc.update(torch.from_numpy(part).to(dtype))
    x = rows.astype(np.float32).astype(np.float64) if dtype == torch.float32 else rows
    ref = np.cov(x, rowvar=False)
    scale = np.linalg.eigvalsh(ref)[-1]
    cov = acc.covariance().numpy()
    tol = 1e-10 if precision == "float64" else 2e-5
    assert np.abs(cov - ref).max() <= tol * scale
    assert np.array_equal(cov, cov.T)
    assert acc.n_rows == rows.shape[0]


def test_add_promoted_is_the_float64_sum_also_in_place():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64) * 1e6
    b = torch.randn(7, 7, generator=g)
    expected = a + b.double()
    out = torch.empty_like(a)
    assert moments.add_promoted(a, b, out=out) is out and torch.equal(out, expected)
    assert torch.equal(moments.add_promoted(a, b, out=a), expected)  # out may be a


def test_merged_and_loaded_states_are_not_recycled_as_scratch():
    """A state that escaped through merge / load_state_dict is never overwritten by later updates."""
    src = ActivationCovarianceAccumulator(3)
    src.update(torch.randn(9, 3) + 4)
    sd = src.state_dict()
    kept = sd["s"].clone()
    dst = ActivationCovarianceAccumulator(3)
    dst.load_state_dict(sd)
    dst.merge(src)
    for k in range(3):
        dst.update(torch.randn(9, 3) * 5 + k)
        src.update(torch.randn(9, 3) * 5 + k)
    assert torch.equal(sd["s"], kept)


def test_add_promoted_ignores_garbage_upper_triangle_without_warning():
    # Lower-triangle-only sums leave the strict upper triangle uninitialized (NaN/Inf possible):
    # the add must not emit NumPy's "invalid value" RuntimeWarning (users run with -W error).
    a = torch.randn(6, 6, dtype=torch.float64)
    b = torch.randn(6, 6)
    b[torch.triu_indices(6, 6, 1).unbind()] = float("nan")
    a[0, 5] = float("inf")
    b[0, 5] = -float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = moments.add_promoted(a, b, out=torch.empty_like(a))
    low = torch.tril_indices(6, 6).unbind()
    assert torch.equal(out[low], (a + b.double())[low])


@pytest.mark.parametrize("initialized", [True, False])
def test_merge_changes_no_tensor_handed_out_before(initialized):
    """A state_dict (or covariance) taken before a merge stays what it was: merge builds new tensors
    (it added into the live ones in place before; the audit restored a 100-row snapshot as 150 rows)."""
    g = torch.Generator().manual_seed(3)
    acc = ActivationCovarianceAccumulator(precision="exact", name="blocks.1")
    acc.update(torch.empty(0, 5))  # a call without rows still counts
    if initialized:
        acc.update(torch.randn(100, 5, generator=g) * 2 + 40)
    sd, cov = acc.state_dict(), (acc.covariance() if initialized else None)
    kept = {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    cov_kept = None if cov is None else cov.clone()
    other = ActivationCovarianceAccumulator(precision="exact")
    other.update(torch.randn(50, 5, generator=g) * 3 - 7)
    other_before = _snapshot(other)
    acc.merge(other)
    for key, value in kept.items():
        assert torch.equal(sd[key], value), key
    if initialized:
        assert torch.equal(cov, cov_kept)
        restored = ActivationCovarianceAccumulator(precision="exact")
        restored.load_state_dict(sd)
        assert restored.n_rows == 100
    assert acc.n_rows == 150 if initialized else acc.n_rows == 50
    assert acc.state_dict()["updates"] == 2 + (1 if initialized else 0)
    _assert_same_state(_snapshot(other), other_before)  # the merged-in accumulator is untouched too


@pytest.mark.parametrize("initialized", [True, False])
def test_interrupted_merge_leaves_state_bit_for_bit(monkeypatch, initialized):
    g = torch.Generator().manual_seed(4)
    acc = ActivationCovarianceAccumulator(precision="exact", name="blocks.2")
    if initialized:
        acc.update(torch.randn(40, 6, generator=g) + 9)
    before = _snapshot(acc)
    other = ActivationCovarianceAccumulator(precision="exact")
    other.update(torch.randn(30, 6, generator=g) * 5 + 80)
    with monkeypatch.context() as patch:
        _raise_on_call(patch, accumulate_module, "reshift", 1, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            acc.merge(other)
    _assert_same_state(_snapshot(acc), before)
    assert acc.initialized == initialized and (initialized or acc.dim is None)
    acc.merge(other)  # and the retry equals a merge that never failed
    clean = ActivationCovarianceAccumulator(precision="exact", name="blocks.2")
    if initialized:
        clean.update(torch.randn(40, 6, generator=torch.Generator().manual_seed(4)) + 9)
    clean.merge(other)
    _assert_same_state(_snapshot(acc), _snapshot(clean))


def _then_raise(patch, module, name: str, exc: BaseException) -> None:
    """``module.<name>`` does its work, then raises ``exc``: an interrupt right after the in-place write
    into S, before the attribute stores that commit it."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        real(*args, **kwargs)
        raise exc

    patch.setattr(module, name, wrapped)


# where the in-place write into S happens: the CPU one-chunk path (its lower-triangle add), calls of several
# chunks (add_promoted), the first read mirroring S in place (deferred terms added, then mirrored)
WRITES = {"cpu": (lower_s, "_add_lower", 131072), "chunks": (accumulate_module, "add_promoted", 8),
          "read": (lower_s, "mirror_lower_", 131072)}


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), MemoryError("out of memory")])
def test_interrupt_after_the_in_place_write_leaves_a_refused_state(monkeypatch, path, exc):
    """S is one buffer, updated in place: an interrupt between that write and the stores after it cannot
    be undone, so the accumulator is marked torn; every later use raises naming reset() (never a silently
    wrong spectrum), and after reset() it measures as a new one."""
    module, name, chunk = WRITES[path]
    g = torch.Generator().manual_seed(6)
    acc = ActivationCovarianceAccumulator(max_chunk_rows=chunk, name="blocks.0")
    for k in range(3):
        acc.update(torch.randn(20, 9, generator=g) * 3 + 10 * k)
    x = torch.randn(20, 9, generator=g) + 70
    with monkeypatch.context() as patch:
        _then_raise(patch, module, name, exc)
        with pytest.raises(type(exc)):
            if path == "read":
                acc.compute()
            else:
                acc.update(x)
    assert acc._torn
    assert_refused_until_reset(acc, x)


@pytest.mark.parametrize("path", ["cpu", "chunks"])
def test_interrupt_in_a_copy_on_write_leaves_the_state(monkeypatch, path):
    """After S was handed out (state_dict), the next update writes into a new buffer: an interrupt right
    after that write leaves the state as it was, not torn, and the retry equals an update never interrupted."""
    module, name, chunk = WRITES[path]
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(20, 9, generator=g) * 3 + 10 * k for k in range(4)]
    acc, clean = (ActivationCovarianceAccumulator(max_chunk_rows=chunk, name="blocks.0") for _ in range(2))
    for a in (acc, clean):
        for x in xs[:3]:
            a.update(x)
    sd = acc.state_dict()
    clean.state_dict()  # a read adds the CPU path's deferred terms early: the same rounding for both
    kept = {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    before = _snapshot(acc)
    with monkeypatch.context() as patch:
        _then_raise(patch, module, name, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            acc.update(xs[3])
    assert not acc._torn
    _assert_same_state(_snapshot(acc), before)
    assert all(torch.equal(sd[k], v) for k, v in kept.items())
    acc.update(xs[3])
    clean.update(xs[3])
    _assert_same_state(_snapshot(acc), _snapshot(clean))


@pytest.mark.parametrize("chunk, dtype", [(131072, torch.float32), (131072, torch.bfloat16), (7, torch.float32),
                                          (131072, torch.float64)])
def test_tensors_handed_out_are_snapshots(chunk, dtype):
    """state_dict(), covariance() and compute_async() taken part-way stay what they were through later
    updates (S is written in place only while nobody holds it; after a read the next update copies it).
    The final spectrum matches float64; for calls of several chunks (no deferred CPU re-shift terms, which
    a read adds early, in another rounding) it equals, bit for bit, that of an accumulator never read."""
    g = torch.Generator().manual_seed(8)
    xs = [(torch.randn(30, 12, generator=g, dtype=torch.float64) * 2 + 5 * k).to(dtype) for k in range(40)]
    read, unread = (ActivationCovarianceAccumulator(max_chunk_rows=chunk) for _ in range(2))
    taken = []
    for i, x in enumerate(xs):
        read.update(x)
        unread.update(x)
        if i in (1, 2, 9, 33):  # 33: past the flush of the CPU path's 32 deferred terms
            sd = read.state_dict()
            cov = read.covariance()
            taken.append((sd, {k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, cov, cov.clone(),
                          read.compute_async(), read.compute().values))
    for sd, kept, cov, cov_kept, future, values in taken:
        assert all(torch.equal(sd[k], v) for k, v in kept.items())
        assert torch.equal(cov, cov_kept)
        assert torch.equal(future.result().values, values)
    if chunk < 30:
        _assert_same_state(_snapshot(read), _snapshot(unread))
    rows = torch.cat(xs).double()
    ref = torch.linalg.eigvalsh(torch.cov(rows.T)).flip(0).clamp_min(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(read.compute().values, ref, rtol=tol, atol=tol * float(ref[0]))
