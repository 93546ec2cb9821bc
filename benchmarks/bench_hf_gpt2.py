"""Per-sample gradient spectrum of HF GPT-2's final ``attn.c_proj`` (a ``transformers`` ``Conv1D``).

Compares, in one run and on the same padded dict batches (``input_ids``, ``attention_mask``, ``labels``):

* ``nograd``  bare forward under ``torch.no_grad()`` (ratio 1.0 by definition);
* ``fast``    ``PerSampleGradientProbe`` with the Conv1D fast path (``engine="auto"``), update + compute;
* ``loop``    ``engine="loop"``: what ``engine="auto"`` falls back to where vmap cannot trace GPT-2's
              attention-mask handling, and what users had to choose before the fast path existed.

Reports seconds (median of ``--repeats`` after one warm-up) and ratios, plus the max relative
difference of the singular values between the two engines (float32).

    python benchmarks/bench_hf_gpt2.py                     # CPU, n_embd 256, 4 layers, M = 32, T = 128
    python benchmarks/bench_hf_gpt2.py --device cuda --n-embd 768 --layers 12 --m 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectral_lens.gradients import PerSampleGradientProbe  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--m", type=int, default=32, help="sequences (samples)")
    ap.add_argument("--t", type=int, default=128, help="sequence length")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import transformers

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64),
                                  n_positions=args.t, vocab_size=8192, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(1, cfg.vocab_size, (args.m, args.t), device=device)
    lengths = torch.randint(args.t // 2, args.t + 1, (args.m,), device=device)
    mask = (torch.arange(args.t, device=device)[None] < lengths[:, None]).long()
    batches = [{"input_ids": ids[i : i + args.chunk], "attention_mask": mask[i : i + args.chunk],
                "labels": ids[i : i + args.chunk].masked_fill(mask[i : i + args.chunk] == 0, -100)}
               for i in range(0, args.m, args.chunk)]
    param = f"transformer.h.{args.layers - 1}.attn.c_proj.weight"

    def nograd():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    results = {}

    def probe(engine):
        p = PerSampleGradientProbe(model, param, engine=engine, chunk_size=args.chunk)
        for b in batches:
            p.update(b)
        results[engine] = p.compute()

    t_ng = _time(nograd, device, args.repeats)
    t_fast = _time(lambda: probe("auto"), device, args.repeats)
    t_loop = _time(lambda: probe("loop"), device, args.repeats)
    s_fast, s_loop = results["auto"].singular_values, results["loop"].singular_values
    rel = float(((s_fast - s_loop).abs() / s_loop[0]).max())
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {dev}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"GPT-2 n_embd={args.n_embd} layers={args.layers} M={args.m} T={args.t} chunk={args.chunk}, "
          f"param {param}, median of {args.repeats}")
    print(f"{'case':<8} {'seconds':>9} {'/ nograd':>9}")
    for name, t in (("nograd", t_ng), ("fast", t_fast), ("loop", t_loop)):
        print(f"{name:<8} {t:>9.3f} {t / t_ng:>9.2f}")
    print(f"loop / fast: {t_loop / t_fast:.2f}x;  max |s_fast - s_loop| / s_1: {rel:.2e}")


if __name__ == "__main__":
    main()
