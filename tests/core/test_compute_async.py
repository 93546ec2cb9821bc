"""``compute_async``: the state snapshotted on the caller's thread, the checks and eigen-solve on the one
spectral-lens worker thread, results identical to ``compute()``'s, errors and warnings surfacing from
``result()``; and (CUDA only) no host synchronization in ``update`` or ``compute_async``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator, NonFiniteError, NonFiniteRowsWarning
from spectral_lens import background
from spectral_lens.background import SolveFuture

from support.data import rows_with_spectrum
from support.threads import one_intra_op_thread  # noqa: F401

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _adversarial(n: int, d: int, seed: int, mean: float = 1e4, decay: float = 2.5) -> torch.Tensor:
    """float64 rows with a large common offset and an ill-conditioned spectrum (lambda_j ~ j^-decay)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rows_with_spectrum(n, np.arange(1, d + 1.0) ** -decay, mean, rng))


def _fed(chunks, **kw) -> ActivationCovarianceAccumulator:
    acc = ActivationCovarianceAccumulator(**kw)
    for c in chunks:
        acc.update(c)
    return acc


@contextlib.contextmanager
def _worker_held():
    """Keep the worker thread busy until the block ends, so jobs submitted inside wait for it."""
    gate = threading.Event()
    blocker = background._get_executor().submit(gate.wait, 30)
    try:
        yield
    finally:
        gate.set()
        blocker.result(timeout=30)


def _assert_same(a: sl.Spectrum, b: sl.Spectrum) -> None:
    assert torch.equal(a.values, b.values)
    assert (a.n_rows, a.dim, a.kind, a.source, a.metadata) == (b.n_rows, b.dim, b.kind, b.source, b.metadata)


@pytest.mark.parametrize("precision", ["float64", "exact", "fast"])
@pytest.mark.parametrize("mean,decay", [(1e4, 2.5), (1e6, 4.0), (0.0, 1.0)])
def test_async_equals_compute_bitwise(precision, mean, decay):
    x = _adversarial(3000, 48, seed=int(decay * 10), mean=mean, decay=decay)
    if precision != "float64":
        x = x.float()
    acc = _fed(x.split(700), precision=precision, max_chunk_rows=512)  # multi-chunk calls, stale S
    future = acc.compute_async()
    assert isinstance(future, concurrent.futures.Future) and isinstance(future, SolveFuture)
    got = future.result(timeout=60)
    want = acc.compute()
    _assert_same(got, want)
    if decay > 2:
        assert got.values[-1] < 1e-4 * got.values[0]  # the data really is ill-conditioned


def test_async_after_load_and_merge_equals_compute(tmp_path):
    # states whose S is full (not lower-only): loaded from a file, and merged
    x = _adversarial(2000, 32, seed=3)
    a = _fed(x[:1200].split(400), precision="float64")
    b = _fed([x[1200:]], precision="float64")
    loaded = ActivationCovarianceAccumulator.load(a.save(tmp_path / "a"))
    _assert_same(loaded.compute_async().result(timeout=60), loaded.compute())
    a.merge(b)
    _assert_same(a.compute_async().result(timeout=60), a.compute())


def test_snapshot_isolated_from_later_updates_merge_and_reset():
    x = _adversarial(4000, 40, seed=5, mean=100.0)
    chunks = x.split(500)
    acc = _fed(chunks[:3], precision="float64")
    stopped = _fed(chunks[:3], precision="float64")
    with _worker_held():  # the solve cannot run before the state changes below
        future = acc.compute_async()
        for c in chunks[3:6]:  # several updates: the S buffers are recycled in place
            acc.update(c * 3.0 + 7.0)
        acc.merge(_fed(chunks[6:], precision="float64"))  # in-place adds to n, m, S
        assert not future.done()
    got = future.result(timeout=60)
    _assert_same(got, stopped.compute())
    assert got.n_rows == 1500 and acc.n_rows == 4000
    with _worker_held():
        future = acc.compute_async()
        acc.reset()
    assert future.result(timeout=60).n_rows == 4000


def test_nonfinite_raise_surfaces_from_result():
    x = torch.randn(64, 8)
    acc = _fed([x, x], name="blocks.3")
    bad = x.clone()
    bad[5, 2] = float("nan")
    acc.update(bad)
    future = acc.compute_async()  # no error at call time
    with pytest.raises(NonFiniteError, match=r"blocks\.3: non-finite values .* update #2") as exc:
        future.result(timeout=60)
    with pytest.raises(NonFiniteError) as want:
        acc.compute()
    assert str(exc.value) == str(want.value)


