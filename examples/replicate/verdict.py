"""The pipeline's plain-words verdict: does the early activation tail rank the tiers, as pre-registered?

Pre-registered (before any run, the same for every workload): the tail statistic is read at the
workload's early fraction (paper: 20%); a family *reproduces* the paper's claim when its Spearman rho
between early ``alpha_tail`` and realized ``eps_tok`` is at least :data:`REPRODUCED_RHO`; it is
*underpowered* when fewer than three of its tiers reach the target (a run that diverged after reaching
it not counted: it is left out of rho), else *not significant* when the
exact p-value exceeds :data:`ALPHA`; a negative rho is flagged as the opposite of the claim. When the
tail statistic cannot be scored at all (e.g. the rank window exceeds the spectrum), the flag says why.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from spectral_lens.analysis import NoiseScalePredictor, TailPredictor, divergence, tokens_to_target, token_inefficiency
from spectral_lens.analysis.efficiency import LABEL_GRID, percent as _percent
from spectral_lens.analysis.predictor import FractionNotReachedError
from spectral_lens.records import RunRecord

__all__ = ["ALPHA", "LABEL_GRID", "REPRODUCED_RHO", "FamilyVerdict", "Verdict", "percent", "unmeasured",
           "unmeasured_note", "verdict"]

REPRODUCED_RHO = 0.8
"""Within-family Spearman rho at or above which a family counts as reproducing the claim."""
ALPHA = 0.05
"""Significance level of the (exact, two-sided) Spearman test."""


@dataclass(frozen=True)
class FamilyVerdict:
    """One family's outcome.

    Attributes:
        family: the family.
        rho, pvalue, n: Spearman rho (early alpha_tail vs eps_tok) at the pre-registered fraction, and
            the number of runs it was computed on (a run left out of the ranking, or whose eps_tok is
            unknown because it was cut short before the target, is not counted; 0 when not scored).
        baseline_rho, baseline_pvalue: the same for the noise-scale baseline (NaN if not measured).
        reached: tiers whose run reached the target loss, with their examples/tokens to target.
        missed: tiers that never reached it (they rank last in eps_tok; a run cut short before it has
            an unknown eps_tok instead, and a diverged run is left out: neither is in ``n``).
        rho_by_fraction: the tail statistic's rho at each scanned progress fraction.
        n_by_fraction: the number of runs each of those rhos was computed on (runs without a statistic
            at a fraction are left out of its rho, so n can differ between fractions).
        diverged: the tiers whose run diverged (``spectral_lens.analysis.divergence``), in ``missed``
            (the verdict says why they never reached the target) or in ``reached`` (it reached the target,
            then diverged: its examples-to-target stand). The library's predictors leave every diverged
            run out of the ranking (its early statistic too), so none of them is in ``n``: the verdict says so.
        flags: ``"reproduced"``, ``"not reproduced"``, ``"underpowered"``, ``"negative rho"``, ...
    """

    family: str
    rho: float
    pvalue: float
    n: int
    baseline_rho: float
    baseline_pvalue: float
    reached: dict[int, float]
    missed: tuple[int, ...]
    rho_by_fraction: dict[float, float]
    flags: tuple[str, ...]
    n_by_fraction: dict[float, int] = field(default_factory=dict)
    diverged: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The whole sweep's outcome, with the plain-words summary in ``lines``.

    Attributes:
        target: the pre-registered target loss.
        fraction: the pre-registered early fraction.
        window: the rank window of the tail statistic.
        unit: what budgets count (``"examples"``, ``"tokens"``).
        families: per family, its :class:`FamilyVerdict` (in chain order).
        pooled_rho, pooled_pvalue, pooled_n: across families (per-family min-max normalized statistic).
        lines: the verdict in plain words, one sentence per line.
        unmeasured: the run ids of the :func:`unmeasured` runs (stopped, kept, counted as cut short), which
            ``lines`` names too (the printed verdict said nothing of them: only the report did).
    """

    target: float
    fraction: float
    window: tuple[int, int] | None
    unit: str
    families: dict[str, FamilyVerdict]
    pooled_rho: float
    pooled_pvalue: float
    pooled_n: int
    lines: tuple[str, ...] = field(default=())
    unmeasured: tuple[str, ...] = field(default=())


