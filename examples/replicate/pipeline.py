"""The shared replication pipeline: tune -> train every tier -> predict -> report -> verdict.

    verdict = replicate(workload, Path("runs/toy"), TunerSettings(rungs=(2_048, 6_144)))

Each stage leaves its result on disk and is skipped when that result is already there, so an
interrupted pipeline is resumed by running the same command again:

* ``tune/choices.json``: the tuner's learning rate per family and tier (:mod:`.tuning`);
* ``runs/<family>-b<tier>/``: one complete run record per measured run (:mod:`.runs`; a run is
  trained into a temporary directory and renamed into place when complete);
* ``report/``: ``report.md`` (``spectral_lens.report.build_report`` plus the workload's own sections
  and figures) and ``verdict.json`` / ``verdict.txt`` (:mod:`.verdict`), rebuilt on every call (the
  temporary files of a call killed mid-write are removed first).

A running pipeline holds an exclusive lock on ``OUT/.replicate.lock`` (released by the kernel if it
is killed): a second job started into the same directory meanwhile is refused with a ``ValueError``
instead of training the same runs and removing the other's ``.partial`` run. A CLI that checks or writes
``OUT/preset.json`` takes the lock first (:func:`job_lock`) and passes it on (``replicate(..., lock=...)``).

Workloads may define, besides the :class:`~examples.replicate.workload.Workload` contract:
``fraction`` (the early progress fraction, default 0.2), ``window`` (the tail rank window; default
the records' scale rule) and ``report_sections(runs, out_dir) -> list[str]`` (Markdown sections,
with any figures written into ``out_dir``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from spectral_lens.analysis import divergence, tokens_to_target
from spectral_lens import _locks as locks
from spectral_lens.atomic import write_text_atomic
from spectral_lens.records import RunRecord, open_runs
from spectral_lens.report import build_report

from .runs import train_runs
from .settings import LOCK_FILE, refuse_torchrun  # LOCK_FILE: held by a running job (job_lock)
from .tuning import TunerSettings, choose_rates
from .verdict import ALPHA, REPRODUCED_RHO, Verdict, verdict
from .workload import Workload

__all__ = ["JobLock", "chain_transitions", "job_lock", "replicate"]


#: The temporary files of ``spectral_lens.atomic.write_atomic`` (``.<name>.<uuid hex>.tmp``).
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files an earlier call killed mid-write left in ``directory`` (the report's
    files are rebuilt on every call, so one left there would stay for good)."""
    if directory.is_dir():
        for p in directory.iterdir():
            if _TEMPORARY.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def chain_transitions(runs: Sequence[RunRecord], families: Sequence[str], target: float) -> list[tuple[str, str]]:
    """Consecutive steps of the family chain, each family represented by its most token-efficient run
    among those that did not diverge (as the toy report's best run; the library ranks no diverged run).

    A family none of whose runs reached ``target`` (without diverging) breaks the chain there (its steps are left out).
    """
    best = {}
    for family in families:
        members = [(tokens_to_target(r, target), r.info.batch_tier, r.run_id) for r in runs
                   if r.info.family == family and divergence(r) is None]
        members = [m for m in members if math.isfinite(m[0])]
        if members:
            best[family] = min(members)[2]
    return [(best[a], best[b]) for a, b in zip(families, families[1:]) if a in best and b in best]


def _lr_table(workload: Workload, lrs) -> str:
    groups = sorted({g for v in lrs.values() for g in v})
    rows = ["| family | tier | " + " | ".join(groups) + " |", "|" + "---|" * (2 + len(groups))]
    for family in workload.families:
        for tier in workload.tiers:
            v = lrs[(family, tier)]
            rows.append(f"| {family} | {tier} | " + " | ".join(f"{v[g]:.4g}" if g in v else "–" for g in groups) + " |")
    return "\n".join(rows)


def replicate(workload: Workload, out: Path, tuner: TunerSettings, *, stream=None, lock: JobLock | None = None
              ) -> Verdict:
    """Run the whole pipeline for ``workload`` into ``out``; returns the :class:`Verdict` (also printed).

    ``stream``: where progress and the verdict are printed (``None``: standard output; ``False``: nowhere).
    ``lock``: the caller's held :func:`job_lock` of ``out`` (taken before it checked ``OUT/preset.json``);
    ``None``: the pipeline takes it.
    """
    refuse_torchrun(getattr(workload, "name", "replicate"))
    if lock is None:
        with job_lock(out):
            return _replicate(workload, Path(out), tuner, stream)
    if not lock.held or lock.directory != Path(out).resolve():
        raise ValueError(f"replicate: the lock passed is {'not held' if not lock.held else 'for ' + str(lock.directory)}, "
                         f"expected the held lock of {Path(out).resolve()} (job_lock(out))")
    return _replicate(workload, Path(out), tuner, stream)