def test_overflow_surfaces_from_result():
    acc = _fed([torch.randn(16, 4) * 1e25], name="huge")  # finite fp32 rows, fp32 products overflow
    with pytest.raises(NonFiniteError, match="huge: the second moments overflowed"):
        acc.compute_async().result(timeout=60)


@pytest.mark.parametrize("rows", [0, 1])
def test_too_few_rows_surfaces_from_result(rows):
    acc = ActivationCovarianceAccumulator(name="tiny")
    if rows:
        acc.update(torch.randn(rows, 5))
    future = acc.compute_async()
    with pytest.raises(ValueError, match=f"tiny: need at least 2 rows, have {rows}"):
        future.result(timeout=60)
    assert isinstance(future.exception(), ValueError)


def test_skipped_rows_warning_reaches_the_caller_of_result():
    x = torch.randn(50, 6)
    x[[3, 17, 40], 1] = float("inf")
    acc = _fed([x], nonfinite="skip", name="mlp")
    with warnings.catch_warnings(record=True) as at_call:
        warnings.simplefilter("always")
        future = acc.compute_async()
        concurrent.futures.wait([future], timeout=60)
    assert not at_call  # nothing is printed by the worker or at submission
    for _ in range(2):  # every result() call warns, as every compute() call does
        with pytest.warns(NonFiniteRowsWarning, match=r"mlp: skipped 3 rows containing NaN/Inf \(first in update #0\)") as rec:
            spectrum = future.result(timeout=60)
        assert [w.filename for w in rec] == [__file__]  # attributed to the result() call
    assert spectrum.metadata["skipped_rows"] == 3 and spectrum.n_rows == 47
    with pytest.warns(NonFiniteRowsWarning):
        _assert_same(spectrum, acc.compute())


def test_warning_also_accompanies_an_error():
    x = torch.randn(3, 4)
    x[:2, 0] = float("nan")  # 2 of 3 rows skipped: 1 row left
    acc = _fed([x], nonfinite="skip")
    with pytest.warns(NonFiniteRowsWarning, match="skipped 2 rows"), pytest.raises(ValueError, match="have 1"):
        acc.compute_async().result(timeout=60)


def test_capture_compute_async_matches_compute_and_is_isolated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6), nn.Tanh())
    batches = [torch.randn(20, 6) + 50.0 for _ in range(4)]
    with sl.attach(model, ["1", "3"], precision="float64") as cap, torch.no_grad():
        for b in batches[:3]:
            model(b)
        with _worker_held():
            future = cap.compute_async()
            model(batches[3])  # later rows are not in the result
        got = future.result(timeout=60)
        assert isinstance(got, dict) and list(got) == ["1", "3"]
        assert all(s.n_rows == 60 for s in got.values())
        assert all(s.n_rows == 80 for s in cap.compute().values())
    with sl.attach(model, ["1", "3"], precision="float64") as ref, torch.no_grad():
        for b in batches[:3]:
            model(b)
        for name, spectrum in ref.compute().items():
            _assert_same(got[name], spectrum)


def test_capture_compute_async_raises_first_error_and_keeps_warnings():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with sl.attach(model, ["0", "1"], nonfinite="skip") as cap, torch.no_grad():
        x = torch.randn(8, 4)
        x[0, 0] = float("nan")
        model(x)
        with pytest.warns(NonFiniteRowsWarning) as rec:
            out = cap.compute_async().result(timeout=60)
        assert {str(w.message).split(":")[0] for w in rec} == {"0", "1"}
        assert out["0"].metadata["skipped_rows"] == 1
    empty = sl.attach(model, "0")
    empty.remove()
    with pytest.raises(ValueError, match="0: need at least 2 rows, have 0"):
        empty.compute_async().result(timeout=60)


