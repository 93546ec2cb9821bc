"""Self-contained reports of a set of runs: Markdown or HTML, with PNG figures when matplotlib is there.

:func:`build_report` gathers the analyses (tokens-to-target, ``eps_tok``, throughput, early tail
prediction and its score, the noise-scale baseline, taxonomy of given transitions), renders them as
tables and figures, and writes ``report.md`` or ``report.html`` (figures embedded as base64 PNG, and
also written next to it). Without matplotlib it writes a Markdown/HTML report with tables only and
says so.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .analysis.efficiency import (COMPLETE_COVERAGE, LABEL_GRID, SweepWarning, coverage, divergence, ended, failure,
                                  group_by_family, percent, pick_learning_rates, reached_at_first_evaluation,
                                  token_inefficiency, tokens_to_target)
from .analysis.noise_predictor import NoiseScalePredictor
from .analysis.ranking import TierRanking, close_call
from .analysis.tail import TailPredictor
from .analysis.tier_predictor import PredictionScore
from .analysis.windows import SpectrumMismatchError, common_spectra, common_windows
from .analysis.taxonomy import TaxonomyResult, TransitionClassifier, replicate_evidence
from ._progress import progress_bar
from .atomic import write_text_atomic
from .records import RunRecord, open_runs

__all__ = ["Report", "build_report", "score_flags", "target_flags", "ranking_flags", "transition_flags", "sweep_notes", "run_status", "MIN_TIERS", "MAX_PVALUE"]

#: Fewer runs than this in a family (runs with a known ``eps_tok``, as the rho counts them: seeds of one tier count
#: each) and its Spearman rho is flagged as underpowered.
MIN_TIERS = 4
#: A p-value above this and the rho is flagged as underpowered.
MAX_PVALUE = 0.1
#: Every figure file a report may write; an earlier report's that this one did not draw are removed.
_FIGURE_FILES = ("loss.png", "spectra.png", "alpha_tail.png", "gradient_spectra.png", "early_alpha_vs_eps.png",
                 "gain_plane.png")


def score_flags(score: PredictionScore, statistic: str = "early α_tail") -> list[str]:
    """Plain-words cautions about a :class:`PredictionScore`, one sentence per problem.

    Per family: a negative rho (the early statistic ordered the tiers the wrong way round), and an
    underpowered one (fewer than :data:`MIN_TIERS` runs with a known ``eps_tok``, or p > :data:`MAX_PVALUE`); an undefined
    rho (fewer than 3 runs or constant values) is said too.
    """
    out = []
    for family, w in score.within.items():
        where = f"family {family}" if family else "these runs"
        if not math.isfinite(w.rho):
            out.append(f"{where}: the correlation is undefined ({w.n} run(s) with a known eps_tok, or constant values): "
                       "nothing to rank.")
            continue
        if w.rho < 0:
            out.append(
                f"{where}: ρ = {_rho(w.rho)} is negative: a flatter early tail went with MORE tokens to the target, "
                f"the opposite of what the predictor assumes; do not trust its recommendation here."
            )
        reasons = []
        if w.n < MIN_TIERS:
            reasons.append(f"only {w.n} runs (fewer than {MIN_TIERS})")
        if math.isfinite(w.pvalue) and w.pvalue > MAX_PVALUE:
            reasons.append(f"p = {w.pvalue:.2g} > {MAX_PVALUE}")
        if reasons:
            out.append(
                f"{where}: underpowered ({', '.join(reasons)}): a ρ of {_rho(w.rho)} could be chance; "
                f"treat the {statistic} ranking as a guess, not evidence."
            )
    return out


def _rho(v: float) -> str:
    """A rho in a caution: two decimals, but a nonzero one that rounds to zero keeps one significant digit
    (``ρ = -0.00 is negative`` read as a contradiction; ``-0.004`` is what it is)."""
    text = f"{v:.2f}"
    return "0.00" if v == 0 else text if float(text) != 0 else f"{v:.1g}"


def target_flags(runs: Iterable[RunRecord], target_loss: float) -> list[str]:
    """A caution per family whose runs (two or more: the runs scored) all reached ``target_loss`` at
    their first evaluation (:func:`~spectral_lens.analysis.efficiency.reached_at_first_evaluation`):
    their ``T`` is where each was first evaluated, their ``eps_tok`` compares evaluation spacings, and
    the score means nothing."""
    out = []
    for family, members in group_by_family(runs).items():
        if len(members) > 1 and all(reached_at_first_evaluation(r, target_loss) for r in members):
            where = f"family {family}" if family else "these runs"
            out.append(f"{where}: every run ({len(members)}) reached val loss {target_loss:g} at its first evaluation: "
                       "T is only where each run was first evaluated and eps_tok compares evaluation spacings, so "
                       "the score means nothing here; choose a lower target loss.")
    return out


def ranking_flags(rankings: dict[str, TierRanking]) -> list[str]:
    """A caution per family whose recommended tier is not clearly the likeliest best
    (:func:`~spectral_lens.analysis.ranking.close_call`: another tier's P(best) is larger, or within
    Monte Carlo error)."""
    return [c for c in map(close_call, rankings.values()) if c is not None]


@contextlib.contextmanager
def sweep_notes(notes: list[str]):
    """Collect the :class:`~spectral_lens.analysis.SweepWarning` lines emitted inside the block (runs
    left out of a ranking or score, runs of a family that differ) into ``notes``, each once; every
    other warning is shown as usual when the block ends."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SweepWarning)
        try:
            yield notes
        finally:
            others = []
            for w in caught:
                text = " ".join(str(w.message).split())
                if issubclass(w.category, SweepWarning):
                    if text not in notes:
                        notes.append(text)
                else:
                    others.append(w)
    for w in others:  # after the block: the caller's warning display (the CLI's one-line warnings)
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run_status(run: RunRecord) -> str:
    """``"diverged"`` (the logged losses end NaN or infinite), ``"failed (TYPE) at N% of budget"`` (its
    ``with RunWriter`` block ended with that exception, :func:`~spectral_lens.analysis.failure`),
    ``"ends at N% of budget"`` (the records end before
    :data:`~spectral_lens.analysis.COMPLETE_COVERAGE` of the token budget: preempted, or still running),
    ``"complete"``, or ``"–"`` when the budget is unknown."""
    if divergence(run) is not None:
        return "diverged"
    c = coverage(run)
    if failure(run) is not None:
        why = run.info.extras.get("failure")  # text, as failure() reads it: "TYPE: first line of the message"
        kind = why.split(":", 1)[0].strip() if isinstance(why, str) else ""
        return "failed" + (f" ({kind})" if kind else "") + ("" if c is None else f" at {percent(c)} of budget")
    if c is None:
        return "–"
    return "complete" if c >= COMPLETE_COVERAGE else f"ends at {percent(c)} of budget"


