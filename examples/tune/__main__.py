"""Command line: ``python -m examples.tune synthetic|zoo ...`` (see ``docs/tuning.md``).

Errors are one line on stderr with exit status 2. A finished run with a family/tier that got no
choice (every candidate failed) exits with status 1, and says which on stderr (with ``--quiet`` too).
Ctrl-C (status 130) and SIGTERM (status 143) stop the tuning as an exception, so its workers release
their trials (a rerun resumes them at once), and say so in one line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from examples.cli import OneLineParser, directory, one_line, sigterm_raises, stopped


def _family(text: str) -> tuple[str, dict[str, float]]:
    """``NAME=GROUP:LR[,GROUP:LR...]`` -> (NAME, {GROUP: LR})."""
    try:
        name, rest = text.split("=", 1)
        pairs = [(g, float(v)) for g, v in (item.split(":", 1) for item in rest.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"family {text!r}: expected NAME=GROUP:LR[,GROUP:LR...]") from None
    lrs = dict(pairs)
    if len(lrs) != len(pairs):  # the later rate would silently replace the earlier
        twice = sorted({g for g, _ in pairs if [p for p, _ in pairs].count(g) > 1})
        raise argparse.ArgumentTypeError(f"family {text!r}: group {', '.join(map(repr, twice))} is given twice; "
                                         "expected each GROUP once")
    return name, lrs


def _workdir(text: str) -> Path:
    """``--workdir``: not empty (that would be the current directory, filled with trials/ and choices.json)."""
    return Path(directory(text))


def _unique(what: str, pairs) -> dict:
    """``dict(pairs)``, refusing a name given twice (the later one would silently replace the earlier)."""
    out = {}
    for name, lrs in pairs:
        if name in out:
            raise ValueError(f"{what} {name!r} is given twice")
        out[name] = lrs
    return out


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m examples.tune", description="Learning-rate tuning per family and batch tier "
                "(synchronized successive halving, paper App. B.3) on Optuna.")
    sub = p.add_subparsers(dest="workload", required=True, parser_class=OneLineParser)
    common = OneLineParser(add_help=False)
    common.add_argument("--tiers", type=int, nargs="+", required=True)
    common.add_argument("--reference-tier", type=int, default=8)
    common.add_argument("--rungs", type=int, nargs="+", required=True, help="cumulative budgets, e.g. 50 150 500")
    common.add_argument("--workdir", type=_workdir, required=True)
    common.add_argument("--choices", type=Path, default=None, help="choices file (default WORKDIR/choices.json)")
    common.add_argument("--mode", choices=("synchronized", "asynchronous"), default="synchronized")
    common.add_argument("--storage", default=None, help="journal:/path/file.log | sqlite:///file.db | postgresql://...")
    common.add_argument("--study", default="tune")
    common.add_argument("--workers", type=int, default=1)
    common.add_argument("--min-resource", type=int, default=None, help="asynchronous mode (default: the first rung)")
    common.add_argument("--reduction-factor", type=int, default=None, help="asynchronous mode (default 2)")
    common.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    common.add_argument("--grace", type=float, default=60.0, help="seconds of silence before a trial is taken over")
    common.add_argument("--quiet", action="store_true", help="no progress output or summary table")
    s = sub.add_parser("synthetic", parents=[common], help="closed-form loss curves (a demo and a test objective)")
    s.add_argument("--family", type=_family, action="append", default=None,
                   help="NAME=GROUP:LR[,GROUP:LR...] (repeatable; default synthetic=lr:1e-3)")
    s.add_argument("--eval-every", type=int, default=10)
    s.add_argument("--sleep", type=float, default=0.0, help="seconds per validation point")
    z = sub.add_parser("zoo", parents=[common], help="NanoGPT zoo variants (budgets in tokens)")
    z.add_argument("--variants", nargs="+", required=True)
    z.add_argument("--profile", default="tiny")
    z.add_argument("--data", default="pydoc")
    z.add_argument("--eval-every-tokens", type=int, required=True)
    z.add_argument("--val-tokens", type=int, default=None)
    z.add_argument("--device", default=None)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one line (``python -m examples.tune: warning: ...``), without the source line."""
    print(f"python -m examples.tune: warning: {one_line(message)}", file=sys.stderr)


