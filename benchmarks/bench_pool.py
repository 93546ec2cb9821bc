"""Pool pass overhead: a bare no-grad forward over a held-out pool vs the same forward with the
deepest block's activation covariance accumulated (forward hook + ``update`` per batch) and
``compute()`` (the float64 eigen-solve) at the end. Ratios in one run, same device.

Async cases (``*_async_vs_bare``): the pool pass with the accumulator attached, ``compute_async()``,
then ``K = 4`` more bare forward batches (the training steps that follow a measurement), then
``.result()``; baseline: the bare pool pass plus the same ``K`` batches. ``*_async_wait_ms`` is the
time ``.result()`` still blocked after those batches were issued. All cases interleaved, same run.

    python benchmarks/bench_pool.py --device cuda            # 262,144 rows: 256 x 1,024 tokens
    python benchmarks/bench_pool.py --quick                  # CPU smoke test, tiny model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import GPT, interleaved_times  # noqa: E402
from spectral_lens.activation_capture import attach  # noqa: E402
from spectral_lens.atomic import write_json_atomic  # noqa: E402


FOLLOW_BATCHES = 4  # bare batches after compute_async(), standing for the next training steps


def pool_overhead(device, cfg, seqs: int, seq: int, batch: int, repeats: int, autocast: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(ctx=seq, **cfg).to(device).eval()
    ids = torch.randint(0, cfg["vocab"], (seqs, seq), device=device)
    block = f"transformer.h.{cfg['layers'] - 1}"
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else torch.no_grad

    def bare():
        with torch.no_grad(), cast():
            for s in range(0, seqs, batch):
                model(ids[s : s + batch])

    def follow():
        with torch.no_grad(), cast():
            for k in range(FOLLOW_BATCHES):
                s = (k * batch) % seqs
                model(ids[s : s + batch])

    def bare_follow():
        bare()
        follow()

    def lens(precision):
        def fn():
            with attach(model, block, precision=precision) as cap, torch.no_grad(), cast():
                for s in range(0, seqs, batch):
                    model(ids[s : s + batch])
                t = time.perf_counter()
                cap.compute()
                fn.compute_s.append(time.perf_counter() - t)
        fn.compute_s = []
        return fn

    def lens_async(precision):
        def fn():
            with attach(model, block, precision=precision) as cap, torch.no_grad(), cast():
                for s in range(0, seqs, batch):
                    model(ids[s : s + batch])
                future = cap.compute_async()
            follow()
            t = time.perf_counter()
            future.result()
            fn.compute_s.append(time.perf_counter() - t)
        fn.compute_s = []
        return fn

    precisions = ["exact"] + (["fast"] if device.type == "cuda" else [])
    cases = {"bare": bare, "bare_follow": bare_follow}
    for p in precisions:
        cases[p] = lens(p)
        cases[f"{p}_async"] = lens_async(p)
    compute = {k: f.compute_s for k, f in cases.items() if hasattr(f, "compute_s")}  # seconds in compute()/result()
    times = interleaved_times(cases, repeats, device)
    compute = {k: v[1:] for k, v in compute.items()}  # without the warm-up call
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"case": "pool_overhead", "device": str(device), "rows": seqs * seq, "d": cfg["d"], "block": block,
           "bare_s": med["bare"], "follow_batches": FOLLOW_BATCHES, "bare_follow_s": med["bare_follow"]}
    for k in compute:
        base = med["bare_follow"] if k.endswith("_async") else med["bare"]
        row[f"{k}_vs_bare"] = med[k] / base
        row[f"{k}_spread"] = [min(times[k]) / base, max(times[k]) / base]
        # the same ratio per round (each round runs every case back to back): drifts of a shared
        # machine cancel; its median is the headline number
        bases = times["bare_follow" if k.endswith("_async") else "bare"]
        paired = [t / b for t, b in zip(times[k], bases)]
        row[f"{k}_vs_bare_paired"] = statistics.median(paired)
        row[f"{k}_paired_range"] = [min(paired), max(paired)]
        row[f"{k}_wait_ms" if k.endswith("_async") else f"{k}_compute_ms"] = 1e3 * statistics.median(compute[k])
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the row as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        row = pool_overhead(device, dict(vocab=512, d=64, heads=4, layers=2), 16, 64, 8, 3, False)
    else:
        row = pool_overhead(device, dict(vocab=50304, d=768, heads=12, layers=12), 256, 1024, 32, args.repeats,
                            device.type == "cuda")
    print(f"pool overhead ({row['rows']} rows, {row['device']}): exact {row['exact_vs_bare']:.3f}x"
          + (f", fast {row['fast_vs_bare']:.3f}x" if "fast_vs_bare" in row else "")
          + f" of the bare forward (target <= 1.02x); compute() {row['exact_compute_ms']:.1f} ms")
    print(f"with compute_async() and {row['follow_batches']} following batches: exact {row['exact_async_vs_bare']:.3f}x"
          + (f", fast {row['fast_async_vs_bare']:.3f}x" if "fast_async_vs_bare" in row else "")
          + f" of bare + the same batches; result() waited {row['exact_async_wait_ms']:.1f} ms")
    print("per-round ratios (median): " + ", ".join(f"{k[:-len('_vs_bare_paired')]} {v:.3f}x" for k, v in row.items()
                                                      if k.endswith("_vs_bare_paired")))
    if args.out:
        write_json_atomic(Path(args.out), row)
    return row


if __name__ == "__main__":
    main()
