"""Accumulator throughput vs in-run ceilings and peers, and fast-mode accuracy vs float64.

Run:  python benchmarks/bench_covariance.py --device cuda --out results.json
      python benchmarks/bench_covariance.py --device cpu --dims 768 --rows 16384 --chunks 4
      python benchmarks/bench_covariance.py --small-chunk          # CPU fixed cost per update
      OMP_NUM_THREADS=1 python benchmarks/bench_covariance.py --masked-chunk  # CPU cost of masked rows
      python benchmarks/bench_covariance.py --fixed-cost           # per-call host cost at 16 x 8, op counts

Every ratio compares rates measured in this same run on this same device: ours vs the bare GEMM of
the same precision (the ceiling: ``X^T X`` of the same chunk), and vs ``torch.cov``. Rates are
"useful" flops 2 N d^2 per chunk, so a path that skips part of the redundant half of the
symmetric product (fp32 on CUDA at d >= 1024) can exceed 1.0. Cases are warmed up, then timed in
interleaved rounds (each round runs every case once, back to back); rates come from median times and
ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's spectral_lens, not an installed one
from spectral_lens import ActivationCovarianceAccumulator, _chunk_sums  # noqa: E402
from spectral_lens._matmul import mm_fp32  # noqa: E402
from spectral_lens.atomic import write_json_atomic  # noqa: E402
from spectral_lens.spectra import band_alpha, tail_window  # noqa: E402
from spectral_lens.spectra.moments import matmul_precision  # noqa: E402


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
    return run


def _rounds(fns: dict, repeats: int, device: torch.device) -> dict:
    """``{name: [seconds, ...]}``: ``repeats`` rounds, each timing every case once, back to back (device
    time between CUDA events, synchronized after each call), so that a shared host's slow drifts hit
    all cases alike and cancel in per-round ratios (:func:`_paired`)."""
    timed = _timer(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(timed(fn, 1))
    return times


def _paired(times: dict, num: str, den: str) -> float:
    """Median over rounds of ``times[num] / times[den]`` (for rates: rate of ``den`` / rate of ``num``)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _rows(n: int, d: int, device, dtype, seed: int = 0, mean: float = 5.0, power: float = 1.2) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.arange(1, d + 1, dtype=torch.float64) ** (-power / 2)
    basis = (scale[:, None] * q.t()).to(device, torch.float32)
    mu = (mean * (2 * torch.rand(d, generator=g, dtype=torch.float64) - 1)).to(device, torch.float32)
    z = torch.randn(n, d, generator=g).to(device)
    return (z @ basis + mu).to(dtype)


def _bare_products(source, precision: str) -> None:
    """The ceiling of :func:`throughput`: ``c.T @ c`` for every chunk, with the float32 matmul precision
    pinned as the accumulator pins it for ``precision`` on the chunks' device (IEEE for "exact": no TF32
    on CUDA, whatever the caller set, so that ours and the ceiling do the same arithmetic)."""
    with matmul_precision(precision, source[0].device.type):
        for c in source:
            c.t() @ c


def throughput(device: torch.device, dims, rows: int, chunks: int, repeats: int) -> list[dict]:
    """Whole ``update`` streams (``chunks`` chunks of ``rows`` rows, a new accumulator per call) against the
    bare product of the same chunks and ``torch.cov``: one warm-up call each, then ``repeats``
    interleaved rounds; rates from median times, ratios as medians of per-round ratios."""
    out = []
    for d in dims:
        data = [_rows(rows, d, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed=i) for i in range(chunks)]
        data32 = [c.float() for c in data]
        flops = 2.0 * rows * d * d * chunks
        row = {"device": device.type, "d": d, "rows_per_chunk": rows, "chunks": chunks}

        def ours(precision, source):
            def fn():
                acc = ActivationCovarianceAccumulator(precision=precision)
                for c in source:
                    acc.update(c)
                acc._s.sum()  # the state is the result; no eigen-solve in the update benchmark
            return fn

        def bare(source, precision):
            return lambda: _bare_products(source, precision)

        def cov(source):
            def fn():
                for c in source:
                    torch.cov(c.t())
            return fn

        fns = {
            "exact": ours("exact", data32),
            "ceiling_fp32": bare(data32, "exact"),
            "torch_cov_fp32": cov(data32),
        }
        if device.type == "cuda":
            fns["fast"] = ours("fast", data)
            fns["ceiling_bf16"] = lambda: [torch.mm(c.t(), c, out_dtype=torch.float32) for c in data]
        for fn in fns.values():  # warm-up (Triton compile, cuBLAS heuristics)
            fn()
        times = _rounds(fns, repeats, device)
        for name in fns:
            row[f"{name}_tflops"] = flops / statistics.median(times[name]) / 1e12
        # ratios of rates: medians of per-round time ratios (the cases of a round ran back to back)
        row["exact_vs_fp32_gemm"] = _paired(times, "ceiling_fp32", "exact")
        row["exact_vs_torch_cov"] = _paired(times, "torch_cov_fp32", "exact")
        if device.type == "cuda":
            row["fast_vs_bf16_gemm"] = _paired(times, "ceiling_bf16", "fast")
            row["fast_vs_torch_cov"] = _paired(times, "torch_cov_fp32", "fast")
        out.append(row)
        print(json.dumps(row), flush=True)
        data = data32 = None  # frees the chunks (the lambdas above ran; a del would read as undefined to them)
    return out


