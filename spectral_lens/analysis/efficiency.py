"""Token efficiency, throughput gains and alignment of measurements across runs (paper Sec. 2.2, 5).

Pure functions on :class:`~spectral_lens.records.RunRecord` objects or plain arrays.

Definitions (protocol section 5):

* tokens-to-target ``T(B)``: training tokens consumed at the **first checkpoint** whose validation
  loss is ``<= target`` (equality counts as reached). ``math.inf`` when never reached.
* token inefficiency within a family: ``eps_tok(B) = T(B) / min_B' T(B')`` (1 for the best run).
* for a transition ``a -> b``: ``TokGain = T(a)/T(b) - 1``, ``ThrGain = Q(b)/Q(a) - 1`` and the
  log-gain coordinates ``g_tok = log(T(a)/T(b))``, ``g_thr = log(Q(b)/Q(a))``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

from .._warnings import SpectralLensWarning
from ..records import Measurement, RunRecord
from ..records.writer import COMPLETE_COVERAGE as _COMPLETE_COVERAGE
from ..records.writer import FAILED as _FAILED

__all__ = [
    "NO_FAMILY",
    "tokens_to_target",
    "reached_at_first_evaluation",
    "eps_tok",
    "token_inefficiency",
    "tok_gain",
    "thr_gain",
    "log_gains",
    "TransitionGains",
    "transition_gains",
    "Matched",
    "align",
    "matched_loss",
    "matched_tokens",
    "matched_fraction",
    "measurement_at_loss",
    "group_by_family",
    "SweepWarning",
    "COMPLETE_COVERAGE",
    "divergence",
    "coverage",
    "ended",
    "failure",
    "DIVERGED_AFTER",
    "ENDED_STATUSES",
    "FAILED_STATUS",
    "learning_rate",
    "pick_learning_rates",
]

NO_FAMILY = "(no family)"
"""Family name used for runs whose ``RunInfo.family`` is ``None``."""

COMPLETE_COVERAGE = _COMPLETE_COVERAGE
"""A run whose records reach this share of its token budget (``RunInfo.total_tokens``) counts as complete."""


DIVERGED_AFTER = 2
"""A run whose losses are non-finite at this many of its last logged token counts diverged (see
:func:`divergence`); one non-finite latest loss counts only once the run has ended (:func:`ended`)."""

ENDED_STATUSES = ("complete", "diverged")
"""``run.json`` extras ``status`` values that say a run has ended (:func:`ended`)."""

FAILED_STATUS = _FAILED
"""``run.json`` extras ``status`` of a run whose ``with RunWriter(...)`` block ended with an exception
(:func:`failure`); the writer records the exception as extras ``failure``."""


class SweepWarning(SpectralLensWarning):
    """A run of a sweep was left out of a ranking or a score (diverged, cut short), or the runs of a
    family differ in a way that makes their comparison doubtful (token budget, probe rows)."""


def divergence(run: RunRecord) -> str | None:
    """Why ``run`` counts as diverged, in one line naming it, or ``None``.

    A run diverged when its losses end non-finite: at each of its last :data:`DIVERGED_AFTER` (2)
    token counts where it logged a ``val_loss`` or ``train_loss`` (``log.jsonl`` events and
    measurements), one of them is NaN or +-inf; or at its last one, once the run has ended (run.json
    extras ``status`` ``"complete"`` or ``"diverged"``, or records reaching :data:`COMPLETE_COVERAGE`
    of ``RunInfo.total_tokens``) or failed (:func:`failure`: a loop that raised on the NaN loss). A
    single non-finite loss as the latest of a run that has not ended (or failed) is not yet a divergence (one bad evaluation, which the next finite loss shows recovered from); a
    non-finite loss followed by finite ones is a step the run recovered from (an fp16 overflow step
    that the GradScaler skipped, the NaN ``val_loss`` of an empty evaluation batch) and does not
    count. The line names where the non-finite losses began: the first one after the last token
    count whose losses were all finite.
    """
    pts = [(e["tokens"], e["step"], k, float(e[k])) for e in run.events
           for k in ("val_loss", "train_loss") if e.get(k) is not None]
    pts += [(m.tokens, m.step, "val_loss", m.val_loss) for m in run.measurements if m.val_loss is not None]
    if not pts:
        return None
    healthy: dict[int, bool] = {}  # token count -> every loss logged there is finite
    for p in pts:
        healthy[p[0]] = healthy.get(p[0], True) and math.isfinite(p[3])
    end = max(healthy)
    if healthy[end]:
        return None
    start = max((t for t, ok in healthy.items() if ok and t < end), default=-math.inf)
    if sum(1 for t in healthy if t > start) < DIVERGED_AFTER and not ended(run) and failure(run) is None:
        return None  # one non-finite loss, the latest, of a run still going: not judged until the next one
    bad = [p for p in pts if p[0] > start and not math.isfinite(p[3])]
    tokens, step, key, value = min(bad, key=lambda p: p[0])  # min keeps the first of equal token counts
    total = run.info.total_tokens
    share = f", {percent(tokens / total)} of its token budget" if total else ""
    return f"run {run.run_id!r} (tier {_tier_text(run.info.batch_tier)}) diverged: {key} {value} at step {step} ({tokens:.4g} tokens{share})"


def coverage(run: RunRecord) -> float | None:
    """The share of its token budget that ``run``'s records reach: the largest ``tokens`` of its events
    and measurements over ``RunInfo.total_tokens`` (``None`` when the budget is unknown). ``1.0`` when
    ``run.json`` extras say ``status: "complete"``."""
    if run.info.extras.get("status") == "complete":
        return 1.0
    if not run.info.total_tokens:
        return None
    seen = [e["tokens"] for e in run.events] + [m.tokens for m in run.measurements]
    return max(seen, default=0) / run.info.total_tokens


def ended(run: RunRecord) -> bool:
    """Whether ``run``'s record says it finished: ``run.json`` extras ``status`` is one of
    :data:`ENDED_STATUSES` (``RunWriter.update_info(status="complete")`` at the end of training), or
    its records reach :data:`COMPLETE_COVERAGE` of its token budget; then a target it did not reach, it
    never will. ``False`` for a run without a token budget or status: it may still be running (a clean
    ``RunWriter.close`` leaves no mark in the record). ``False`` for a run that failed short of that
    coverage (:func:`failure`): it logs nothing more, but it was cut short, so a target not reached
    says nothing about it (resumed, ``RunWriter(resume=True)`` marks it ``"running"`` while open; the past
    failure is kept in ``failure_history``, which this does not read)."""
    if run.info.extras.get("status") in ENDED_STATUSES:
        return True
    c = coverage(run)
    return c is not None and c >= COMPLETE_COVERAGE


def failure(run: RunRecord) -> str | None:
    """``"failed (TYPE: message)"`` when ``run.json`` extras ``status`` is ``"failed"``: the run's
    ``with RunWriter(...)`` block ended with that exception (extras ``failure``), and nothing resumed it
    since; else ``None``. Such a run logs nothing more, and did not finish: :func:`ended` is ``False``
    unless its records reach :data:`COMPLETE_COVERAGE` of its token budget. Extras
    ``failure_after_end`` (a block that raised after the record said the run ended) is no failure."""
    extras = run.info.extras
    if extras.get("status") != FAILED_STATUS:
        return None
    why = extras.get("failure")
    return f"failed ({why})" if isinstance(why, str) and why else "failed"


def learning_rate(run: RunRecord):
    """The learning rate(s) ``run`` names in its ``run.json`` extras: ``"lrs"`` (parameter group ->
    rate, as the examples and the tuner record them), else ``"lr"``; ``None`` when it names neither."""
    extras = run.info.extras
    return extras["lrs"] if "lrs" in extras else extras.get("lr")


def _lr_key(lr):
    """``lr`` as the tier's rates are grouped by: numbers (and strings that read as one) to 6 significant
    digits, so that one rate written two ways (``1e-3``, ``0.0010000000000000002``, ``"0.001"``) is one rate;
    ``lrs`` of one parameter group (``{"lr": 1e-3}``) is that group's rate, as ``lr=1e-3`` is."""
    if isinstance(lr, dict):
        if len(lr) == 1:
            return _lr_key(next(iter(lr.values())))
        return {str(k): _lr_key(v) for k, v in lr.items()}
    if isinstance(lr, (list, tuple)):
        return [_lr_key(v) for v in lr]
    if isinstance(lr, str):
        try:
            lr = float(lr)
        except ValueError:
            return lr
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr):
        return float(f"{lr:.6g}")
    return lr


