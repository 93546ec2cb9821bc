"""Quickstart: a small batch-size sweep with spectral measurements, then prediction and a report.

    python -m examples.quickstart --out runs/quickstart

Trains the variant zoo's ``tiny`` profile on text that ships with Python (no download) at a few
batch tiers; at every evaluation a :class:`spectral_lens.SpectralLens` measures the deepest block's
activation covariance spectrum and the final attention output projection's per-sample gradient
spectrum over a fixed held-out pool and appends them to each run's record. Then it prints what
``TailPredictor`` says from the early (20%) spectra, how that compares with the realized token
efficiency, and writes a report (``spectral-lens report``). On a laptop CPU it takes a few minutes.
Tiny models on tiny data make a noisy sweep: read the numbers as a demonstration of the workflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import spectral_lens as sl
from spectral_lens.analysis import TailPredictor, token_inefficiency
from spectral_lens.records import RunInfo, RunWriter, open_runs
from spectral_lens.report import build_report

from .nanogpt.data import builtin_data, heldout_pool
from .nanogpt.train import train
from .nanogpt.variants import build_config

TAIL_WINDOW = (10, 40)


def run_tier(out: Path, variant: str, tier: int, tokens: int, seq_len: int, rows: int, pool, seed: int) -> Path:
    """Train one batch tier with spectral measurements at every evaluation; returns its record dir."""
    cfg = build_config(variant, "tiny")
    run_dir = out / f"{variant.lower()}-b{tier}"
    info = RunInfo(run_dir.name, family=variant, batch_tier=tier, tokens_per_step=tier * rows * seq_len,
                   seed=seed, n_layer=cfg.n_layer, total_tokens=tokens, batch_size=tier * rows,
                   primary_spectrum=f"act:blocks.{cfg.n_layer - 1}")  # the deepest block, as in the paper
    # The tiny profile is 128 wide: the d12 window [100, 200] does not fit, so use the paper's local
    # windows (App. E.1: 10-40 for the tail statistic) and a leading window for the head.
    writer = RunWriter(run_dir, info, fsync=False, tail_window=TAIL_WINDOW, head_window=(2, 8))
    state: dict = {}

    def on_eval(model: torch.nn.Module, step: int, seen: int, val_loss: float) -> None:
        if "lens" not in state:  # the trainer hands over the unwrapped model; zoo blocks return (x, v): pick=0
            state["lens"] = sl.SpectralLens(model, pool, layers="all", pick=0, gradient_samples=32,
                                            writer=writer, progress=False)
        state["lens"].measure(step, seen, val_loss=val_loss, progress=seen / tokens)
        writer.log(step, seen, val_loss=val_loss)

    result = train(variant=variant, profile="tiny", data="pydoc", run_dir=run_dir / "train", tokens=tokens,
                   batch_tier=tier, seq_len=seq_len, rows=rows, eval_every_tokens=tokens // 10,
                   seed=seed, on_eval=on_eval, save_final=False, verbose=False)
    writer.update_info(throughput=result.tokens_per_s)
    writer.close()
    print(f"  {run_dir.name}: {result.steps} steps, final val loss {result.final_val_loss:.3f}, "
          f"{result.tokens_per_s:,.0f} tokens/s")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--variant", default="RoPE")
    ap.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=300_000, help="training tokens per run")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose another --out")
    torch.manual_seed(args.seed)
    data = builtin_data("pydoc")
    pool = list(heldout_pool(data.val, args.seq_len, 64, batch_size=8))  # fixed pool, reused everywhere
    print(f"sweep: {args.variant} (tiny profile), tiers {args.tiers}, {args.tokens:,} tokens each")
    dirs = [run_tier(out, args.variant, t, args.tokens, args.seq_len, args.rows, pool, args.seed) for t in args.tiers]

    runs = open_runs(dirs)
    losses = [r.val_curve()[1] for r in runs]
    target = float(max(min(l) for l in losses)) + 1e-9  # the loss every tier reached
    print(f"\ntarget validation loss: {target:.3f} (the worst tier's best)")
    eps = token_inefficiency(runs, target)
    predictor = TailPredictor(fraction=0.2, window=TAIL_WINDOW).fit(runs)
    for family, ranking in predictor.predict().items():
        print(f"early alpha_tail ordering ({family}): tiers {ranking.tiers} -> recommend tier {ranking.recommended}")
    print("realized eps_tok:", {r.info.batch_tier: round(float(eps[r.run_id]), 3) for r in runs})
    score = predictor.score(targets=target)
    print(f"Spearman rho(early alpha_tail, eps_tok) = {score.mean_within_rho:.2f}")
    print("note: these tiers share one learning rate and a tiny budget, so smaller batches win by taking more\n"
          "steps; the paper's prediction concerns learning rates tuned per tier (its ASHA protocol).")
    report = build_report(runs, out / "report", target_loss=target, window=TAIL_WINDOW)
    print(f"\nreport: {report.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