def _target_cell(run: RunRecord, T: float) -> str:
    """The runs table's T cell: tokens to the target; for a run that has not reached it, "not reached"
    when it never will (it ended or diverged), "not reached (failed)" when its block failed short of its
    budget (:func:`~spectral_lens.analysis.failure`: cut short; its status says where), else "not reached
    yet" (it may still be running)."""
    if T == math.inf and not ended(run) and divergence(run) is None:
        return "not reached (failed)" if failure(run) is not None else "not reached yet"
    return _num(T, ".4g")


@dataclass
class Report:
    """What :func:`build_report` wrote and computed.

    Attributes:
        path: the report file.
        figures: PNG files written (empty without matplotlib).
        rankings: family -> :class:`TierRanking` of the tail predictor (empty if it could not run).
        score: the tail predictor's :class:`PredictionScore` (``None`` without a target loss).
        baseline_rankings, baseline_score: the same for the noise-scale baseline (when available).
        taxonomy: one :class:`TaxonomyResult` per requested transition.
        flags: plain-words cautions about the prediction score (:func:`score_flags`, :func:`target_flags`),
            then about the rankings (:func:`ranking_flags`: a toss-up between the top tiers), then about the
            transitions (:func:`transition_flags`: two runs of different batch tiers).
        notes: what was skipped and why.
    """

    path: Path
    figures: list[Path] = field(default_factory=list)
    rankings: dict[str, TierRanking] = field(default_factory=dict)
    score: PredictionScore | None = None
    baseline_rankings: dict[str, TierRanking] = field(default_factory=dict)
    baseline_score: PredictionScore | None = None
    taxonomy: list[TaxonomyResult] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_nan(v: Any) -> bool:
    """An ``eps_tok`` that is not known (NaN: the run has not reached the target and has not ended): the table
    says ``unknown``, as ``spectral-lens predict`` does (``–``: no value at all)."""
    return isinstance(v, float) and math.isnan(v)