def test_many_concurrent_futures_from_several_threads_one_worker():
    before = {t.ident for t in threading.enumerate()}
    data = [_adversarial(300, 16, seed=s, mean=10.0 * s) for s in range(24)]
    accs = [_fed(x.split(100), precision="float64", name=f"acc{i}") for i, x in enumerate(data)]
    futures: dict[int, concurrent.futures.Future] = {}

    def submit_some(k):
        for i in range(k, len(accs), 4):
            futures[i] = accs[i].compute_async()

    callers = [threading.Thread(target=submit_some, args=(k,)) for k in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(futures) == len(accs)
    done, _ = concurrent.futures.wait(futures.values(), timeout=120)
    assert len(done) == len(accs)
    for i, acc in enumerate(accs):
        _assert_same(futures[i].result(), acc.compute())
    new = [t for t in threading.enumerate() if t.ident not in before]
    assert all(t.name.startswith("spectral-lens") for t in new), new
    workers = [t for t in threading.enumerate() if t.name.startswith("spectral-lens")]
    assert len(workers) == 1, workers


def test_cancelled_future_never_runs():
    acc = _fed([torch.randn(10, 3)])
    with _worker_held():
        future = acc.compute_async()
        assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=5)
    assert acc.compute_async().result(timeout=60).n_rows == 10  # the worker goes on


def test_forked_child_gets_a_fresh_worker():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    _fed([torch.randn(10, 3)]).compute_async().result(timeout=60)  # the parent's worker exists
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        n = pool.apply_async(_child_solve).get(timeout=60)
    assert n == 10


def _child_solve() -> int:
    return _fed([torch.randn(10, 3)]).compute_async().result(timeout=30).n_rows


# ----------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fast", "exact"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("mask_device", [None, "cuda", "cpu"])
def test_cuda_update_and_compute_async_never_sync(precision, nonfinite, mask_device):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(70_000, 256, device="cuda", generator=gen, dtype=torch.bfloat16) + 3.0
    if nonfinite == "skip":
        x[[5, 40_000]] = float("nan")
    mask = None if mask_device is None else (torch.rand(x.shape[0], device="cuda", generator=gen) > 0.1).to(mask_device)
    acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, max_chunk_rows=30_000)
    acc.update(x[:10])  # the first call allocates the state and warms cuBLAS
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        acc.update(x, mask=mask)  # three chunks
        acc.update(x[:20_000])  # one chunk
        future = acc.compute_async()
        acc.update(x[20_000:], mask=None if mask is None else mask[20_000:])  # after the snapshot
    finally:
        torch.cuda.set_sync_debug_mode("default")
    warns = pytest.warns(NonFiniteRowsWarning) if nonfinite == "skip" else contextlib.nullcontext()
    with warns:
        got = future.result(timeout=120)
    ref = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, max_chunk_rows=30_000)
    ref.update(x[:10])
    ref.update(x, mask=mask)
    ref.update(x[:20_000])
    with warns:
        want = ref.compute()  # cuSOLVER on the GPU vs LAPACK on the CPU: equal to round-off
    assert got.n_rows == want.n_rows and got.metadata == want.metadata
    assert torch.allclose(got.values, want.values, rtol=1e-9, atol=1e-12 * float(want.values[0]))
    if nonfinite == "skip":
        assert got.metadata["skipped_rows"] >= 1


@pytest.mark.cuda
@needs_cuda
def test_cuda_nonfinite_raise_surfaces_from_result():
    x = torch.randn(4096, 64, device="cuda")
    acc = _fed([x, x], name="blocks.7")
    bad = x.clone()
    bad[100, 3] = float("inf")
    acc.update(bad)
    future = acc.compute_async()
    with pytest.raises(NonFiniteError, match=r"blocks\.7: non-finite values .* update #2") as exc:
        future.result(timeout=120)
    with pytest.raises(NonFiniteError) as want:
        acc.compute()
    assert str(exc.value) == str(want.value)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dim", [64, 768])
def test_cuda_async_equals_compute_to_roundoff(dim):
    x = _adversarial(20_000, dim, seed=dim, mean=1e3).to("cuda")
    acc = _fed(x.split(6000), precision="float64")
    future = acc.compute_async()
    got, want = future.result(timeout=120), acc.compute()
    assert got.n_rows == want.n_rows == 20_000
    assert torch.allclose(got.values, want.values, rtol=1e-8, atol=1e-12 * float(want.values[0]))