def _lr_text(lr) -> str:
    if lr is None:
        return "lr not recorded"
    fmt = lambda v: f"{v:.6g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v)  # noqa: E731
    if isinstance(lr, dict):
        return "lrs " + ", ".join(f"{k}={fmt(v)}" for k, v in lr.items())
    return f"lr={fmt(lr)}"


def _finite_val(run: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    t, v = run.val_curve()
    ok = np.isfinite(v)
    return t[ok], v[ok]


def _loss_at(curve: tuple[np.ndarray, np.ndarray], tokens: float) -> float:
    """The validation loss of a run's finite ``curve`` at ``tokens``, linearly interpolated between the
    evaluations around it (NaN outside its first and last evaluation)."""
    t, v = curve
    if not t.size or not t[0] <= tokens <= t[-1]:
        return math.nan
    return float(np.interp(tokens, t, v))


def _rate_text(loss: float, n_bad: int, n: int) -> tuple[str, str]:
    """A rate's loss (or why it has none) and its share of diverged runs, for the pick's note."""
    value = f"{loss:.4g}" if math.isfinite(loss) else "diverged" if n_bad == n else "no val loss"
    return value, (f", {n_bad} of {n} runs diverged" if 0 < n_bad < n else "")


def pick_learning_rates(runs: Iterable[RunRecord]) -> tuple[list[RunRecord], dict[str, str]]:
    """Of the runs of each batch tier (per family) that name several learning rates
    (:func:`learning_rate`; equal to 6 significant digits is one rate), keep the best rate's runs, as
    the paper uses the tuned rate of each tier.

    The rates are compared at one token count: the latest that every rate reached (the last finite
    validation loss of its furthest run, diverged runs aside), so a seed cut short early does not
    pull the comparison back to the first evaluations; the final loss when the runs have finished one
    budget. Each run's validation loss there is interpolated linearly between its evaluations around
    it (runs evaluated at different token counts are compared at the same one; a run that ends before
    it is not counted). The best rate, of those with a validation loss there, has the smallest share of
    diverged runs (:func:`divergence`), then the lowest mean validation loss of its other runs; ties
    go to the first rate in run order.
    Runs of one rate (seeds) are kept together; a tier with one rate is untouched.

    Returns ``(kept runs in input order, {run id: one line why it is left out})``. The line is the
    same for every run left out of one tier: it names the rates, their losses, the token count and
    the one picked. A tier whose rates cannot be compared yet has every run left out, with a line
    saying why: no rate has a validation loss (unless all of its runs diverged: each is left out for
    that), or a rate's evaluations all come after that token count.
    """
    runs = list(runs)
    tiers: dict[tuple, dict[str, list[RunRecord]]] = {}
    for r in runs:
        family = r.info.family if r.info.family is not None else NO_FAMILY
        key = json.dumps(_lr_key(learning_rate(r)), sort_keys=True, default=str)
        tiers.setdefault((family, r.info.batch_tier), {}).setdefault(key, []).append(r)
    left: dict[str, str] = {}
    for (family, tier), by_lr in tiers.items():
        if len(by_lr) < 2:
            continue
        where = f"tier {_tier_text(tier)}" + ("" if family == NO_FAMILY else f" of family {family!r}")
        ids = [r.run_id for rs in by_lr.values() for r in rs]
        texts = {k: _lr_text(learning_rate(rs[0])) for k, rs in by_lr.items()}
        bad = {r.run_id for rs in by_lr.values() for r in rs if divergence(r) is not None}
        curves = {r.run_id: _finite_val(r) for rs in by_lr.values() for r in rs if r.run_id not in bad}
        reach = {k: max((curves[r.run_id][0][-1] for r in rs if r.run_id in curves and curves[r.run_id][0].size),
                        default=None) for k, rs in by_lr.items()}
        at = min((float(t) for t in reach.values() if t is not None), default=math.nan)
        loss, n_bad = {}, {}
        for key, rs in by_lr.items():
            vals = [v for r in rs if r.run_id in curves for v in [_loss_at(curves[r.run_id], at)] if not math.isnan(v)]
            loss[key] = float(np.mean(vals)) if vals else math.nan
            n_bad[key] = sum(r.run_id in bad for r in rs)
        late = [k for k in by_lr if reach[k] is not None and math.isnan(loss[k])]
        if late:  # it has validation losses, all after the others' last: no token count to compare them at
            first = {k: min(curves[r.run_id][0][0] for r in by_lr[k] if r.run_id in curves and curves[r.run_id][0].size)
                     for k in late}
            firsts = "; ".join(f"{texts[k]} first at {first[k]:.4g} tokens" for k in late)
            why = (f"{where} has runs at {len(by_lr)} learning rates ({'; '.join(texts.values())}) and no token count "
                   f"where every rate has a validation loss yet ({firsts}, after {at:.4g}), so none of its runs is used")
            left.update(dict.fromkeys(ids, why))
            continue
        finite = [k for k, v in loss.items() if math.isfinite(v)]
        if not finite:
            if len(bad) == len(ids):
                continue  # every run diverged: each is left out for that
            why = (f"{where} has runs at {len(by_lr)} learning rates ({'; '.join(texts.values())}) and no "
                   "validation loss to pick the best one by yet, so none of its runs is used")
            left.update(dict.fromkeys(ids, why))
            continue
        best = min(finite, key=lambda k: (n_bad[k] / len(by_lr[k]), loss[k]))  # min keeps the first of equals

        said = {k: _rate_text(loss[k], n_bad[k], len(rs)) for k, rs in by_lr.items()}
        totals = {r.info.total_tokens for rs in by_lr.values() for r in rs}
        total = next(iter(totals)) if len(totals) == 1 else None
        at_text = f" at {at:.4g} tokens" + (f", {percent(at / total)} of the budget" if total else "")
        others = "; ".join(f"{texts[k]}: {said[k][0]}{said[k][1]}" for k in by_lr if k != best)
        dropped = [r.run_id for k, rs in by_lr.items() if k != best for r in rs]
        why = (f"{where} has runs at {len(by_lr)} learning rates: the best, {texts[best]} (val loss "
               f"{said[best][0]}{at_text}{said[best][1]}; {others}), is used; the runs at the others "
               f"({', '.join(dropped)}) are not")
        left.update(dict.fromkeys(dropped, why))
    return [r for r in runs if r.run_id not in left], left


#: A 5% grid of progress fractions a user is likely to write (0.05, 0.1, ..., 1.0): pass it as ``among`` to
#: :func:`percent` so that a fraction near a grid point is told from it (0.2004 is ``20.04%``, not ``20%``).
LABEL_GRID = tuple(k / 20 for k in range(1, 21))


def percent(fraction: float, among: Sequence[float] = ()) -> str:
    """A progress fraction in words: ``0.2`` -> ``"20%"``, ``0.001`` -> ``"0.1%"`` (``:.0%`` said ``"0%"``);
    ``nan`` -> ``"nan%"`` (messages about a bad fraction must not fail to say it), never ``"-0%"``, and a
    tiny nonzero share is not ``"0%"``; a huge one is ``"1e+302%"``, not 303 digits (``:.0f`` writes every
    digit of a whole number). A NumPy scalar prints as the float it is. With ``among`` (other fractions of
    one table or message, e.g. :data:`LABEL_GRID`), as many digits (3 at least) as tell ``fraction`` from each
    of them: ``percent(0.2004, LABEL_GRID)`` is ``"20.04%"``; fractions within 1e-9 (0.1 + 0.2 and 0.3) are one."""
    p = 100 * float(fraction)
    if not math.isfinite(p):
        return f"{p}%"
    others = [100 * float(g) for g in among if not math.isclose(float(g), float(fraction), abs_tol=1e-9)]
    for digits in range(3, 18):
        label = _percent_label(p, digits)
        if all(_percent_label(q, digits) != label for q in others if math.isfinite(q)):
            break
    return label


def _percent_label(p: float, digits: int) -> str:
    """``p`` percent with ``digits`` significant digits (a whole number as one, 0 as ``0%``)."""
    if p == 0:
        return "0%"
    whole = abs(round(p)) < 1e6 and abs(p - round(p)) < 1e-9 and round(p) != 0  # 999999.9999999991 is 1e+06%
    return f"{p:.0f}%" if whole else f"{p:.{digits}g}%"


def _tier_text(t) -> str:
    """A batch tier as text: ``8``, ``0.5``; a huge one (finite in run.json) ``1e+300``, not 301 digits."""
    return "?" if t is None else (str(int(t)) if float(t).is_integer() and abs(t) < 1e15 else f"{t:g}")


def _curve(run_or_curve) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(run_or_curve, RunRecord):
        return run_or_curve.val_curve()
    try:
        tokens, losses = run_or_curve
    except (TypeError, ValueError):
        raise TypeError(
            "expected a RunRecord or a pair (tokens, val_losses) of equal-length sequences, "
            f"got {type(run_or_curve).__name__}"
        ) from None
    tokens = np.asarray(tokens, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if tokens.shape != losses.shape or tokens.ndim != 1:
        raise ValueError(f"tokens and val_losses must be 1-D of equal length, got {tokens.shape} and {losses.shape}")
    if not np.isfinite(tokens).all():
        raise ValueError(f"tokens must be finite, got {tokens[~np.isfinite(tokens)][0]} at index "
                         f"{int(np.flatnonzero(~np.isfinite(tokens))[0])}")
    order = np.argsort(tokens, kind="stable")
    return tokens[order], losses[order]


def tokens_to_target(run_or_curve, target: float, *, interpolate: bool = False) -> float:
    """Tokens to reach validation loss ``target``: ``T`` at the first checkpoint with loss ``<= target``.

    Args:
        run_or_curve: a :class:`RunRecord` (its :meth:`~RunRecord.val_curve`: logged events and
            measurements merged) or a pair ``(tokens, val_losses)``.
        target: target validation loss.
        interpolate: ``False`` (the paper's definition): the token count of that checkpoint.
            ``True``: the token count where the straight line between the previous checkpoint and
            that one crosses ``target`` (a finer estimate when checkpoints are sparse; the first
            checkpoint itself if it already reaches the target).

    Returns ``math.inf`` when no checkpoint reaches the target. Ties: checkpoints are taken in
    token order, equal token counts in file order; a loss exactly equal to ``target`` counts as
    reached; non-finite losses (NaN, and ``-inf``, a broken loss rather than a low one) never do. A
    non-finite ``target`` or token count is a ``ValueError``.
    """
    if not math.isfinite(target):
        raise ValueError(f"tokens_to_target: target validation loss must be a finite number, got {target}")
    tokens, losses = _curve(run_or_curve)
    hit = _reached(losses, target)
    if hit.size == 0:
        return math.inf
    i = int(hit[0])
    if not interpolate or i == 0:
        return float(tokens[i])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
    if not np.isfinite(l0) or l0 == l1:
        return float(t1)
    return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0))


