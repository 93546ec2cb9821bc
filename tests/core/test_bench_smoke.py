"""``benchmarks/gpu_all.py --tiny``: the one-command GPU benchmark runs end to end on the CPU."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path


BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_all_tiny_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    gpu_all = importlib.import_module("gpu_all")
    out = tmp_path / "all.json"
    res = gpu_all.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and not list(tmp_path.glob("*.tmp"))
    keys = ["probe_vs_nograd", "probe_chunked_head_vs_nograd", "recipe_vmap_over_probe"]
    if importlib.util.find_spec("opacus") is not None:  # the optional peer
        keys.append("opacus_over_probe")
    for s in res["gradients"]:
        for key in keys:
            assert math.isfinite(s[key]) and s[key] > 0, key
    assert res["accuracy"]["exact"]["alpha_abs_err"][0] < 1e-3
    assert res["pool"]["exact_vs_bare"] > 0 and res["pool"]["rows"] == 16 * 64
    assert any(line.startswith("| pool pass / bare forward, exact") and "(rounds " in line for line in res["table"])
    assert res["head_loss"]["ours_chunked_grad_rel_err_vs_materialized"] < 1e-5
    assert res["head_loss"]["ours_chunked_grad_rel_err_vs_float64"] < 1e-5
    assert {r["d"] for r in res["small_chunk"]} == {32}
    assert [r["d"] for r in res["fast_variants"]] == [64] and res["fast_variants"][0]["best_vs_gemm"] > 0
    for s in res["gradients"]:  # the cast cache's comparison row and the op counts
        assert math.isfinite(s["probe_no_cast_cache_vs_nograd"])
        assert set(s["ops"]) == {"nograd", "probe", "probe_no_cast_cache"}
    sys.modules.pop("gpu_all", None)


def _bench_module(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


def test_head_loss_gradient_errors_are_against_float64(monkeypatch):
    """Every head + loss case's gradient is compared with a float64 gradient of the same inputs (not only
    with the materialized case, which rounds too), and that reference is the closed form."""
    import torch

    gpu_all = _bench_module("gpu_all", monkeypatch)
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(40, 8, generator=g) * 3, torch.randn(30, 8, generator=g)
    t = torch.randint(0, 30, (40,), generator=g)
    ref = gpu_all._float64_head_grad(h, w, t)
    z = h.double() @ w.double().t()
    closed = (torch.softmax(z, 1) - torch.nn.functional.one_hot(t, 30).double()) @ w.double()
    assert ref.dtype == torch.float64 and torch.allclose(ref, closed, rtol=0, atol=1e-12)
    row = gpu_all.head_loss(torch.device("cpu"), 64, 16, 100, 1)
    for name in ("materialized", "ours_chunked", "ours_chunked_torch_body"):
        err = row[f"{name}_grad_rel_err_vs_float64"]
        assert 0 <= err < 1e-5, (name, err)


def test_fp32_ceiling_pins_the_precision_of_the_chunks_device(monkeypatch):
    """The bare-GEMM ceiling of ``throughput`` pins IEEE float32 matmuls on the device its chunks live on
    (as the accumulator does), not on the CPU backend whatever the device (TF32 on CUDA for the ceiling only)."""
    import contextlib

    import torch

    bc = _bench_module("bench_covariance", monkeypatch)
    seen = []

    def record(precision, device_type="cpu"):
        seen.append((precision, device_type))
        return contextlib.nullcontext()

    monkeypatch.setattr(bc, "matmul_precision", record)
    bc._bare_products([torch.empty(16, 4, device="meta")] * 2, "exact")
    assert seen == [("exact", "meta")]


def test_covariance_cases_are_timed_in_interleaved_rounds(monkeypatch):
    """``throughput`` and ``fast_variants`` time their cases round by round (every case once per round)
    and report ratios as medians of per-round ratios, so a drift of a shared host cancels."""
    import torch

    bc = _bench_module("bench_covariance", monkeypatch)
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = bc._rounds(fns, 3, torch.device("cpu"))
    assert calls == ["a", "b", "c"] * 3 and all(len(v) == 3 for v in times.values())
    # per-round time ratios gemm / ours 0.5, 2.0, 0.5: median 0.5 (the ratio of the medians, 4.0 / 2.0, would say 2)
    drift = {"gemm": [1.0, 4.0, 4.0], "ours": [2.0, 2.0, 8.0]}
    assert bc._paired(drift, "gemm", "ours") == 0.5
    rows = bc.throughput(torch.device("cpu"), [16], 64, 2, 3)
    assert 0 < rows[0]["exact_vs_fp32_gemm"] and 0 < rows[0]["exact_vs_torch_cov"]


def test_masked_chunk_case_times_kept_rows_against_their_bare_product(monkeypatch):
    """``--masked-chunk``: each row names how many rows of the call were kept, and its ratios are finite
    medians of paired update / bare-product times with their spread."""
    bc = _bench_module("bench_covariance", monkeypatch)
    rows = bc.masked_chunk(dims=(8,), seqs=4, positions=8, keeps=(1, 8), pairs=3, per=1)
    assert [(r["dtype"], r["keep"], r["kept"], r["rows"]) for r in rows] == [
        ("float32", "1/8", 4, 32), ("float32", "8/8", 32, 32), ("bfloat16", "1/8", 4, 32), ("bfloat16", "8/8", 32, 32)]
    for r in rows:
        assert 0 < r["wall_ratio_min"] <= r["wall_ratio_median"] <= r["wall_ratio_max"] and r["update_ms"] > 0


def test_measure_never_empties_the_cuda_cache_between_timed_calls(monkeypatch):
    """``bench_gradients.measure`` (also bench_loss's timer) empties the CUDA cache before the warm-up only:
    emptied before each timed call, every call re-pays cudaMalloc for its whole footprint, which favours
    the case with the smaller footprint (ours against Opacus, whole-model vmap, materialized logits)."""
    import torch

    bg = _bench_module("bench_gradients", monkeypatch)
    log = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7)
    seconds, peak, out = bg.measure(lambda: log.append("call") or 3, torch.device("cuda"), 3)
    assert log.count("call") == 4 and out == 3 and peak == 7 and seconds >= 0
    first_timed = log.index("call") + 1
    assert "empty_cache" not in log[first_timed:], log


def test_pool_reports_per_round_ratios_and_their_range(monkeypatch):
    """The pool pass's headline is the median of per-round ratios (each round runs every case back to
    back); its spread is the range of those same ratios, which brackets the median."""
    import torch

    bp = _bench_module("bench_pool", monkeypatch)
    row = bp.pool_overhead(torch.device("cpu"), dict(vocab=64, d=16, heads=2, layers=1), 4, 8, 2, 3, False)
    for k in ("exact", "exact_async"):
        lo, hi = row[f"{k}_paired_range"]
        assert 0 < lo <= row[f"{k}_vs_bare_paired"] <= hi