def _score(predictor, runs, eps):
    """``(score, None)``, or ``(None, why)`` when the predictor cannot score the runs."""
    try:
        return predictor.fit(runs).score(targets=eps), None
    except (FractionNotReachedError, ValueError) as e:
        return None, str(e) or type(e).__name__


def _flags(rho: float, p: float, n_reached: int, why: str | None = None) -> tuple[str, ...]:
    """The verdict flags; ``why``: why there is no rho (default: too few tiers or constant values)."""
    flags = []
    if not math.isfinite(rho):
        flags.append(f"no ranking ({why or 'fewer than 3 tiers or constant values'})")
    elif rho >= REPRODUCED_RHO - 1e-9:  # rho of ranks is a ratio of integers: 0.8 may come out 0.7999...
        flags.append("reproduced")
    else:
        flags.append("not reproduced")
    if math.isfinite(rho) and rho < 0:
        flags.append("negative rho (the early tail ranks the tiers backwards)")
    if n_reached < 3:
        flags.append("underpowered")
    elif math.isfinite(rho) and not (p <= ALPHA):
        flags.append(f"not significant (p > {ALPHA:g})")
    return tuple(flags)


def verdict(runs: Sequence[RunRecord], *, target: float, families: Sequence[str], unit: str,
            fraction: float = 0.2, window: tuple[int, int] | None = None,
            fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5)) -> Verdict:
    """Score the sweep against the pre-registered claim and say the outcome in plain words."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = token_inefficiency(runs, target)
        main, why = _score(TailPredictor(fraction, window=window), runs, eps)
        base, _ = _score(NoiseScalePredictor(fraction), runs, eps)
        scans = {f: _score(TailPredictor(f, window=window), runs, eps)[0] for f in fractions}
    out: dict[str, FamilyVerdict] = {}
    for family in families:
        members = [r for r in runs if r.info.family == family]
        T = {int(r.info.batch_tier): tokens_to_target(r, target) for r in members}
        reached = {t: v for t, v in sorted(T.items()) if math.isfinite(v)}
        missed = tuple(t for t, v in sorted(T.items()) if not math.isfinite(v))
        diverged = tuple(sorted(int(r.info.batch_tier) for r in members if divergence(r) is not None))
        w = main.within.get(family) if main is not None else None
        b = base.within.get(family) if base is not None else None
        rho, p, n = (w.rho, w.pvalue, w.n) if w is not None else (math.nan, math.nan, 0)
        scanned = {f: (s.within.get(family) if s is not None else None) for f, s in scans.items()}
        by_f = {f: x.rho if x is not None else math.nan for f, x in scanned.items()}
        n_by_f = {f: x.n if x is not None else 0 for f, x in scanned.items()}
        out[family] = FamilyVerdict(family, rho, p, n, b.rho if b else math.nan, b.pvalue if b else math.nan,
                                    reached, missed, by_f, _flags(rho, p, len(set(reached) - set(diverged)), why),
                                    n_by_f, diverged)
    pooled = (main.rho, main.pvalue, main.n) if main is not None else (math.nan, math.nan, 0)
    stopped = tuple(sorted(r.run_id for r in unmeasured(runs)))
    v = Verdict(target, fraction, window, unit, out, *pooled, unmeasured=stopped)
    return Verdict(**{**v.__dict__, "lines": tuple(_sentences(v))})


def unmeasured(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The runs a job stopped and kept as ``status: "diverged"`` while their losses were finite: the lens could not
    measure them (``NonFiniteError``, activations beyond float32's range; ``divergence`` in ``run.json`` says why).
    The library reads such a run as cut short, not diverged (:func:`spectral_lens.analysis.divergence`), so the
    verdict counts it as having missed the target unless it reached it first, and names no divergence."""
    status = lambda r: (getattr(r.info, "extras", None) or {}).get("status")  # noqa: E731 (a stand-in info: none)
    return [r for r in runs if status(r) == "diverged" and divergence(r) is None]


