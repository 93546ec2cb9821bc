"""The toy's report sections: Fig. 4a / 11a / 11b analogues and our numbers beside the paper's.

Called by the shared pipeline through ``ToyWorkload.report_sections``; figures are PNG files
written next to ``report.md`` (skipped, with a note, without matplotlib).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

import spectral_lens as sl
from examples.replicate.machine import machine_section as _machines  # shared with the speedrun's report
from examples.replicate.verdict import percent, unmeasured_note
from spectral_lens.analysis import TailPredictor, divergence, token_inefficiency, tokens_to_target
from spectral_lens.records import Measurement, RunRecord

__all__ = ["toy_sections", "PAPER", "SCAN_FRACTIONS"]

SCAN_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
"""Progress fractions at which the tail statistic's rho is scanned (Fig. 4a's x axis)."""

PAPER = {
    "fig4a": "Muon stage: the 10-40 tail statistic reaches Spearman rho = 1 at about 20% progress",
    "fig11a": "at matched loss, smaller batches have steeper tails (Untied runs, B in {32..512})",
    "fig11b": "Muon -> Untied gives a mean Delta H_peak about 5x the Baseline -> RoPE and RoPE -> Muon steps",
}
"""What the paper reports for the toy (Sec. 5, App. F), quoted in our words."""


def _num(x: float, fmt: str = ".2f") -> str:
    return format(x, fmt) if x is not None and math.isfinite(x) else "n/a"


def _pct(f: float) -> str:
    """A progress fraction in percent: ``20%``, ``12.5%`` (no rounding that would hide the preset's fraction), told
    from every scanned one: a preset's 0.2004 is ``20.04%``, not a second ``20%`` column beside 0.2's."""
    return percent(f, SCAN_FRACTIONS)


def _alpha(m: Measurement, name: str, window: tuple[int, int]) -> float:
    return float(sl.BandAlphaFitter(window).fit(m.spectra[name]).alpha)


def _best_run(runs: Sequence[RunRecord], family: str, target: float) -> RunRecord | None:
    """The family's most token-efficient run among those that did not diverge (a run that reached the target
    and then diverged has no healthy late checkpoints to probe, and the library leaves it out of every ranking)."""
    members = [r for r in runs if r.info.family == family and divergence(r) is None]
    if not members:
        return None
    return min(members, key=lambda r: (tokens_to_target(r, target), r.info.batch_tier))


def _at_progress(run: RunRecord, f: float) -> Measurement:
    return min(run.measurements, key=lambda m: abs((run.progress(m) or 0.0) - f))


def _fig4a_points(runs, families, target, window, fraction) -> dict[str, list[tuple[float, float, int]]]:
    """Per family, ``(alpha_tail, examples to target (NaN if not reached), tier)`` of every run in the
    pre-registered rho: the values ``TailPredictor(fraction, window=window)`` ranks, interpolated at exactly
    ``fraction`` as the verdict's rho reads them (runs it leaves out, e.g. diverged ones, are not drawn)."""
    out = {f: [] for f in families}
    try:
        stats = TailPredictor(fraction, window=window).fit(runs).statistics_
    except ValueError:  # no run has a statistic at the fraction (FractionNotReachedError is one)
        return out
    by_id = {r.run_id: r for r in runs}
    for s in stats:
        if s.family in out:
            T = tokens_to_target(by_id[s.run_id], target)
            out[s.family].append((s.value, T if math.isfinite(T) else math.nan, int(s.tier)))
    return out


def _rho_scan(runs, families, target, window, fractions=SCAN_FRACTIONS
              ) -> tuple[dict[str, dict[float, float]], dict[str, dict[float, int]]]:
    """Per family, the within-family rho at each of ``fractions``, and the number of runs it was computed on
    (a run without a statistic at a fraction, or cut short before the target, is left out of that rho)."""
    eps = token_inefficiency(runs, target)
    out, ns = {f: {} for f in families}, {f: {} for f in families}
    for frac in fractions:
        try:
            score = TailPredictor(frac, window=window).fit(runs).score(targets=eps)
        except ValueError:
            continue
        for fam in families:
            if fam in score.within:
                out[fam][frac], ns[fam][frac] = score.within[fam].rho, score.within[fam].n
    return out, ns