#: From this magnitude on, a fixed-point spec (".4f") formats as its "g" form: ".4f" of 1e300 wrote 305 characters.
_FIXED_LIMIT = 1e9


def _as_float(v: Any) -> Any:
    """``v`` as a Python float when it is a real, non-integer number (a NumPy ``float32`` is not a ``float``:
    the checks below missed it; a 0-d NumPy array or torch tensor is read as its one value), else ``v``."""
    if getattr(v, "ndim", None) == 0 and callable(getattr(v, "item", None)):
        v = v.item()
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) else v


def _plain(v: Any, fmt: str) -> str:
    """``format(v, fmt)`` of a number, without the sign of a value that rounds to zero (a flat spectrum's
    alpha is ``-0.0``: ``"-0.0000"`` read as a negative value) and, for a huge value and a fixed-point ``fmt``,
    in the ``"g"`` form at the same precision (``1e+300``, not 300 digits)."""
    v = _as_float(v)
    if isinstance(v, float) and math.isfinite(v):
        if fmt.endswith("f") and abs(v) >= _FIXED_LIMIT:
            fmt = fmt[:-1] + "g"
        with contextlib.suppress(ValueError):  # a spec with a suffix ("%") is left as formatted
            if float(format(v, fmt)) == 0:
                v = 0.0
    return format(v, fmt)


def _num(v: Any, fmt: str = ".4g") -> str:
    v = _as_float(v)
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "not reached" if v > 0 else "-inf"
    return _plain(v, fmt)


def _tier(t) -> str:
    """A batch tier as text: ``8``, ``0.5``; a huge one (finite in run.json) ``1e+300``, not 301 digits."""
    return "?" if t is None else (str(int(t)) if float(t).is_integer() and abs(t) < 1e15 else f"{t:g}")


class _Doc:
    """A tiny block model rendered to Markdown or HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def fig(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                esc = lambda c: c.replace("|", "\\|")  # noqa: E731
                out.append("| " + " | ".join(map(esc, b[1])) + " |")
                out.append("|" + "|".join("---" for _ in b[1]) + "|")
                out.extend("| " + " | ".join(map(esc, r)) + " |" for r in b[2])
            elif b[0] == "fig":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}*")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{e(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
            "img{max-width:100%}figcaption{font-style:italic;color:#444}code{background:#f6f6f6}</style>",
            "</head><body>",
        ]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in b[1]) + "</tr>")
                out.extend("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append("</table>")
            elif b[0] == "fig":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
                out.append(  # data-file: the PNG written beside it (a later report in out may remove it)
                    f'<figure data-file="{e(Path(b[1]).name)}"><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(b[2])}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def transition_flags(pairs) -> list[str]:
    """A one-line caution per transition ``(run_a, run_b)`` whose runs are of different batch tiers
    (``RunInfo.batch_tier``): its token and throughput gains then mix the batch size's effect with the
    change's (the paper classifies transitions between variants at one tier, B = 8), and a tier step of one
    variant is no architectural transition at all. Runs without a tier are not judged."""
    from .analysis.efficiency import _tier_text

    out = []
    for a, b in pairs:
        ta, tb = a.info.batch_tier, b.info.batch_tier
        if ta is not None and tb is not None and ta != tb:
            out.append(f"transition {a.run_id} -> {b.run_id}: the runs are of batch tiers {_tier_text(ta)} and "
                       f"{_tier_text(tb)}, so its gains mix the batch size's effect with the change's (the paper "
                       "classifies transitions between variants at one tier); compare runs of one batch tier")
    return out


_TRANSITION_KEY = (
    "Each row is a transition a → b (b: the changed variant). TokGain = T(a)/T(b) - 1, with T the training tokens "
    "at the first validation checkpoint with val loss <= {target:g}: +0.10 means a needed 10% more tokens than b, so b "
    "learned faster. ThrGain = Q(b)/Q(a) - 1, with Q the median logged training throughput in tokens/s: +0.10 means "
    "b is 10% faster. The rules compare the log gains g_tok = log(1 + TokGain), g_thr = log(1 + ThrGain) with "
    "gain_threshold. Δα_head, Δα_grad: change (b - a) of the power-law exponent of the activation spectrum's head "
    "window and of the gradient spectrum, each run's measured at matched loss (its first measurement at val loss "
    "<= {target:g}); JSD: Jensen-Shannon divergence of the two normalized spectra (0 = same "
    "shape). act_score / grad_score in the rule text are these moves in units of their thresholds (>= 1: a clear move)."
)
"""The taxonomy section's key: what each column of its table means (units, signs)."""