def unmeasured_note(runs: Sequence[RunRecord]) -> str:
    """One report paragraph naming the :func:`unmeasured` runs ('' when none): nothing else in a report told them
    from runs that finished their budget or merely missed the target."""
    gone = unmeasured(runs)
    if not gone:
        return ""
    return ("Stopped unmeasured (kept, not retrained): " + ", ".join(sorted(r.run_id for r in gone))
            + ". The lens could not measure them at a finite loss (`run.json` `divergence` says why, e.g. activations "
            "beyond float32's range); their losses being finite, the verdict counts each as cut short there (a "
            "missed target unless it reached the target first), not as diverged.")


def _num(x: float, fmt: str = ".2f") -> str:
    return format(x, fmt) if math.isfinite(x) else "n/a"


def percent(f: float, among: Sequence[float] = ()) -> str:
    """A progress fraction in percent, told from each fraction of ``among`` and of :data:`LABEL_GRID`
    (:func:`spectral_lens.analysis.efficiency.percent`): a pre-registered 0.2004 beside a scanned 0.2 is
    ``20.04%``, and one fraction has one label in the verdict and the toy report (shared with it)."""
    return _percent(f, (*among, *LABEL_GRID))


def _sentences(v: Verdict) -> list[str]:
    scanned = sorted({f for fam in v.families.values() for f in fam.rho_by_fraction} | {v.fraction})
    lines = [f"Pre-registered: target validation loss {v.target:g}; early statistic alpha_tail over ranks "
             f"{v.window} at {percent(v.fraction, scanned)} of the budget; a family reproduces the claim when "
             f"rho >= {REPRODUCED_RHO}."]
    for fam in v.families.values():
        tiers = sorted(set(fam.reached) | set(fam.missed))
        reach = (f"{len(fam.reached)} of {len(tiers)} tiers reached the target"
                 + (f" (not: {', '.join(f'{t} (diverged)' if t in fam.diverged else str(t) for t in fam.missed)})"
                    if fam.missed else "")
                 + (f" ({', '.join(str(t) for t in fam.diverged if t in fam.reached)} diverged after reaching it)"
                    if set(fam.diverged) & set(fam.reached) else "")
                 + ("; diverged tiers are left out of rho" if fam.diverged else ""))
        lines.append(f"{fam.family}: {reach}; rho = {_num(fam.rho)} (p = {_num(fam.pvalue, '.3g')}, n = {fam.n}); "
                     f"noise-scale baseline rho = {_num(fam.baseline_rho)}; verdict: {', '.join(fam.flags)}.")
        scan = ", ".join(f"{percent(f, scanned)}: {_num(r)} (n = {fam.n_by_fraction.get(f, 0)})"
                         for f, r in fam.rho_by_fraction.items())
        lines.append(f"  {fam.family} rho by progress fraction: {scan}.")
    lines.append(f"Pooled across families (min-max normalized per family): rho = {_num(v.pooled_rho)} "
                 f"(p = {_num(v.pooled_pvalue, '.3g')}, n = {v.pooled_n}).")
    if v.unmeasured:
        lines.append(f"Stopped unmeasured (kept, not retrained): {', '.join(v.unmeasured)}: the lens could not measure "
                     "them at a finite loss, so each counts as cut short there (a missed target unless it reached "
                     "the target first), not as diverged.")
    failed = [f.family for f in v.families.values() if "reproduced" not in f.flags]
    weak = [f.family for f in v.families.values() if "reproduced" in f.flags and len(f.flags) > 1]
    if failed:
        lines.append(f"Did not reproduce the paper's claim (early tail ranks the tiers) for: {', '.join(failed)}.")
    else:
        lines.append("Every family reproduced the claim at the pre-registered fraction"
                     + (f", but weakly for {', '.join(weak)} (see the flags above)." if weak else "."))
    return lines