def _accumulate_fp32(s: torch.Tensor, y: torch.Tensor) -> None:
    """``s += y^T y`` in fp32 from bf16 ``y``: cuBLAS's beta = 1 (``addmm`` with ``out_dtype``) where the
    build has it on this device, else a product and an add."""
    try:
        torch.addmm(s, y.t(), y, out_dtype=torch.float32, out=s)
    except (RuntimeError, NotImplementedError, TypeError):
        s.add_(mm_fp32(y.t(), y))


def _overlapped(data, shift, parts: int, device: torch.device):
    """An experiment for the fast mode (not in the library): each chunk in ``parts`` row blocks, the
    centring of block j + 1 on a side stream while the product of block j runs on the main stream,
    the blocks' products summed into one fp32 ``S``. It can only gain where cuBLAS leaves SMs idle
    (a d x d output has few tiles: 36-100 at d = 768-1600 against 132 SMs, unless cuBLAS splits K).
    Returns ``fn() -> [(m, S), ...]``."""
    from spectral_lens.spectra import fast_moments as fm

    side = torch.cuda.Stream(device)
    d = data[0].shape[1]

    def fn():
        main = torch.cuda.current_stream(device)
        out = []
        for c, sh in zip(data, shift):
            side.wait_stream(main)
            ready = []
            with torch.cuda.stream(side):
                for block in c.chunk(parts):
                    y, m = fm.center_cast(block, sh)
                    done = torch.cuda.Event()
                    done.record(side)
                    ready.append((y, m, done))
            s = torch.zeros(d, d, dtype=torch.float32, device=device)
            m_total = torch.zeros(d, dtype=torch.float64, device=device)
            for y, m, done in ready:
                main.wait_event(done)
                y.record_stream(main)
                m.record_stream(main)
                _accumulate_fp32(s, y)
                m_total += m
            out.append((m_total, s))
        return out

    return fn


#: Looped launches of the centring kernel timed by :func:`fast_variants`: (row tiles per program,
#: rows per tile, warps), 128 columns per tile. The library's launch is one 128 x 128 tile, 8 warps.
LOOPED = ((4, 128, 8), (8, 64, 4), (16, 64, 4), (16, 128, 8))


