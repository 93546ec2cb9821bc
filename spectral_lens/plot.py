"""Figures of the analyses (matplotlib is an optional extra: ``pip install 'spectral-lens[plot]'``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing here touches
the user's backend or global figure state; save with ``fig.savefig(path)``. Colors encode the batch
tier consistently across figures (small tiers dark, large tiers light).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .analysis.efficiency import LABEL_GRID, group_by_family, measurement_at_loss, percent
from .analysis.early import alpha_trajectory
from .analysis.tier_predictor import PredictionScore
from .analysis.windows import resolve_spectrum, resolve_window
from .analysis.taxonomy import LABELS, TaxonomyResult
from .atomic import write_atomic
from .records import RunRecord

if TYPE_CHECKING:  # annotations only: matplotlib is the optional plot extra, imported where a figure is drawn
    from matplotlib.figure import Figure

__all__ = [
    "require_matplotlib",
    "plot_spectra",
    "plot_loss_curves",
    "plot_gradient_spectra",
    "plot_alpha_trajectories",
    "plot_early_vs_eps",
    "plot_gain_plane",
    "label_offsets",
    "save_figure",
]


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary file, fsync, rename), in the format of the
    file's suffix (``.png`` by default); returns the path. The figure is left open."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    write_atomic(path, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi))
    return path


def require_matplotlib():
    """Import matplotlib or raise an ``ImportError`` that names the ``plot`` extra."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "spectral-lens plotting needs matplotlib, an optional extra: pip install 'spectral-lens[plot]'"
        ) from None
    return Figure


def _tier_colors(runs: Iterable[RunRecord]) -> dict[float, tuple]:
    from matplotlib import colormaps

    tiers = sorted({r.info.batch_tier for r in runs if r.info.batch_tier is not None})
    cmap = colormaps["viridis"]
    n = max(len(tiers) - 1, 1)
    return {t: cmap(0.9 * i / n) for i, t in enumerate(tiers)}


def _tier_label(t) -> str:
    if t is None:
        return "B=?"
    return f"B={int(t)}" if float(t).is_integer() else f"B={t:g}"


def label_offsets(
    anchors: Sequence[tuple[float, float]],
    labels: Sequence[str],
    *,
    height: float = math.inf,
    fontsize: float = 7.0,
    gap: tuple[float, float] = (5.0, 3.0),
) -> list[tuple[float, float]]:
    """Offsets ``(dx, dy)`` in points (an annotation's ``xytext``) that keep point labels apart.

    ``anchors``: the labeled points in points from the axes' lower-left corner; ``height``: the axes'
    height in points. Each label is taken as a box ``0.6 * fontsize`` per character wide and
    ``1.25 * fontsize`` tall, placed ``gap`` right of and above its point. In the given order, a label
    whose box overlaps one already placed moves a line down, then up, two lines down, ... to the
    nearest free place that stays inside the axes (the nearest free place at all, if none does), so
    the labels of coinciding or nearly coinciding points (two tiers with the same early statistic and
    eps_tok) are stacked instead of printed over each other.
    """
    line = 1.25 * fontsize
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), text in zip(anchors, labels):
        w = 0.6 * fontsize * max(len(text), 1)
        x0 = x + gap[0]
        reach = len(placed) + 1  # the moves: gap[1], then 1 .. reach lines down and up, alternating
        # the moves a placed box blocks; a box one line tall blocks at most two, found from its height
        # and then checked with the same comparisons as every move (so n labels cost O(n^2), not O(n^3))
        blocked = set()
        for bx0, by0, bx1, by1 in placed:
            if not (x0 < bx1 and bx0 < x0 + w):
                continue
            for j in _moves_near(by0, by1, y, gap[1], line, reach):
                dy = _move(gap[1], j, line)
                # boxes that only touch (one line apart) do not overlap: compared with a margin of 1e-6 pt
                if y + dy < by1 - 1e-6 and by0 < y + dy + line - 1e-6:
                    blocked.add(j)
        first = inside = None
        for j in itertools.chain((0,), (sign * k for k in range(1, reach + 1) for sign in (-1, 1))):
            if j in blocked:
                continue
            dy = _move(gap[1], j, line)
            if first is None:
                first = dy
                if dy == gap[1]:
                    break
            if 0.0 <= y + dy and y + dy + line <= height:
                inside = dy
                break
        dy = first if first == gap[1] or inside is None else inside
        placed.append((x0, y + dy, x0 + w, y + dy + line))
        out.append((gap[0], dy))
    return out


