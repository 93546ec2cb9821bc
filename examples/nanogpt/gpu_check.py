"""GPU checks for the zoo's CUDA-only paths; writes a JSON report.

    python -m examples.nanogpt.gpu_check --out gpu_check.json [--variant FlexWin --steps 200]

Sections (each runs even if an earlier one failed; errors are recorded, not raised):

* ``attention``: FlexAttention (block masks) vs the dense-mask SDPA path vs a float64 reference,
  forward and input gradients, for every mask kind (causal, document-causal, token sliding
  window, block window, LSWA short window), in fp32 and bf16;
* ``fp8_head``: the FP8 LM-head matmul vs bf16 and fp32 matmuls, forward and gradients through a
  real cross-entropy loss (skipped, and said so, below compute capability 8.9);
* ``smoke``: a d12 training run of ``--variant`` on the bundled corpus, reporting tokens/s and the
  loss at start and end; ``smoke_fp8`` a short AttnScale run (FP8 head + LSWA) the same way.

Exit status 0 only if every section ran and passed its tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from spectral_lens.atomic import write_json_atomic

from .model import FP8_SCALES, FP8Matmul, attend, dense_window_mask, flex_window_mask, fp8_supported

TOL = {"float32": 2e-3, "bfloat16": 3e-2}   # max abs error vs float64, relative to the reference's max abs


def _mask_kinds(T: int, block: int):
    """(name, per-row docs?, window size, unit): the masks the zoo builds."""
    return [("causal", False, T, "token"), ("doc_causal", True, T, "token"),
            ("sliding_token_96", True, 96, "token"), ("block_3", True, 3, "block"),
            ("block_short_1", True, 1, "block")]


def check_attention(T: int = 1024, H: int = 2, hd: int = 64, block: int = 128, seed: int = 0,
                    device: str = "cuda") -> dict:
    """Dense-mask SDPA vs FlexAttention vs float64 reference for each mask kind and dtype.

    On CPU (dry run) FlexAttention has no backward, so only its forward is compared there.
    """
    dev = torch.device(device)
    flex_grads = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, docs_on, size, unit in _mask_kinds(T, block):
            q, k, v = (torch.randn(2, H, T, hd, generator=g) for _ in range(3))
            eot = torch.rand(2, T, generator=g) < (1 / 150 if docs_on else 0)
            docs = eot.long().cumsum(1)
            dout = torch.randn(2, H, T, hd, generator=g)
            mask64 = dense_window_mask(docs, size, unit, block)
            ref = {}
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            y64 = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask64, scale=hd ** -0.5)
            y64.backward(dout.double())
            ref = dict(y=y64.detach(), dq=q64.grad, dk=k64.grad, dv=v64.grad)
            res = {}
            for impl in ("dense", "flex"):
                grads = impl == "dense" or flex_grads
                qd, kd, vd = (t.to(dev, dtype).requires_grad_(grads) for t in (q, k, v))
                dd = docs.to(dev)
                mask = (dense_window_mask if impl == "dense" else flex_window_mask)(dd, size, unit, block)
                y = attend(qd, kd, vd, mask, hd ** -0.5)
                got = dict(y=y)
                if grads:
                    y.backward(dout.to(dev, dtype))
                    got |= dict(dq=qd.grad, dk=kd.grad, dv=vd.grad)
                res[impl] = {key: float((got[key].detach().double().cpu() - ref[key]).abs().max() / ref[key].abs().max())
                             for key in got}
            dn, fl = res["dense"], res["flex"]
            worst = max(max(dn.values()), max(fl.values()))
            out[f"{name}/{str(dtype)[6:]}"] = dict(
                rel_max_err_vs_fp64_dense=dn, rel_max_err_vs_fp64_flex=fl, worst=worst,
                tol=TOL[str(dtype)[6:]], ok=worst <= TOL[str(dtype)[6:]])
            print(f"attention {name:18s} {str(dtype)[6:]:8s} dense {max(dn.values()):.2e}  flex "
                  f"{max(fl.values()):.2e}  {'ok' if worst <= TOL[str(dtype)[6:]] else 'FAIL'}", flush=True)
    return dict(results=out, ok=all(r["ok"] for r in out.values()))


def check_fp8_head(M: int = 8192, d: int = 768, V: int = 50304, seed: int = 0, device: str = "cuda") -> dict:
    """FP8 head vs bf16/fp32 heads: relative errors of logits, loss and gradients."""
    dev = torch.device(device)
    if not fp8_supported(dev):
        why = (f"compute capability {torch.cuda.get_device_capability(dev)} < (8, 9)" if dev.type == "cuda"
               else f"device {dev} has no FP8 GEMM")
        return dict(skipped=f"{why}: the zoo falls back to a plain matmul", ok=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x0 = F.rms_norm(torch.randn(M, d, generator=g), (d,))       # final-normed activations
    w0 = torch.randn(V, d, generator=g) * 0.05                  # a head weight of trained-like scale
    tgt = torch.randint(0, 50257, (M,), generator=g).to(dev)

    def run(mode):
        x = x0.to(dev, torch.bfloat16 if mode != "fp32" else torch.float32).requires_grad_()
        w = w0.to(dev).requires_grad_()
        if mode == "fp8":
            y = FP8Matmul.apply(x, w, *FP8_SCALES)
        elif mode == "bf16":
            y = F.linear(x, w.bfloat16())
        else:
            y = F.linear(x, w)
        z = 15 * torch.tanh(y.float() / 15)
        loss = F.cross_entropy(z, tgt)
        loss.backward()
        return dict(y=y.float().detach(), loss=loss.detach(), dx=x.grad.float(), dw=w.grad.float())

    ref, bf, f8 = run("fp32"), run("bf16"), run("fp8")
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    res = {mode: {k: rel(r[k], ref[k]) for k in ("y", "dx", "dw")} | {"loss_abs_diff": float((r["loss"] - ref["loss"]).abs())}
           for mode, r in (("bf16", bf), ("fp8", f8))}
    ok = res["fp8"]["y"] < 0.1 and res["fp8"]["dx"] < 0.25 and res["fp8"]["dw"] < 0.25 and res["fp8"]["loss_abs_diff"] < 0.05
    print(f"fp8 head rel. errors vs fp32: {res['fp8']}  (bf16: {res['bf16']})  {'ok' if ok else 'FAIL'}", flush=True)
    return dict(rel_err_vs_fp32=res, ok=ok)


def check_smoke(variant: str, steps: int, seq_len: int, batch_tier: int, profile: str = "d12",
                compile: bool = False, device: str = "cuda", measure: bool = False) -> dict:
    """Train ``variant`` for ``steps`` steps on the bundled corpus; throughput and start/end loss.

    With ``measure``, a :class:`spectral_lens.SpectralLens` measures the deepest block's activation
    spectrum (fast precision, bf16 autocast) and the final W_O's per-sample gradient spectrum over a
    fixed held-out pool at every evaluation (4 per run), and the measurement times are reported.
    """
    import spectral_lens as sl

    from .data import builtin_data, heldout_pool
    from .train import train

    measurements: list[dict] = []

    def on_eval(model, step, tokens, val_loss):
        pool = list(heldout_pool(builtin_data("stdlib").val, seq_len, 16, batch_size=2, device=device))
        probe = sl.PerSampleGradientProbe(model, chunk_size=2, autocast_dtype=torch.bfloat16)
        lens = sl.SpectralLens(model, pool, pick=0, probe=probe, precision="fast", autocast_dtype=torch.bfloat16)
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda *a: None)
        sync(device)
        t = time.perf_counter()
        m = lens.measure(step, tokens, val_loss=val_loss)
        sync(device)
        act = next(v for k, v in m.spectra.items() if k.startswith("act:"))
        grad = next(v for k, v in m.spectra.items() if k.startswith("grad:"))
        measurements.append(dict(step=step, val_loss=val_loss, seconds=time.perf_counter() - t,
                                 rankme_act=sl.RankMe()(act),
                                 alpha_tail=sl.BandAlphaFitter((100, 200) if act.dim >= 200 else (10, 40)).fit(act).alpha,
                                 rankme_grad=sl.RankMe()(grad) if grad.n_nonzero else None,  # zero head at step 0
                                 noise_scale=m.scalars["noise_scale"],
                                 act_rows=act.n_rows, grad_samples=grad.n_rows))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(variant=variant, profile=profile, data="stdlib", run_dir=tmp, steps=steps,
                    batch_tier=batch_tier, seq_len=seq_len,
                    eval_every_tokens=max(1, steps * batch_tier * seq_len // 3) if measure else 10**15,
                    val_tokens=4 * seq_len, save_final=False, compile=compile, log_every=max(1, steps // 10),
                    verbose=False, device=device, on_eval=on_eval if measure else None)
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
        cfg = json.loads((Path(tmp) / "config.json").read_text())
    train_losses = [r["train_loss"] for r in rows if r["train_loss"] is not None]
    out = dict(variant=variant, profile=profile, steps=res.steps, tokens=res.tokens, seq_len=seq_len,
               batch_tier=batch_tier, tokens_per_s=res.tokens_per_s, val_loss_start=res.history[0]["val_loss"],
               val_loss_end=res.final_val_loss, train_loss_first_logged=train_losses[0] if train_losses else None,
               train_loss_last=train_losses[-1] if train_losses else None, wall_s=time.perf_counter() - t0,
               params=cfg["params"], fp8_head_active=cfg["fp8_head_active"], optimizers=cfg["optimizers"],
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None)
    out["measurements"] = measurements
    out["ok"] = math.isfinite(res.final_val_loss) and res.final_val_loss < res.history[0]["val_loss"] - 0.5
    if measure:
        out["ok"] = out["ok"] and len(measurements) >= 2 and all(math.isfinite(m["alpha_tail"]) for m in measurements)
    print(f"smoke {variant}: {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every section, write ``--out``; exit status 0 iff all passed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path of the JSON report")
    ap.add_argument("--variant", default="FlexWin")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch-tier", type=int, default=4)
    ap.add_argument("--fp8-steps", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps of the smoke runs")
    ap.add_argument("--profile", default="d12", help="smoke-run profile (tiny for a CPU dry run)")
    ap.add_argument("--device", default="cuda", help="'cpu' for a dry run of the script itself")
    a = ap.parse_args(argv)
    report: dict = dict(torch=torch.__version__, cuda_available=torch.cuda.is_available(), device_arg=a.device)
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            report["error"] = "no CUDA device: nothing to check (use --device cpu for a dry run)"
            write_json_atomic(a.out, report)
            print(report["error"])
            return 1
        report |= dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                       cuda=torch.version.cuda)
    smoke = dict(steps=a.steps, seq_len=a.seq_len, batch_tier=a.batch_tier, profile=a.profile, compile=a.compile,
                 device=a.device)
    sections = [("attention", check_attention, dict(device=a.device)),
                ("fp8_head", check_fp8_head, dict(device=a.device)),
                ("smoke", check_smoke, dict(variant=a.variant, measure=True, **smoke)),
                ("smoke_fp8", check_smoke, dict(smoke, variant="AttnScale", steps=a.fp8_steps))]
    for name, fn, kw in sections:
        t0 = time.perf_counter()
        try:
            report[name] = fn(**kw)
        except Exception as e:  # record and go on: one broken path must not hide the others
            report[name] = dict(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
        report[name]["seconds"] = time.perf_counter() - t0
        write_json_atomic(a.out, report)
    report["ok"] = all(report[n].get("ok", False) for n, _, _ in sections)
    write_json_atomic(a.out, report)
    print(f"gpu_check {'passed' if report['ok'] else 'FAILED'}; report in {a.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