_RESUME = ("rerun the same command to resume (with a journal or database --storage; the in-memory default "
           "keeps nothing)")


def _is_storage_error(e: Exception) -> bool:
    """Optuna's ``StorageInternalError`` (a database gone away, a failed commit): the user's to fix, as an
    ``OSError`` is, not a traceback (Optuna is imported only once the tuning starts)."""
    exceptions = sys.modules.get("optuna.exceptions")
    return exceptions is not None and isinstance(e, exceptions.StorageInternalError)


def main(argv=None) -> int:
    """Run the tuner from the command line; returns the exit status."""
    with warnings.catch_warnings():  # the grid-edge and take-over warnings: one line each, as the errors
        warnings.showwarning = _one_line_warning
        try:
            with sigterm_raises():  # SIGTERM raises examples.cli.Terminated, a KeyboardInterrupt
                return _main(argv)
        except KeyboardInterrupt as e:  # outside the tuning (parsing, importing, printing the result)
            return stopped("python -m examples.tune", e, _RESUME)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "synchronized":  # the paper's rule always keeps the top half; say so instead of ignoring them
        for flag, value in (("--min-resource", args.min_resource), ("--reduction-factor", args.reduction_factor)):
            if value is not None:
                print(f"python -m examples.tune: error: {flag} applies to --mode asynchronous only (the synchronized "
                      "rule promotes the top half at each of --rungs)", file=sys.stderr)
                return 2
    try:
        from .storage import _optuna

        optuna = _optuna()  # a missing Optuna is one line naming the extra, not 'No module named optuna'
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from .tuner import tune

        if args.workload == "synthetic":
            from .synthetic import SyntheticTrainable

            trainable = SyntheticTrainable(eval_every=args.eval_every, sleep=args.sleep)
            families = _unique("family", args.family or [("synthetic", {"lr": 1e-3})])
        else:
            from examples.nanogpt.variants import canonical_name

            from .zoo import ZooTrainable, zoo_reference_lrs

            trainable = ZooTrainable(eval_every_tokens=args.eval_every_tokens, profile=args.profile, data=args.data,
                                     val_tokens=args.val_tokens, device=args.device)
            from examples.nanogpt.train import load_fitting_data

            # fail fast, as examples.speedrun: a directory without shards or with a corrupt one, or token ids
            # beyond the profile's vocabulary, made every trial fail alone (status 0 and no choice)
            load_fitting_data(args.data, args.profile)
            # the registry's spelling ("unet" -> "U-Net"): the choices file is read by that name
            families = _unique("variant", [(v, zoo_reference_lrs(v)) for v in map(canonical_name, args.variants)])
        result = tune(trainable, families=families, tiers=args.tiers, reference_tier=args.reference_tier,
                      rungs=args.rungs, workdir=args.workdir, choices_path=args.choices, mode=args.mode,
                      storage=args.storage, study_name=args.study, n_workers=args.workers,
                      progress=False if args.quiet else True, min_resource=args.min_resource,
                      reduction_factor=2 if args.reduction_factor is None else args.reduction_factor,
                      heartbeat_interval=args.heartbeat,
                      grace_period=args.grace)
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143): one line, no traceback (the workers stop quietly)
        return stopped("python -m examples.tune", e, _RESUME)
    except (ValueError, KeyError, OSError, ImportError) as e:   # (with its notes: a pruner's names the trial)
        print(f"python -m examples.tune: error: {'; '.join([one_line(e), *getattr(e, '__notes__', ())])}",
              file=sys.stderr)
        return 2
    except Exception as e:  # a database gone away (it stops the call, as a full disk does): one line too
        if not _is_storage_error(e):
            raise
        print(f"python -m examples.tune: error: storage: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"choices written to {result.choices_path}")
    if result.missing:  # every candidate of a family/tier diverged: a script must notice (exit 1), even with --quiet
        if args.quiet:  # (otherwise the summary table above ends with these lines)
            from .progress import missing_lines

            for line in missing_lines(result):
                print(f"python -m examples.tune: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
