"""The activation measurement's memory: spectral_lens._memory's estimate against the real allocations of an
accumulator (its tensors' bytes after updates; the peak of the tensors allocated inside an update and inside
compute(), counted by a TorchDispatchMode), and the refusal of a pass that would not fit (free memory mocked)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from support.models import TinyLM, lm_pool
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import spectral_lens as sl
from spectral_lens import (
    ActivationCovarianceAccumulator,
    SpectralLens,
    _chunk_sums,
    _memory,
)
from spectral_lens._memory import accumulator_bytes, measurement_bytes


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive: those registered with :meth:`track` and those the ops inside the mode
    allocate (an output whose storage is none of the op's inputs'), each counted until it is freed; ``peak``
    is the most at once. (LAPACK's internal copies inside one op are not seen; see the compute test.)"""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _add(self, storage) -> None:
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def track(self, acc) -> int:
        for t in _tensors(acc):
            self._add(t.untyped_storage())
        self.peak = self.now
        return self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._add(t.untyped_storage())
        return out


def _tensors(acc):
    for v in vars(acc).values():
        for t in v if isinstance(v, tuple) else (v,):
            if isinstance(t, torch.Tensor):
                yield t


def _held(acc) -> int:
    """Bytes of the accumulator's state: its tensors' storages and NumPy arrays, each counted once."""
    seen = {}
    for v in vars(acc).values():
        for t in v if isinstance(v, tuple) else (v,):
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            elif isinstance(t, np.ndarray):
                base = t if t.base is None else t.base
                seen[base.ctypes.data] = base.nbytes
    return sum(seen.values())


# (d, rows per update, max_chunk_rows, rows' dtype): the CPU one-chunk path, a larger chunk, float64 rows,
# and calls of several chunks (the generic path)
CASES = [(256, 64, 131072, torch.float32), (300, 5000, 131072, torch.float32), (128, 500, 131072, torch.float64),
         (200, 3000, 1000, torch.float32), (128, 500, 100, torch.float32),
         (256, 64, 131072, torch.bfloat16), (300, 5000, 131072, torch.bfloat16), (96, 2000, 131072, torch.float16),
         (200, 3000, 1000, torch.bfloat16)]


@pytest.mark.parametrize("precision", ["exact", "fast", "float64"])
@pytest.mark.parametrize("d, rows, chunk, dtype", CASES)
def test_estimate_matches_the_real_allocations(precision, d, rows, chunk, dtype):
    torch.manual_seed(0)
    acc = ActivationCovarianceAccumulator(d, precision=precision, max_chunk_rows=chunk)
    x = (torch.randn(3, rows, d, dtype=torch.float64) + 3).to(dtype)
    held, update, solve = accumulator_bytes(d, precision, rows, device_type="cpu", rows_float64=dtype == torch.float64,
                                            rows_half=dtype in (torch.bfloat16, torch.float16),
                                            max_chunk_rows=chunk)
    acc.update(x[0])
    acc.update(x[1])
    # the state after the second update: S (one d x d buffer), the d-vectors (the estimate leaves out 3 int64 scalars)
    assert 0 <= _held(acc) - held <= 64
    if hasattr(_chunk_sums._SCRATCH, "chunks"):  # the CPU path's recycled scratch, allocated anew as on a first call
        del _chunk_sums._SCRATCH.chunks
    live = _LiveBytes()
    start = live.track(acc)
    with live:
        acc.update(x[2])
    # margin: a few d-vectors (sample means, column sums)
    assert abs((live.peak - start) - update) <= 64 * d, (live.peak - start, update)
    assert 0 <= _held(acc) - held <= 64
    live = _LiveBytes()
    start = live.track(acc)
    with live:
        spectrum = acc.compute()
    # the peak is the covariance and its m m^T (S is mirrored in place, with one triangle's temporary); the
    # solve's copy of its input (inside LAPACK, unseen here) comes after m m^T is freed
    assert abs((live.peak - start) - solve) <= 64 * d, (live.peak - start, solve)
    ref = torch.linalg.eigvalsh(torch.cov(x.reshape(-1, d).double().T)).flip(0)
    assert torch.allclose(spectrum.values, ref.clamp_min(0), rtol=1e-4, atol=1e-5 * float(ref[0]))  # fp32 products


def test_measurement_bytes_of_many_layers():
    held, update, solve = accumulator_bytes(8192, "exact", 4096)
    assert held == 8 * 8192**2 + 5 * 8 * 8192
    assert measurement_bytes([8192] * 80, "exact", 4096) == 80 * held + max(update, solve)
    mixed = measurement_bytes([64, 128], "float64", 10, device_type="cpu")
    assert mixed == sum(accumulator_bytes(d, "float64", 10, device_type="cpu")[0] for d in (64, 128)) + 2 * 8 * 128**2
    with pytest.raises(ValueError, match="precision"):
        accumulator_bytes(8, "half", 1)


def _model():
    torch.manual_seed(0)
    return TinyLM(layers=4).double()


