"""Per-sample gradient spectrum of the final block's W_O on a GPT-2-small-like model.

Compares, in one run and on the same sequences:

* ``nograd``      bare forward under ``torch.no_grad()`` (the floor's main term; ratio 1.0 by definition);
* ``probe``       ``PerSampleGradientProbe`` (nn.Linear fast path), ``update`` + ``compute``, defaults: with
                  ``head_loss="auto"`` it detects the tied ``lm_head`` and runs head + loss chunked over tokens
                  (the decision is the row's ``head_loss``);
* ``probe_materialized`` the same with ``head_loss="materialized"`` (full tokens x vocab logits, the
                  default loss: the probe before auto selection);
* ``probe_native_ce`` the same with PyTorch's autocast cross-entropy (``causal_lm_loss(method="native")``)
                  instead of the default, which keeps the softmax in bf16 for bf16 logits (no float32 copy);
* ``probe_offload`` the same with ``offload_rows=True`` (rows of G in pinned host memory: peak device memory);
* ``probe_vmap``  the probe's generic ``torch.func`` engine;
* ``recipe_vmap`` the textbook whole-model recipe ``vmap(grad(functional_call(model)))`` w.r.t. W_O,
                  float64 Gram + eigvalsh of the stacked rows; on out-of-memory it retries with
                  ``vmap(..., chunk_size=k)`` for k = chunk/2, chunk/4, ..., 1 and records k;
* ``loop``        one ``torch.autograd.grad`` per sequence (``--no-loop`` skips it);
* ``probe_chunked_head`` the probe with the head and loss chunked over tokens passed by hand
                  (``head_loss_fns``: never the full tokens x vocab logits; calls the model as ``model(x)``);
* ``opacus``      Opacus ``GradSampleModule`` (the peer; optional import, skipped if absent) with only
                  W_O trainable: forward, ``sum`` loss, backward, ``grad_sample`` rows, float64 Gram;
* ``probe_no_cast_cache`` the default probe with its per-update cache of autocast weight casts off
                  (``spectral_lens.gradients.cast_cache``): every chunk re-casts every ``nn.Linear`` weight;
* ``probe_fp32``  the fast path without autocast: the reference for bf16 agreement.

For ``nograd``, ``probe`` and ``probe_no_cast_cache`` the rows also carry ``ops`` (aten operators
dispatched by one call, about one kernel launch each on CUDA) and ``casts`` (``aten._to_copy`` calls),
counted once outside the timing; both are device-independent measures of host work.

Rows of probe cases carry ``head_loss`` (``probe.head_loss_``: ``"chunked (lm_head)"``,
``"materialized: ..."`` or ``"custom: ..."``). Reports seconds (median of ``--repeats`` after one warm-up), the ratio to ``nograd``, peak CUDA memory
and the relative error of singular values against ``probe_fp32`` (max over all j of
``|s_j - s_ref_j| / s_ref_j``, and of ``|s_j - s_ref_j| / s_ref_1``). Targets: probe <= 1.5x nograd and
>= 1.5x faster than recipe_vmap.

    python benchmarks/bench_gradients.py --device cuda --m 64 512 --out runs/bench_gradients.json
    python benchmarks/bench_gradients.py --quick          # CPU smoke test, tiny sizes, < 60 s
    python benchmarks/bench_gradients.py --host-overhead  # CPU: the probe's host work per chunk (host_overhead)
    python benchmarks/bench_gradients.py --cpu-parts      # CPU: Gram fill, loss scaling, finiteness check, old vs new
    python benchmarks/bench_gradients.py --new-probe      # CPU: a new probe's extra aten ops and time over a kept one
    python benchmarks/bench_gradients.py --isolation --repeats 9 [--old DIR] [--fsdp]  # CPU: the probe's fixed cost per update
    python benchmarks/bench_gradients.py --probe-ratio --repeats 7 [--m 512]  # probe / forward interleaved, 32 tokens (CPU)
    python benchmarks/bench_gradients.py --probe-ratio --device cuda --seq 1024 --m 64 512 --repeats 9 --chunk-mib 512
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectral_lens.atomic import write_json_atomic  # noqa: E402
from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss, cast_cache, head_loss_fns  # noqa: E402
from spectral_lens.spectra.eigen import gram_eigenvalues  # noqa: E402


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.c_attn, self.c_proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.c_attn(x).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT / GPT-2 small shape: learned positions, pre-LN, tied embedding and head."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, ctx: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d),
                 h=nn.ModuleList(Block(d, heads) for _ in range(layers)), ln_f=nn.LayerNorm(d))
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = block(x)
        return self.lm_head(tr.ln_f(x))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(cases: dict, rounds: int, device=torch.device("cpu"), warm: bool = True) -> dict:
    """``{name: [seconds, ...]}``: ``rounds`` rounds, each calling every case once, back to back (so a
    shared machine's slow drifts hit all cases alike; compare them round by round). One warm-up call
    of each case first unless ``warm`` is False; the device is synchronized around each timed call."""
    if warm:
        for fn in cases.values():
            fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for key, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return times


class _OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched inside the block, and the dtype casts among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> dict:
    """``{"ops", "casts"}`` of one call of ``fn``."""
    with _OpCount() as c:
        fn()
    return {"ops": c.ops, "casts": c.casts}


def measure(fn, device, repeats):
    """(median seconds, peak CUDA bytes or None, last result) after one warm-up call.

    The CUDA cache is emptied once, before the warm-up, never between timed calls: emptied there, every
    timed call would pay fresh ``cudaMalloc`` calls in proportion to its footprint, which charges the
    memory-hungry cases (the peers, the materialized logits) for allocator work that a real loop does
    not repeat. The peak is the largest ``max_memory_allocated`` over the timed calls."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fn()
    times, peak, out = [], None, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak or 0, torch.cuda.max_memory_allocated(device))
    return statistics.median(times), peak, out


