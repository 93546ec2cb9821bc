"""A cheap synthetic trainable: a closed-form loss curve per candidate, with checkpoints and a call log.

``loss(b, s) = floor + k * (b / unit) ** -c * (1 + width * log2(s / s_opt) ** 2)`` where the best
scale grows with the tier, ``s_opt = (tier / 8) ** exponent`` (between the square-root and the linear
rule). It writes its progress to ``workdir/state.json`` (atomically) and appends one line per call to
``workdir/calls.jsonl`` so tests can check that no finished rung is trained twice. It serves the
tests and ``python -m examples.tune synthetic``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from spectral_lens.atomic import write_text_atomic
from .trainable import Candidate, Report

__all__ = ["SyntheticTrainable"]


@dataclass(frozen=True)
class SyntheticTrainable:
    """Closed-form loss curves (see the module docstring); picklable, so worker processes can use it.

    Attributes:
        eval_every: resource units between validation reports.
        floor, k, c, unit, width, exponent, reference_tier: the loss model.
        sleep: seconds to sleep per validation point (to make runs slow enough to interrupt).
        nan_above: candidates with a larger scale diverge (report NaN at their first validation).
        raise_keys: candidate keys whose call raises ``RuntimeError``.
    """

    resume_ignores: ClassVar[tuple[str, ...]] = ("sleep",)  # not compared when a study resumes (no effect on losses)

    eval_every: int = 10
    floor: float = 2.0
    k: float = 3.0
    c: float = 0.5
    unit: float = 10.0
    width: float = 0.25
    exponent: float = 0.75
    reference_tier: int = 8
    sleep: float = 0.0
    nan_above: float = math.inf
    raise_keys: frozenset = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # a setting no trial can run with is refused here, not by every trial failing alone
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"SyntheticTrainable: eval_every={self.eval_every!r}, expected a positive int")
        if not (isinstance(self.sleep, (int, float)) and math.isfinite(self.sleep) and self.sleep >= 0):
            raise ValueError(f"SyntheticTrainable: sleep={self.sleep!r}, expected a finite number of seconds >= 0")

    def loss(self, candidate: Candidate, resource: int) -> float:
        """The validation loss of ``candidate`` after ``resource`` units."""
        s_opt = (candidate.tier / self.reference_tier) ** self.exponent
        shape = 1.0 + self.width * math.log2(candidate.scale / s_opt) ** 2
        return self.floor + self.k * (max(resource, 1) / self.unit) ** -self.c * shape

    def __call__(self, candidate: Candidate, budget: int, *, horizon: int, workdir: Path, report: Report) -> None:
        """Continue from ``workdir/state.json`` to ``budget``, reporting every ``eval_every`` units."""
        workdir = Path(workdir)
        state_file = workdir / "state.json"
        start = json.loads(state_file.read_text())["resource"] if state_file.exists() else 0
        log = {"key": candidate.key, "start": start, "budget": budget, "horizon": horizon, "pid": os.getpid()}
        with open(workdir / "calls.jsonl", "a") as f:
            f.write(json.dumps(dict(log, event="begin")) + "\n")
        if candidate.key in self.raise_keys:
            raise RuntimeError(f"synthetic failure of {candidate.key}")
        points = [r for r in range(start + self.eval_every, budget + 1, self.eval_every)]
        if not points or points[-1] != budget:
            points.append(budget)
        if start == 0:
            points.insert(0, 0)
        for r in points:
            if self.sleep:
                time.sleep(self.sleep)
            report(r, float("nan") if candidate.scale > self.nan_above else self.loss(candidate, r))
        write_text_atomic(state_file, json.dumps({"resource": budget}))
        with open(workdir / "calls.jsonl", "a") as f:
            f.write(json.dumps(dict(log, event="end")) + "\n")
