"""``python -m examples.toy --preset cpu --out runs/toy``: the paper's toy model, replicated end to end.

Tunes a learning rate per family and batch tier (``examples.tune``), trains every tier with spectral
and Fourier measurements, predicts the token-efficient tier from the early activation tail, writes
``<out>/report/report.md`` and prints the verdict. Run the same command again to resume after an
interruption: finished stages and runs are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input, one line on stderr)."""
    ap = argparse.ArgumentParser(prog="python -m examples.toy", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="smoke (tests), cpu (main job), full (paper)")
    ap.add_argument("--out", default=None, help="output directory (default runs/toy-<preset>)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out or f"runs/toy-{preset.name}")
    marker = out / "preset.json"
    try:
        if marker.exists():
            stored = json.loads(marker.read_text(encoding="utf-8")).get("preset")
            if stored != preset.name:
                raise ValueError(f"{out} holds a run of preset {stored!r}, not {preset.name!r}: choose another --out")
        elif out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no toy run: choose another --out")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as exc:
        print(f"examples.toy: error: {exc}", file=sys.stderr)
        return 2

    threads = args.threads or preset.threads
    previous_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the tuner's spawned worker processes
    import torch

    from examples.replicate.pipeline import replicate
    from spectral_lens.atomic import write_text_atomic

    from .workload import ToyWorkload

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            write_text_atomic(marker, json.dumps({"preset": preset.name}) + "\n")
        replicate(ToyWorkload(preset), out, preset.tuner)
    finally:
        torch.set_num_threads(previous)
        if previous_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_env
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