def _move(base: float, j: int, line: float) -> float:
    """The offset ``j`` lines from ``base`` (``j < 0``: down), as :func:`label_offsets` tries it."""
    return base if j == 0 else base + j * line


def _moves_near(by0: float, by1: float, y: float, base: float, line: float, reach: int) -> range:
    """The moves ``j`` (``|j| <= reach``) whose box could overlap the placed box ``[by0, by1]`` in height,
    one more either side for rounding; all of them where the geometry is not finite."""
    if line > 0:
        lo, hi = (by0 - line - y - base) / line, (by1 - y - base) / line
        if math.isfinite(lo) and math.isfinite(hi):
            return range(max(-reach, math.floor(lo) - 1), min(reach, math.ceil(hi) + 1) + 1)
    return range(-reach, reach + 1)


def _grid(Figure, n: int, width: float = 5.2, height: float = 4.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _sorted_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return sorted(runs, key=lambda r: (r.info.batch_tier is None, r.info.batch_tier or 0, r.run_id))


def plot_spectra(
    runs: Sequence[RunRecord],
    target_loss: float | None = None,
    *,
    spectrum: str | None = None,
    window: tuple[int, int] | None = None,
) -> "Figure":
    """Trace-normalized spectra overlaid per family, at matched loss (paper Fig. 1a).

    Each run contributes its measurement at ``target_loss``
    (:func:`~spectral_lens.analysis.measurement_at_loss`: its first measurement with
    ``val_loss <= target_loss``, or, for measurements recorded without a loss, the first at or past the
    tokens where its logged validation loss reaches the target; runs that never reach it are listed in
    the panel as "not reached", runs without measurements as "no measurements"); without a target, its
    last measurement. The
    tail window is shaded. Under each family's log-log panel, a second panel shows every spectrum
    divided by the family's geometric-mean spectrum, where differences of a few percent that the
    log-log view hides become visible.
    """
    Figure = require_matplotlib()
    fams = group_by_family(runs)
    n = len(fams)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.4 * cols, 5.6 * rows), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(rows, cols, squeeze=False).ravel())
    colors = _tier_colors(runs)
    for sf in subfigs[n:]:
        sf.set_visible(False)
    for sf, (family, members) in zip(subfigs, fams.items()):
        ax, rax = sf.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
        missing, curves = [], []
        win = None
        for run in _sorted_runs(members):
            if not run.measurements:  # e.g. stopped before its first measurement: listed, not fatal
                missing.append(f"{_tier_label(run.info.batch_tier)} (no measurements)")
                continue
            name = resolve_spectrum(run, spectrum)
            win = resolve_window(run, window)
            if target_loss is not None:
                m = measurement_at_loss(run, target_loss, spectrum=name)
            else:
                m = max(run.measurements, key=lambda x: x.tokens) if run.measurements else None
            if m is None or name not in m.spectra:
                missing.append(_tier_label(run.info.batch_tier))
                continue
            loss = f", loss {m.val_loss:.3f}" if m.val_loss is not None else ""
            curves.append((run, m.spectra[name].normalized.numpy(), f"{_tier_label(run.info.batch_tier)} (step {m.step}{loss})"))
        for run, p, label in curves:
            ranks = np.arange(1, p.size + 1)
            keep = p > 0
            ax.loglog(ranks[keep], p[keep], color=colors.get(run.info.batch_tier), lw=1.4, label=label)
        if curves:
            k = min(int(np.count_nonzero(p > 0)) for _, p, _ in curves)
            ref = np.exp(np.mean([np.log(p[:k]) for _, p, _ in curves], axis=0))
            for run, p, _ in curves:
                rax.semilogx(np.arange(1, k + 1), p[:k] / ref, color=colors.get(run.info.batch_tier), lw=1.2)
        rax.axhline(1.0, color="0.5", lw=0.8)
        for a in (ax, rax):
            if win is not None:
                a.axvspan(win[0], win[1], color="0.85", zorder=0, label=f"tail window [{win[0]}, {win[1]}]" if a is ax else None)
            a.grid(True, which="major", alpha=0.3)
        where = f"first checkpoint with val loss ≤ {target_loss:g}" if target_loss is not None else "last checkpoint"
        ax.set_title(f"{family}: spectra at {where}", fontsize=10)
        ax.set_ylabel("normalized eigenvalue  p_j = λ_j / Σλ")
        rax.set_ylabel("p_j / family\ngeometric mean")
        rax.set_xlabel("rank j")
        if missing:
            ax.text(0.02, 0.02, "not reached: " + ", ".join(missing), transform=ax.transAxes, fontsize=8, color="0.3")
        ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_loss_curves(runs: Sequence[RunRecord], target_loss: float | None = None) -> "Figure":
    """Validation loss against tokens (log x), one panel per family, one line per run.

    Training loss from ``log.jsonl`` (``train_loss``), when recorded, is drawn thin and dashed in the
    same color (labelled with its tier when the run has no validation loss, as a Trainer run without
    evaluation); ``target_loss`` as a horizontal line.
    """
    Figure = require_matplotlib()
    fams = group_by_family(runs)
    fig, axes = _grid(Figure, len(fams))
    colors = _tier_colors(runs)
    for ax, (family, members) in zip(axes, fams.items()):
        drawn = False
        for run in _sorted_runs(members):
            c = colors.get(run.info.batch_tier)
            train = [(e["tokens"], float(e["train_loss"])) for e in run.events
                     if e.get("train_loss") is not None and e["tokens"] > 0]
            tokens, losses = run.val_curve()
            keep = tokens > 0
            if train:  # labelled only when the run has no validation curve to carry its label
                t, l = zip(*sorted(train))
                ax.plot(t, l, color=c, lw=0.8, ls="--", alpha=0.6,
                        label=None if keep.any() else _tier_label(run.info.batch_tier) + " (training)")
                drawn = True
            if keep.any():
                ax.plot(tokens[keep], losses[keep], color=c, lw=1.5, label=_tier_label(run.info.batch_tier))
                drawn = True
        if target_loss is not None:
            ax.axhline(target_loss, color="0.3", ls=":", lw=1, label=f"target {target_loss:g}")
        if drawn:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(f"{family}: loss (solid: validation, dashed: training)", fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.grid(True, which="major", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, ncol=2)
    return fig


def plot_gradient_spectra(runs: Sequence[RunRecord], target_loss: float | None = None) -> "Figure":
    """Trace-normalized per-sample gradient spectra (``s_j^2``), overlaid per family.

    Each run contributes its first gradient spectrum (the first name of kind ``"gradient"`` it
    recorded) at its measurement at ``target_loss`` (as in :func:`plot_spectra`) or, without a target
    or when it never reaches it, at its last measurement. Raises ``ValueError`` when no run recorded one.
    """
    Figure = require_matplotlib()
    if not any(r.spectrum_names("gradient") for r in runs):
        raise ValueError("no run recorded a gradient spectrum")
    fams = group_by_family(runs)
    fig, axes = _grid(Figure, len(fams))
    colors = _tier_colors(runs)
    for ax, (family, members) in zip(axes, fams.items()):
        names = set()
        for run in _sorted_runs(members):
            grads = run.spectrum_names("gradient")
            if not grads:
                continue
            name = grads[0]
            with_grad = [m for m in run.measurements if name in m.spectra]
            m = None
            if target_loss is not None:
                m = measurement_at_loss(run, target_loss, spectrum=name)
            if m is None and with_grad:
                m = max(with_grad, key=lambda x: x.tokens)
            if m is None:
                continue
            p = m.spectra[name].normalized.numpy()
            keep = p > 0
            if not keep.any():
                continue
            names.add(name)
            ranks = np.arange(1, p.size + 1)
            ax.loglog(ranks[keep], p[keep], color=colors.get(run.info.batch_tier), lw=1.3,
                      label=f"{_tier_label(run.info.batch_tier)} (step {m.step})")
        title = ", ".join(sorted(names)) or "no gradient spectrum"
        ax.set_title(f"{family}: gradient spectrum {title}", fontsize=9)
        ax.set_xlabel("rank j")
        ax.set_ylabel("normalized s_j² / Σ s²")
        ax.grid(True, which="major", alpha=0.3)
        if names:
            ax.legend(fontsize=7)
    return fig


def plot_alpha_trajectories(
    runs: Sequence[RunRecord],
    *,
    fraction: float | None = 0.2,
    spectrum: str | None = None,
    window: tuple[int, int] | None = None,
) -> "Figure":
    """``alpha_tail`` against training progress, one panel per family, one line per run (runs without
    measurements are listed in the panel)."""
    Figure = require_matplotlib()
    fams = group_by_family(runs)
    fig, axes = _grid(Figure, len(fams))
    colors = _tier_colors(runs)
    for ax, (family, members) in zip(axes, fams.items()):
        win, empty, unfit, narrow = None, [], [], None
        for run in _sorted_runs(members):
            if not run.measurements:  # listed in the panel instead of failing the whole figure
                empty.append(_tier_label(run.info.batch_tier))
                continue
            win = resolve_window(run, window)
            prog, alpha, _ = alpha_trajectory(run, window=window, spectrum=spectrum)
            n_bad = int(np.isnan(alpha).sum())
            if n_bad:  # a gap in the line (a collapsed spectrum), named in the panel
                unfit.append(f"{_tier_label(run.info.batch_tier)} ({n_bad} of {alpha.size})")
            if n_bad and n_bad == alpha.size:  # no point at all: a window wider than the spectrum?
                size = _spectrum_size(run, spectrum)
                if size is not None and size < win[1]:
                    narrow = size if narrow is None else min(narrow, size)
            ax.plot(100 * prog, alpha, marker="o", ms=2.5, lw=1.3, color=colors.get(run.info.batch_tier),
                    label=_tier_label(run.info.batch_tier))
        if fraction is not None:
            ax.axvline(100 * fraction, color="0.4", ls="--", lw=1, label=f"early checkpoint ({percent(fraction, LABEL_GRID)})")  # as the report header says it
        ax.set_title(f"{family}: tail exponent during training", fontsize=10)
        ax.set_xlabel("training progress (% of token budget)")
        ax.set_ylabel(f"α_tail (ranks {win[0]}–{win[1]})" if win else "α_tail")
        ax.set_xlim(0, 100)
        said = (["no measurements: " + ", ".join(empty)] if empty else []) + (
            ["α_tail not fittable at checkpoints: " + ", ".join(unfit)] if unfit else []) + (
            [f"window [{win[0]}, {win[1]}] is wider than the spectrum ({narrow} eigenvalues):\n"
             f"pass --window LO HI with HI <= {narrow} (window= in Python)"] if narrow is not None else [])
        if said:
            ax.text(0.02, 0.02, "\n".join(said), transform=ax.transAxes, fontsize=8, color="0.3")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, alpha=0.3)
    return fig


