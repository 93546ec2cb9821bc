"""Per-tier learning-rate selection: the paper's synchronized successive halving (App. B.3), small.

This is the speedrun's own selection, used because the shared ASHA tuner (``examples.tune.tune``,
issue #7) was not on this branch when the speedrun was built; it talks to the zoo only through the
:class:`~examples.tune.trainable.Trainable` contract, so the tuner can replace it unchanged.

For one family and tier: candidates are the reference rates times ``center(B / B0) * multiplier``
(de-duplicated); every candidate trains to the first rung, the better half (at least one) continues
to the next rung, and so on; the chosen rate is the best validation loss at the last rung. Trial
results are saved (atomically) after every trial, so an interrupted selection resumes where it
stopped (each trial's checkpoint is in its own directory).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from examples.tune.trainable import Candidate, Trainable

__all__ = ["lr_candidates", "select_rate", "write_json_atomic"]

Progress = Callable[[int], None]


def lr_candidates(family: str, tier: int, reference_tier: int, reference_lrs: Mapping[str, float],
                  centers: Sequence[str], multipliers: Sequence[float]) -> list[Candidate]:
    """The de-duplicated LR candidates of ``family`` at ``tier`` (ascending factor).

    ``center``: ``"sqrt"`` -> ``sqrt(B/B0)``, ``"linear"`` -> ``B/B0``; factors equal to 6 significant
    digits are one candidate whose ``origins`` lists every (center, multiplier) that produced it.
    """
    if tier <= 0 or reference_tier <= 0:
        raise ValueError(f"tiers must be positive, got tier={tier}, reference_tier={reference_tier}")
    ratio = tier / reference_tier
    base = {"sqrt": math.sqrt(ratio), "linear": ratio}
    factors: dict[str, tuple[float, list[tuple[str, float]]]] = {}
    for c in centers:
        if c not in base:
            raise ValueError(f"unknown LR scaling center {c!r}; expected 'sqrt' or 'linear'")
        for m in multipliers:
            if not m > 0:
                raise ValueError(f"LR multipliers must be positive, got {m}")
            f = base[c] * m
            factors.setdefault(f"{f:.6g}", (f, []))[1].append((c, float(m)))
    return [Candidate(family, tier, f, {g: r * f for g, r in reference_lrs.items()}, tuple(o))
            for f, o in sorted(factors.values())]


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path``: temporary file in the same directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _trial_dir(workdir: Path, c: Candidate) -> Path:
    return workdir / c.key.replace("/", "_")


def select_rate(trainable: Trainable, candidates: Sequence[Candidate], rungs: Sequence[int], *, horizon: int,
                workdir: Path, progress: Progress | None = None) -> tuple[Candidate, dict]:
    """Run synchronized successive halving over ``candidates``; returns (chosen, trial table).

    The trial table maps each candidate key to ``{"scale", "origins", "losses": {rung budget: loss}}``
    and is kept in ``workdir/trials.json``. ``progress(tokens)`` is called with the tokens each
    trial segment trained. A trial that raises or reports a non-finite loss counts as infinitely
    bad; if every candidate fails, a ``RuntimeError`` names the family and tier.
    """
    if not candidates:
        raise ValueError("select_rate: no candidates")
    if list(rungs) != sorted(set(rungs)) or rungs[-1] > horizon or rungs[0] <= 0:
        raise ValueError(f"rungs must be ascending, distinct, positive and <= horizon {horizon}, got {list(rungs)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    table_path = workdir / "trials.json"
    table: dict = json.loads(table_path.read_text(encoding="utf-8")) if table_path.exists() else {}
    alive = list(candidates)
    prev = 0
    for k, budget in enumerate(rungs):
        for c in alive:
            entry = table.setdefault(c.key, dict(scale=c.scale, origins=[list(o) for o in c.origins], losses={}))
            if str(budget) in entry["losses"]:
                continue  # done before an interruption
            points: list[tuple[int, float]] = []
            try:
                trainable(c, budget, horizon=horizon, workdir=_trial_dir(workdir, c),
                          report=lambda tokens, loss: points.append((tokens, loss)))
                loss = points[-1][1] if points else float("nan")
            except (RuntimeError, FloatingPointError) as exc:  # a diverged trial, not a bug in the inputs
                loss, entry["error"] = float("nan"), f"{type(exc).__name__}: {exc}"
            entry["losses"][str(budget)] = loss if math.isfinite(loss) else None
            write_json_atomic(table_path, table)
            if progress is not None:
                progress(budget - prev)
        ranked = sorted(alive, key=lambda c: _loss(table, c, budget))
        if k + 1 < len(rungs):
            alive = ranked[: max(1, math.ceil(len(ranked) / 2))]
        prev = budget
    best = ranked[0]
    if not math.isfinite(_loss(table, best, rungs[-1])):
        c0 = candidates[0]
        raise RuntimeError(f"LR selection for {c0.family} at tier {c0.tier}: every candidate diverged "
                           f"(see {table_path})")
    return best, table


def _loss(table: dict, c: Candidate, budget: int) -> float:
    v = table[c.key]["losses"].get(str(budget))
    return float("inf") if v is None else float(v)