def build_report(
    runs: Sequence[RunRecord | str | os.PathLike],
    out: str | os.PathLike,
    *,
    fmt: str = "md",
    target_loss: float | None = None,
    fraction: float = 0.2,
    window: tuple[int, int] | None = None,
    spectrum: str | None = None,
    transitions: Sequence[tuple[str, str]] = (),
    classifier: TransitionClassifier | None = None,
    replicates: Sequence[RunRecord | str | os.PathLike] = (),
    plots: bool = True,
    title: str = "spectral-lens report",
    progress: bool | None = None,
) -> Report:
    """Write a report of ``runs`` into directory ``out``; returns a :class:`Report`.

    Args:
        runs: run records or directories (a sweep root expands to its runs).
        out: output directory (created). Figure files of an earlier report there that this one does
            not draw (``gain_plane.png`` without transitions, all of them with ``plots=False``) are
            removed, so every figure the earlier report showed belongs to this one. Only figure files
            that an earlier ``report.md`` / ``report.html`` in ``out`` links are ever removed; other
            files (a ``loss.png`` of your own included) are left alone.
        fmt: ``"md"`` (``report.md`` + PNG files) or ``"html"`` (``report.html`` with the PNGs
            embedded; the PNG files are written too).
        target_loss: target validation loss for ``T``, ``eps_tok``, the prediction score, the
            matched-loss spectra and the taxonomy. Without it those parts are skipped (noted).
        fraction, window, spectrum: the early measurement of :class:`TailPredictor`.
        transitions: pairs of run ids ``(a, b)`` to place on the gain plane and classify.
        classifier: thresholds for the taxonomy (default :class:`TransitionClassifier()`).
        replicates: runs of one configuration that differ only in the seed: the taxonomy's
            thresholds are then set from their seed noise
            (:meth:`~spectral_lens.analysis.TransitionClassifier.from_replicates`, margin 2). Not
            together with ``classifier``; needs ``target_loss``.
        plots: draw figures (needs matplotlib, the ``plot`` extra): loss curves, activation spectra,
            α_tail trajectories, gradient spectra (when recorded), the prediction score, the gain plane.
        progress: a progress bar over the figures (``None`` = on in a terminal, off in CI / non-TTY).

    The tail window is each run's recorded one unless ``window`` is given; runs of a family that
    recorded different windows raise :class:`~spectral_lens.analysis.WindowMismatchError`.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"fmt must be 'md' or 'html', got {fmt!r}")
    if replicates and classifier is not None:
        raise ValueError("build_report: give classifier or replicates, not both")
    records = open_runs(runs)
    if not records:
        raise ValueError("build_report: no runs given")
    by_id = {r.run_id: r for r in records}
    for a, b in transitions:  # checked with or without a target loss: a typo is an error, not a skipped table
        for x in (a, b):
            if x not in by_id:
                raise ValueError(f"transition {a}->{b}: no run with id {x!r}; run ids: {sorted(by_id)}")
    seeds = open_runs(replicates) if replicates else []
    windows = common_windows(records, window)  # runs that disagree fail here, not as a skipped figure
    try:  # so do runs of a family measured at different layers
        common_spectra(records, spectrum)
    except SpectrumMismatchError:
        raise
    except ValueError:  # no usable spectrum at all: the tail predictor's note says why
        pass
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(path=out / f"report.{fmt}")
    doc = _Doc()
    doc.h(1, title)
    fams = sorted({r.info.family or "(no family)" for r in records})
    doc.p(
        f"{len(records)} run{'' if len(records) == 1 else 's'} in {len(fams)} "
        f"famil{'y' if len(fams) == 1 else 'ies'} ({', '.join(fams)}). "
        + (f"Target validation loss {target_loss:g}. " if target_loss is not None else "No target loss given: "
           "tokens-to-target, eps_tok, the prediction score and the taxonomy are skipped (pass --target-loss). ")
        + f"Early checkpoint at {percent(fraction, LABEL_GRID)} of the token budget. α_tail window"
        + (f" (given): ranks {list(window)}." if window is not None else
           " (recorded by each run): " + ", ".join(f"{f or '(no family)'} ranks {list(w)}" for f, w in windows.items()) + ".")
    )
    want_plots = plots and _matplotlib_available()
    if plots and not want_plots:
        report.notes.append("matplotlib is not installed: tables only (pip install 'spectral-lens[plot]' for figures)")

    # ---- prediction --------------------------------------------------------------------------
    # runs left out of a ranking or score (diverged, cut short) and runs of a family that differ are notes
    def fitted(predictor, what: str):
        """``(predictor, its rankings)`` fitted on ``records``, or ``(None, {})`` with a note saying why not."""
        with sweep_notes(report.notes):
            try:
                return predictor, predictor.fit(records).predict()
            except ValueError as exc:
                report.notes.append(f"{what} not run: {exc}")
                return None, {}

    pred, report.rankings = fitted(TailPredictor(fraction, window=window, spectrum=spectrum), "tail predictor")
    base, report.baseline_rankings = fitted(NoiseScalePredictor(fraction), "noise-scale baseline")
    eps = {}
    if target_loss is not None:
        with sweep_notes(report.notes):
            eps = token_inefficiency(pick_learning_rates(records)[0], target_loss)  # a tier's best rate only
        if pred is not None:
            report.score = pred.score(targets=eps)
        if base is not None:
            report.baseline_score = base.score(targets=eps)

    # ---- runs table ----------------------------------------------------------------------------
    doc.h(2, "Runs")
    early = {s.run_id: s for s in (pred.statistics_ if pred is not None else [])}
    rows = []
    # the windows fitted, else (the tail predictor failed) the ones it tried: the header names one, or each cell its own
    tried = {tuple(s.window) for s in early.values()} or ({tuple(window)} if window is not None else set(windows.values()))
    one_window = len(tried) <= 1
    for r in sorted(records, key=lambda r: (r.info.family or "", r.info.batch_tier or 0, r.run_id)):
        _, losses = r.val_curve()
        T = tokens_to_target(r, target_loss) if target_loss is not None else None
        s = early.get(r.run_id)
        rows.append([
            r.run_id, r.info.family or "–", _tier(r.info.batch_tier), len(r.measurements),
            _num(float(losses[-1]) if losses.size else None),
            _target_cell(r, T) if T is not None else "–",
            ("unknown" if _is_nan(eps.get(r.run_id)) else _num(eps.get(r.run_id), ".3f")) if eps else "–",
            _num(r.throughput(), ".4g"),
            (f"{_num(s.value, '.3f')} ± {_num(s.sigma, '.2g')}" + ("" if one_window else f" (ranks {tuple(s.window)})"))
            if s else ("left out (see notes)" if pred is not None and r.run_id in pred.excluded_ else "–"),
            run_status(r),
        ])
    win_txt = f" ranks {next(iter(tried))}" if len(tried) == 1 else ""
    doc.table(
        ["run", "family", "tier", "measurements", "final val loss", "T (tokens to target)", "eps_tok",
         "Q (tokens/s)", f"early α_tail{win_txt}", "status"],
        rows,
    )

    # ---- prediction tables ---------------------------------------------------------------------
    if report.rankings:
        doc.h(2, "Early prediction of the token-efficient tier")
        doc.p(
            "Tiers ordered by early α_tail (flatter tail = predicted more token-efficient). "
            "σ is the checkpoint-to-checkpoint jitter of α_tail near the early checkpoint; "
            "P(best) is the probability that a tier has the smallest true α_tail under that uncertainty."
        )
        for family, rk in report.rankings.items():
            doc.h(3, f"{family}: one tier ({_tier(rk.recommended)}): nothing to rank" if len(rk.tiers) == 1 else
                  f"{family}: recommended tier {_tier(rk.recommended)} (P(best) = {_num(rk.p_recommended, '.2f')})")
            b_rk = report.baseline_rankings.get(family)
            rows = []
            for i, t in enumerate(rk.tiers, 1):
                row = [i, _tier(t), _num(rk.values[t], ".4f"), _num(rk.sigmas[t], ".2g"), _num(rk.p_best[t], ".3f")]
                if b_rk is not None:
                    row.append(b_rk.tiers.index(t) + 1 if t in b_rk.tiers else "–")
                if eps:
                    row.append(", ".join(_num(eps.get(rid), ".3f") for rid in rk.run_ids[t]))
                rows.append(row)
            headers = ["rank", "tier", "early α_tail", "σ", "P(best)"]
            if b_rk is not None:
                headers.append("noise-scale baseline rank")
            if eps:
                headers.append("realized eps_tok")
            doc.table(headers, rows)
            for c in ranking_flags({family: rk}):  # a toss-up between the top tiers: said where the ranking is
                doc.p("Caution: " + c)
    if report.score is not None:
        doc.h(2, "Score: does the early tail order realized token efficiency?")
        rows = [[f, _num(w.rho, ".3f"), _num(w.pvalue, ".3g"), w.n] for f, w in report.score.within.items()]
        rows.append(["pooled (per-family min-max normalized)", _num(report.score.rho, ".3f"),
                     _num(report.score.pvalue, ".3g"), report.score.n])
        doc.table(["family", "Spearman ρ (early α_tail vs eps_tok)", "p-value", "runs"], rows)
        if report.baseline_score is not None:
            bs = report.baseline_score
            doc.p(
                f"Noise-scale baseline (tier closest to the early gradient noise scale B_simple): pooled ρ = "
                f"{_num(bs.rho, '.3f')} (p = {_num(bs.pvalue, '.3g')}), within-family mean "
                f"{_num(bs.mean_within_rho, '.3f')}, against the tail predictor's "
                f"{_num(report.score.mean_within_rho, '.3f')}."
            )
        doc.p("p-values: exact permutation test (scipy.stats.permutation_test) for up to 8 runs, "
              "scipy.stats.spearmanr's t-approximation above.")
        scored = [by_id[p[0]] for p in report.score.points]
        report.flags = score_flags(report.score) + target_flags(scored, target_loss)
        if report.flags:
            doc.h(3, "Caution")
            for f in report.flags:
                doc.p("- " + f)
    elif report.baseline_score is not None:  # the tail predictor could not run (see the notes); the baseline did
        bs = report.baseline_score
        doc.h(2, "Score of the noise-scale baseline (the early-tail score is missing: see the notes)")
        rows = [[f, _num(w.rho, ".3f"), _num(w.pvalue, ".3g"), w.n] for f, w in bs.within.items()]
        rows.append(["pooled (per-family min-max normalized)", _num(bs.rho, ".3f"), _num(bs.pvalue, ".3g"), bs.n])
        doc.table(["family", "Spearman ρ (noise-scale tier vs eps_tok)", "p-value", "runs"], rows)
    report.flags += ranking_flags(report.rankings)  # shown under their ranking tables

    # ---- taxonomy -------------------------------------------------------------------------------
    if replicates and not transitions:
        report.notes.append("replicates given but no transitions (--transition A:B): nothing to classify")
    if transitions:
        if target_loss is None:
            report.notes.append("transitions given but no target loss: taxonomy skipped")
        else:
            if seeds:
                null = replicate_evidence(seeds, target_loss, activation=spectrum)
                clf = TransitionClassifier.from_replicates(null)
                source = (f"from the seed noise of {len(seeds)} replicas ({', '.join(r.run_id for r in seeds)}): "
                          f"twice the largest difference over {len(null)} null transition{'' if len(null) == 1 else 's'}")
            elif classifier is not None:
                clf, source = classifier, "given"
            else:
                clf, source = TransitionClassifier(), "defaults"
            for a, b in transitions:
                report.taxonomy.append(clf.classify_runs(by_id[a], by_id[b], target_loss, activation=spectrum))
            doc.h(2, "Taxonomy of transitions")
            doc.p(f"Thresholds ({source}): " + ", ".join(f"{k}={v:g}" for k, v in clf.thresholds.items()) + ".")
            doc.p(_TRANSITION_KEY.format(target=target_loss))
            rows = []
            for t in report.taxonomy:
                ev = t.evidence
                rows.append([f"{ev.a} → {ev.b}", t.label, _num(ev.tok_gain, "+.3f") if math.isfinite(ev.tok_gain) else "–",
                             _num(ev.thr_gain, "+.3f") if math.isfinite(ev.thr_gain) else "–",
                             _num(ev.d_alpha_head, "+.3f"), _num(ev.act_jsd, ".2g"), _num(ev.d_grad_alpha, "+.3f"),
                             _num(ev.grad_jsd, ".2g"), t.rule])
            doc.table(["transition", "label", "TokGain", "ThrGain", "Δα_head", "JSD act", "Δα_grad", "JSD grad", "rule"], rows)
            mixed = transition_flags([(by_id[a], by_id[b]) for a, b in transitions])
            for f in mixed:
                doc.p("Caution: " + f)
            report.flags += mixed

    # ---- figures --------------------------------------------------------------------------------
    if want_plots:
        from . import plot

        def save(fig, name: str, caption: str) -> None:
            path = plot.save_figure(fig, out / name)
            report.figures.append(path)
            doc.fig(path, caption)

        doc.h(2, "Figures")
        figures = [
            ("loss.png", "Loss against tokens (solid: validation, dashed: training)",
             lambda: plot.plot_loss_curves(records, target_loss)),
            ("spectra.png", "Normalized activation spectra at matched loss" if target_loss is not None
             else "Normalized activation spectra at the last checkpoint",
             lambda: plot.plot_spectra(records, target_loss, spectrum=spectrum, window=window)),
            ("alpha_tail.png", "α_tail during training; dashed: the early checkpoint",
             lambda: plot.plot_alpha_trajectories(records, fraction=fraction, spectrum=spectrum, window=window)),
            ("gradient_spectra.png", "Normalized per-sample gradient spectra at matched loss" if target_loss is not None
             else "Normalized per-sample gradient spectra at the last checkpoint",
             lambda: plot.plot_gradient_spectra(records, target_loss)),
        ]
        if report.score is not None:
            figures.append(("early_alpha_vs_eps.png",
                            "Early statistic (min-max normalized per family) against realized token inefficiency",
                            lambda: plot.plot_early_vs_eps(report.score, report.baseline_score)))
        if report.taxonomy:
            figures.append(("gain_plane.png", "Transitions on the log-gain plane",
                            lambda: plot.plot_gain_plane(report.taxonomy)))
        bar = progress_bar(len(figures), "report figures", progress, "fig")
        try:
            for name, caption, draw in figures:
                try:
                    save(draw(), name, caption)
                except ValueError as exc:
                    report.notes.append(f"figure {name} skipped: {exc}")
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    if report.notes:
        doc.h(2, "Notes")
        for n in report.notes:
            doc.p("- " + n)
    text = doc.markdown() if fmt == "md" else doc.html(title)
    earlier = _linked_figures(out)  # read before report.md / report.html is replaced
    write_text_atomic(report.path, text)
    written = {p.name for p in report.figures}
    for name in earlier - written:  # an earlier report's figures that this one did not draw would mislead
        (out / name).unlink(missing_ok=True)
    return report


def _linked_figures(out: Path) -> set[str]:
    """The figure files that an earlier report in ``out`` shows: its ``report.md``'s image links and
    its ``report.html``'s ``data-file`` names. Only those are ever removed, so a ``loss.png`` of the
    user's own in ``out`` is left alone."""
    names = set()
    for report_file in ("report.md", "report.html"):
        try:
            text = (out / report_file).read_text(encoding="utf-8", errors="replace")
        except OSError:  # none (or unreadable): nothing of it to remove
            continue
        names.update(n for n in _FIGURE_FILES if f"]({n})" in text or f'data-file="{n}"' in text)
    return names
