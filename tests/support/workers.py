"""A synthetic trainable that keeps the first worker busy only until a second worker process has started.

Two-worker tests used ``SyntheticTrainable(sleep=...)``: a fixed sleep per validation point, long enough
on a slow machine for the spawned worker to start and claim trials, and paid in full on every machine
(~16 s and ~11 s). This one sleeps ``wait`` per point only while fewer than ``workers`` processes have
begun a trial under ``root``; after that it runs at full speed. It never sleeps more than the fixed
sleep it replaces, and it guarantees what the fixed sleep only made likely: the spawned worker trains.
It is importable by name (``support.workers``), so the spawned workers can unpickle it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from examples.tune.synthetic import SyntheticTrainable

__all__ = ["UntilWorkersStarted", "worker_pids"]


def worker_pids(root) -> set[int]:
    """The processes that began a trial under ``root`` (from the trainable's ``calls.jsonl`` logs)."""
    pids = set()
    for f in Path(root).rglob("calls.jsonl"):
        for line in f.read_text().splitlines():
            try:
                pids.add(json.loads(line)["pid"])
            except (ValueError, KeyError):  # a line being written by another process
                pass
    return pids


@dataclass(frozen=True)
class UntilWorkersStarted(SyntheticTrainable):
    """``SyntheticTrainable`` (same losses, checkpoints and call log) that sleeps ``wait`` seconds before
    each validation point until ``workers`` processes have begun a trial under ``root``."""

    resume_ignores: ClassVar[tuple[str, ...]] = ("sleep", "wait", "root", "workers")

    root: str = ""
    wait: float = 0.15
    workers: int = 2

    def __call__(self, candidate, budget, *, horizon, workdir, report):
        def waiting_report(resource, loss):
            if len(worker_pids(self.root)) < self.workers:
                time.sleep(self.wait)
            report(resource, loss)

        return super().__call__(candidate, budget, horizon=horizon, workdir=workdir, report=waiting_report)
