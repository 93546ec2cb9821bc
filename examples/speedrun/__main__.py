"""``python -m examples.speedrun --preset cpu --out runs/speedrun-cpu``: the speedrun replication.

The shared replication pipeline (``examples.replicate``) configured with the zoo workload and a
preset: tunes a learning rate per family and batch tier (``examples.tune``), trains every tier of
every family with spectral measurements on a fixed held-out pool (``OUT/runs/``), then predicts and
reports (``OUT/report/report.md``). Rerunning the same command resumes an interrupted run. Errors
print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from examples.cli import OneLineParser, directory, one_line, run_stoppable

from .presets import PRESETS, Preset, get_preset

__all__ = ["main", "build_parser", "check_settings", "check_data", "recorded_data"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for the docs and tests)."""
    ap = OneLineParser(prog="python -m examples.speedrun", description="The speedrun replication: tune a rate per tier, train every tier with spectral "
                                 "measurements, predict the token-efficient tier, report.")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS), help="what to run (see docs/replication-speedrun.md)")
    ap.add_argument("--out", type=directory, help="output directory (default runs/speedrun-<preset>); rerun to resume")
    ap.add_argument("--data", help="override the preset's data: 'pydoc', 'stdlib' or a directory of .bin shards "
                                   "(paper-d12 needs the FineWeb shards here)")
    ap.add_argument("--device", help="override the preset's device (cpu, cuda)")
    ap.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's; 1 is faster on a busy machine)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines")
    return ap


@dataclasses.dataclass(frozen=True)
class _Recorded(Preset):
    """What ``preset.json`` holds: the preset and the :attr:`~examples.nanogpt.data.TokenData.fingerprint` of its
    data (a fact of the shards, not a setting: kept out of :class:`Preset`)."""

    data_fingerprint: str | None = None