def _matched(runs, family, target, window):
    """Per tier of ``family``: (examples at the first measurement with val loss <= target, alpha, spectrum).

    A run that diverged is left out, even one that reached the target first: its rho(tier, alpha) ranks the
    tiers, and the library's predictors leave every diverged run out of a ranking, its checkpoints from before
    the divergence too (as the verdict's rho and Fig. 4a here do); :func:`_diverged_tiers` names them."""
    rows = []
    for r in sorted((r for r in runs if r.info.family == family and divergence(r) is None),
                    key=lambda r: r.info.batch_tier):
        name = r.info.primary_spectrum
        hit = [m for m in r.measurements if m.val_loss is not None and math.isfinite(m.val_loss) and m.val_loss <= target]
        if hit:
            m = hit[0]
            rows.append((int(r.info.batch_tier), m.tokens, m.val_loss, _alpha(m, name, window), m.spectra[name]))
    return rows


def _diverged_tiers(runs, family) -> list[int]:
    """The tiers of ``family`` whose run diverged (left out of the matched-loss table and its rho)."""
    return sorted(int(r.info.batch_tier) for r in runs if r.info.family == family and divergence(r) is not None)


def _h_peak_steps(runs, families, target) -> list[tuple[str, float]]:
    """Mean Delta H_peak over checkpoints at 1/3, 2/3 and 1 of progress, per chain step (best tiers)."""
    out = []
    for a, b in zip(families, families[1:]):
        ra, rb = _best_run(runs, a, target), _best_run(runs, b, target)
        if ra is None or rb is None:
            continue
        deltas = [_at_progress(rb, f).scalars.get("H_peak", math.nan) - _at_progress(ra, f).scalars.get("H_peak", math.nan)
                  for f in (1 / 3, 2 / 3, 1.0)]
        out.append((f"{a} -> {b}", float(np.mean(deltas))))
    return out


def _last_scalars(runs, family: str, target: float) -> dict[str, float]:
    r = _best_run(runs, family, target)
    return dict(_at_progress(r, 1.0).scalars) if r is not None and r.measurements else {}


