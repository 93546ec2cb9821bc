"""``python -m examples.toy --preset cpu --out runs/toy``: the paper's toy model, replicated end to end.

Tunes a learning rate per family and batch tier (``examples.tune``), trains every tier with spectral
and Fourier measurements, predicts the token-efficient tier from the early activation tail, writes
``<out>/report/report.md`` and prints the verdict. Run the same command again to resume after an
interruption: finished stages and runs are kept. ``OUT/preset.json`` records every setting of the
preset; a rerun whose preset differs in any of them (an edited or updated preset) is refused, in one
line naming the fields, rather than mixing its results with the old ones: use a new ``--out``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from examples.cli import OneLineParser, directory, one_line, run_stoppable

# examples.replicate (its package imports the pipeline, so torch) and .presets are imported inside main(), under
# its SIGTERM handling: imported here, at start-up, a `kill` in the job's first second or two ended it silently


def __getattr__(name: str):
    """``PRESETS``, imported on first use (``.presets`` imports torch: see above)."""
    if name == "PRESETS":
        from .presets import PRESETS

        return PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: glibc's settings of when freed memory goes back to the kernel (read from the environment at process start).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}  # name: mallopt's M_* parameter
_KEEP = 1 << 30


def keep_freed_memory() -> None:
    """Let glibc reuse freed blocks of up to 1 GiB instead of handing them back to the kernel.

    Every training step allocates MLP temporaries of up to 32 MiB (B = 512: 512 x 64 x 256 floats),
    above glibc's largest mmap threshold, so each was mapped, zero-filled page by page and unmapped
    again (a tenth of the run's CPU time went to page faults). Changes no number. Set with ``mallopt``
    here and through the environment in the tuner's spawned workers; a no-op off glibc. The cost:
    memory stays at its peak instead of shrinking between steps.
    """
    for name, param in MALLOC_ENV.items():
        os.environ.setdefault(name, str(_KEEP))
        try:
            import ctypes

            ctypes.CDLL(None).mallopt(param, _KEEP)
        except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows): nothing to set
            return


_RESUME = "rerun the same command to resume (finished runs are kept)"
#: ``--help``'s description, plain text (the module docstring's first line, shown until review 27, was reST markup).
_DESCRIPTION = ("The paper's toy model, replicated end to end: tune a learning rate per batch tier, train every tier "
                "with spectral measurements, predict the token-efficient tier, write OUT/report/report.md and print "
                "the verdict. Rerun the same command to resume (finished runs are kept). See docs/replication-toy.md.")
PROG = "python -m examples.toy"  # every line of the job says it: argparse's errors, the job's own, Ctrl-C and SIGTERM


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input, one line on stderr; Ctrl-C 130 and
    SIGTERM 143, one line: the tuner's trials are released and a rerun resumes, see :mod:`examples.cli`)."""
    return run_stoppable(PROG, _RESUME, _main, argv)


def _main(argv: list[str] | None) -> int:
    started = time.perf_counter()
    from .presets import PRESETS  # torch: imported under main()'s SIGTERM handler

    ap = OneLineParser(prog=PROG, description=_DESCRIPTION)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                    help="smoke (the tests'; seconds), cpu (the main job, the default; minutes), full (the paper's "
                         "sweep; hours)")
    ap.add_argument("--out", type=directory, default=None, help="output directory (default runs/toy-<preset>)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's)")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out or f"runs/toy-{preset.name}")
    with contextlib.ExitStack() as held:
        try:
            from examples.replicate.settings import check_settings, refuse_torchrun

            refuse_torchrun("examples.toy")
            if args.threads is not None and args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {out} is not a directory; use a new --out")
            _check_fresh(out)  # before the lock: a refused directory gets no lock file
            from examples.replicate.pipeline import job_lock

            # the job's lock before preset.json is read or written: two jobs started at once into a new --out
            # with different presets both found no preset.json, both wrote theirs, and one ran under the other's
            lock = held.enter_context(job_lock(out))
            _check_fresh(out)
            check_settings(out, preset, "toy run")  # every setting, as examples.speedrun: never mix results
        except (ValueError, OSError) as exc:
            print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        return _run(preset, out, args.threads or preset.threads, lock, started)


def _check_fresh(out: Path) -> None:
    """Refuse an ``out`` that is not empty and holds no toy run (no ``preset.json``)."""
    from examples.replicate.settings import holds_other_files

    if not (out / "preset.json").exists() and not (out / "preset.json").is_symlink() and holds_other_files(out):
        raise ValueError(f"{out} is not empty and holds no toy run: choose another --out")


def _run(preset, out: Path, threads: int, lock, started: float) -> int:
    """The pipeline with ``threads`` torch threads (the tuner's workers too); returns the exit status. Ends with one
    ``done in ...`` line naming the report and the run records, as ``python -m examples.speedrun`` does (until
    review 27 the job ended with its verdict; the report's path was a progress line above it)."""
    previous_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", *MALLOC_ENV)}
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the tuner's spawned worker processes
    keep_freed_memory()
    import torch

    from examples.replicate.pipeline import replicate

    from .workload import ToyWorkload

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        replicate(ToyWorkload(preset), out, preset.tuner, lock=lock)
    except (ValueError, KeyError, OSError, ImportError) as exc:  # a malformed OUT/tune/choices.json, no Optuna: one line
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)
        for k, v in previous_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    took = time.strftime('%H:%M:%S', time.gmtime(time.perf_counter() - started))
    print(f"\ndone in {took}: report {out / 'report' / 'report.md'}; run records in {out / 'runs'} "
          f"(python -m spectral_lens.cli predict {out / 'runs'}/*)")  # (rho: in the verdict just above)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