def test_async_includes_deferred_cpu_reshifts():
    """CPU updates defer their rank-2 re-shift terms (applied every 32 updates or on a read); a
    snapshot taken in between must carry them: the async result equals compute() bit for bit."""
    rng = np.random.default_rng(7)
    acc = ActivationCovarianceAccumulator(precision="exact")
    for k in range(5):  # drifting means: every update's shift differs from the state's
        acc.update(torch.from_numpy(rng.standard_normal((300, 40)) * np.logspace(0, -3, 40) + 1e3 * k).float())
    assert acc._pend_k > 0  # the case under test: deferred terms exist at the time of the snapshot
    fut = acc.compute_async()
    assert np.array_equal(fut.result().values.numpy(), acc.compute().values.numpy())


# ------------------------------------------------------------- snapshot isolation, property test
def _ref_eigs(rows: list[torch.Tensor]) -> np.ndarray:
    x = torch.cat(rows).double().numpy()
    return np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]


_OPS = ("update", "update", "update", "masked", "merge", "reset", "load_self", "load_other")


def _interleave(ops, snap_at, precision, seed) -> int:
    """Run ``ops`` on one accumulator, a ``compute_async`` before op ``i`` where ``snap_at[i]`` (and one
    at the end); no solve runs before the last op. Checks each future against a float64 reference
    of the rows it snapshotted; returns how many futures held rows."""
    d = 5
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if precision == "float64" else torch.float32

    def draw(k):  # an offset pool (mean ~1e3) with an ill-conditioned scale, drifting per call
        return ((torch.randn(k, d, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, d, dtype=torch.float64)
                 + 1e3 + 10 * torch.rand(1, generator=gen, dtype=torch.float64)).to(dtype))

    acc = ActivationCovarianceAccumulator(d, precision=precision, name="prop")
    rows: list[torch.Tensor] = []
    pending = []
    with _worker_held():  # no snapshot is solved before every later call ran
        for i, (op, k) in enumerate(ops):
            if snap_at[i]:
                pending.append((acc.compute_async(), list(rows)))
            if op == "update":
                x = draw(k)
                acc.update(x)
                rows.append(x)
            elif op == "masked":
                x, keep = draw(k), torch.rand(k, generator=gen) < 0.6
                acc.update(x, mask=keep)
                rows.append(x[keep])
            elif op == "merge":
                x = draw(k)
                acc.merge(_fed([x], precision=precision))
                rows.append(x)
            elif op == "reset":
                acc.reset()
                rows = []
            elif op == "load_self":
                acc.load_state_dict(acc.state_dict())
            else:  # load_other
                x = draw(k)
                acc.load_state_dict(_fed([x], precision=precision).state_dict())
                rows = [x]
        pending.append((acc.compute_async(), list(rows)))
    checked = 0
    for future, snap in pending:
        n = sum(r.shape[0] for r in snap)
        if n < 2:
            with pytest.raises(ValueError, match=f"prop: need at least 2 rows, have {n}"):
                future.result(timeout=60)
            continue
        got = future.result(timeout=60)
        want = _ref_eigs(snap)
        assert got.n_rows == n
        wide = dtype == torch.float64
        np.testing.assert_allclose(got.values.numpy(), want, rtol=1e-9 if wide else 2e-4,
                                   atol=want[0] * (1e-11 if wide else 1e-5))
        checked += 1
    return checked


def test_snapshots_under_random_interleavings_match_float64_references():
    """Whatever update/merge/reset/load_state_dict calls follow a compute_async (CPU updates recycle S
    buffers in place and defer re-shift terms), each future gives the spectrum of exactly the rows
    it snapshotted, against a float64 reference of those rows."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(st.tuples(st.sampled_from(_OPS), st.integers(2, 40)), min_size=3, max_size=40),
           snap_at=st.lists(st.booleans(), min_size=40, max_size=40),
           precision=st.sampled_from(["exact", "float64"]), seed=st.integers(0, 2**16))
    def run(ops, snap_at, precision, seed):
        _interleave(ops, snap_at, precision, seed)

    run()


@pytest.mark.parametrize("precision", ["exact", "float64"])
def test_snapshot_isolated_from_many_later_updates(precision):
    """Snapshots with deferred CPU re-shift terms outstanding, then more updates than the deferral
    buffer holds (its slots are reused), and snapshots between them."""
    ops = [("update", 7)] * 80
    snap_at = [i in (5, 6, 30, 41) for i in range(80)]
    assert _interleave(ops, snap_at, precision, seed=3) == 5
