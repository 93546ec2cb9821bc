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

from spectral_lens.gradients import PerSampleGradientProbe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    args = ap.parse_args()
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

    for fn in (probe, nograd):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"==== {fn.__name__}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