def run(m, args, device, model, name):
    g = torch.Generator().manual_seed(1000 + m)
    ids = torch.randint(0, args.vocab, (m, args.seq + 1), generator=g).to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    c = args.chunk
    amp = torch.bfloat16 if args.autocast == "bf16" else None
    cast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    w = dict(model.named_parameters())[name]

    def nograd():
        with torch.no_grad(), cast():
            for s in range(0, m, c):
                model(x[s : s + c])

    decisions = {}  # case -> probe.head_loss_ of its last run

    def probe(label, engine="auto", autocast=amp, ce=None, offload=False, chunked_head=False, head_loss="auto",
              casts=True):
        fns = (
            head_loss_fns(model) if chunked_head
            else {"loss_fn": functools.partial(causal_lm_loss, method=ce)} if ce is not None
            else {}
        )

        def fn():
            p = PerSampleGradientProbe(
                model, name, engine=engine, chunk_size=c, autocast_dtype=autocast, offload_rows=offload,
                head_loss=head_loss, **fns,
            )
            saved, cast_cache.ENABLED = cast_cache.ENABLED, casts
            try:
                values = p.update((x, y)).compute().values
            finally:
                cast_cache.ENABLED = saved
            decisions[label] = p.head_loss_
            return values

        return fn

    def opacus():
        from opacus import GradSampleModule  # optional peer: ImportError is recorded as a failed case

        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(p is w)
        was_training = model.training
        model.train()  # Opacus captures activations only in training mode (this model has no dropout)
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            rows = []
            for s in range(0, m, c):
                with cast():
                    logits = gsm(x[s : s + c]).float()
                # per-sequence mean token loss, summed over sequences: grad_sample holds grad L_m
                loss = F.cross_entropy(logits.flatten(0, 1), y[s : s + c].flatten(), reduction="none")
                loss.view(logits.shape[:2]).mean(1).sum().backward()
                rows.append(w.grad_sample.reshape(min(c, m - s), -1).float())
                w.grad_sample = None
                w.grad = None
            return gram_eigenvalues(torch.cat(rows))
        finally:
            gsm._close()
            model.train(was_training)
            for p, flag in saved:
                p.requires_grad_(flag)
            w.grad = None

    def loss_of(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),))[0].float(), yi)

    vmap_chunk = [c]  # samples per vmap call; halved on out-of-memory (recorded in the results)

    def recipe_vmap():
        while True:
            per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0), chunk_size=vmap_chunk[0])
            try:
                rows = []
                # no_grad outside the transform: torch.func.grad still differentiates inside, but the
                # model's other parameters (requires_grad leaves) no longer make ordinary autograd record
                # a graph around it. Without it each chunk's result kept that graph and every activation
                # of the chunk alive (grad_fn CatBackward0): memory grew chunk after chunk (111 GiB peak
                # at M = 64 on an H200, out of memory at M = 512 for every vmap chunk size).
                with torch.no_grad(), cast():
                    for s in range(0, m, c):
                        g = per_sample({name: w.detach()}, x[s : s + c], y[s : s + c])[name]
                        rows.append(g.reshape(min(c, m - s), -1).float())
                return gram_eigenvalues(torch.cat(rows))
            except torch.OutOfMemoryError:
                if vmap_chunk[0] == 1:
                    raise
            # out of memory: free the failed attempt before the retry, after the except block (while
            # the error is handled, its traceback keeps the attempt's frames alive)
            rows = g = None
            gc.collect()
            torch.cuda.empty_cache()
            vmap_chunk[0] //= 2
            print(f"M={m} recipe_vmap: out of memory, retrying with vmap chunk_size={vmap_chunk[0]}", file=sys.stderr)

    def loop():
        rows = []
        with cast():
            for i in range(m):
                loss = F.cross_entropy(model(x[i : i + 1])[0].float(), y[i])
                rows.append(torch.autograd.grad(loss, w)[0].reshape(1, -1).float())
        return gram_eigenvalues(torch.cat(rows))

    cases = {"nograd": nograd, "probe": probe("probe"),
             "probe_no_cast_cache": probe("probe_no_cast_cache", casts=False),
             "probe_materialized": probe("probe_materialized", head_loss="materialized"),
             "probe_chunked_head": probe("probe_chunked_head", chunked_head=True),
             "probe_native_ce": probe("probe_native_ce", ce="native"),
             "probe_offload": probe("probe_offload", offload=True), "probe_vmap": probe("probe_vmap", "vmap"),
             "recipe_vmap": recipe_vmap, "opacus": opacus}
    if not args.no_loop:
        cases["loop"] = loop
    cases["probe_fp32"] = probe("probe_fp32", autocast=None)
    cases = {k: v for k, v in cases.items() if k == "nograd" or k not in args.skip}
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    results, spectra = [], {}
    for label, fn in cases.items():
        reps = 1 if label in ("loop", "probe_fp32") else args.repeats
        try:
            t, peak, out = measure(fn, device, reps)
        except Exception as exc:  # one failing case (OOM, a missing vmap rule) must not sink the run
            print(f"M={m} {label}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
            results.append({"m": m, "case": label, "seconds": float("nan"), "peak_bytes": None, "error": repr(exc)[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append({"m": m, "case": label, "seconds": t, "peak_bytes": peak, "repeats": reps})
        if label in decisions:
            results[-1]["head_loss"] = decisions[label]
        if label == "recipe_vmap":
            results[-1]["vmap_chunk_size"] = vmap_chunk[0]
        if label in ("nograd", "probe", "probe_no_cast_cache"):
            results[-1].update(count_ops(fn))
        if out is not None:
            spectra[label] = out.detach().double().cpu().clamp_min(0).sqrt()
    ref = spectra.get("probe_fp32", spectra.get("probe"))
    t0 = results[0]["seconds"]
    for r in results:
        r["vs_nograd"] = r["seconds"] / t0
        r["model_bytes"] = base_mem
        s = spectra.get(r["case"])
        if s is not None and ref is not None:
            r["rel_err_max"] = float(((s - ref).abs() / ref).max())
            r["rel_err_vs_s1"] = float((s - ref).abs().max() / ref[0])
    by = {r["case"]: r["seconds"] for r in results}
    nan = float("nan")
    summary = {
        "m": m,
        "probe_vs_nograd": by.get("probe", nan) / by["nograd"],
        "probe_materialized_vs_nograd": by.get("probe_materialized", nan) / by["nograd"],
        "probe_chunked_head_vs_nograd": by.get("probe_chunked_head", nan) / by["nograd"],
        "probe_head_loss": decisions.get("probe"),
        "probe_native_ce_vs_nograd": by.get("probe_native_ce", nan) / by["nograd"],
        "probe_no_cast_cache_vs_nograd": by.get("probe_no_cast_cache", nan) / by["nograd"],
        "ops": {r["case"]: (r["ops"], r["casts"]) for r in results if "ops" in r},
        "recipe_vmap_over_probe": by.get("recipe_vmap", nan) / by.get("probe", nan),
        "opacus_over_probe": by.get("opacus", nan) / by.get("probe", nan),
        "recipe_vmap_chunk_size": vmap_chunk[0],
    }
    best = min(summary["probe_vs_nograd"], summary["probe_materialized_vs_nograd"], summary["probe_chunked_head_vs_nograd"])
    summary["target_probe_le_1.5x_nograd"] = bool(best <= 1.5)
    summary["target_ge_1.5x_faster_than_vmap"] = bool(summary["recipe_vmap_over_probe"] >= 1.5)
    return results, summary


def host_overhead(pairs: int = 15) -> dict:
    """The probe's host work per chunk, where it dominates: a 12-layer model of width 64 on 4-token
    sequences (M = 64 in 8 chunks, bf16 autocast, CPU, 1 thread), the probe with and without its cast
    cache against the no-grad forward of the same chunks; medians over interleaved pairs."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(ctx=4, vocab=512, d=64, heads=4, layers=12).eval()
    x, y = torch.randint(0, 512, (64, 4)), torch.randint(0, 512, (64, 4))
    name = "transformer.h.11.attn.c_proj.weight"

    def probe(casts):
        def fn():
            saved, cast_cache.ENABLED = cast_cache.ENABLED, casts
            try:
                PerSampleGradientProbe(model, name, chunk_size=8, autocast_dtype=torch.bfloat16).update((x, y))
            finally:
                cast_cache.ENABLED = saved
        return fn

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, 64, 8):
                model(x[i : i + 8])

    fns = {"probe": probe(True), "probe_no_cast_cache": probe(False), "nograd": forward}
    times = interleaved_times(fns, pairs)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_vs_nograd": out[k] / out["nograd"] for k in ("probe", "probe_no_cast_cache")})
    print(f"host-bound probe (CPU, 1 thread): probe / forward {out['probe_vs_nograd']:.3f}, without the cast cache "
          f"{out['probe_no_cast_cache_vs_nograd']:.3f}")
    return out


def probe_ratio(pairs: int = 7, m: int = 64, device: str = "cpu", seq: int = 32, chunk_mib=(), chunk: int = 16,
                shape: tuple[int, int, int, int] = (768, 12, 12, 50304)) -> dict:
    """The probe (update + compute) against the no-grad forward of the same chunks, interleaved: the
    GPT-2-small layout (``shape`` = width, heads, layers, vocabulary; smaller for the scripts' CPU
    check) on ``seq``-token sequences, ``m`` sequences in chunks of ``chunk`` (the probe's
    ``chunk_size`` and the forward's batch), bf16 autocast, on
    ``device``. ``probe`` builds a new probe for each call (what a first measurement costs);
    ``probe_kept`` reuses one probe, ``reset()`` between calls (a training loop's later checkpoints:
    its one-time setup, the bind and the head + loss decision, was paid at its first call). Reports the median time of each case and the median of the per-round ratios (each round
    runs every case once, back to back, so slow drifts of a shared machine cancel in the ratio).
    ``chunk_mib`` adds one probe case per value with ``fused_head.KERNEL_CHUNK_BYTES`` (the chunked
    head's block budget where its Triton kernels run: CUDA) set to that many MiB. Apart from that module constant it uses only the public API, so
    the same file can be run against an older checkout (copy it into that checkout's ``benchmarks/``)
    for a before/after ratio."""
    from spectral_lens.gradients import fused_head

    dev = torch.device(device)
    torch.manual_seed(0)
    d, heads, layers, vocab = shape
    model = GPT(ctx=seq, vocab=vocab, d=d, heads=heads, layers=layers).to(dev).eval()
    x, y = torch.randint(0, vocab, (m, seq), device=dev), torch.randint(0, vocab, (m, seq), device=dev)
    name = f"transformer.h.{layers - 1}.attn.c_proj.weight"

    def probe(budget=None):
        def fn():
            saved = fused_head.KERNEL_CHUNK_BYTES
            fused_head.KERNEL_CHUNK_BYTES = saved if budget is None else budget
            try:
                PerSampleGradientProbe(model, name, chunk_size=chunk, autocast_dtype=torch.bfloat16).update((x, y)).compute()
            finally:
                fused_head.KERNEL_CHUNK_BYTES = saved
        return fn

    def nograd():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            for i in range(0, m, chunk):
                model(x[i : i + chunk])

    kept = PerSampleGradientProbe(model, name, chunk_size=chunk, autocast_dtype=torch.bfloat16)

    def probe_kept():  # one probe for every round, reset each time: its one-time setup (the head decision) is paid once
        kept.reset()
        kept.update((x, y)).compute()

    cases = {"nograd": nograd, "probe": probe(), "probe_kept": probe_kept}
    cases.update({f"probe_chunk_{mib}mib": probe(mib << 20) for mib in chunk_mib})
    peak = {}
    for key, fn in cases.items():  # warm-up, and each case's peak device memory
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        fn()
        if dev.type == "cuda":
            peak[key] = torch.cuda.max_memory_allocated(dev) / 2**30
    times = interleaved_times(cases, pairs, dev, warm=False)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "m": m, "seq": seq, "chunk": chunk,
           "pairs": pairs}
    out.update({k: statistics.median(v) for k, v in times.items()})
    out.update({f"{k}_peak_gib": v for k, v in peak.items()})
    for key in cases:
        if key != "nograd":
            ratios = [p / n for p, n in zip(times[key], times["nograd"])]
            out[f"{key}_vs_nograd"] = statistics.median(ratios)
            out[f"{key}_vs_nograd_range"] = [min(ratios), max(ratios)]
            print(f"M = {m}, {seq} tokens, chunks of {chunk}: {key} {out[key]:.3f} s, no-grad forward {out['nograd']:.3f} s, "
                  f"{key} / forward {out[key + '_vs_nograd']:.2f} (per-round range {min(ratios):.2f}-{max(ratios):.2f}; "
                  f"{out['device']}, {torch.get_num_threads()} threads)"
                  + (f"; peak {peak[key]:.2f} GiB, forward {peak['nograd']:.2f} GiB" if peak else ""))
    return out


def new_probe(pairs: int = 21) -> dict:
    """What a probe built for one measurement costs beyond a kept one (``reset()`` between calls), on
    a host-bound CPU case (the model and sizes of :func:`host_overhead`, chunks of 16, 1 thread),
    with ``head_loss="chunked"`` (what ``"auto"`` picks on CUDA with Triton) and ``"materialized"``
    (no head decision to make): aten operators per call and medians of per-round time ratios against
    the no-grad forward of the same chunks. Uses only the public API, so it can be copied into an
    older checkout for a before/after count."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(ctx=4, vocab=512, d=64, heads=4, layers=12).eval()
    x, y = torch.randint(0, 512, (64, 4)), torch.randint(0, 512, (64, 4))
    name = "transformer.h.11.attn.c_proj.weight"

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, 64, 16):
                model(x[i : i + 16])

    cases = {"nograd": forward}
    for how in ("chunked", "materialized"):
        kw = dict(chunk_size=16, autocast_dtype=torch.bfloat16, head_loss=how)
        kept = PerSampleGradientProbe(model, name, **kw)
        cases[f"new_{how}"] = lambda kw=kw: PerSampleGradientProbe(model, name, **kw).update((x, y)).compute()
        cases[f"kept_{how}"] = lambda kept=kept: kept.reset().update((x, y)).compute()
    for fn in cases.values():  # warm-up (the kept probes decide here)
        fn()
    out = {"ops": {k: count_ops(fn)["ops"] for k, fn in cases.items()}}
    times = interleaved_times(cases, pairs, warm=False)
    out["vs_nograd"] = {k: statistics.median([a / b for a, b in zip(times[k], times["nograd"])]) for k in cases if k != "nograd"}
    for how in ("chunked", "materialized"):
        ops, ratio = out["ops"], out["vs_nograd"]
        print(f"head_loss={how}: aten ops new {ops['new_' + how]}, kept {ops['kept_' + how]}, forward {ops['nograd']}; "
              f"time / forward new {ratio['new_' + how]:.3f}, kept {ratio['kept_' + how]:.3f} (CPU, 1 thread)")
    return out


def cpu_parts(pairs: int = 7) -> dict:
    """Three parts of the probe on the CPU, each old way against the current one in interleaved pairs
    (medians, one process): the float64 Gram fill of the rows (row blocks vs column slabs), the scaling
    in the cross-entropy backward (PyTorch's mixed-dtype ``g.mul_(w)`` vs row blocks in float32), and
    the row finiteness check (``isfinite().all(1)`` vs a row maximum and minimum)."""
    from spectral_lens.gradients import losses
    from spectral_lens.gradients.gram import CPU_SLAB_ELEMENTS, block_rows_for, fill_gram, fill_gram_by_columns
    from spectral_lens.gradients.probe import finite_rows

    g = torch.Generator().manual_seed(0)
    cases = {}
    for n, p in ((64, 768 * 768), (512, 768 * 192)):
        blocks = [torch.randn(8, p, generator=g) for _ in range(n // 8)]
        k = torch.zeros(n, n, dtype=torch.float64)
        cases[f"gram {n} x {p}"] = (lambda b=blocks, k=k, p=p: fill_gram(k, b, 0, block_rows_for(p)),
                                    lambda b=blocks, k=k, n=n: fill_gram_by_columns(k, b, 0, CPU_SLAB_ELEMENTS // n))
    soft = torch.softmax(torch.randn(256, 50304, generator=g).bfloat16(), -1)
    w = torch.rand(256, 1, generator=g) / 32
    cases["ce scale 256 x 50304 bf16"] = (lambda: soft.clone().mul_(w), lambda: losses._scaled_rows(soft, w))
    rows = torch.randn(8, 768 * 768, generator=g)
    cases["finite rows 8 x 589824"] = (lambda: rows.isfinite().all(1), lambda: finite_rows(rows))
    out = {}
    for name, (old, new) in cases.items():
        t = interleaved_times({"old": old, "new": new}, pairs)
        o, nw = statistics.median(t["old"]), statistics.median(t["new"])
        out[name] = {"old_s": o, "new_s": nw, "new_over_old": nw / o}
        print(f"{name}: old {o * 1e3:.1f} ms, new {nw * 1e3:.1f} ms, new / old {nw / o:.2f} "
              f"({torch.get_num_threads()} threads)")
    return out


def _package_at(alias: str, root: str):
    """The ``spectral_lens`` package of another checkout (``root``: the folder holding its ``spectral_lens/``),
    imported under ``alias`` beside this one (its imports are relative), for an A/B run in one process."""
    pkg = Path(root) / "spectral_lens"
    spec = importlib.util.spec_from_file_location(alias, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


def isolation(rounds: int = 9, old: str | None = None, reps: int = 200, m1: int = 200, m8: int = 400,
              fsdp: bool = False) -> dict:
    """The probe's fixed per-update cost on the CPU (1 thread), a 2-block GPT of width 16 (vocabulary 37, 12
    tokens): the isolation's enter + exit (``with probe._isolated(): pass``, ``reps`` times, per call) with the
    model in eval mode and in train mode (its flags switched and set back), and a ``gradient_spectra`` pass
    (``SpectralLens.gradient_spectra`` over ``m1`` sequences in batches of 1, ``m8`` in batches of 8, compute
    included) per update against one bare forward + backward of the same batch. ``old``: the folder of another
    checkout (holding its ``spectral_lens/``), measured in the same rounds, alternating (CPU ``process_time``;
    medians over ``rounds``). With transformers installed, also the isolation of a two-layer Hugging Face Llama
    of width 16 (every transformers-5 model inherits ``PreTrainedModel.train``). ``fsdp``: import
    ``torch.distributed.fsdp`` first, as a training script that can shard does (the probe's FSDP check then
    looks for sharded modules)."""
    torch.set_num_threads(1)
    if fsdp:
        importlib.import_module("torch.distributed.fsdp")
    versions = {"new": sys.modules["spectral_lens"]}
    if old is not None:
        versions = {"old": _package_at("spectral_lens_old", old), **versions}
    torch.manual_seed(0)
    model = GPT(vocab=37, d=16, heads=2, layers=2, ctx=12)
    name = "transformer.h.1.attn.c_proj.weight"
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 37, (max(m1, m8), 13), generator=g)
    pools = {b: [(seqs[i:i + b, :-1], seqs[i:i + b, 1:]) for i in range(0, m, b)] for b, m in ((1, m1), (8, m8))}
    probes = {v: pkg.gradients.PerSampleGradientProbe(model, name) for v, pkg in versions.items()}
    lenses = {(v, b): pkg.SpectralLens(model, pools[b], params=name, progress=False)
              for v, pkg in versions.items() for b in pools}

    def enter_exit(probe):
        def fn():
            for _ in range(reps):
                with probe._isolated():
                    pass
        return fn

    def bare(b):
        x, y = pools[b][0]

        def fn():
            for _ in range(len(pools[b])):
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            for p in model.parameters():
                p.grad = None
        return fn

    llama = None
    try:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2)
        llama = transformers.LlamaForCausalLM(cfg)
        hf = {v: pkg.gradients.PerSampleGradientProbe(llama, "model.layers.1.self_attn.o_proj.weight")
              for v, pkg in versions.items()}
    except ImportError:
        pass
    cases = {}
    for mode in ("eval", "train"):
        for v in versions:
            cases[(mode, "iso", v)] = enter_exit(probes[v])
            if llama is not None:
                cases[(mode, "hf_iso", v)] = enter_exit(hf[v])
        for b in pools:
            cases[(mode, f"bare{b}", "")] = bare(b)
            for v in versions:
                cases[(mode, f"pass{b}", v)] = lenses[(v, b)].gradient_spectra
    times = {k: [] for k in cases}
    for r in range(rounds + 1):  # round 0: warm-up
        for key, fn in cases.items():
            model.train(key[0] == "train")
            if llama is not None:
                llama.train(key[0] == "train")
            t0 = time.process_time()
            fn()
            if r:
                times[key].append(time.process_time() - t0)
    out = {"threads": torch.get_num_threads(), "rounds": rounds, "fsdp_imported": fsdp}
    for mode in ("eval", "train"):
        for v in versions:
            out[f"{mode}_isolation_us_{v}"] = statistics.median(times[(mode, "iso", v)]) / reps * 1e6
            if llama is not None:
                out[f"{mode}_hf_llama_isolation_us_{v}"] = statistics.median(times[(mode, "hf_iso", v)]) / reps * 1e6
        for b in pools:
            for v in versions:
                ratios = [p / q for p, q in zip(times[(mode, f"pass{b}", v)], times[(mode, f"bare{b}", "")])]
                out[f"{mode}_batch{b}_pass_over_bare_{v}"] = statistics.median(ratios)
        print(f"{mode} model: isolation enter+exit " + ", ".join(f"{v} {out[f'{mode}_isolation_us_{v}']:.0f} us"
                                                              for v in versions)
              + "; gradient_spectra pass per update / bare fwd+bwd " + "; ".join(
                  f"batch {b}: " + ", ".join(f"{v} {out[f'{mode}_batch{b}_pass_over_bare_{v}']:.3f}" for v in versions)
                  for b in pools))
        if llama is not None:
            print(f"{mode} Llama: isolation enter+exit " + ", ".join(
                f"{v} {out[f'{mode}_hf_llama_isolation_us_{v}']:.0f} us" for v in versions))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="samples (sequences); default 64 512")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (CPU smoke test)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=16, help="sequences per pass (the probe's chunk_size and the forward's batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--autocast", choices=["bf16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-sample autograd loop")
    ap.add_argument("--skip", nargs="*", default=[], help="case names to leave out (e.g. probe_offload loop)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--host-overhead", action="store_true", help="only the host-bound CPU case (host_overhead)")
    ap.add_argument("--cpu-parts", action="store_true", help="only the CPU parts, old vs new (cpu_parts)")
    ap.add_argument("--new-probe", action="store_true", help="only a new probe's extra cost over a kept one (new_probe)")
    ap.add_argument("--probe-ratio", action="store_true", help="only the probe / forward ratio, interleaved (probe_ratio)")
    ap.add_argument("--isolation", action="store_true", help="only the probe's fixed per-update cost on the CPU (isolation)")
    ap.add_argument("--old", default=None, help="--isolation: the folder of an older checkout, measured alternately")
    ap.add_argument("--fsdp", action="store_true", help="--isolation: import torch.distributed.fsdp first")
    ap.add_argument("--chunk-mib", type=int, nargs="*", default=[], help="--probe-ratio: extra probe cases with this chunked-head block budget (MiB)")
    args = ap.parse_args(argv)
    if args.host_overhead:
        return host_overhead()
    if args.cpu_parts:
        return cpu_parts()
    if args.new_probe:
        return new_probe()
    if args.isolation:
        return isolation(args.repeats, args.old, fsdp=args.fsdp)
    if args.probe_ratio:
        res = [probe_ratio(args.repeats, m, args.device, args.seq or 32, args.chunk_mib, args.chunk) for m in (args.m or [64])]
        if args.out:
            write_json_atomic(Path(args.out), res)
        return res
    device = torch.device(args.device)
    if args.quick:
        cfg = dict(vocab=512, d=64, heads=4, layers=2)
        args.seq, args.m, args.chunk, args.repeats = args.seq or 64, args.m or [8, 16], min(args.chunk, 4), 1
    else:
        cfg = dict(vocab=50304, d=768, heads=12, layers=12)
        args.seq, args.m = args.seq or 1024, args.m or [64, 512]
    args.vocab = cfg["vocab"]
    args.autocast = args.autocast or ("bf16" if device.type == "cuda" else "none")
    torch.manual_seed(0)
    model = GPT(ctx=args.seq, **cfg).to(device).eval()
    name = f"transformer.h.{cfg['layers'] - 1}.attn.c_proj.weight"
    rows, summaries = [], []
    for m in args.m:
        r, s = run(m, args, device, model, name)
        rows += r
        summaries.append(s)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n### Per-sample gradients of `{name}` ({dev_name}, torch {torch.__version__}, autocast={args.autocast}, "
          f"{cfg['layers']} layers, width {cfg['d']}, vocab {cfg['vocab']}, {args.seq} tokens/sequence, chunk {args.chunk})\n")
    print("| M | case | head + loss | seconds | vs no-grad fwd | peak GiB | s_j rel. err (max) | rel. to s_1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        e1 = "-" if "rel_err_max" not in r else f"{r['rel_err_max']:.1e}"
        e2 = "-" if "rel_err_vs_s1" not in r else f"{r['rel_err_vs_s1']:.1e}"
        how = r.get("head_loss") or "-"
        how = how if how.startswith("chunked") else how.split(":")[0]
        print(f"| {r['m']} | {r['case']} | {how} | {r['seconds']:.3f} | {r['vs_nograd']:.2f}x | {peak} | {e1} | {e2} |")
    print()
    for s in summaries:
        print(f"M={s['m']}: probe = {s['probe_vs_nograd']:.2f}x no-grad forward (head_loss: {s['probe_head_loss']}), "
              f"materialized {s['probe_materialized_vs_nograd']:.2f}x, chunked head by hand "
              f"{s['probe_chunked_head_vs_nograd']:.2f}x (target <= 1.5x: "
              f"{'met' if s['target_probe_le_1.5x_nograd'] else 'MISSED'}); opacus / probe = {s['opacus_over_probe']:.2f}x; "
              f"recipe vmap / probe = "
              f"{s['recipe_vmap_over_probe']:.2f}x (target >= 1.5x: {'met' if s['target_ge_1.5x_faster_than_vmap'] else 'MISSED'})")
        print(f"M={s['m']}: probe without the cast cache = {s['probe_no_cast_cache_vs_nograd']:.2f}x no-grad forward; "
              "aten ops / casts per call: " + ", ".join(f"{k} {o} / {c}" for k, (o, c) in s["ops"].items()))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": dev_name, "torch": torch.__version__, "config": cfg, "seq": args.seq, "chunk": args.chunk,
                "autocast": args.autocast, "param": name}
        write_json_atomic(out, {"meta": meta, "rows": rows, "summary": summaries})
        print(f"\nwrote {out}")
    return summaries


if __name__ == "__main__":
    main()
