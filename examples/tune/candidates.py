"""Learning-rate candidates per family and batch tier (paper App. B.3; protocol.md section 8).

From the reference tier ``B0`` and the family's reference rate per optimizer group, tier ``B`` gets
two scaling centers, ``sqrt(B / B0)`` and ``B / B0``, each times the local multipliers
``{1/2, 1/sqrt(2), 1, sqrt(2), 2}``. Coincident factors (equal within ``rel_tol``, relative) are one
candidate that remembers every (center, multiplier) pair that produced it. One factor scales every
optimizer group together, so the relative rates between parameter classes are preserved.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from .trainable import Candidate

__all__ = ["PAPER_MULTIPLIERS", "candidate_set"]

PAPER_MULTIPLIERS: tuple[float, ...] = (0.5, 2 ** -0.5, 1.0, 2 ** 0.5, 2.0)
"""The paper's local multipliers around each scaling center."""


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"candidate_set: {name} must be a positive int, got {value!r}")
    return value


def candidate_set(family: str, tier: int, *, reference_tier: int, reference_lrs: Mapping[str, float],
                  multipliers: Sequence[float] = PAPER_MULTIPLIERS, rel_tol: float = 1e-9) -> list[Candidate]:
    """The de-duplicated learning-rate candidates of ``family`` at batch tier ``tier``, sorted by scale.

    Args:
        family: the family name (any non-empty string).
        tier: the batch tier ``B`` (positive int).
        reference_tier: the reference tier ``B0`` whose rates are ``reference_lrs``.
        reference_lrs: the family's rate per optimizer group at ``B0`` (finite, > 0).
        multipliers: local multipliers around each center (the paper's five by default).
        rel_tol: two factors within this relative tolerance (``math.isclose``) are one candidate;
            the kept factor is the one generated first (``sqrt`` center before ``linear``, multipliers
            in the given order).

    Returns:
        Candidates with ``scale = center * multiplier``, ``lrs = {group: reference_lr * scale}`` and
        every (center, multiplier) pair in ``origins``, in ascending ``scale``.

    Raises:
        ValueError: bad tier, reference tier, rates, multipliers or tolerance, or an empty set.
    """
    if not isinstance(family, str) or not family:
        raise ValueError(f"candidate_set: family must be a non-empty string, got {family!r}")
    _check_positive_int("tier", tier)
    _check_positive_int("reference_tier", reference_tier)
    if not isinstance(reference_lrs, Mapping) or not reference_lrs:
        raise ValueError(f"candidate_set: family {family!r} has no reference rates (reference_lrs={reference_lrs!r}); "
                         "expected a mapping optimizer group -> rate at the reference tier")
    for group, lr in reference_lrs.items():
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"candidate_set: family {family!r} group {group!r} has reference rate {lr!r}; "
                             "expected a finite rate > 0")
    multipliers = tuple(multipliers)
    if not multipliers:
        raise ValueError(f"candidate_set: empty candidate set for family {family!r} tier {tier}: no multipliers")
    for m in multipliers:
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m <= 0:
            raise ValueError(f"candidate_set: multiplier {m!r} must be a finite number > 0")
    if not (0.0 <= rel_tol < 1.0):
        raise ValueError(f"candidate_set: rel_tol must be in [0, 1), got {rel_tol!r}")

    ratio = tier / reference_tier
    generated = [(c * m, (name, float(m)))
                 for name, c in (("sqrt", math.sqrt(ratio)), ("linear", ratio))
                 for m in multipliers]
    # Cluster by value: walk in ascending order, join a factor to the cluster whose first member it is
    # close to. Each cluster keeps the factor generated first (stable index order).
    order = sorted(range(len(generated)), key=lambda i: (generated[i][0], i))
    clusters: list[list[int]] = []
    for i in order:
        if clusters and math.isclose(generated[i][0], generated[clusters[-1][0]][0], rel_tol=rel_tol):
            clusters[-1].append(i)
        else:
            clusters.append([i])
    out = []
    for members in clusters:
        members.sort()
        scale = generated[members[0]][0]
        out.append(Candidate(family=family, tier=tier, scale=scale,
                             lrs={g: float(lr) * scale for g, lr in reference_lrs.items()},
                             origins=tuple(generated[i][1] for i in members)))
    out.sort(key=lambda c: c.scale)
    return out