def toy_sections(workload, runs: Sequence[RunRecord], out_dir: Path) -> list[str]:
    """Markdown sections (and figures in ``out_dir``) of the toy report."""
    target, window, families = workload.target_loss, tuple(workload.window), tuple(workload.families)
    fraction = float(getattr(workload, "fraction", 0.2))  # the preset's (the pipeline's default: the paper's 20%)
    # the table shows the pre-registered fraction too (a grid point it merely rounds to, e.g. 0.1 + 0.2, is dropped)
    scanned = tuple(sorted({f for f in SCAN_FRACTIONS if not math.isclose(f, fraction, abs_tol=1e-9)} | {fraction}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan, scan_n = _rho_scan(runs, families, target, window, scanned)
    last = families[-1]
    matched = _matched(runs, last, target, window)
    rho_tier = math.nan
    if len(matched) >= 3 and len({a for *_, a, _ in matched}) > 1:
        rho_tier = float(stats.spearmanr([t for t, *_ in matched], [a for *_, a, _ in matched]).statistic)
    steps = _h_peak_steps(runs, families, target)
    sections = []

    lines = ["## Early tail vs examples to target, by progress (Fig. 4a analogue)", "",
             "Units: the library's tables above say *tokens*; in this toy one token is one training example "
             "(one predicted target), so T and Q count examples and examples/s.", "",
             f"Within-family Spearman rho between alpha over ranks {window[0]}-{window[1]} (last-position "
             "activations of the last block) and realized eps_tok (examples to target / the family's best), "
             "at each progress fraction, and the number of runs n each rho was computed on. Tiers that never "
             "reach the target rank last; a run that diverged is left out (the library's rule).", "",
             "| family | " + " | ".join(_pct(f) for f in scanned) + " |",
             "|---|" + "---|" * len(scanned)]
    for fam in families:
        lines.append(f"| {fam} | " + " | ".join(_num(scan[fam].get(f, math.nan)) for f in scanned) + " |")
        lines.append(f"| {fam} n | " + " | ".join(str(scan_n[fam].get(f, 0)) for f in scanned) + " |")
    sections.append("\n".join(lines))

    lines = [f"## Matched-loss spectra by tier, {last} (Fig. 11a analogue)", ""]
    if matched:
        lines += ["| tier | examples at first checkpoint <= target | val loss there | alpha (ranks "
                  f"{window[0]}-{window[1]}) |", "|---|---|---|---|"]
        lines += [f"| {t} | {n:,} | {v:.3f} | {a:.3f} |" for t, n, v, a, _ in matched]
        lines += ["", f"Spearman rho(tier, matched-loss alpha) = {_num(rho_tier)} (n = {len(matched)}); the paper's "
                  "'smaller batches are steeper' means rho < 0."]
    else:
        lines.append(f"No {last} run reached the target {target:g} without diverging: nothing to match.")
    gone = _diverged_tiers(runs, last)
    if gone:
        lines += ["", "Left out (diverged, even after reaching the target: the library ranks no diverged run): "
                  + ", ".join(f"B={t}" for t in gone) + "."]
    stopped = unmeasured_note(runs)  # kept as diverged with finite losses (the lens failed there): nothing else said so
    if stopped:
        lines += ["", stopped]
    sections.append("\n".join(lines))

    lines = ["## Fourier probes along the cyclic index (Fig. 4b / 11b analogues)", "",
             "H_S (task band r = 1..8), H_peak and PC1 peak mass of the last-position hidden states grouped by "
             "the target's phase, for each family's most token-efficient tier among its runs that did not diverge "
             f"(first / {_pct(fraction)} / last checkpoint):", "",
             "| family | tier | H_S | H_peak | PC1 peak mass |", "|---|---|---|---|---|"]
    for fam in families:
        r = _best_run(runs, fam, target)
        if r is None:
            continue
        ms = [_at_progress(r, f) for f in (0.0, fraction, 1.0)]
        cell = lambda key: " / ".join(_num(m.scalars.get(key, math.nan), ".3f") for m in ms)  # noqa: E731
        lines.append(f"| {fam} | {int(r.info.batch_tier)} | {cell('H_S')} | {cell('H_peak')} | {cell('pc1_peak')} |")
    if steps:
        lines += ["", "Mean Delta H_peak per chain step (checkpoints at 1/3, 2/3 and the end, best tiers): "
                  + "; ".join(f"{s}: {d:+.4f}" for s, d in steps) + "."]
    else:
        lines += ["", "Delta H_peak per chain step needs at least two families (the `full` preset)."]
    bands = [k for k in _last_scalars(runs, families[0], target) if k.startswith("pc1_peak:")]
    if bands:
        lines += ["", "Final PC1 peak mass by probe band (Fig. 11c analogue; best tier of each family):", "",
                  "| family | " + " | ".join(k.split(":", 1)[1] for k in bands) + " |", "|---|" + "---|" * len(bands)]
        for fam in families:
            last_s = _last_scalars(runs, fam, target)
            lines.append(f"| {fam} | " + " | ".join(_num(last_s.get(k, math.nan), ".3f") for k in bands) + " |")
    sections.append("\n".join(lines))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        points = _fig4a_points(runs, families, target, window, fraction)
    figs = _figures(runs, families, target, window, scan, matched, steps, out_dir, points, fraction)
    if figs:
        sections.append("## Toy figures\n\n" + "\n\n".join(f"![{cap}]({p.name})\n\n*{cap}*" for p, cap in figs))

    ours_4a = scan.get("Muon", {}).get(fraction, math.nan)
    ratio = math.nan
    if len(steps) == 3 and abs(steps[0][1]) + abs(steps[1][1]) > 0:
        ratio = steps[2][1] / (0.5 * (abs(steps[0][1]) + abs(steps[1][1])))
    sections.append("\n".join([
        "## Our numbers beside the paper's", "",
        "| claim | paper | this run |", "|---|---|---|",
        f"| Fig. 4a | {PAPER['fig4a']} | Muon rho at {_pct(fraction)} = {_num(ours_4a)}"
        + (f" (n = {scan_n['Muon'][fraction]})" if fraction in scan_n.get("Muon", {}) else "")
        + ("" if "Muon" in families else " (Muon not in this preset)") + " |",
        f"| Fig. 11a | {PAPER['fig11a']} | {last}: rho(tier, alpha at matched loss) = {_num(rho_tier)} over "
        f"{len(matched)} tiers |",
        f"| Fig. 11b | {PAPER['fig11b']} | "
        + (f"{steps[2][0]} step / mean |earlier step| = {_num(ratio)}" if math.isfinite(ratio)
           else "not measured (needs the whole chain: `--preset full`)") + " |",
    ]))
    machines = _machines(runs)
    if machines:
        sections.append(machines)
    return sections


def _save(fig, path: Path) -> Path:
    """Write ``fig`` atomically and close it."""
    import matplotlib.pyplot as plt

    from spectral_lens.plot import save_figure

    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _annotate_tiers(ax, pts) -> None:
    """Label each point ``(alpha, examples, tier)`` "B=<tier>" beside it (on its left when the label would pass the
    axes' right edge: B = 512's was cut off by the figure's), moving a label past those already placed when
    their boxes would intersect (tiers whose points nearly coincide, e.g. B = 64 and 128 with the
    same examples to target and close alphas, had their labels drawn over each other): up from a point in the
    axes' lower half, down from one in the upper half (stacked upwards, the labels of coincident points at the
    top of the plot rose out of the axes, over the title). Call after the layout: the boxes are measured where
    the figure will draw them."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.autoscale_view()
    placed = []
    axes = ax.get_window_extent(renderer)
    for a, T, t in sorted(pts, key=lambda p: (p[1], p[0], p[2])):
        down = ax.transData.transform((a, T))[1] > 0.5 * (axes.y0 + axes.y1)  # stack towards the axes' middle
        dx, dy = 3.0, -3.0 if down else 3.0
        label = ax.annotate(f"B={t}", (a, T), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            va="top" if down else "baseline")
        box = label.get_window_extent(renderer)
        if box.x1 > axes.x1:  # the rightmost point's label would leave the figure: put it on the left
            dx = -3.0
            label.set_horizontalalignment("right")
            label.xyann = (dx, dy)
            box = label.get_window_extent(renderer)
        for _ in range(len(placed) + 1):  # each move clears at least one placed box
            hit = [b for b in placed if box.overlaps(b)]
            if not hit:
                break
            if down:  # points: just below the lowest one hit
                dy -= (box.y1 - min(b.y0 for b in hit)) * 72 / fig.dpi + 1
            else:  # just above the highest one hit
                dy += (max(b.y1 for b in hit) - box.y0) * 72 / fig.dpi + 1
            label.xyann = (dx, dy)
            box = label.get_window_extent(renderer)
        placed.append(box)


def _figures(runs, families, target, window, scan, matched, steps, out_dir: Path, points, fraction
             ) -> list[tuple[Path, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for fam in families:
        xs = sorted(scan[fam])
        ax[0].plot([100 * x for x in xs], [scan[fam][x] for x in xs], marker="o", label=fam)
    ax[0].axhline(0, color="grey", lw=0.5)
    ax[0].set(xlabel="training progress (%)", ylabel="Spearman rho (early alpha vs eps)", ylim=(-1.05, 1.05),
              title=f"tail statistic, ranks {window[0]}-{window[1]}")
    ax[0].legend()
    for fam in families:
        pts = points.get(fam, [])
        if pts:
            ax[1].scatter([p[0] for p in pts], [p[1] for p in pts], label=fam)
    ax[1].set(xlabel=f"alpha at {_pct(fraction)} progress (interpolated, as rho)", ylabel="examples to target",
              title=f"target loss {target:g}")
    fig.tight_layout()
    _annotate_tiers(ax[1], [p for fam in families for p in points.get(fam, []) if math.isfinite(p[1])])
    caption = (f"Fig. 4a analogue: rho by progress; alpha at {_pct(fraction)} (the values the verdict's rho ranks) vs "
               "examples to target (tiers not reaching it, and runs left out of rho, not drawn)")
    out.append((_save(fig, out_dir / "toy_fig4a.png"), caption))

    if matched:
        fig, ax = plt.subplots(figsize=(5, 4))
        for t, n, v, a, spec in matched:
            y = spec.normalized.double().numpy()
            ax.loglog(np.arange(1, len(y) + 1), np.clip(y, 1e-12, None), label=f"B={t} (alpha {a:.2f})")
        ax.axvspan(*window, color="grey", alpha=0.15)
        ax.set(xlabel="rank", ylabel="normalized eigenvalue", title=f"{families[-1]}: spectra at val loss <= {target:g}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append((_save(fig, out_dir / "toy_fig11a.png"), "Fig. 11a analogue: last-position activation spectra at matched loss, by tier"))

    fig, ax = plt.subplots(figsize=(5, 4))
    for fam in families:
        r = _best_run(runs, fam, target)
        if r is None:
            continue
        ms = sorted(r.measurements, key=lambda m: m.tokens)
        ax.plot([100 * (r.progress(m) or 0) for m in ms], [m.scalars.get("H_S", np.nan) for m in ms],
                marker=".", label=f"{fam} (B={int(r.info.batch_tier)})")
    ax.set(xlabel="training progress (%)", ylabel="H_S (modes 1-8)", title="task-band concentration")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append((_save(fig, out_dir / "toy_fig4b.png"), "Fig. 4b analogue: H_S during training, each family's most token-efficient tier (runs that did not diverge)"))

    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([s for s, _ in steps], [d for _, d in steps], color="tab:purple")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(ylabel="mean Delta H_peak", title="chain steps (best tiers)")
        fig.tight_layout()
        out.append((_save(fig, out_dir / "toy_fig11b.png"), "Fig. 11b analogue: mean Delta H_peak per chain step"))
    return out