def _set_launch(launch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Set the centring kernel's launch constants (tiles, BLOCK_R, warps); return the previous ones."""
    from spectral_lens.spectra import _center_kernel as ck

    old = (ck.TILES, ck.BLOCK_R, ck.NUM_WARPS)
    ck.TILES, ck.BLOCK_R, ck.NUM_WARPS = launch
    return old


def _with_launch(launch, fn):
    old = _set_launch(launch)
    try:
        return fn()
    finally:
        _set_launch(old)


def fast_variants(device: torch.device, dims, rows: int, chunks: int, repeats: int) -> list[dict]:
    """The CUDA fast mode's pieces in one run: the centring pass (Triton one-pass kernel vs torch ops)
    against a bf16 copy of the chunk (the bandwidth ceiling), the product alone and the whole
    accumulator (with each centring path) against the bare bf16 GEMM, the host time to issue the
    updates, and each path's chunk-sum error against float64 sums of the same rounded rows. On CUDA
    also the looped launches of the centring kernel (:data:`LOOPED`), alone and in the accumulator.
    One warm-up call per case, then ``repeats`` interleaved rounds (:func:`_rounds`); ``*_vs_gemm`` and
    ``*_vs_copy`` are medians of per-round ratios.
    (A sweep of block splits of the product and of kernel launch shapes was measured on an H100 and
    removed: benchmarks/RESULTS.md.)"""
    from spectral_lens import _triton as kernels
    from spectral_lens.spectra import fast_moments as fm

    out = []
    for d in dims:
        data = [_rows(rows, d, device, torch.bfloat16, seed=i) for i in range(chunks)]
        nbytes = 2.0 * 2 * rows * d * chunks  # bf16 read + bf16 write
        shift = [c[:1024].double().mean(0).to(torch.bfloat16).double() for c in data]  # bf16-representable
        ys = [fm.center_cast(c, s, use_triton=False)[0] for c, s in zip(data, shift)]
        preps = [True, False] if device.type == "cuda" and fm.triton_available() else [False]
        if device.type != "cuda":  # CPU smoke run of this script: no bf16 -> fp32 GEMM kernel there
            ys = [y.float() for y in ys]
        fns = {"gemm_bf16": lambda: [mm_fp32(c.t(), c) for c in data],
               "copy_bf16": lambda: [c.clone() for c in data]}
        for t in preps:
            fns[f"prep_{'triton' if t else 'torch'}"] = (lambda t=t: [fm.center_cast(c, s, use_triton=t) for c, s in zip(data, shift)])
        fns["gram"] = lambda: [mm_fp32(y.t(), y) for y in ys]

        def acc_fn(t, launch=None):
            def fn():
                saved, kernels._AVAILABLE = kernels._AVAILABLE, t
                consts = _set_launch(launch) if launch else None
                try:
                    acc = ActivationCovarianceAccumulator(precision="fast")
                    for c in data:
                        acc.update(c)
                    acc._s_lower.sum()
                finally:
                    kernels._AVAILABLE = saved
                    if consts:
                        _set_launch(consts)
            return fn

        for t in preps:
            fns[f"acc_{'triton' if t else 'torch'}"] = acc_fn(t)
        row = {"case": "fast_variants", "d": d, "rows_per_chunk": rows, "chunks": chunks}
        if True in preps:  # the looped launches of the centring kernel; y must be the same bits
            y_ref = fm.center_cast(data[0], shift[0], use_triton=True)[0]
            for launch in LOOPED:
                tag = "loop{}x{}w{}".format(*launch)
                try:
                    consts = _set_launch(launch)
                    try:
                        row[f"prep_{tag}_same_y"] = bool(torch.equal(fm.center_cast(data[0], shift[0])[0], y_ref))
                    finally:
                        _set_launch(consts)
                    fns[f"prep_{tag}"] = lambda launch=launch: _with_launch(
                        launch, lambda: [fm.center_cast(c, s) for c, s in zip(data, shift)])
                    fns[f"acc_{tag}"] = acc_fn(True, launch)
                except Exception as exc:  # noqa: BLE001 (an experiment: keep the run going)
                    row[f"prep_{tag}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if device.type == "cuda":  # the two-stream experiment; a failure is recorded, not raised
            for parts in (2, 4):
                try:
                    fn = _overlapped(data, shift, parts, device)
                    m, s = fn()[0]
                    torch.cuda.synchronize(device)
                    ref = fm.fast_chunk_moments(data[0], shift[0])[1].double()
                    row[f"overlap{parts}_err_vs_one_gemm"] = float((s.double() - ref).abs().max() / ref.diagonal().max())
                    fns[f"overlap{parts}"] = fn
                except Exception as exc:  # noqa: BLE001 (an experiment: keep the run going)
                    row[f"overlap{parts}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for fn in fns.values():  # warm-up (Triton compile and autotuning, cuBLAS heuristics, allocator)
            fn()
        times = _rounds(fns, repeats, device)
        for name, fn in fns.items():
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name]) / chunks
            if name.startswith("acc_"):  # host time to issue the updates (no sync inside): launch-bound if ~ the device time
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                row[f"{name}_host_ms"] = 1e3 * (time.perf_counter() - t0) / chunks
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        for name in fns:  # medians of per-round ratios (a round runs every case once, back to back)
            if name.startswith(("acc_", "gram", "overlap")):
                row[f"{name}_vs_gemm"] = _paired(times, "gemm_bf16", name)
            if name.startswith("prep_"):
                row[f"{name}_vs_copy"] = _paired(times, "copy_bf16", name)
        row["copy_bf16_tb_s"] = nbytes / chunks / (row["copy_bf16_ms"] / 1e3) / 1e12
        # accuracy of each variant's chunk sums vs float64 sums of the same bf16-rounded rows
        y64 = ys[0].double()
        ref_s, ref_m = y64.t() @ y64, y64.sum(0)
        low = torch.ones(d, d, dtype=torch.bool, device=device).tril()
        for t in preps:
            m, s = fm.fast_chunk_moments(data[0], shift[0], use_triton=t)
            row[f"err_{'triton' if t else 'torch'}"] = [  # the lower triangle (what the accumulator reads)
                float((s.double() - ref_s).abs()[low].max() / ref_s.diagonal().max()),
                float((m - ref_m).abs().max() / (ref_m.abs().max() + 1))]
        accs = {n: row[f"{n}_vs_gemm"] for n in fns if n.startswith("acc_")}
        row["best"] = max(accs, key=accs.get)
        row["best_vs_gemm"] = accs[row["best"]]
        out.append(row)
        print(json.dumps(row), flush=True)
        data = ys = None  # frees the chunks (as above)
    return out


def _interleaved(bare, ours, pairs: int, per: int) -> tuple[dict, float]:
    """``pairs`` interleaved rounds of ``per`` calls of ``bare`` then ``per`` of ``ours``: the median, min
    and max of the paired ratios ours / bare in wall and process CPU time, and ``ours``' median wall
    seconds per call."""
    wall, cpu, each = [], [], []
    for _ in range(pairs):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per):
            bare()
        w1, c1 = time.perf_counter(), time.process_time()
        for _ in range(per):
            ours()
        w2, c2 = time.perf_counter(), time.process_time()
        wall.append((w2 - w1) / (w1 - w0))
        cpu.append((c2 - c1) / max(c1 - c0, 1e-9))
        each.append((w2 - w1) / per)
    ratios = {"wall_ratio_median": statistics.median(wall), "wall_ratio_min": min(wall), "wall_ratio_max": max(wall),
              "cpu_ratio_median": statistics.median(cpu), "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu)}
    return ratios, statistics.median(each)


def _ratio_text(r: dict) -> str:
    """:func:`_interleaved`'s ratios of a result row, as one line's text."""
    return (f"{r['wall_ratio_median']:.2f}x wall (spread {r['wall_ratio_min']:.2f}-{r['wall_ratio_max']:.2f}), "
            f"{r['cpu_ratio_median']:.2f}x CPU time (spread {r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f})")


def small_chunk(dims=(256, 768), rows: int = 1024, pairs: int = 31, per: int = 5,
                dtypes=(torch.float32, torch.bfloat16), precisions=("exact", "fast")) -> list[dict]:
    """CPU fixed cost per update: one ``update`` of ``rows`` rows vs a bare ``X.T @ X`` of the same rows.

    Interleaved: each of ``pairs`` repetitions times ``per`` bare products, then ``per`` updates, and
    records their ratio; the median and the spread (min, max) of the paired ratios are reported, in
    wall time and in process CPU time (the latter is robust to other processes on a shared machine,
    but counts a spinning thread pool's idle cycles). For bf16 rows (what CPU autocast produces) the
    bare product is the fp32 one of the same values. Each precision in ``precisions`` is timed for fp32
    rows, bf16 rows in the first one only. Each row records ``OMP_WAIT_POLICY`` as this process has it
    ("default": libgomp's, threads spin a while after each parallel region): the ratio depends on it,
    since passive waits make every parallel kernel wake the sleeping pool (see benchmarks/RESULTS.md).
    """
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    out = []
    for d in dims:
        for dtype, precision in [(t, p) for t in dtypes for p in precisions
                                 if t == torch.float32 or p == precisions[0]]:
            x32 = _rows(rows, d, torch.device("cpu"), torch.float32, seed=d).to(dtype).float()
            x = x32.to(dtype)
            acc = ActivationCovarianceAccumulator(d, precision=precision)
            for _ in range(3):  # warm-up: SciPy import, allocator, thread pools
                acc.update(x)
                x32.t() @ x32
            ratios, _ = _interleaved(lambda: x32.t() @ x32, lambda: acc.update(x), pairs, per)
            row = {"case": "small_chunk", "d": d, "rows": rows, "dtype": str(dtype).split(".")[-1],
                   "precision": precision, "omp_wait_policy": policy,
                   "threads": torch.get_num_threads(), "pairs": pairs, **ratios}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def masked_chunk(dims=(64, 256, 768), seqs: int = 256, positions: int = 64, keeps=(1, 32, 56), pairs: int = 9,
                 per: int = 2, dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """CPU cost of a masked update: one ``update`` of ``seqs`` x ``positions`` rows that keeps the last
    ``k`` positions of each sequence (k = 1: the toy's ``last_position_mask``; larger k: a padded
    batch) vs a bare ``X_kept.T @ X_kept`` of the kept rows alone, measured as :func:`small_chunk` is
    (interleaved pairs, medians and spread of the paired ratios, wall and process CPU time). Run with
    ``OMP_NUM_THREADS=1`` for one thread in torch and in SciPy's BLAS alike."""
    out = []
    for d in dims:
        for dtype in dtypes:
            x32 = _rows(seqs * positions, d, torch.device("cpu"), torch.float32, seed=d).to(dtype).float()
            x = x32.to(dtype).reshape(seqs, positions, d)
            for k in keeps:
                mask = torch.zeros(seqs, positions, dtype=torch.bool)
                mask[:, positions - k:] = True
                kept = x32.reshape(seqs, positions, d)[mask].contiguous()
                acc = ActivationCovarianceAccumulator(d)
                for _ in range(3):  # warm-up: SciPy import, allocator, thread pools, scratch
                    acc.update(x, mask)
                    kept.t() @ kept
                ratios, upd = _interleaved(lambda: kept.t() @ kept, lambda: acc.update(x, mask), pairs, per)
                row = {"case": "masked_chunk", "d": d, "rows": seqs * positions, "kept": seqs * k,
                       "keep": f"{k}/{positions}", "dtype": str(dtype).split(".")[-1],
                       "threads": torch.get_num_threads(), "pairs": pairs, "update_ms": 1e3 * upd, **ratios}
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


# Ops that launch no kernel: views and metadata, allocation without a fill (counted out of the
# per-update op count of fixed_cost; ops that may be no-ops, such as ``to``, never reach it as such:
# a ``to`` that converts arrives as ``_to_copy``)
_NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose", "permute",
    "detach", "alias", "empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg", "expand",
    "unsqueeze", "squeeze", "slice", "select", "lift_fresh",
})