def _reached(losses: np.ndarray, target: float) -> np.ndarray:
    """Indices of the finite ``losses`` at or below ``target``: a ``-inf`` validation loss is an overflow
    or a broken evaluation, not a run at the target (it gave the smallest ``T`` of a family)."""
    return np.flatnonzero(np.isfinite(losses) & (losses <= target))


def reached_at_first_evaluation(run_or_curve, target: float) -> bool:
    """Whether the first checkpoint of training (in token order) already has validation loss ``<= target``.
    Then ``T`` is that checkpoint's token count: where the first evaluation happened to be, an upper bound
    on the tokens the target needed, not a measurement of them; a family whose runs all do this has
    an ``eps_tok`` that only compares evaluation spacings (choose a lower target). An evaluation before
    training (at token 0, as the example trainers do) or at the same token count as the one that
    reached the target brackets nothing, so it does not count as an earlier one. An earlier evaluation with
    a non-finite loss (NaN, ``-inf``) does count: it is one that did not reach the target."""
    if not math.isfinite(target):
        raise ValueError(f"reached_at_first_evaluation: target validation loss must be a finite number, got {target}")
    tokens, losses = _curve(run_or_curve)
    hit = _reached(losses, target)
    if hit.size == 0:
        return False
    before = tokens[: int(hit[0])]
    return not bool(np.any((before > 0) & (before < tokens[hit[0]])))


