"""The speedrun's own report sections, handed to the shared pipeline through ``report_sections``.

The pipeline's report (``spectral_lens.report.build_report``: runs table, early-prediction tables and
score beside the noise-scale baseline, matched-loss spectra, alpha trajectories, gain plane and
taxonomy of the chain with its evidence) and its verdict (rho per family and pooled, reached and
missed tiers, flags) are generic. This module adds what is specific to the speedrun: our rhos beside
the paper's numbers (Sec. 3) with the smallest p-value the number of tiers allows, the runs that
missed the pre-registered target with their best losses, the tuner's chosen factors with their
final-rung losses (and whether each is an end of its grid), and the machine(s) that trained the runs
(:func:`examples.replicate.machine.machine_section`, as the toy's report). The validation-loss curves are
the library report's ``loss.png``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from examples.replicate.machine import machine_section
from examples.replicate.verdict import ALPHA, unmeasured, unmeasured_note, verdict
from spectral_lens.records import RunRecord

__all__ = ["PAPER", "best_val_loss", "min_pvalue", "speedrun_sections"]

PAPER = dict(within_rho_d12=0.97, pooled_rho=0.93, within_rho_d36_d48=0.95)
"""The paper's early-prediction correlations (Sec. 3): within-family mean at d12, pooled, at d36/d48."""


def min_pvalue(n: int) -> float:
    """The smallest exact two-sided p-value of a Spearman rho over ``n`` distinct ranks (a perfect order): ``2/n!``."""
    if n < 2:
        raise ValueError(f"min_pvalue: need n >= 2 ranks, got {n}")
    return 2 / math.factorial(n)  # int / int: exact rounding, 0.0 only where 2/n! is below the float range


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def best_val_loss(run: RunRecord) -> float:
    """The lowest finite validation loss of ``run`` (NaN when it has none). Finite only: a diverged run's curve
    ends NaN (it is kept as a result), and the minimum of a curve holding a NaN is NaN (numpy), which listed a
    run that reached the target before it diverged as having missed it."""
    _, losses = run.val_curve()
    finite = [float(x) for x in losses if math.isfinite(x)]
    return min(finite) if finite else math.nan


def speedrun_sections(workload, runs: Sequence[RunRecord], out_dir: Path) -> list[str]:
    """Markdown sections of the speedrun report (figures into ``out_dir``); see the module docstring.

    The tuner's choices are read from ``out_dir/../tune/choices.json`` (the pipeline's layout) when present.
    """
    p = workload.preset
    target = workload.target_loss
    v = verdict(runs, target=target, families=workload.families, unit=workload.unit,
                fraction=workload.fraction, window=workload.window)
    rows = ["| group | our Spearman rho (early alpha_tail vs eps_tok) | p-value | runs | paper |", "|---|---|---|---|---|"]
    for f in v.families.values():
        rows.append(f"| {f.family} | {_fmt(f.rho)} | {_fmt(f.pvalue, '.3g')} | {f.n} | "
                    f"within-family mean {PAPER['within_rho_d12']} (d12) |")
    within = [f.rho for f in v.families.values() if math.isfinite(f.rho)]
    rows.append(f"| within-family mean | {_fmt(sum(within) / len(within) if within else math.nan)} | | | "
                f"{PAPER['within_rho_d12']} (d12) |")
    rows.append(f"| pooled (per-family min-max) | {_fmt(v.pooled_rho)} | {_fmt(v.pooled_pvalue, '.3g')} | "
                f"{v.pooled_n} | {PAPER['pooled_rho']} |")
    base = ", ".join(f"{f.family} {_fmt(f.baseline_rho)}" for f in v.families.values())
    notes = [f"Noise-scale baseline within-family rho: {base}."]
    n_tiers = len(workload.tiers)
    if min_pvalue(n_tiers) >= ALPHA:
        notes.append(f"Underpowered by design: with {n_tiers} tiers per family the smallest exact two-sided "
                     f"p-value of a within-family rho is {min_pvalue(n_tiers):.3g} (a perfect order), so no "
                     f"within-family rho can be significant at {ALPHA}.")
    sections = [f"## Early prediction: ours beside the paper's\n\nPreset `{p.name}`: profile `{p.profile}`, data "
                f"`{p.data}`, {p.budget:,} training tokens per run, pre-registered target **{target:g}** (fixed "
                f"in `examples/speedrun/presets.py` before the runs).\n\n" + "\n".join(rows) + "\n\n"
                + "\n".join(f"- {n}" for n in notes)]

    missed = []
    stopped = {r.run_id for r in unmeasured(runs)}  # kept as diverged, with finite losses: the lens failed there
    for r in runs:
        best = best_val_loss(r)
        if not best <= target:
            diverged = " (stopped unmeasured)" if r.run_id in stopped else \
                " (diverged)" if (r.info.extras or {}).get("status") == "diverged" else ""
            missed.append(f"| {r.run_id} | {r.info.family} | {r.info.batch_tier:g} | {_fmt(best)}{diverged} |")
    sections.append("## Target loss\n\n" + (
        "Runs that did NOT reach the pre-registered target (a run that finished its budget without reaching it "
        "has eps_tok infinite and ranks last; a run cut short before it has no eps_tok and is left out of the "
        "scores):\n\n"
        "| run | family | tier | best validation loss |\n|---|---|---|---|\n" + "\n".join(missed)
        if missed else f"Every run reached {target:g}.")
        + (f"\n\n{unmeasured_note(runs)}" if stopped else ""))

    choices_path = out_dir.parent / "tune" / "choices.json"
    if choices_path.exists():
        data = json.loads(choices_path.read_text(encoding="utf-8"))
        lines = ["| family | tier | chosen factor (x reference) | its last-rung loss | at the grid's edge |",
                 "|---|---|---|---|---|"]
        lines += [f"| {c['family']} | {c['tier']} | {c['scale']:.4g} | {_fmt(c.get('loss'))} | "
                  f"{(c.get('at_edge') or '') and c['at_edge'] + ' candidate: the best rate may lie beyond'} |"
                  for c in data["choices"]]
        sections.append(f"## Tuner choices\n\nSynchronized successive halving (`examples.tune`), rungs "
                        f"{list(p.rungs)} tokens, learning-rate schedules over the {p.budget:,}-token run budget "
                        f"(`{choices_path.relative_to(out_dir.parent)}`).\n\n" + "\n".join(lines))
    machines = machine_section(runs)  # the toy report's section: what trained the runs, and whether they differ
    if machines:
        sections.append(machines)
    return sections
