"""The paper's promotion rule at one rung of one family/tier (App. B.3), as pure functions.

At a rung every candidate still in the race has a validation loss (the last report at or before the
rung budget) or has failed. Candidates are ranked by loss, ascending; a failed candidate or a NaN loss
ranks last; ties go to the smaller learning-rate scale, then to the key. The top half survives,
``max(1, n // 2)`` of the ``n`` candidates that entered the rung (at least one survivor), and only
candidates with a finite loss can survive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Entry", "rank", "survivors", "n_keep"]


@dataclass(frozen=True)
class Entry:
    """One candidate at one rung: its ``key``, learning-rate ``scale`` and rung ``loss``.

    ``loss`` is ``None`` or NaN for a failed candidate.
    """

    key: str
    scale: float
    loss: float | None


def _finite(loss: float | None) -> bool:
    return loss is not None and math.isfinite(loss)


def rank(entries: Sequence[Entry]) -> list[Entry]:
    """Entries best first: finite losses ascending, then failed/NaN; ties by smaller scale, then key."""
    return sorted(entries, key=lambda e: (0, e.loss, e.scale, e.key) if _finite(e.loss)
                  else (1, 0.0, e.scale, e.key))


def n_keep(n: int) -> int:
    """How many of ``n`` entrants are promoted: the top half, at least one."""
    if n <= 0:
        raise ValueError(f"n_keep: a rung needs at least one entrant, got n={n}")
    return max(1, n // 2)


def survivors(entries: Sequence[Entry]) -> list[Entry]:
    """The promoted entries, best first: the first ``n_keep(len(entries))`` of :func:`rank` with a finite loss."""
    if not entries:
        raise ValueError("survivors: empty rung (no candidate entered it)")
    return [e for e in rank(entries)[: n_keep(len(entries))] if _finite(e.loss)]