def _recorded_fingerprint(out: Path):
    """``OUT/preset.json``'s ``data_fingerprint``; ``_MISSING`` where there is none (no file, written before review
    26, or unreadable: :func:`check_settings` says what is wrong)."""
    try:
        have = json.loads((Path(out) / "preset.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError):
        return _MISSING
    return have.get("data_fingerprint", _MISSING) if isinstance(have, dict) else _MISSING


_MISSING = object()


def check_settings(out: Path, preset: Preset, fingerprint: str | None = None) -> None:
    """Write ``out/preset.json`` (with the data's ``fingerprint``), or refuse (``ValueError``) an output directory made
    with other settings. A recorded data fingerprint is not compared here (:func:`check_data` does, once the data is
    read).

    The check shared with ``examples.toy``: :func:`examples.replicate.settings.check_settings`.
    """
    from examples.replicate.settings import check_settings as check

    recorded = _recorded_fingerprint(out)
    if recorded is not _MISSING:
        preset = _Recorded(**dataclasses.asdict(preset), data_fingerprint=recorded)
    elif fingerprint is not None and not _holds_preset(out):  # a new output directory
        preset = _Recorded(**dataclasses.asdict(preset), data_fingerprint=fingerprint)
    check(out, preset, "speedrun")


def _streams(fingerprint: str) -> dict[str, str]:
    """A :attr:`~examples.nanogpt.data.TokenData.fingerprint` by stream: ``{"train": "1 shards, ...", "val": ...}``."""
    from examples.nanogpt.data import fingerprint_version

    body = fingerprint.split(" ", 1)[-1] if fingerprint_version(fingerprint) > 1 else fingerprint
    return dict(part.split(" ", 1) for part in body.split("; ") if " " in part)


def check_data(out: Path, data) -> None:
    """Refuse (``ValueError``, one line) a rerun whose data (``data``: the
    :class:`~examples.nanogpt.data.TokenData`) is not what ``OUT/preset.json`` recorded: shards changed in place
    would mix runs trained on the old tokens (kept) with runs trained on the new ones; the bundled corpus (``pydoc``,
    ``stdlib``) changes with the Python version instead, and its refusal says so. A ``preset.json`` written
    before review 26 records no fingerprint: the data its runs saw cannot be checked, so it is accepted and the
    fingerprint recorded now (atomically; a symlinked ``preset.json`` is written through, the link kept), so that
    later changes are refused. Call after :func:`check_settings`."""
    from examples.nanogpt.data import FINGERPRINT_VERSION, fingerprint_version
    from spectral_lens.atomic import write_text_atomic

    path = Path(out) / "preset.json"
    recorded = _recorded_fingerprint(out)
    if recorded is _MISSING:
        have = json.loads(path.read_text(encoding="utf-8"))
        write_text_atomic(path, json.dumps({**have, "data_fingerprint": data.fingerprint}, indent=1) + "\n")
        return
    if not isinstance(recorded, str):
        raise ValueError(f"{path} records data_fingerprint {recorded!r}, expected a string; use a new --out")
    version = fingerprint_version(recorded)
    if version > FINGERPRINT_VERSION:  # not "the data changed"
        raise ValueError(f"{path}: the data fingerprint is version {version}, written by a newer speedrun (this one "
                         f"knows versions 1 to {FINGERPRINT_VERSION}), so the data cannot be checked; rerun with that "
                         "version or use a new --out")
    now = data.fingerprint_as(version)
    if now == recorded:
        return
    have, want = _streams(recorded), _streams(now)
    changed = [k for k in ("train", "val") if have.get(k) != want.get(k)] or ["train", "val"]
    shown = "; ".join(f"{k} shards: recorded {have.get(k)}, now {want.get(k)}" for k in changed)
    if data.name.startswith("builtin:"):  # nothing to restore: the corpus is this Python's text (see _BUNDLED)
        fix = _BUNDLED.format(name=data.name)
        trained = _trained_with(out)
        if trained is not None:  # a kept run says which Python: name it (the refusal said only "that Python")
            fix = fix.replace("rerun with the Python that started it",
                              f"rerun with Python {trained[0]} (as {trained[1]} records)")
    else:
        fix = "restore the data or use a new --out"
    raise ValueError(f"{out} holds a speedrun trained on other data: the {' and '.join(changed)} data of "
                     f"{data.name} changed since {path} recorded it ({shown}); {fix} "
                     "(kept runs would be mixed with runs trained on the changed tokens)")


#: How :func:`check_data` words a refusal of the bundled corpus (``--data pydoc|stdlib``): it is built from the running
#: Python's own pydoc topics and stdlib docstrings, so it changes with the Python version (or an update of its
#: standard library), not by anyone editing it; the recorded fingerprint does not say which Python made the run.
_BUNDLED = ("the bundled corpus {name} is this Python's own pydoc/stdlib text, which changes with the Python version "
            "or an update of its standard library (preset.json does not record which Python made the run): rerun "
            "with the Python that started it, or use a new --out")


def _trained_with(out: Path) -> tuple[str, Path] | None:
    """The Python version a kept run of ``out`` was trained with (``OUT/runs/*/run.json`` ``extras.machine.python``,
    :func:`examples.replicate.machine.machine_info`) and that file; ``None`` where no run records one."""
    for path in sorted(Path(out).glob("runs/*/run.json")):
        try:
            version = json.loads(path.read_text(encoding="utf-8"))["extras"]["machine"]["python"]
        except (OSError, UnicodeError, ValueError, KeyError, TypeError):
            continue
        if isinstance(version, str) and version:
            return version, path
    return None


def recorded_data(out: Path, data: str) -> str:
    """``data`` as ``OUT/preset.json`` records it: a shard directory resolved (``--data shards``, ``./shards``, the
    absolute path and a symlink to it are one setting), or, where ``preset.json`` already names the same directory
    in another spelling (written as typed before review 26), that spelling, so the rerun resumes instead of being
    refused as other settings. The bundled corpus names and a path that is no directory are left as they are."""
    if data in ("pydoc", "stdlib") or not Path(data).is_dir():
        return data
    resolved = str(Path(data).resolve())
    try:
        have = json.loads((Path(out) / "preset.json").read_text(encoding="utf-8")).get("data")
    except (OSError, UnicodeError, ValueError, AttributeError):  # none yet, or check_settings says what is wrong
        return resolved
    if isinstance(have, str) and have not in ("pydoc", "stdlib") and Path(have).is_dir() \
            and str(Path(have).resolve()) == resolved:
        return have
    return resolved


def _holds_preset(out: Path) -> bool:
    """Whether ``out`` holds a ``preset.json`` (a dangling symlink too: :func:`check_settings` says what is wrong)."""
    return (out / "preset.json").exists() or (out / "preset.json").is_symlink()


def _check_fresh(out: Path) -> None:
    """Refuse an ``out`` that is not empty and holds no speedrun (no ``preset.json``)."""
    from examples.replicate.settings import holds_other_files

    if not _holds_preset(out) and holds_other_files(out):
        raise ValueError(f"{out} is not empty and holds no speedrun: choose another --out")


_RESUME = "rerun the same command to resume (finished runs are kept)"


def _or_na(x: float, fmt: str) -> str:
    """``x`` formatted, or ``n/a`` where it is NaN (no pooled rho: too few ranked tiers), as the verdict says it."""
    return format(x, fmt) if math.isfinite(x) else "n/a"


def main(argv: list[str] | None = None) -> int:
    """Run the speedrun; returns the exit status (Ctrl-C 130 and SIGTERM 143, one line: the tuner's trials are
    released and a rerun resumes, see :mod:`examples.cli`)."""
    return run_stoppable("python -m examples.speedrun", _RESUME, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        from examples.nanogpt.train import load_fitting_data
        from examples.replicate import replicate

        from .summary import PAPER
        from .workload import ZooWorkload

        from examples.replicate.settings import refuse_torchrun

        refuse_torchrun("examples.speedrun")
        preset = get_preset(args.preset)
        if args.threads is not None:
            import torch

            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        changes = {k: v for k, v in dict(data=args.data, device=args.device).items() if v is not None}
        if changes:
            preset = preset.replace(**changes)
        if preset.device is not None:  # checked before anything is written (else every tuner trial fails on it)
            import torch

            try:
                device = torch.device(preset.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device {preset.device!r} is not a torch device "
                                 f"({str(e).splitlines()[0][:80]}); use cpu or cuda") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"preset {preset.name!r} needs a CUDA GPU and none is visible "
                                   "(pass --device cpu to try it on the CPU)")
            if device.type != "cuda" and preset.attn_impl == "flex":
                # FlexAttention's backward is CUDA-only: elsewhere every trial would fail; the dense form of
                # the same window mask trains (recorded in preset.json)
                preset = preset.replace(attn_impl="dense")
        out = Path(args.out or f"runs/speedrun-{preset.name}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is not a directory; use a new --out")
        data, td = preset.data, None
        if not _holds_preset(out):  # a new run: refused before the lock (a refused directory gets no lock file)
            _check_fresh(out)
            # fail fast on missing shards or token ids beyond the profile's vocabulary (with --data SHARDS on a
            # byte-level preset every tuner trial failed, and the error blamed tune/choices.json), before any
            # training and before anything is written
            td = load_fitting_data(data, preset.profile)
        from examples.replicate.pipeline import job_lock

        with job_lock(out) as lock:
            # the job's lock before preset.json is read or written (as examples.toy): two jobs started at once
            # into a new --out with different presets both found no preset.json, both wrote theirs, and one
            # ran under the other's settings
            preset = preset.replace(data=recorded_data(out, data))
            workload = ZooWorkload(preset, verbose=not args.no_progress)  # its line per run is progress too
            resumed = _holds_preset(out)
            if resumed:  # other settings are refused before the data is read (parsing --data stdlib takes seconds)
                check_settings(out, preset)
            if td is None:
                td = load_fitting_data(preset.data, preset.profile)
            if resumed:  # shards changed in place since preset.json recorded them are refused
                check_data(out, td)
            else:
                _check_fresh(out)  # as examples.toy: never write a speedrun into another run's directory
                check_settings(out, preset, td.fingerprint)  # writes preset.json
            v = replicate(workload, out, preset.tuner, stream=False if args.no_progress else None, lock=lock)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError, ImportError) as exc:
        print(f"python -m examples.speedrun: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"\ndone in {time.strftime('%H:%M:%S', time.gmtime(time.perf_counter() - t0))}: report "
          f"{out / 'report' / 'report.md'}; pooled rho {_or_na(v.pooled_rho, '.3f')} (p = {_or_na(v.pooled_pvalue, '.3g')}), paper "
          f"{PAPER['pooled_rho']}; run records in {out / 'runs'} (python -m spectral_lens.cli predict {out / 'runs'}/*)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
