"""``python -m examples.speedrun --preset cpu --out runs/speedrun-cpu``: the speedrun replication.

Tunes a learning rate per family and batch tier, trains every tier of every family with spectral
measurements on a fixed held-out pool, then predicts and reports (``OUT/report/report.md``).
Rerunning the same command resumes an interrupted run. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .presets import PRESETS, get_preset

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for the docs and tests)."""
    ap = argparse.ArgumentParser(prog="python -m examples.speedrun", description="The speedrun replication: tune a rate per tier, train every tier with spectral "
                                 "measurements, predict the token-efficient tier, report.")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS), help="what to run (see docs/replication-speedrun.md)")
    ap.add_argument("--out", help="output directory (default runs/speedrun-<preset>); rerun to resume")
    ap.add_argument("--data", help="override the preset's data: 'pydoc', 'stdlib' or a directory of .bin shards "
                                   "(paper-d12 needs the FineWeb shards here)")
    ap.add_argument("--device", help="override the preset's device (cpu, cuda)")
    ap.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's; 1 is faster on a busy machine)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the speedrun; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        from .pipeline import run_pipeline
        from .workload import ZooWorkload

        preset = get_preset(args.preset)
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        changes = {k: v for k, v in dict(data=args.data, device=args.device).items() if v is not None}
        if changes:
            preset = preset.replace(**changes)
        if preset.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"preset {preset.name!r} needs a CUDA GPU and none is visible "
                                   "(pass --device cpu to try it on the CPU)")
        out = Path(args.out or f"runs/speedrun-{preset.name}")
        workload = ZooWorkload(preset)
        print(f"speedrun {preset.name}: {' -> '.join(workload.families)}, tiers {list(workload.tiers)}, "
              f"{preset.budget:,} tokens per run, target loss {preset.target_loss:g} -> {out}", flush=True)
        result = run_pipeline(workload, out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished runs are kept)", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"python -m examples.speedrun: error: {msg}", file=sys.stderr)
        return 2
    s = result.summary
    print(f"\ndone in {time.strftime('%H:%M:%S', time.gmtime(result.wall_s))}: report {result.report}")
    pooled = s["score"]["pooled"]
    print(f"pooled rho {pooled['rho']:.3f} (p = {pooled['pvalue']:.3g}); paper 0.93")
    for line in s["verdict"]:
        print(f"  - {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