def eps_tok(T: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Token inefficiency ``eps_tok = T / min(T)`` of runs in one family, keyed like ``T``.

    Runs that never reached the target (``T = inf``) get ``inf``. Equal ``T`` give equal ``eps_tok``
    (two best runs both get 1). If no run reached the target, every value is NaN and a
    :class:`SpectralLensWarning` is emitted.
    """
    if not T:
        return {}
    values = {k: float(v) for k, v in T.items()}
    for k, v in values.items():
        if v == 0:
            raise ValueError(f"eps_tok: T[{k!r}] = 0: that run is at the target loss at its first evaluation, before "
                             "training, so no run can be compared to it; choose a lower target loss")
        if not (v > 0):
            raise ValueError(f"eps_tok: T[{k!r}] = {v} must be positive (tokens to target)")
    best = min(values.values())
    if math.isinf(best):
        warnings.warn("eps_tok: no run reached the target; eps_tok is undefined (NaN)", SpectralLensWarning, stacklevel=2)
        return {k: math.nan for k in values}
    return {k: v / best for k, v in values.items()}


def group_by_family(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by ``info.family`` (``None`` -> :data:`NO_FAMILY`), families and runs in input order."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.info.family if r.info.family is not None else NO_FAMILY, []).append(r)
    return groups


def token_inefficiency(
    runs: Iterable[RunRecord], target: float, *, interpolate: bool = False
) -> dict[str, float]:
    """``eps_tok`` of every run (keyed by run id), normalized within its family.

    Seeds of one tier are separate runs, each with its own ``eps_tok`` against the family's best run.
    A run that never reached ``target`` gets ``inf`` only when it is known not to reach it: it diverged
    (:func:`divergence`) or it has ended (:func:`ended`: ran its whole budget, or ``run.json`` extras
    ``status: "complete"``). Any other such run might still reach it: one cut short (its records
    reach less than :data:`COMPLETE_COVERAGE` of ``RunInfo.total_tokens``, see :func:`coverage`; one
    that failed, :func:`failure`), still running, or without a token budget or status to tell; its
    ``eps_tok`` is unknown: NaN (Spearman scores leave it out, and their ``n`` does not count it), with
    a :class:`SweepWarning` naming it.
    """
    out: dict[str, float] = {}
    for family, members in group_by_family(runs).items():
        T, short = {}, {}
        for r in members:
            t = tokens_to_target(r, target, interpolate=interpolate)
            if math.isinf(t) and not ended(r) and divergence(r) is None:
                short[r.run_id] = coverage(r)  # None: no budget to say how far it got
            else:
                T[r.run_id] = t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpectralLensWarning)
            eps = eps_tok(T)
        fam = {r.run_id: eps.get(r.run_id, math.nan) for r in members}
        if all(math.isnan(v) for v in fam.values()):
            warnings.warn(
                f"family {family!r}: no run reached val loss {target}; eps_tok is NaN for its runs",
                SpectralLensWarning,
                stacklevel=2,
            )
        for rid, c in short.items():
            failed = failure(next(r for r in members if r.run_id == rid))
            where = (f"has records to {percent(c)} of its token budget" if c is not None else
                     "has no token budget (RunInfo.total_tokens) and no run.json extras status 'complete' to say "
                     "it ended,")
            warnings.warn(
                f"run {rid!r} {where} and has not reached val loss {target}: "
                + (f"it {failed}, cut short" if failed else "cut short (or still running)")
                + ", not slow, so its eps_tok is unknown (NaN) and the score leaves it out",
                SweepWarning,
                stacklevel=2,
            )
        out.update(fam)
    return out


def tok_gain(T_a: float, T_b: float) -> float:
    """Relative token gain of a transition ``a -> b``: ``T(a)/T(b) - 1`` (positive = b needs fewer tokens)."""
    _check_positive(T_a=T_a, T_b=T_b)
    return T_a / T_b - 1.0


def thr_gain(Q_a: float, Q_b: float) -> float:
    """Relative throughput gain of ``a -> b``: ``Q(b)/Q(a) - 1`` (positive = b is faster)."""
    _check_positive(Q_a=Q_a, Q_b=Q_b)
    return Q_b / Q_a - 1.0


def log_gains(T_a: float, T_b: float, Q_a: float, Q_b: float) -> tuple[float, float]:
    """Log-gain coordinates ``(g_tok, g_thr) = (log(T(a)/T(b)), log(Q(b)/Q(a)))``."""
    _check_positive(T_a=T_a, T_b=T_b, Q_a=Q_a, Q_b=Q_b)
    return math.log(T_a / T_b), math.log(Q_b / Q_a)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if v is None or not (v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class TransitionGains:
    """Outcome coordinates of a transition ``a -> b`` (paper Sec. 2.2).

    Attributes:
        a, b: run ids.
        target: target validation loss used for ``T``.
        T_a, T_b: tokens to target (``inf`` if never reached).
        Q_a, Q_b: throughput in tokens/s (``None`` if not logged).
        tok_gain, thr_gain: relative gains (NaN when an input is missing or infinite).
        g_tok, g_thr: log gains (NaN likewise).
    """

    a: str
    b: str
    target: float
    T_a: float
    T_b: float
    Q_a: float | None
    Q_b: float | None
    tok_gain: float
    thr_gain: float
    g_tok: float
    g_thr: float


def transition_gains(run_a: RunRecord, run_b: RunRecord, target: float, *, warmup: float = 0.1) -> TransitionGains:
    """Token and throughput gains of ``run_a -> run_b`` from their records.

    ``Q`` is :meth:`RunRecord.throughput` (median logged tokens/s after ``warmup``). A run at the target
    at an evaluation at token 0 (before training) has ``T = 0``: no token gain can be computed against
    it, a ``ValueError`` naming the run (as :func:`eps_tok`'s), not a bare ``T_a must be positive``.
    """
    T_a, T_b = tokens_to_target(run_a, target), tokens_to_target(run_b, target)
    for run, T in ((run_a, T_a), (run_b, T_b)):
        if T == 0:
            raise ValueError(f"transition_gains: run {run.run_id!r} is at the target loss {target} at its first "
                             "evaluation, before training (T = 0 tokens), so no token gain can be computed "
                             "against it; choose a lower target loss")
    Q_a, Q_b = run_a.throughput(warmup), run_b.throughput(warmup)
    t_ok = math.isfinite(T_a) and math.isfinite(T_b)
    q_ok = Q_a is not None and Q_b is not None and Q_a > 0 and Q_b > 0
    nan = math.nan
    return TransitionGains(
        a=run_a.run_id,
        b=run_b.run_id,
        target=float(target),
        T_a=T_a,
        T_b=T_b,
        Q_a=Q_a,
        Q_b=Q_b,
        tok_gain=tok_gain(T_a, T_b) if t_ok else nan,
        thr_gain=thr_gain(Q_a, Q_b) if q_ok else nan,
        g_tok=math.log(T_a / T_b) if t_ok else nan,
        g_thr=math.log(Q_b / Q_a) if q_ok else nan,
    )


# --------------------------------------------------------------------------------------------------
# alignment


@dataclass(frozen=True)
class Matched:
    """The measurement of one run picked by an alignment.

    Attributes:
        run_id: the run.
        measurement: the chosen :class:`Measurement`.
        index: its position in ``run.measurements``.
        by: ``"loss"``, ``"tokens"`` or ``"progress"``.
        target: the value aligned to.
        value: the measurement's own value of ``by``.
        gap: ``value - target`` (for loss: how far above (+) or below (-) the target it is).
    """

    run_id: str
    measurement: Measurement
    index: int
    by: str
    target: float
    value: float
    gap: float


_RULES = {"loss": ("first_below", "nearest"), "tokens": ("nearest", "first_after"), "progress": ("nearest", "first_after")}


def align(
    runs: Iterable[RunRecord],
    by: str,
    target: float,
    *,
    rule: str | None = None,
    tolerance: float | None = None,
) -> dict[str, Matched | None]:
    """Pick one measurement per run at a matched loss, token count or progress fraction.

    Args:
        runs: the run records to align.
        by: ``"loss"`` (the paper's primary comparison), ``"tokens"`` or ``"progress"``.
        target: the loss, token count or fraction to match.
        rule: for ``by="loss"``: ``"first_below"`` (default; the first measurement in token order
            with ``val_loss <= target``, consistent with tokens-to-target) or ``"nearest"`` (smallest
            ``|val_loss - target|``). For tokens/progress: ``"nearest"`` (default) or
            ``"first_after"`` (the first measurement at or beyond the target).
            Ties (equal distance) go to the earlier measurement.
        tolerance: if given, a match with ``|gap| > tolerance`` counts as no match.

    Returns run id -> :class:`Matched`, or ``None`` for a run with no eligible measurement (no
    measurement with a val loss, loss never reached under ``first_below``, unknown progress, ...).
    """
    if by not in _RULES:
        raise ValueError(f"align: by must be one of {tuple(_RULES)}, got {by!r}")
    rule = rule or _RULES[by][0]
    if rule not in _RULES[by]:
        raise ValueError(f"align: rule for by={by!r} must be one of {_RULES[by]}, got {rule!r}")
    # NaN compares False: 'nearest' picked each run's first measurement with a gap of NaN, 'first_below' none,
    # and a NaN tolerance let every match through
    if not math.isfinite(target):
        raise ValueError(f"align: target {by} must be a finite number, got {target}")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"align: tolerance must be >= 0 (or None), got {tolerance}")
    out: dict[str, Matched | None] = {}
    for run in runs:
        cands = []
        for i, m in enumerate(run.measurements):
            v = m.val_loss if by == "loss" else float(m.tokens) if by == "tokens" else run.progress(m)
            if v is not None and math.isfinite(v):
                cands.append((m.tokens, i, float(v)))
        cands.sort(key=lambda c: c[0])  # stable: equal tokens keep file order
        pick = None
        if rule == "first_below":
            pick = next((c for c in cands if c[2] <= target), None)
        elif rule == "first_after":
            pick = next((c for c in cands if c[2] >= target), None)
        elif cands:
            pick = min(cands, key=lambda c: abs(c[2] - target))  # min keeps the first of equals
        if pick is not None and tolerance is not None and abs(pick[2] - target) > tolerance:
            pick = None
        out[run.run_id] = None if pick is None else Matched(
            run.run_id, run.measurements[pick[1]], pick[1], by, float(target), pick[2], pick[2] - float(target)
        )
    return out


def matched_loss(runs: Iterable[RunRecord], target: float, *, rule: str = "first_below", tolerance: float | None = None):
    """:func:`align` with ``by="loss"``: each run's measurement at validation loss ``target``."""
    return align(runs, "loss", target, rule=rule, tolerance=tolerance)


def measurement_at_loss(run: RunRecord, target: float, *, spectrum: str | None = None) -> Measurement | None:
    """The run's measurement at validation loss ``target``, as the report's figures and the taxonomy read it.

    Its first measurement (in token order) with ``val_loss <= target`` (:func:`matched_loss`); when no
    measurement carries such a ``val_loss`` (the integrations' step schedules measure without one and
    the loss is in ``log.jsonl``), the first measurement at or past the run's tokens-to-target from
    its validation curve (:func:`tokens_to_target`). ``None`` when the run never reaches ``target`` or
    has no measurement from there on. ``spectrum``: only measurements that hold that spectrum.
    """
    ms = sorted((m for m in run.measurements if spectrum is None or spectrum in m.spectra), key=lambda m: m.tokens)
    m = next((x for x in ms if x.val_loss is not None and math.isfinite(x.val_loss) and x.val_loss <= target), None)
    if m is None:
        reached = tokens_to_target(run, target)
        if math.isfinite(reached):
            m = next((x for x in ms if x.tokens >= reached), None)
    return m


def matched_tokens(runs: Iterable[RunRecord], tokens: float, *, rule: str = "nearest", tolerance: float | None = None):
    """:func:`align` with ``by="tokens"``: each run's measurement at ``tokens`` training tokens."""
    return align(runs, "tokens", tokens, rule=rule, tolerance=tolerance)


def matched_fraction(runs: Iterable[RunRecord], fraction: float, *, rule: str = "nearest", tolerance: float | None = None):
    """:func:`align` with ``by="progress"``: each run's measurement at a schedule fraction."""
    return align(runs, "progress", fraction, rule=rule, tolerance=tolerance)