def _launching_ops(fn) -> dict:
    """``{op: count}`` of the aten ops one call of ``fn`` hands to backend kernels, less
    :data:`_NO_LAUNCH`: seen by a TorchDispatchMode, i.e. after autograd and the composite
    decompositions, so one entry is one kernel on CUDA. (The profiler's CPU event tree also lists
    the helpers CPU kernels run inside, such as the dtype copy inside ``mean(dtype=)``, which are
    no launches on CUDA.) Work done in NumPy on the CPU (``add_promoted``'s d x d add, a torch.add
    on CUDA) is not seen."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name not in _NO_LAUNCH:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return dict(sorted(mode.ops.items()))


def fixed_cost(n: int = 16, d: int = 8, updates: int = 200, repeats: int = 15) -> list[dict]:
    """Per-call host cost of ``update`` at a tiny chunk (``n`` x ``d``), one thread: fp32 and bf16 rows
    on the CPU one-chunk path (``_cpu_update``; bf16 converted to fp32 first) and bf16 rows forced
    onto the generic path (``_chunk_sums._call_sums`` -> ``_commit``, the one every CUDA update takes; see
    :func:`_route`), each against a bare ``x.t() @ x``; for the
    generic path also the aten ops per update that launch work (see :func:`_launching_ops`). The
    time is the median over ``repeats`` of ``updates`` back-to-back calls; the bare product is the
    fp32 one for both dtypes."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g) + 3
    mask = torch.rand(n, generator=g) > 0.3

    def per_call(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(updates):
                fn()
            times.append((time.perf_counter() - t) / updates)
        return statistics.median(times)

    bare = per_call(lambda: base.t() @ base)  # the fp32 product alone
    out = []
    for path, dtype in (("cpu_update", torch.float32), ("cpu_update", torch.bfloat16), ("generic", torch.bfloat16)):
        x = base.to(dtype)
        for precision in ("exact", "fast"):
            for masked in (False, True):
                for nonfinite in ("raise", "skip"):
                    acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite)
                    m = mask if masked else None
                    fn = lambda: acc.update(x, mask=m)  # noqa: E731
                    with _route(path):
                        for _ in range(3):  # initialized, the state buffer owned (updated in place), warm caches
                            fn()
                        row = {"case": "fixed_cost", "dtype": str(dtype).split(".")[-1], "n": n, "d": d,
                               "path": path, "precision": precision,
                               "masked": masked, "nonfinite": nonfinite, "update_us": 1e6 * per_call(fn),
                               "bare_us": 1e6 * bare}
                        if path == "generic":
                            ops = _launching_ops(fn)
                            row["ops_per_update"] = sum(ops.values())
                            row["ops"] = ops
                    out.append(row)
                    print(json.dumps(row), flush=True)
    return out