class JobLock:
    """The held lock of the job writing into ``directory`` (yielded by :func:`job_lock`; ``held`` until it exits)."""

    def __init__(self, directory: Path):
        self.directory, self.held = directory, True


@contextlib.contextmanager
def job_lock(out: Path):
    """Hold the exclusive lock of the job writing into ``out`` (``OUT/.replicate.lock``; ``out`` is created) and
    yield a :class:`JobLock` for :func:`replicate`'s ``lock``.

    Raises ``ValueError`` (one line) when another job holds it (another process, or another ``job_lock`` in this
    one). A CLI takes it before it checks or writes ``OUT/preset.json`` and passes it to :func:`replicate`: two
    jobs started at once with different presets both found no ``preset.json`` and wrote theirs, and one then ran
    under the other's settings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    try:
        fd = locks.acquire(lock)
    except BlockingIOError:
        raise ValueError(f"{out}: another replication is running into this directory (it holds {lock}); wait for "
                         "it, or stop it and rerun to resume") from None
    held = JobLock(out.resolve())
    try:
        yield held
    finally:
        held.held = False
        if fd is not None:
            locks.release(fd, os.getpid())


def _replicate(workload: Workload, out: Path, tuner: TunerSettings, stream) -> Verdict:
    fraction = float(getattr(workload, "fraction", 0.2))
    window = getattr(workload, "window", None)

    def say(msg: str) -> None:
        if stream is not False:
            print(msg, file=sys.stdout if stream is None else stream, flush=True)

    say(f"{workload.name}: families {' -> '.join(workload.families)}; tiers {list(workload.tiers)}; "
        f"{workload.budget:,} {workload.unit} per run; pre-registered target validation loss {workload.target_loss:g}")
    say(f"[tune] rungs {list(tuner.rungs)} ({workload.unit}), reference tier {workload.reference_tier}")
    lrs = choose_rates(workload, out / "tune", tuner, stream=stream)
    dirs = train_runs(workload, lrs, out / "runs", stream=stream)
    runs = open_runs(dirs)
    say("[predict] scoring the early tail and the noise-scale baseline")
    v = verdict(runs, target=workload.target_loss, families=workload.families, unit=workload.unit,
                fraction=fraction, window=window)
    report_dir = out / "report"
    _remove_stale_temporaries(report_dir)
    transitions = chain_transitions(runs, workload.families, workload.target_loss)
    rep = build_report(runs, report_dir, target_loss=workload.target_loss, fraction=fraction, window=window,
                       transitions=transitions, title=f"{workload.name}: tuned batch sweep")
    sections = [
        "## Verdict\n\n" + "\n".join(f"- {line.strip()}" for line in v.lines),
        f"## Learning rates chosen by the tuner\n\n{_lr_table(workload, lrs)}",
    ]
    hook = getattr(workload, "report_sections", None)
    if hook is not None:
        sections.extend(hook(runs, report_dir))
    text = rep.path.read_text(encoding="utf-8")
    write_text_atomic(rep.path, text.rstrip() + "\n\n" + "\n\n".join(sections) + "\n")
    write_text_atomic(report_dir / "verdict.txt", "\n".join(v.lines) + "\n")
    write_text_atomic(report_dir / "verdict.json", json.dumps(_strict(_jsonable(v)), indent=2, allow_nan=False) + "\n")
    say(f"[report] {rep.path}")
    say("\nVerdict:")
    for line in v.lines:
        say("  " + line)
    return v


def _strict(x):
    """``x`` with every NaN or infinite float replaced by ``None`` (JSON ``null``): ``verdict.json`` is strict JSON
    (bare ``NaN``, as ``json.dumps`` writes by default, is refused by strict parsers and other languages)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(y) for k, y in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(y) for y in x]
    return x


def _jsonable(v: Verdict) -> dict:
    fams = {}
    for name, f in v.families.items():
        fams[name] = {**f.__dict__, "reached": {str(k): x for k, x in f.reached.items()},
                      "rho_by_fraction": {str(k): x for k, x in f.rho_by_fraction.items()},
                      "n_by_fraction": {str(k): x for k, x in f.n_by_fraction.items()},
                      "missed": list(f.missed), "diverged": list(f.diverged), "flags": list(f.flags)}
    return {**v.__dict__, "window": list(v.window) if v.window else None, "families": fams, "lines": list(v.lines),
            "reproduced_rho": REPRODUCED_RHO, "alpha": ALPHA}  # the rule it was judged by, with its numbers
