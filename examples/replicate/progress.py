"""Progress lines with an ETA for the replication pipeline (plain prints; no terminal tricks)."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts finished units of work (runs, examples) and prints one line per event with an ETA.

    Args:
        total: the amount of work of the stage (e.g. examples over all runs still to train).
        stage: a short name printed in front of every line.
        stream: where lines go: ``None`` (default) = the current ``sys.stdout``; ``False`` silences it.

    The ETA extrapolates the rate of the work done in this process (resumed work is not counted).
    """

    def __init__(self, total: float, stage: str, stream=None):
        if total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        self.total, self.stage, self.stream = float(total), stage, stream
        self.done = 0.0
        self.start = time.monotonic()

    def eta(self) -> float | None:
        """Seconds left at the rate so far, or ``None`` before any work is done."""
        elapsed = time.monotonic() - self.start
        if self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def advance(self, amount: float, message: str = "") -> None:
        """Add ``amount`` finished work and print ``[stage] done/total (pct) elapsed, ETA: message``."""
        self.done += amount
        if self.stream is False:
            return
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta()
        eta_txt = f", ETA {_fmt(eta)}" if eta is not None and self.done < self.total else ""
        print(f"[{self.stage}] {pct:5.1f}% after {_fmt(elapsed)}{eta_txt}: {message}", file=self._out(), flush=True)

    def drop(self, amount: float) -> None:
        """Remove ``amount`` from the stage's work without doing it (a run that diverged part way: the rest of its
        budget is never trained, and counting it as done would make the ETA extrapolate work that took no time)."""
        if not 0 <= amount <= self.total - self.done:
            raise ValueError(f"Progress.drop: amount must be in [0, {self.total - self.done:g}] (the work left), got {amount}")
        self.total -= amount

    def note(self, message: str) -> None:
        """Print one line of the stage without advancing."""
        if self.stream is not False:
            print(f"[{self.stage}] {message}", file=self._out(), flush=True)

    def _out(self):
        return sys.stdout if self.stream is None else self.stream