@contextlib.contextmanager
def _route(path: str):
    """``"generic"``: CPU bf16 rows take the generic path (the one every CUDA update takes) instead of
    being converted to fp32 for the CPU one-chunk path, so that its host cost and ops can be counted
    on the CPU."""
    saved = _chunk_sums._CPU_HALF
    if path == "generic":
        _chunk_sums._CPU_HALF = ()
    try:
        yield
    finally:
        _chunk_sums._CPU_HALF = saved


def accuracy(device: torch.device, d: int, rows: int, chunks: int) -> dict:
    """Tail alpha of each mode vs a float64 pass over the same (bf16-stored) rows."""
    data = [_rows(rows, d, device, torch.bfloat16, seed=100 + i) for i in range(chunks)]
    n = rows * chunks
    mean = sum(c.double().sum(0) for c in data) / n
    ref_cov = sum((c.double() - mean).t() @ (c.double() - mean) for c in data) / (n - 1)
    ref = torch.linalg.eigvalsh(ref_cov).flip(0).clamp_min(0).cpu()
    # the paper's tail windows; proportional ones for the small d of a smoke test
    windows = [tail_window(12), (400, min(700, d))] if d >= 700 else [(max(2, d // 8), d // 4), (d // 3, 2 * d // 3)]
    result = {"device": device.type, "d": d, "rows": n, "windows": windows, "ref_alpha": [band_alpha(ref, w).alpha for w in windows]}
    modes = ["float64", "exact"] + (["fast"] if device.type == "cuda" else [])
    for mode in modes:
        acc = ActivationCovarianceAccumulator(precision=mode)
        for c in data:
            acc.update(c)
        vals = acc.compute().values
        rel = (vals - ref).abs() / ref
        result[mode] = {
            "alpha_abs_err": [abs(band_alpha(vals, w).alpha - a) for w, a in zip(windows, result["ref_alpha"])],
            "max_rel_err_top200": float(rel[:200].max()),
            "max_rel_err_200_700": float(rel[200:700].max()) if d > 200 else float("nan"),
        }
    # The trap: raw second moments in the product precision, centered afterwards.
    raw = sum(torch.mm(c.t(), c, out_dtype=torch.float32).double() if device.type == "cuda" else (c.float().t() @ c.float()).double() for c in data)
    sums = sum(c.float().sum(0).double() for c in data)
    raw_cov = (raw - torch.outer(sums, sums) / n) / (n - 1)
    raw_vals = torch.linalg.eigvalsh(raw_cov).flip(0).clamp_min(1e-300).cpu()
    result["uncentered"] = {
        "alpha_abs_err": [abs(band_alpha(raw_vals, w).alpha - a) for w, a in zip(windows, result["ref_alpha"])],
        "max_rel_err_200_700": float(((raw_vals - ref).abs() / ref)[200:700].max()) if d > 200 else float("nan"),
    }
    print(json.dumps(result), flush=True)
    return result


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device_name']}; torch {results['torch']}; {results['date']}", ""]
    cuda = results["throughput"] and "fast_tflops" in results["throughput"][0]
    head = "| d | exact TF/s | fp32 GEMM TF/s | exact/GEMM | exact/torch.cov |"
    if cuda:
        head += " fast TF/s | bf16 GEMM TF/s | fast/GEMM | fast/torch.cov |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["throughput"]:
        line = (f"| {r['d']} | {r['exact_tflops']:.2f} | {r['ceiling_fp32_tflops']:.2f} | {r['exact_vs_fp32_gemm']:.3f} | "
                f"{r['exact_vs_torch_cov']:.2f} |")
        if cuda:
            line += (f" {r['fast_tflops']:.1f} | {r['ceiling_bf16_tflops']:.1f} | {r['fast_vs_bf16_gemm']:.3f} | "
                     f"{r['fast_vs_torch_cov']:.1f} |")
        lines.append(line)
    for acc in results.get("accuracy", []):
        lines += ["", f"Accuracy, d={acc['d']}, {acc['rows']} bf16 rows, windows {acc['windows']}, float64 alpha {acc['ref_alpha']}:"]
        for mode in ("float64", "exact", "fast", "uncentered"):
            if mode in acc:
                lines.append(f"- {mode}: |alpha err| {['%.2e' % e for e in acc[mode]['alpha_abs_err']]}, "
                             f"max rel err ranks 200-700 {acc[mode]['max_rel_err_200_700']:.2e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[768, 1280, 1600])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--accuracy-rows", type=int, default=524288)
    ap.add_argument("--out", default=None)
    ap.add_argument("--small-chunk", action="store_true", help="only the CPU fixed-cost case (1,024-row updates)")
    ap.add_argument("--masked-chunk", action="store_true",
                    help="only the CPU masked-update case (256 x 64 rows keeping 1, 32 or 56 positions per sequence)")
    ap.add_argument("--fast-variants", action="store_true", help="only the CUDA fast-mode design variants")
    ap.add_argument("--fixed-cost", action="store_true",
                    help="only the per-call host cost of update at 16 x 8 rows (1 thread) and its aten op count")
    ap.add_argument("--pairs", type=int, default=31, help="interleaved repetitions of the small-chunk case")
    args = ap.parse_args()
    if args.small_chunk:
        rows = small_chunk(pairs=args.pairs)
        for r in rows:
            print(f"CPU small chunk, d={r['d']}, {r['rows']} {r['dtype']} rows, {r['precision']}, {r['threads']} threads, "
                  f"OMP_WAIT_POLICY={r['omp_wait_policy']}: update / bare X.T@X = "
                  f"{_ratio_text(r)}; target <= {1.5 if r['d'] <= 256 else 1.1}x")
        if args.out:
            write_json_atomic(args.out, rows)
        return
    if args.masked_chunk:
        rows = masked_chunk(pairs=min(args.pairs, 9))
        for r in rows:
            print(f"CPU masked chunk, d={r['d']}, {r['kept']} of {r['rows']} {r['dtype']} rows kept ({r['keep']}), "
                  f"{r['threads']} threads: update {r['update_ms']:.2f} ms, / bare X_kept.T@X_kept = {_ratio_text(r)}")
        if args.out:
            write_json_atomic(args.out, rows)
        return
    if args.fixed_cost:
        rows = fixed_cost()
        for r in rows:
            ops = f", {r['ops_per_update']} launching ops" if "ops_per_update" in r else ""
            print(f"{r['path']:10s} {r['dtype']:8s} {r['precision']:5s} mask={r['masked']!s:5s} "
                  f"nonfinite={r['nonfinite']:5s}: {r['update_us']:6.1f} us per update (bare x.t() @ x "
                  f"{r['bare_us']:.1f} us){ops}")
        if args.out:
            write_json_atomic(args.out, rows)
        return
    device = torch.device(args.device)
    if args.fast_variants:
        rows = fast_variants(device, args.dims, args.rows, args.chunks, args.repeats)
        if args.out:
            write_json_atomic(args.out, rows)
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results = {"device_name": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "throughput": throughput(device, args.dims, args.rows, args.chunks, args.repeats)}
    acc_chunks = max(1, args.accuracy_rows // args.rows)
    results["accuracy"] = [accuracy(device, 768, args.rows, acc_chunks)]
    print(markdown(results))
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