def _spectrum_size(run: RunRecord, spectrum: str | None) -> int | None:
    """Eigenvalue count of the run's latest measured spectrum used for ``alpha_tail`` (None if none)."""
    name = resolve_spectrum(run, spectrum)
    for m in reversed(run.measurements):
        if name in m.spectra:
            spectra = m.spectra
            loaded = spectra.load(name) if hasattr(spectra, "load") else spectra[name]
            return int(loaded.values.numel())
    return None


def plot_early_vs_eps(score: PredictionScore, baseline: PredictionScore | None = None) -> "Figure":
    """Normalized early statistic against realized token inefficiency (paper Fig. 2).

    One panel for the tail predictor's ``score`` and, if given, one for a baseline's. Points are
    colored by family and labeled by tier; runs that never reached the target (``eps_tok = inf``)
    are drawn as triangles at the top edge; runs whose ``eps_tok`` is unknown (NaN: cut short before
    the target) are not drawn, as the score leaves them out.
    """
    Figure = require_matplotlib()
    from matplotlib import colormaps

    from .report import _rho  # a rho that rounds to zero keeps a digit, as in the report's text

    panels = [s for s in (score, baseline) if s is not None]
    fig = Figure(figsize=(5.6 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    families = sorted({p[1] for s in panels for p in s.points})
    cmap = colormaps["tab10"]
    fam_color = {f: cmap(i % 10) for i, f in enumerate(families)}
    names = {"alpha_tail": "early α_tail", "noise_scale_distance": "early |log(B / B_simple)| (noise-scale baseline)"}
    tops = []
    for ax, s in zip(axes, panels):
        finite = [p[4] for p in s.points if math.isfinite(p[4])]
        top = max(finite) * 1.08 if finite else 2.0
        tops.append(top)
        for fam in families:
            pts = [p for p in s.points if p[1] == fam]
            xs = [p[3] for p in pts if math.isfinite(p[4])]
            ys = [p[4] for p in pts if math.isfinite(p[4])]
            ax.scatter(xs, ys, color=fam_color[fam], s=36, label=fam, zorder=3)
            inf_x = [p[3] for p in pts if math.isinf(p[4])]  # never reached; NaN (cut short: unknown) not drawn
            if inf_x:
                ax.scatter(inf_x, [top] * len(inf_x), marker="^", color=fam_color[fam], s=40, zorder=3)
        label = names.get(s.statistic, s.statistic)
        ax.set_xlabel(f"{label.split(' (')[0]}, min-max normalized per family")
        ax.set_ylabel("token inefficiency ε_tok = T(B) / min T")
        rho = f"ρ_S = {_rho(s.rho)} (p = {s.pvalue:.2g}, n = {s.n})" if math.isfinite(s.rho) else "ρ_S undefined"
        within = f"; within-family mean {_rho(s.mean_within_rho)}" if len(s.within) > 1 and math.isfinite(s.mean_within_rho) else ""
        # the triangles' key goes in the title: inside the axes it covered a never-reached run of the family's
        # smallest statistic, which is drawn at the top-left corner
        never = "\n▲ at the top edge: target not reached" if any(math.isinf(p[4]) for p in s.points) else ""
        ax.set_title(f"{label} vs ε_tok\npooled {rho}{within}{never}", fontsize=9)
        ax.set_xlim(-0.08, 1.12)
        # eps_tok >= 1 by definition: keep 1 in view and a visible span even for one run (or all equal)
        ax.set_ylim(min(0.97, min(finite, default=1.0) - 0.03), max(top, 1.1) + (0.04 if any(math.isinf(p[4]) for p in s.points) else 0))
        if s.n < 2:
            ax.text(0.5, 0.5, "one run: nothing to rank" if s.n == 1 else "no run with a known ε_tok: nothing to rank", transform=ax.transAxes, ha="center", fontsize=8, color="0.4")
        ax.grid(True, alpha=0.3)
        if len(families) > 1:
            ax.legend(fontsize=7, title="family", title_fontsize=7)
    fig.draw_without_rendering()  # the layout: where each point lands, in points, for the labels
    for ax, s, top in zip(axes, panels, tops):
        box = ax.get_window_extent()
        pts = [p for p in s.points if math.isfinite(p[3]) and not math.isnan(p[4])]
        xy = [(p[3], p[4] if math.isfinite(p[4]) else top) for p in pts]
        scale = 72.0 / fig.dpi
        anchors = [((u - box.x0) * scale, (v - box.y0) * scale) for u, v in ax.transData.transform(xy)] if xy else []
        texts = [_tier_label(p[2]) for p in pts]
        for p, at, text, off in zip(pts, xy, texts, label_offsets(anchors, texts, height=box.height * scale)):
            ax.annotate(text, at, fontsize=7, color=fam_color[p[1]] if len(families) > 1 else "black",
                        xytext=off, textcoords="offset points")
    return fig


_LABEL_COLORS = dict(zip(LABELS, ["tab:blue", "tab:purple", "tab:orange", "tab:red", "tab:gray", "tab:olive", "black", "tab:brown"]))


def plot_gain_plane(results: Sequence[TaxonomyResult]) -> "Figure":
    """Transitions on the log-gain plane (paper Fig. 3a): ``g_thr`` across, ``g_tok`` up, colored by label.

    The band ``|g| < gain_threshold`` (no clear change) is shaded.
    """
    Figure = require_matplotlib()
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    ax = fig.subplots()
    g = results[0].thresholds["gain_threshold"] if results else 0.02
    xs = [r.evidence.g_thr for r in results]
    ys = [r.evidence.g_tok for r in results]
    finite = [abs(v) for v in xs + ys if math.isfinite(v)]
    lim = max(finite + [2 * g]) * 1.25
    ax.axhspan(-g, g, color="0.92", zorder=0)
    ax.axvspan(-g, g, color="0.92", zorder=0)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(0, color="0.5", lw=0.8)
    seen = set()
    for r, x, y in zip(results, xs, ys):
        x = x if math.isfinite(x) else 0.0
        y = y if math.isfinite(y) else 0.0
        ax.scatter([x], [y], color=_LABEL_COLORS.get(r.label, "k"), s=50, zorder=3,
                   label=r.label if r.label not in seen else None)
        seen.add(r.label)
        ax.annotate(f"{r.evidence.a}→{r.evidence.b}", (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("throughput gain  g_thr = log(Q(b) / Q(a))")
    ax.set_ylabel("token gain  g_tok = log(T(a) / T(b))")
    ax.set_title(f"Transitions on the gain plane (shaded: |g| < {g:g}, no clear change)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)
    return fig
