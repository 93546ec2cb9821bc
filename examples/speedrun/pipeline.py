"""The speedrun pipeline: tune -> train every tier of every family -> predict -> report.

Output directory layout (``OUT``)::

    OUT/preset.json            the preset and workload settings (written before any run)
    OUT/_tune/choices.json     the chosen rate per family and tier; _tune/<family>-b<tier>/ trials
    OUT/<family>-b<tier>/      one finished run record per family and tier (spectral-lens CLI input)
    OUT/report/                report.md + figures + summary.json

``spectral-lens predict OUT`` / ``spectral-lens report OUT`` read the run records directly (the
other folders hold no ``run.json``). Interrupting and rerunning the same command resumes: finished
runs and finished tuning trials are kept, an unfinished run is trained again.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from examples.nanogpt.data import load_data

from .halving import lr_candidates, select_rate, write_json_atomic
from .summary import write_summary
from .workload import ZooWorkload, is_complete, run_id

__all__ = ["run_pipeline", "PipelineResult"]


@dataclass
class PipelineResult:
    """What a pipeline call produced: the output directory, the run directories, the report, the summary."""

    out: Path
    run_dirs: list[Path]
    report: Path
    summary: dict
    wall_s: float


def _settings(workload: ZooWorkload) -> dict:
    return dict(preset=dataclasses.asdict(workload.preset), families=list(workload.families))


def _check_settings(out: Path, workload: ZooWorkload) -> None:
    """Write ``preset.json``, or refuse to resume an output directory made with other settings."""
    path = out / "preset.json"
    want = json.loads(json.dumps(_settings(workload)))
    if path.exists():
        have = json.loads(path.read_text(encoding="utf-8"))
        if have != want:
            diff = sorted(k for k in set(have.get("preset", {})) | set(want["preset"])
                          if have.get("preset", {}).get(k) != want["preset"].get(k))
            raise ValueError(f"{out} holds a speedrun made with other settings (differs in: "
                             f"{', '.join(diff) or 'families'}); use a new --out or the same preset")
    else:
        write_json_atomic(path, want)


def run_pipeline(workload: ZooWorkload, out: str | Path, *, progress: bool = True) -> PipelineResult:
    """Run (or resume) the whole speedrun of ``workload`` into ``out``; returns a :class:`PipelineResult`."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, workload)
    p = workload.preset
    load_data(p.data)  # fail fast on missing shards, before any training
    tune_dir = out / "_tune"
    choices_path = tune_dir / "choices.json"
    choices: dict = json.loads(choices_path.read_text(encoding="utf-8")) if choices_path.exists() else {}

    pairs = [(f, t) for f in workload.families for t in workload.tiers]
    cands = {(f, t): lr_candidates(f, t, workload.reference_tier, workload.reference_lrs(f), p.centers, p.multipliers)
             for f, t in pairs}
    # total work in tokens (for the ETA): every rung of a full halving, then every measured run
    total = 0
    for f, t in pairs:
        n, prev = len(cands[f, t]), 0
        for budget in p.rungs:
            total += n * (budget - prev)
            n, prev = max(1, -(-n // 2)), budget
        total += p.budget
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=workload.name, disable=not progress, smoothing=0.1)

    trainable = workload.trainable()
    for f, t in pairs:
        key = f"{f}/b{t}"
        if key in choices:
            _skip_tuning(bar, len(cands[f, t]), p.rungs)
            continue
        bar.set_postfix_str(f"tune {key}")
        best, table = select_rate(trainable, cands[f, t], p.rungs, horizon=p.budget,
                                  workdir=tune_dir / run_id(f, t), progress=bar.update)
        choices[key] = dict(family=f, tier=t, scale=best.scale, lrs=dict(best.lrs),
                            origins=[list(o) for o in best.origins], trials=table)
        write_json_atomic(choices_path, choices)

    run_dirs = []
    for f, t in pairs:
        rd = out / run_id(f, t)
        bar.set_postfix_str(f"run {run_id(f, t)}")
        if not is_complete(rd):
            workload.run(f, t, choices[f"{f}/b{t}"]["lrs"], rd)
        bar.update(p.budget)
        run_dirs.append(rd)
    bar.close()

    summary = write_summary(workload, run_dirs, out / "report", choices=choices)
    return PipelineResult(out, run_dirs, out / "report" / "report.md", summary, time.perf_counter() - t0)


def _skip_tuning(bar, n: int, rungs) -> None:
    prev = 0
    for budget in rungs:
        bar.update(n * (budget - prev))
        n, prev = max(1, -(-n // 2)), budget
