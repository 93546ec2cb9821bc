"""Where the per-sample gradient probe spends its time on CUDA: torch.profiler's top kernels.

python benchmarks/profile_gradients.py [--m 32] [--chunk 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import GPT  # noqa: E402

from spectral_lens.atomic import write_text_atomic  # noqa: E402
from spectral_lens.gradients import PerSampleGradientProbe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the full tables here")
    args = ap.parse_args()
    full = []
    dev = torch.device("cuda")
    model = GPT(50304, 768, 12, 12, 1024).to(dev)
    x = torch.randint(0, 50304, (args.m, 1024), device=dev)
    y = torch.randint(0, 50304, (args.m, 1024), device=dev)
    name = "transformer.h.11.attn.c_proj.weight"

    def probe():
        return PerSampleGradientProbe(model, name, chunk_size=args.chunk, autocast_dtype=torch.bfloat16).update((x, y)).compute()

    def nograd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for i in range(0, args.m, args.chunk):
                model(x[i : i + args.chunk])

    import time

    for fn in (probe, nograd):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
        print(f"==== {fn.__name__}: wall {wall * 1e3:.1f} ms (unprofiled), device kernels {device_ms:.1f} ms")
        print(events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=48))
        full += [f"==== {fn.__name__}", events.table(sort_by="self_cuda_time_total", row_limit=60),
                 events.table(sort_by="self_cpu_time_total", row_limit=40)]
    if args.out:
        write_text_atomic(args.out, "\n".join(full))


if __name__ == "__main__":
    main()
