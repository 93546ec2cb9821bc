"""The CUDA fast mode's one-pass kernel against the two-pass path and the bare bf16 GEMM, per launch
configuration, in one run (issue #13: "fast accumulator >= 0.85 of the bf16 GEMM").

Run:  python benchmarks/bench_fused_gram.py --out fused.json                  # a CUDA GPU, ~2-3 minutes
      python benchmarks/bench_fused_gram.py --smoke                           # CPU, Triton's interpreter

Cases, per (d, rows): ``gemm`` (cuBLAS ``x^T x``, bf16 operands, fp32 output: the ceiling),
``copy`` (a bf16 copy of the chunk: the bandwidth ceiling), ``two_pass`` (today's fast path: the
Triton centring kernel, then the GEMM), ``center`` (the centring kernel alone, per launch shape) and
``fused/<config>`` (``spectral_lens/spectra/_gram_kernel.py`` with that launch configuration). Each
case runs ``--reps`` calls between two device syncs, the cases take turns (``--rounds`` rounds), and
every ratio is the median of per-round ratios. Each fused configuration's chunk sums are checked
against float64 sums of the same bf16 rows before it is timed (``err``), and its compiled kernels'
registers, spills, shared memory and instruction kinds (wgmma, TMA, cp.async) are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's spectral_lens
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_covariance import _rows  # noqa: E402
from bench_gradients import interleaved_times  # noqa: E402

from spectral_lens import ActivationCovarianceAccumulator  # noqa: E402
from spectral_lens._matmul import mm_fp32  # noqa: E402
from spectral_lens.atomic import write_json_atomic  # noqa: E402
from spectral_lens.spectra import _gram_kernel as K  # noqa: E402
from spectral_lens.spectra import band_alpha, tail_window  # noqa: E402
from spectral_lens.spectra import fast_moments as fm  # noqa: E402

#: name -> the kernel module's launch settings (BLOCK, BLOCK_K, NUM_WARPS, NUM_STAGES, TRANS_A, USE_TMA,
#: PREFETCH, WAVES)
CONFIGS = {
    "b128k64w8s3": (128, 64, 8, 3, 0, False, False, 1),
    "b128k64w8s3pf": (128, 64, 8, 3, 0, False, True, 1),
    "b128k64w4s3pf": (128, 64, 4, 3, 0, False, True, 1),
    "b128k32w8s3pf": (128, 32, 8, 3, 0, False, True, 1),
    "b128k64w8s3T": (128, 64, 8, 3, 1, False, False, 1),
    "b128k64w8s2tma": (128, 64, 8, 2, 0, True, False, 1),
    "b128k64w8s3tma": (128, 64, 8, 3, 0, True, False, 1),
    "b128k64w8s4tma": (128, 64, 8, 4, 0, True, False, 1),
    "b128k64w4s3tma": (128, 64, 4, 3, 0, True, False, 1),
    "b128k32w8s4tma": (128, 32, 8, 4, 0, True, False, 1),
    "b64k64w4s4tma": (64, 64, 4, 4, 0, True, False, 1),
    "b128k64w8s3tmax4": (128, 64, 8, 3, 0, True, False, 4),
}
SMOKE_CONFIGS = {"smoke": (16, 16, 4, 1, 0, False, False, 1), "smokeT": (16, 16, 4, 1, 1, True, False, 1),
                 "smokePF": (16, 16, 4, 1, 0, False, True, 1)}
#: centring kernel launch shapes (BLOCK_R, BLOCK_C, warps)
CENTER_SHAPES = [(64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (128, 256, 8)]

_SETTINGS = ("BLOCK", "BLOCK_K", "NUM_WARPS", "NUM_STAGES", "TRANS_A", "USE_TMA", "PREFETCH", "WAVES")


def _configure(cfg) -> None:
    for key, value in zip(_SETTINGS, cfg):
        setattr(K, key, value)


def _kernel_facts(compiled) -> dict:
    """Registers, spills, shared memory and which instruction kinds the PTX uses."""
    facts = {}
    for key in ("n_regs", "n_spills"):
        facts[key] = getattr(compiled, key, None)
    meta = getattr(compiled, "metadata", None)
    facts["shared"] = getattr(meta, "shared", None)
    ptx = getattr(compiled, "asm", {}).get("ptx", "") if hasattr(compiled, "asm") else ""
    facts["wgmma"] = "wgmma" in ptx
    facts["mma_sync"] = "mma.sync" in ptx
    facts["tma"] = "cp.async.bulk.tensor" in ptx
    facts["cp_async"] = "cp.async.cg" in ptx or "cp.async.ca" in ptx
    return facts


def _err(m, s, y64) -> list[float]:
    ref_s, ref_m = y64.t() @ y64, y64.sum(0)
    low = torch.ones_like(ref_s, dtype=torch.bool).tril()
    return [float((s.double() - ref_s).abs()[low].max() / ref_s.diagonal().max()),
            float((m.double() - ref_m).abs().max() / (y64.abs().sum(0).max() + 1))]


def run(dims, rows_list, rounds: int, reps: int, configs, device) -> list[dict]:
    out = []
    cuda = device.type == "cuda"
    for rows in rows_list:
        for d in dims:
            x = _rows(rows, d, device, torch.bfloat16)
            if not cuda:  # Triton's interpreter truncates in its bf16 rounding: values on a 1/4 grid, exact centring
                x = (x.float() * 4).round().div(4).add(50).to(torch.bfloat16)
            shift = x[:1024].double().mean(0).to(torch.bfloat16).double()
            y, _ = fm.center_cast(x, shift, use_triton=False)
            y64 = y.double()
            row = {"d": d, "rows": rows, "reps": reps, "rounds": rounds}
            cases = {}
            if cuda:
                cases["gemm"] = lambda: [mm_fp32(x.t(), x) for _ in range(reps)]
                cases["copy"] = lambda: [x.clone() for _ in range(reps)]
                cases["two_pass"] = lambda: [fm.fast_chunk_moments(x, shift, use_triton=True) for _ in range(reps)]
                from spectral_lens.spectra import _center_kernel as ck

                for br, bc, w in CENTER_SHAPES:
                    def center(br=br, bc=bc, w=w):
                        for _ in range(reps):
                            yy = torch.empty_like(x)
                            part = torch.empty(-(-rows // br), d, dtype=torch.float32, device=device)
                            ck.center_cast(x, shift, None, yy, part, block_r=br, block_c=bc, num_warps=w)
                    cases[f"center/{br}x{bc}w{w}"] = center
            for label, cfg in configs.items():
                name = f"fused/{label}"
                try:
                    _configure(cfg)
                    m, s = K.gram_center(x, shift)
                    row[f"{name}/err"] = _err(m, s, y64)
                    row[f"{name}/diag"] = _kernel_facts(K._LAST.get("diag"))
                    row[f"{name}/lower"] = _kernel_facts(K._LAST.get("lower"))
                except Exception as exc:  # a configuration that does not compile is a result, not a stop
                    row[f"{name}/error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    continue

                def fused(cfg=cfg):
                    _configure(cfg)
                    for _ in range(reps):
                        K.gram_center(x, shift)
                cases[name] = fused
            if not cuda:  # smoke: correctness and the harness only
                out.append(row)
                print(json.dumps(row), flush=True)
                continue
            times = interleaved_times(cases, rounds, device)
            for key, ts in times.items():
                row[f"{key}/ms"] = 1e3 * statistics.median(ts) / reps
                if key != "gemm":
                    row[f"{key}/gemm_over"] = statistics.median(g / t for g, t in zip(times["gemm"], ts))
                if key.startswith("center/"):
                    row[f"{key}/vs_copy"] = statistics.median(c / t for c, t in zip(times["copy"], ts))
            fused = {k[:-len("/gemm_over")]: v for k, v in row.items() if k.startswith("fused/") and k.endswith("/gemm_over")}
            if fused:
                row["best_fused"] = max(fused, key=fused.get)
                row["best_fused_vs_gemm"] = fused[row["best_fused"]]
            row["two_pass_vs_gemm"] = row["two_pass/gemm_over"]
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
            del x, y, y64
            torch.cuda.empty_cache()
    return out


def accumulator(dims, rows: int, chunks: int, rounds: int, best: dict, device) -> list[dict]:
    """Whole ``update`` calls (host work included) with the two-pass path vs the fused kernel (its best
    configuration for that d), against the bare GEMM: the ``throughput`` case of bench_covariance."""
    out = []
    for d in dims:
        data = [_rows(rows, d, device, torch.bfloat16, seed=i) for i in range(chunks)]

        def acc(fused):
            def fn():
                saved = fm.FUSED
                fm.FUSED = fused
                try:
                    a = ActivationCovarianceAccumulator(precision="fast")
                    for c in data:
                        a.update(c)
                    a._s_lower.sum()
                finally:
                    fm.FUSED = saved
            return fn

        label = (best.get(d) or "fused/b128k64w8s3").split("/")[1]
        _configure(CONFIGS[label])
        cases = {"gemm": lambda: [mm_fp32(c.t(), c) for c in data], "acc_two_pass": acc(False), "acc_fused": acc(True)}
        times = interleaved_times(cases, rounds, device)
        row = {"case": "accumulator", "d": d, "rows": rows, "chunks": chunks, "config": label}
        for key in ("acc_two_pass", "acc_fused"):
            row[f"{key}_vs_gemm"] = statistics.median(g / t for g, t in zip(times["gemm"], times[key]))
        # accuracy of the whole accumulator with each path vs float64 of the same rows: covariance
        # entries and the tail alphas (the bound: 1e-3)
        ref_cov = torch.cov(torch.cat(data).double().t())
        ref = torch.linalg.eigvalsh(ref_cov).flip(0).clamp_min(0).cpu()
        windows = [tail_window(12), (400, min(700, d))]
        for key, fused in (("two_pass", False), ("fused", True)):
            saved, fm.FUSED = fm.FUSED, fused
            try:
                a = ActivationCovarianceAccumulator(precision="fast")
                for c in data:
                    a.update(c)
                cov = a.covariance().double().to(ref_cov.device)
                row[f"{key}_cov_err"] = float((cov - ref_cov).abs().max() / ref_cov.diagonal().max())
                vals = a.compute().values
                row[f"{key}_alpha_err"] = [abs(band_alpha(vals, w).alpha - band_alpha(ref, w).alpha) for w in windows]
            finally:
                fm.FUSED = saved
        out.append(row)
        print(json.dumps(row), flush=True)
        del data, ref_cov
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[768, 1280, 1600])
    ap.add_argument("--rows", type=int, nargs="+", default=[262144, 65536])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", nargs="*", default=None, help="names from CONFIGS (default: all)")
    ap.add_argument("--no-accumulator", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        results = {"fused": run([40, 48], [300], 1, 1, SMOKE_CONFIGS, device)}
        bad = [k for r in results["fused"] for k, v in r.items() if k.endswith("/err") and max(v) > 1e-5]
        bad += [k for r in results["fused"] for k in r if k.endswith("/error")]
        print("smoke:", "FAILED " + ", ".join(bad) if bad else "ok")
        sys.exit(1 if bad else 0)
    device = torch.device("cuda")
    configs = {k: v for k, v in CONFIGS.items() if args.configs is None or k in args.configs}
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    results["fused"] = run(args.dims, args.rows, args.rounds, args.reps, configs, device)
    if not args.no_accumulator:
        best = {r["d"]: r.get("best_fused") for r in results["fused"] if r["rows"] == 65536}
        results["accumulator"] = accumulator(args.dims, 65536, 8, args.rounds, best, device)
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
