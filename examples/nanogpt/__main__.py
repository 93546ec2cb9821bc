"""Command line: ``python -m examples.nanogpt {params,variants,train} ...`` (see README.md).

``train`` exits with status 1 and one line when the run diverged (a non-finite loss: it stops there, its newest
checkpoint the last finite state), 2 for a refused setting, 130 on Ctrl-C.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from examples.cli import OneLineParser, directory, one_line, reader_gone


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the exit status."""
    ap = OneLineParser(prog="python -m examples.nanogpt", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="parameter counts vs the paper's Table 4 (meta device)")
    p.add_argument("--all", action="store_true", help="also print every variant at every profile")
    sub.add_parser("variants", help="list the 16 variants and what each changes")
    t = sub.add_parser("train", help="train one variant (torchrun-compatible)")
    t.add_argument("--variant", default="FlexWin")
    t.add_argument("--profile", default="tiny", help="tiny | small | d12 | d36 | d48")
    t.add_argument("--data", default="pydoc", help="'pydoc', 'stdlib' (bundled text) or a directory of .bin shards")
    t.add_argument("--run-dir", type=directory, default="runs/nanogpt")
    t.add_argument("--steps", type=int)
    t.add_argument("--tokens", type=int, help="train for this many tokens instead of --steps")
    t.add_argument("--batch-tier", type=int, default=8, help="micro-batches per optimizer step (the paper's B)")
    t.add_argument("--seq-len", type=int)
    t.add_argument("--rows", type=int, help="sequences per micro-batch")
    t.add_argument("--lr-scale", type=float, default=1.0)
    t.add_argument("--matrix-optimizer", choices=("muon", "adamw", "lamb"))
    t.add_argument("--matrix-lr", type=float)
    t.add_argument("--muon-impl", default="auto", choices=("auto", "records", "torch"))
    t.add_argument("--eval-every-tokens", type=int)
    t.add_argument("--val-tokens", type=int)
    t.add_argument("--target-val-loss", type=float)
    t.add_argument("--checkpoint-every-tokens", type=int)
    t.add_argument("--no-save-final", action="store_true")
    t.add_argument("--resume")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device")
    t.add_argument("--compile", action="store_true", help="torch.compile the whole model for the training steps")
    t.add_argument("--attn-impl", default="auto", choices=("auto", "dense", "flex"))
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    try:
        if a.cmd == "params":
            from .params import main as params_main

            return params_main(show_all=a.all)
        if a.cmd == "variants":
            from .variants import CHAIN

            for i, v in enumerate(CHAIN, 1):
                print(f"{i:2d} {v.name:10s} [{v.group}] {v.change}")
            return 0
    except BrokenPipeError:  # `python -m examples.nanogpt variants | head -3`: stop quietly
        return reader_gone()
    from .train import TrainingDiverged, train
    from .variants import canonical_name, get_profile

    # the train parser's errors (``python -m examples.nanogpt train: error: ...``), as its other lines; ap.error said
    # ``python -m examples.nanogpt: error: train: ...`` (until review 27)
    if a.steps is None and a.tokens is None:
        t.error("give --steps or --tokens")
    try:
        canonical_name(a.variant), get_profile(a.profile)
    except KeyError as e:
        t.error(e.args[0])
    started = time.time()
    try:
        res = train(variant=a.variant, profile=a.profile, data=a.data, run_dir=a.run_dir, steps=a.steps, tokens=a.tokens,
                    batch_tier=a.batch_tier, seq_len=a.seq_len, rows=a.rows, lr_scale=a.lr_scale,
                    matrix_optimizer=a.matrix_optimizer, matrix_lr=a.matrix_lr, muon_impl=a.muon_impl,
                    eval_every_tokens=a.eval_every_tokens, val_tokens=a.val_tokens, target_val_loss=a.target_val_loss,
                    checkpoint_every_tokens=a.checkpoint_every_tokens, save_final=not a.no_save_final, resume=a.resume,
                    seed=a.seed, device=a.device, compile=a.compile, attn_impl=a.attn_impl, log_every=a.log_every,
                    verbose=not a.quiet)
    except TrainingDiverged as e:  # a NaN loss: stopped there (it trained on into NaN rows and checkpoints), status 1
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops alike; one line says why
            print(f"python -m examples.nanogpt train: {one_line(e).removeprefix('train: ')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line naming the newest checkpoint to resume from, no traceback
        # this run's checkpoints only: the run dir may hold older ones of an earlier run
        ckpts = sorted(p for p in Path(a.run_dir).glob("ckpt_*.pt") if p.stat().st_mtime >= started - 1)
        latest = ckpts[-1] if ckpts else a.resume  # none written since this run resumed: its own checkpoint
        hint = (f"resume with the same settings and --resume {latest}" if latest
                else "no checkpoint was written (--checkpoint-every-tokens sets how often)")
        print(f"python -m examples.nanogpt train: interrupted: {hint}", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # a refused checkpoint, setting, data or run dir: one line, status 2
        print(f"python -m examples.nanogpt train: error: {one_line(e)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {res.steps} steps, {res.tokens:,} tokens, final val loss {res.final_val_loss:.4f}, "
              f"{res.tokens_per_s:,.0f} tokens/s, run dir {res.run_dir}")
    return 0


def exit_rank(status: int) -> None:
    """End the process with ``status``. Under torchrun (``WORLD_SIZE`` > 1; the trainer has destroyed its process
    group) by ``os._exit`` after flushing the output: on CPU, torch 2.13's gloo threads outlive
    ``destroy_process_group()`` and a normal interpreter exit sometimes aborts (SIGABRT, "terminate called without an
    active exception"), which torchrun reports as the job failing after it succeeded (32 of 237 two-rank runs of a
    plain gloo script, none of 184 ending by ``os._exit``; docs/guide-multi-gpu.md). Everything the run wrote is
    complete by then (closed files, atomic writes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_rank(main())
