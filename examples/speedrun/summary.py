"""The speedrun report: the library report plus the replication verdict beside the paper's numbers.

``spectral_lens.report.build_report`` writes the runs table, the early-prediction tables and score
(TailPredictor and the noise-scale baseline), matched-loss spectra, alpha trajectories, the
early-prediction scatter, and for the variant chain (consecutive families at the reference tier)
the gain plane and the taxonomy with its evidence. This module adds what is specific to the
replication: the pre-registered target and which tiers missed it, the tuned rates, validation loss
curves, rho per family and pooled with p-values beside the paper's, and plain-language flags when a
rho is underpowered or negative. ``summary.json`` holds the same numbers.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from spectral_lens.records import RunRecord, open_runs
from spectral_lens.report import build_report

from .halving import write_json_atomic
from .workload import run_id

__all__ = ["write_summary", "verdict_lines", "PAPER"]

PAPER = dict(within_rho_d12=0.97, pooled_rho=0.93, within_rho_d36_d48=0.95)
"""The paper's early-prediction correlations (Sec. 3): within-family mean at d12, pooled, at d36/d48."""

ALPHA = 0.05


def verdict_lines(score: dict, n_tiers: int) -> list[str]:
    """Plain-language reading of the score: negative, underpowered or not significant rhos, per family and pooled.

    ``score``: ``{"within": {family: {"rho", "pvalue", "n"}}, "pooled": {"rho", "pvalue", "n"}}`` (NaN allowed).
    """
    lines = []
    min_p = 2 / math.factorial(n_tiers) if n_tiers <= 8 else 0.0  # exact two-sided test, perfect order
    if min_p >= ALPHA:
        lines.append(f"Underpowered: with {n_tiers} tiers per family the smallest possible two-sided p-value of a "
                     f"within-family rho is {min_p:.3g} (a perfect ordering), so no within-family rho can be "
                     f"significant at {ALPHA}.")
    entries = [(f"{f}", s) for f, s in score["within"].items()] + [("pooled", score["pooled"])]
    for name, s in entries:
        rho, p, n = s["rho"], s["pvalue"], s["n"]
        if rho is None or not math.isfinite(rho):
            lines.append(f"{name}: rho is undefined (fewer than 3 runs with a finite eps_tok, or ties).")
        elif rho < 0:
            lines.append(f"{name}: rho = {rho:.3f} is NEGATIVE: the early tail orders the tiers against realized token "
                         f"efficiency here (the paper's finding does not reproduce for this group).")
        elif p is not None and math.isfinite(p) and p >= ALPHA:
            lines.append(f"{name}: rho = {rho:.3f} is positive but not significant (p = {p:.3g}, n = {n}).")
    return lines


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _plot_loss_curves(runs: Sequence[RunRecord], target: float, path: Path) -> bool:
    try:
        from spectral_lens.plot import require_matplotlib

        require_matplotlib()
    except ImportError:
        return False
    from matplotlib.figure import Figure

    fams = sorted({r.info.family for r in runs})
    fig = Figure(figsize=(5.2 * len(fams), 4.0))
    axes = fig.subplots(1, len(fams), squeeze=False)[0]
    for ax, fam in zip(axes, fams):
        for r in sorted((r for r in runs if r.info.family == fam), key=lambda r: r.info.batch_tier):
            tokens, losses = r.val_curve()
            ax.plot(tokens, losses, marker="o", ms=3, label=f"B={r.info.batch_tier:g}")
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
        ax.set_title(fam)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.5))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_summary(workload, run_dirs: Sequence[os.PathLike], out: os.PathLike, *, choices: dict) -> dict:
    """Write ``out/report.md`` (library report + replication summary) and ``out/summary.json``; returns the summary."""
    p = workload.preset
    out = Path(out)
    runs = open_runs(run_dirs)
    target = workload.target_loss
    fams = list(workload.families)
    transitions = [(run_id(a, workload.reference_tier), run_id(b, workload.reference_tier))
                   for a, b in zip(fams, fams[1:])]
    rep = build_report(runs, out, target_loss=target, fraction=p.fraction, window=p.tail_window,
                       transitions=transitions, title=f"Speedrun replication: preset {p.name}")
    library_md = rep.path.read_text(encoding="utf-8")

    missed = []
    for r in runs:
        _, losses = r.val_curve()
        best = float(losses.min()) if losses.size else math.nan
        if not best <= target:
            missed.append(dict(run=r.run_id, family=r.info.family, tier=r.info.batch_tier, best_val_loss=best))
    sc = rep.score
    score = dict(
        within={f: dict(rho=w.rho, pvalue=w.pvalue, n=w.n) for f, w in (sc.within.items() if sc else [])},
        pooled=dict(rho=sc.rho if sc else math.nan, pvalue=sc.pvalue if sc else math.nan, n=sc.n if sc else 0),
        mean_within_rho=sc.mean_within_rho if sc else math.nan,
    )
    bs = rep.baseline_score
    baseline = None if bs is None else dict(pooled_rho=bs.rho, pooled_pvalue=bs.pvalue, mean_within_rho=bs.mean_within_rho)
    verdict = verdict_lines(score, len(workload.tiers))
    if sc is None:
        verdict.insert(0, "No prediction score: " + "; ".join(rep.notes))
    taxonomy = [dict(transition=f"{t.evidence.a} -> {t.evidence.b}", label=t.label, rule=t.rule,
                     tok_gain=t.evidence.tok_gain, thr_gain=t.evidence.thr_gain) for t in rep.taxonomy]
    missed_ids = {m["run"] for m in missed}
    for t in rep.taxonomy:
        gone = [x for x in (t.evidence.a, t.evidence.b) if x in missed_ids]
        if gone:
            verdict.append(f"Transition {t.evidence.a} -> {t.evidence.b}: {', '.join(gone)} did not reach the target, so "
                           f"the token gain is undefined and the label ({t.label}) rests on the other evidence only; "
                           "it is not evidence for the paper's taxonomy.")
    summary = dict(preset=p.name, target_loss=target, families=fams, tiers=list(workload.tiers), budget=p.budget,
                   fraction=p.fraction, tail_window=list(p.tail_window), missed_target=missed, score=score,
                   baseline=baseline, paper=PAPER, verdict=verdict, taxonomy=taxonomy,
                   chosen_lr_scale={k: v["scale"] for k, v in choices.items()})

    lines = [f"# Speedrun replication: preset `{p.name}`", "",
             f"Profile `{p.profile}`, data `{p.data}`, families {' -> '.join(fams)}, tiers {list(workload.tiers)} "
             f"(B0 = {workload.reference_tier}), {p.budget:,} training tokens per run. Pre-registered target "
             f"validation loss **{target:g}** (fixed in `examples/speedrun/presets.py` before the runs). Early "
             f"checkpoint at {p.fraction:.0%} progress, alpha_tail over ranks {p.tail_window}.", "",
             "## Early prediction: ours beside the paper's", "",
             "| group | our Spearman rho (early alpha_tail vs eps_tok) | p-value | runs | paper |",
             "|---|---|---|---|---|"]
    for f, s in score["within"].items():
        lines.append(f"| {f} (within family) | {_fmt(s['rho'])} | {_fmt(s['pvalue'], '.3g')} | {s['n']} | "
                     f"within-family mean {PAPER['within_rho_d12']} (d12) |")
    lines.append(f"| within-family mean | {_fmt(score['mean_within_rho'])} | | | {PAPER['within_rho_d12']} (d12) |")
    lines.append(f"| pooled (per-family min-max) | {_fmt(score['pooled']['rho'])} | "
                 f"{_fmt(score['pooled']['pvalue'], '.3g')} | {score['pooled']['n']} | {PAPER['pooled_rho']} |")
    if baseline:
        lines += ["", f"Noise-scale baseline: pooled rho {_fmt(baseline['pooled_rho'])} "
                      f"(p = {_fmt(baseline['pooled_pvalue'], '.3g')}), within-family mean "
                      f"{_fmt(baseline['mean_within_rho'])}."]
    lines += ["", "## Verdict", ""] + [f"- {v}" for v in verdict or ["No flags: every rho is positive and significant."]]
    lines += ["", "## Target loss", ""]
    if missed:
        lines += ["Runs that did NOT reach the pre-registered target (their eps_tok is infinite and they rank last):", "",
                  "| run | family | tier | best validation loss |", "|---|---|---|---|"]
        lines += [f"| {m['run']} | {m['family']} | {m['tier']:g} | {m['best_val_loss']:.3f} |" for m in missed]
    else:
        lines.append(f"Every run reached {target:g}.")
    lines += ["", "## Tuned learning rates", "",
              "Factor over the family's reference rates (synchronized successive halving, `_tune/choices.json`).", "",
              "| family | tier | chosen factor | trial losses at the last rung |", "|---|---|---|---|"]
    for k, v in choices.items():
        last = str(p.rungs[-1])
        trials = ", ".join(f"x{t['scale']:.3g}: {_fmt(t['losses'].get(last))}" for t in v["trials"].values()
                           if last in t["losses"])
        lines.append(f"| {v['family']} | {v['tier']} | {v['scale']:.4g} | {trials} |")
    if taxonomy:
        lines += ["", "## Variant chain (taxonomy at the reference tier)", ""]
        lines += [f"- {t['transition']}: **{t['label']}** (TokGain {_fmt(t['tok_gain'], '+.3f')}, "
                  f"ThrGain {_fmt(t['thr_gain'], '+.3f')}; rule: {t['rule']})" for t in taxonomy]
    if _plot_loss_curves(runs, target, out / "loss_curves.png"):
        lines += ["", "## Loss curves", "", "![Validation loss by tier](loss_curves.png)"]
    lines += ["", "---", ""]
    tmp = rep.path.with_name(rep.path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n" + library_md.replace("# ", "## ", 1), encoding="utf-8")
    os.replace(tmp, rep.path)
    write_json_atomic(out / "summary.json", _finite(summary))
    return summary


def _finite(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