def _state(model):
    return ([m.training for m in model.modules()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def test_a_lens_pass_that_cannot_fit_is_refused_before_any_state(monkeypatch):
    model = _model()
    model.train()
    pool = lm_pool()
    rows = pool[0][0].numel()  # rows per update: batch x sequence
    need = measurement_bytes([32] * 4, "exact", rows, device_type="cpu", rows_float64=True)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need - 1)
    before = _state(model)
    lens = SpectralLens(model, pool, layers="all", params=())
    with pytest.raises(MemoryError) as e:
        lens.measure(0, 0)
    msg = str(e.value)
    for part in ("4 layer(s)", "d=32", "precision='exact'", "on cpu", "is free", "all_blocks(model)[::4]",
                 "several passes", f"{need / 2**30:.2f} GiB", "nothing was measured", "(about 3 fit)"):
        assert part in msg, (part, msg)
    after = _state(model)
    assert after[:2] == before[:2] and all(torch.equal(after[2][k], v) for k, v in before[2].items())
    assert lens.history == []
    # exactly the estimate fits: the same spectra as with all the memory there is
    monkeypatch.setattr(_memory, "free_bytes", lambda device: need)
    fits = lens.measure(0, 0)
    monkeypatch.undo()
    free = lens.measure(0, 0)
    assert set(fits.spectra) == {f"act:h.{i}" for i in range(4)}
    assert all(torch.equal(fits.spectra[k].values, free.spectra[k].values) for k in free.spectra)


def test_an_attach_refuses_at_its_first_rows(monkeypatch):
    model = _model()
    x = lm_pool()[0][0]
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1 << 20)  # 1 MiB: 4 x d = 32 needs less
    with sl.attach(model, "h.*", precision="float64") as capture:
        model(x)
    assert all(acc.n_rows == x.numel() for acc in capture.accumulators.values())
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1000)
    with sl.attach(model, "h.*", precision="float64") as capture:
        with pytest.raises(MemoryError, match=r"4 layer\(s\) \(d=32, precision='float64'"):
            model(x)
    assert not any(acc.initialized for acc in capture.accumulators.values())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    monkeypatch.setattr(_memory, "free_bytes", lambda device: None)  # a device whose free memory is unknown
    with sl.attach(model, "h.*") as capture:
        model(x)
    assert all(acc.n_rows == x.numel() for acc in capture.accumulators.values())


def test_free_bytes_reads_the_cpu_memory():
    free = _memory.free_bytes(torch.device("cpu"))
    assert free is not None and free > 0
    assert _memory.free_bytes(torch.device("meta")) is None


def test_the_docs_table_is_the_estimate():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "performance.md").read_text()
    section = text.split("## Memory of the activation measurement", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) GiB \| ([\d.]+) GiB \| ([\d.]+) GiB \|$", section, re.MULTILINE)
    assert len(rows) == 6
    for d, layers, *gib in rows:
        for precision, value in zip(("exact", "fast", "float64"), gib):
            assert value == f"{measurement_bytes([int(d)] * int(layers), precision, 16384) / 2**30:.2f}"


def _rank_worker(rank: int, port: int, out: str) -> None:
    """A lens measured on 2 gloo ranks where only rank 1's device lacks the memory (its free memory mocked)."""
    from support.ranks import gloo_group, write_case

    if rank == 1:
        _memory.free_bytes = lambda device: 1000
    with gloo_group(rank, port, 2, 30):
        lens = SpectralLens(_model(), lm_pool(), layers="all", params=())
        try:
            lens.measure(0, 0)
            error = None
        except Exception as exc:  # noqa: BLE001 - recorded for the parent
            error = f"{type(exc).__name__}: {exc}"
        write_case(out, "refusal", rank, {"error": error})


@pytest.mark.distributed
def test_one_rank_short_of_memory_makes_every_rank_raise(tmp_path):
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_rank_worker, 2, tmp_path, 120.0)
    got = case_results(tmp_path, ["refusal"], 2)["refusal"]
    assert hung == [] and None not in got, (hung, got)
    assert got[1]["error"].startswith("MemoryError: spectral_lens: measuring 4 layer(s) (d=32"), got
    assert got[0]["error"].startswith("RuntimeError") and "rank(s) [1]" in got[0]["error"], got  # names rank 1


@pytest.mark.parametrize("rows, chunk, dtype", [(64, 131072, torch.float32), (64, 131072, torch.bfloat16),
                                                (300, 100, torch.float32), (200, 131072, torch.float64)])
def test_the_state_holds_one_square_matrix(rows, chunk, dtype):
    """After many updates (the CPU one-chunk path, the deferred terms flushed; calls of several chunks;
    float64 rows) one float64 d x d storage is alive, S itself: updates add into it in place (a spare
    buffer beside it made two, 16 d^2 bytes a layer). Counted over every allocation since the
    accumulator was built, so no buffer kept elsewhere (a cache, a closure) escapes the count."""
    d = 96
    torch.manual_seed(1)
    xs = [(torch.randn(rows, d, dtype=torch.float64) * 2 + k).to(dtype) for k in range(40)]  # > 32: a flush
    live = _LiveBytes()
    with live:
        acc = ActivationCovarianceAccumulator(d, max_chunk_rows=chunk)
        for x in xs:
            acc.update(x)
    # the CPU path's recycled chunk buffers (per thread, shared by every accumulator; a float64 product
    # for float64 rows) are counted in the update's bytes, not in the state
    scratch = {t.untyped_storage().data_ptr() for t in tree_flatten(list(getattr(_chunk_sums._SCRATCH, "chunks", {})
                                                                         .values()))[0] if isinstance(t, torch.Tensor)}
    squares = [k for k, size in live.live.items() if size == 8 * d * d and k not in scratch]
    assert squares == [acc._s_lower.untyped_storage().data_ptr()], len(squares)
    ref = torch.linalg.eigvalsh(torch.cov(torch.cat(xs).double().T)).flip(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(acc.compute().values, ref.clamp_min(0), rtol=tol, atol=tol * float(ref[0]))
