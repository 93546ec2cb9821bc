"""Taxonomy of architectural transitions (paper Sec. 4, Fig. 3).

A transition ``a -> b`` (two runs of different variants, same batch tier) is placed by its outcome
coordinates (token gain, throughput gain) and attributed by spectral evidence:

* **activation-led learning**: token gain with a clear displacement of the activation spectrum
  (``alpha_head`` moves and/or the normalized spectra differ);
* **gradient-led learning**: token gain whose dominant geometric change is in the gradient spectrum,
  the activation endpoint staying comparatively static;
* **throughput/execution-leaning**: mainly a throughput gain;
* **mixed/tradeoff**: one objective improves while the other worsens comparably;
* **no clear change**: neither gain exceeds the threshold.

Three more labels make the classifier total instead of forcing a case into the wrong bucket:
**learning gain, spectrally unattributed** (a token gain with neither spectrum moving beyond its
threshold), **regression** (one or both objectives worsen, none improves) and **undetermined
(token gain undefined)** (a run of the transition never reached the target, so ``T`` is infinite
and the transition cannot be placed on the gain plane).

The paper gives no numeric thresholds; every threshold is a constructor parameter of
:class:`TransitionClassifier` (or set from seed noise: :meth:`TransitionClassifier.from_replicates`
on the :func:`replicate_evidence` of runs that differ only in the seed), and every result carries
the numbers and the rule that fired.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable

import numpy as np

from .._args import check_window
from ..records import RunRecord
from ..spectrum import Spectrum
from ..spectra import ranks as _ranks
from ..summaries import BandAlphaFitter, InsufficientRowsWarning, _values
from .efficiency import (
    divergence,
    ended,
    failure,
    measurement_at_loss,
    transition_gains,
)
from .windows import resolve_spectrum

__all__ = [
    "ACTIVATION_LED",
    "GRADIENT_LED",
    "THROUGHPUT_LEANING",
    "MIXED_TRADEOFF",
    "NO_CLEAR_CHANGE",
    "UNATTRIBUTED_LEARNING",
    "REGRESSION",
    "UNDETERMINED",
    "LABELS",
    "TransitionEvidence",
    "TaxonomyResult",
    "TransitionClassifier",
    "js_divergence",
    "transition_evidence",
    "replicate_evidence",
]

ACTIVATION_LED = "activation-led learning"
"""Label: token gain with a clear displacement of the activation spectrum."""
GRADIENT_LED = "gradient-led learning"
"""Label: token gain whose dominant geometric change is in the gradient spectrum."""
THROUGHPUT_LEANING = "throughput/execution-leaning"
"""Label: mainly a throughput gain."""
MIXED_TRADEOFF = "mixed/tradeoff"
"""Label: one objective improves while the other worsens comparably."""
NO_CLEAR_CHANGE = "no clear change"
"""Label: neither gain exceeds the threshold."""
UNATTRIBUTED_LEARNING = "learning gain, spectrally unattributed"
"""Label: a token gain with neither spectrum moving beyond its threshold."""
REGRESSION = "regression"
"""Label: one or both objectives worsen, none improves."""
UNDETERMINED = "undetermined (token gain undefined)"
"""Label: a run of the transition never reached the target, so ``T`` is infinite."""
LABELS = (
    ACTIVATION_LED,
    GRADIENT_LED,
    THROUGHPUT_LEANING,
    MIXED_TRADEOFF,
    NO_CLEAR_CHANGE,
    UNATTRIBUTED_LEARNING,
    REGRESSION,
    UNDETERMINED,
)
"""Every label the classifier can return."""


def js_divergence(a: Spectrum | np.ndarray, b: Spectrum | np.ndarray) -> float:
    """Jensen-Shannon divergence (natural log, in [0, log 2]) of two trace-normalized spectra.

    Spectra are compared rank by rank, in the order given; a shorter one is padded with zeros. Each is
    divided by its largest entry before it is normalized (a sum that overflows, e.g. entries near 1e308,
    made every share 0 and the divergence 0). ``ValueError`` for a spectrum that is not 1-D, holds NaN/Inf,
    a negative eigenvalue beyond round-off (as :func:`spectral_lens.RankMe`'s tolerance: those within count
    as 0), or is all zero (or empty): such input was read as no displacement (0.0) or clipped to 0 without
    a word. Computed with ``scipy.spatial.distance.jensenshannon`` (which returns the JS *distance*, the
    square root of the divergence). For nearly equal spectra scipy's sum of relative entropies can round
    to a tiny negative number, whose square root it returns as NaN (about half the time for spectra equal
    to 1e-15 relative, see ``tests/analysis/test_stack_scipy_stats.py``); that case is the divergence 0.
    """
    from scipy.spatial.distance import jensenshannon

    p = _normalized(a, "first")
    q = _normalized(b, "second")
    n = max(p.size, q.size)
    p = np.pad(p, (0, n - p.size))
    q = np.pad(q, (0, n - q.size))
    with np.errstate(invalid="ignore"):
        distance = float(jensenshannon(p, q))
    return 0.0 if math.isnan(distance) else min(distance * distance, math.log(2.0))


def _normalized(s: Spectrum | np.ndarray, which: str) -> np.ndarray:
    """``s`` (a Spectrum, tensor, array or list of eigenvalues) divided by its largest entry, then by its
    sum, in float64; checked as :func:`spectral_lens.spectra.ranks.rankme` checks its input."""
    where = f"js_divergence ({which} spectrum)"
    scaled = _ranks._scaled(_values(s, where), where)
    if scaled is None:
        raise ValueError(f"{where}: spectrum is all zero (or empty); the divergence needs a nonzero trace")
    return (scaled / scaled.sum()).numpy()


def _signed(v: float) -> str:
    """``v`` as ``+0.123`` in a rule's text; a value that rounds to zero is ``+0.000``, not ``-0.000`` (a
    tiny loss read as a negative gain)."""
    s = f"{v:+.3f}"
    return "+0.000" if float(s) == 0 else s


def _gain_text(v: float) -> str:
    """A log gain in a rule's text: :func:`_signed`, or ``unknown (as 0)`` for a gain the records do not give
    (no logged throughput: it was ``+0.000``, read as a throughput measured equal)."""
    return _signed(v) if v is not None and math.isfinite(v) else "unknown (as 0)"


@dataclass(frozen=True)
class TransitionEvidence:
    """The numbers behind a transition's label.

    Attributes:
        a, b: names of the two sides (run ids, or free text when built by hand).
        tok_gain, thr_gain: relative gains ``T(a)/T(b) - 1`` and ``Q(b)/Q(a) - 1``.
        g_tok, g_thr: log gains (the classifier's coordinates; NaN when unknown).
        d_alpha_head: ``alpha_head(b) - alpha_head(a)`` of the activation spectrum at matched loss.
        act_jsd: Jensen-Shannon divergence of the two normalized activation spectra.
        d_grad_alpha: ``alpha(b) - alpha(a)`` of the gradient spectrum (head window).
        grad_jsd: Jensen-Shannon divergence of the two normalized gradient spectra.
        details: provenance (target loss, matched steps and losses, spectrum names, windows, T, Q).
    """

    a: str
    b: str
    tok_gain: float
    thr_gain: float
    g_tok: float
    g_thr: float
    d_alpha_head: float = math.nan
    act_jsd: float = math.nan
    d_grad_alpha: float = math.nan
    grad_jsd: float = math.nan
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_gains(cls, a: str, b: str, tok_gain: float, thr_gain: float, **spectral) -> "TransitionEvidence":
        """Build from relative gains (log gains derived) and optional spectral numbers."""
        return cls(a, b, tok_gain, thr_gain, _log1p(tok_gain), _log1p(thr_gain), **spectral)


def _log1p(x: float) -> float:
    return math.log1p(x) if x is not None and math.isfinite(x) and x > -1 else math.nan


@dataclass(frozen=True)
class TaxonomyResult:
    """A transition's label with its evidence.

    Attributes:
        label: one of :data:`LABELS`.
        rule: which rule fired, in words with the numbers.
        evidence: the :class:`TransitionEvidence`.
        act_score: activation movement in threshold units ``max(|d_alpha_head|/head_threshold,
            act_jsd/act_jsd_threshold)`` (>= 1 = clear); NaN if no activation evidence.
        grad_score: gradient movement likewise; NaN if no gradient evidence.
        thresholds: the classifier's thresholds.
    """

    label: str
    rule: str
    evidence: TransitionEvidence
    act_score: float
    grad_score: float
    thresholds: dict[str, float]


def _missed_target(ev: TransitionEvidence) -> list[str]:
    """The sides of ``ev`` whose details record an infinite ``T`` (the run never reached the target)."""
    return [name for name, key in ((ev.a, "T_a"), (ev.b, "T_b")) if key in ev.details and not math.isfinite(ev.details[key])]


def _missed_text(ev: TransitionEvidence) -> str:
    """Why the sides of ``ev`` without a finite ``T`` have none: a run that diverged (``details``
    ``diverged_a`` / ``diverged_b``, from :func:`~spectral_lens.analysis.divergence`) is named with
    its divergence, one that failed short of its budget (``details`` ``failed_a`` / ``failed_b``, from
    :func:`~spectral_lens.analysis.failure`) with its failure, one that has not ended otherwise
    (``details`` ``not_ended_a`` / ``not_ended_b``: :func:`~spectral_lens.analysis.ended` is false) as
    not reaching the target yet, the others as not reaching it."""
    target = ev.details.get("target", "?")
    parts, plain, going = [], [], []
    for side, name in (("a", ev.a), ("b", ev.b)):
        if f"T_{side}" in ev.details and not math.isfinite(ev.details[f"T_{side}"]):
            why = ev.details.get(f"diverged_{side}")
            failed = ev.details.get(f"failed_{side}")
            if why:
                parts.append(f"{name} diverged: {why.split(' diverged: ', 1)[-1]}, before reaching the target {target}")
            elif failed and ev.details.get(f"not_ended_{side}"):
                parts.append(f"{name} has not reached the target {target}: it {failed}, cut short")
            elif ev.details.get(f"not_ended_{side}"):
                going.append(name)
            else:
                plain.append(name)
    if going:
        parts.insert(0, f"{' and '.join(going)} {'has' if len(going) == 1 else 'have'} not reached the target "
                        f"{target} yet (its record does not say it ended: cut short or still running)")
    if plain:
        parts.insert(0, f"{' and '.join(plain)} did not reach the target {target}")
    return "; ".join(parts)


def _score(pairs: list[tuple[float, float]]) -> float:
    vals = [abs(v) / t for v, t in pairs if v is not None and math.isfinite(v)]
    return max(vals) if vals else math.nan


class TransitionClassifier:
    """Rule-based classifier of transitions ``a -> b`` (paper Sec. 4).

    Args:
        gain_threshold: smallest |log gain| that counts as a change (default 0.02, i.e. about 2%;
            below it a gain is within checkpoint resolution and run-to-run noise).
        tradeoff_ratio: a gain and a loss are "comparable" when the smaller magnitude is at least
            this fraction of the larger (default 0.5).
        head_threshold: clear activation-head displacement, ``|d alpha_head|`` (default 0.05).
        act_jsd_threshold: clear activation-spectrum displacement in JSD (default 0.005, about a
            0.1 change of a pure power-law exponent over 768 ranks).
        grad_alpha_threshold: clear gradient-spectrum change in ``|d alpha|`` (default 0.1).
        grad_jsd_threshold: clear gradient-spectrum change in JSD (default 0.005).

    Rules, in order (on log gains ``g_tok``, ``g_thr``; an unknown gain counts as 0; ``g`` is
    ``gain_threshold``):

    0. ``undetermined (token gain undefined)``: the evidence's ``details`` record an infinite
       ``T_a`` or ``T_b`` (a run never reached the target, as :func:`transition_evidence` records);
       the rule names the run(s), a run that diverged with its divergence (``details``
       ``diverged_a`` / ``diverged_b``: where its losses turned non-finite), one whose record does
       not say it ended (``details`` ``not_ended_a`` / ``not_ended_b``; cut short or still running)
       as not reaching the target yet, or, when it failed (``details`` ``failed_a`` / ``failed_b``:
       :func:`~spectral_lens.analysis.failure`), as failed and cut short. The token gain is then
       undefined, not zero.

    1. ``mixed/tradeoff``: one gain >= g, the other <= -g, and
       ``min(|g_tok|, |g_thr|) >= tradeoff_ratio * max(|g_tok|, |g_thr|)``.
    2. ``no clear change``: ``|g_tok| < g`` and ``|g_thr| < g``.
    3. ``regression``: no gain >= g (so at least one <= -g), or a loss <= -g larger in magnitude
       than the gain (not comparable to it, else rule 1): e.g. ``g_tok = -0.5``, ``g_thr = +0.1``.
    4. token-led (``g_tok >= g`` and ``g_tok >= g_thr``):
       ``activation-led`` if ``act_score >= 1`` and ``act_score >= grad_score``; else
       ``gradient-led`` if ``grad_score >= 1``; else ``learning gain, spectrally unattributed``.
    5. otherwise (throughput gain dominant): ``throughput/execution-leaning``.
    """

    def __init__(
        self,
        *,
        gain_threshold: float = 0.02,
        tradeoff_ratio: float = 0.5,
        head_threshold: float = 0.05,
        act_jsd_threshold: float = 0.005,
        grad_alpha_threshold: float = 0.1,
        grad_jsd_threshold: float = 0.005,
    ):
        for name, v in dict(
            gain_threshold=gain_threshold, head_threshold=head_threshold, act_jsd_threshold=act_jsd_threshold,
            grad_alpha_threshold=grad_alpha_threshold, grad_jsd_threshold=grad_jsd_threshold,
        ).items():
            if not v > 0:
                raise ValueError(f"TransitionClassifier: {name} must be > 0, got {v}")
        if not 0 < tradeoff_ratio <= 1:
            raise ValueError(f"TransitionClassifier: tradeoff_ratio must be in (0, 1], got {tradeoff_ratio}")
        self.gain_threshold = gain_threshold
        self.tradeoff_ratio = tradeoff_ratio
        self.head_threshold = head_threshold
        self.act_jsd_threshold = act_jsd_threshold
        self.grad_alpha_threshold = grad_alpha_threshold
        self.grad_jsd_threshold = grad_jsd_threshold

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds as a dict (also stored in every result)."""
        return {
            "gain_threshold": self.gain_threshold,
            "tradeoff_ratio": self.tradeoff_ratio,
            "head_threshold": self.head_threshold,
            "act_jsd_threshold": self.act_jsd_threshold,
            "grad_alpha_threshold": self.grad_alpha_threshold,
            "grad_jsd_threshold": self.grad_jsd_threshold,
        }

    @classmethod
    def from_replicates(
        cls, null: Iterable[TransitionEvidence], *, margin: float = 2.0, tradeoff_ratio: float = 0.5
    ) -> "TransitionClassifier":
        """A classifier whose thresholds are set by seed noise instead of the defaults.

        ``null``: the evidence of transitions between replicas of one configuration (same variant,
        batch tier, budget and data; different seeds), e.g. :func:`replicate_evidence` of 3-5 seed
        runs. Each threshold becomes ``margin`` times the largest magnitude its quantity takes among
        them: ``gain_threshold`` from ``|g_tok|`` and ``|g_thr|``, ``head_threshold`` from
        ``|d_alpha_head|``, ``act_jsd_threshold`` from ``act_jsd``, and the two gradient thresholds
        from ``|d_grad_alpha|`` and ``grad_jsd``. A real transition then counts as a clear change
        only beyond ``margin`` times the largest seed-to-seed difference seen. A quantity that is
        NaN in every null transition (no gradient spectra; a replica that never reached the target)
        keeps its default. Null transitions in which a replica never reached the target are left out:
        their spectra come from different points of training, not from seed noise.

        Raises ``ValueError`` for no usable null transition, ``margin <= 0``, or a quantity whose
        every finite value is 0 (identical replicas: the seeds did not differ, so there is no noise
        to calibrate against).
        """
        given = list(null)
        null = [ev for ev in given if not _missed_target(ev)]
        if not null:
            raise ValueError(
                f"TransitionClassifier.from_replicates: no usable null transition ({len(given)} given; need >= 2 "
                "replicate runs that reach the target)"
            )
        if not margin > 0:
            raise ValueError(f"TransitionClassifier.from_replicates: margin must be > 0, got {margin}")
        sources = {
            "gain_threshold": [v for ev in null for v in (ev.g_tok, ev.g_thr)],
            "head_threshold": [ev.d_alpha_head for ev in null],
            "act_jsd_threshold": [ev.act_jsd for ev in null],
            "grad_alpha_threshold": [ev.d_grad_alpha for ev in null],
            "grad_jsd_threshold": [ev.grad_jsd for ev in null],
        }
        spread = {}
        for name, values in sources.items():
            finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
            if finite:  # else not measured in these runs: the default stays
                spread[name] = max(finite)
        for name, largest in spread.items():
            if largest == 0:
                pairs = ", ".join(f"{ev.a}->{ev.b}" for ev in null)
                # the spectra differ but the gains do not: the target was reached at the same checkpoint
                resolution = name == "gain_threshold" and any(v > 0 for v in spread.values())
                why = ("every replica reached the target at the same token count (the resolution of the "
                       "validation checkpoints) with the same or no logged throughput, so the records cannot "
                       "resolve the gains' seed noise: validate more often, or pass gain_threshold= to "
                       "TransitionClassifier yourself" if resolution else
                       "the replicas are identical; calibrate on runs with different seeds")
                raise ValueError(
                    f"TransitionClassifier.from_replicates: {name} has zero spread over {len(null)} null "
                    f"transition(s) ({pairs}): {why}"
                )
        thresholds = {name: margin * largest for name, largest in spread.items()}
        return cls(tradeoff_ratio=tradeoff_ratio, **thresholds)

    def classify(self, ev: TransitionEvidence) -> TaxonomyResult:
        """Label one transition from its evidence (see the class docstring for the rules)."""
        g = self.gain_threshold
        gt = ev.g_tok if math.isfinite(ev.g_tok) else 0.0
        gq = ev.g_thr if math.isfinite(ev.g_thr) else 0.0
        act = _score([(ev.d_alpha_head, self.head_threshold), (ev.act_jsd, self.act_jsd_threshold)])
        grad = _score([(ev.d_grad_alpha, self.grad_alpha_threshold), (ev.grad_jsd, self.grad_jsd_threshold)])
        coords = f"g_tok={_gain_text(ev.g_tok)}, g_thr={_gain_text(ev.g_thr)}"
        missed = _missed_target(ev)
        if missed:
            rule = (f"rule 0: {_missed_text(ev)}: "
                    f"the token gain is undefined (g_thr={_gain_text(ev.g_thr)}, act_score={act:.2f}, grad_score={grad:.2f})")
            return TaxonomyResult(UNDETERMINED, rule, ev, act, grad, self.thresholds)
        big, small = max(abs(gt), abs(gq)), min(abs(gt), abs(gq))
        if max(gt, gq) >= g and min(gt, gq) <= -g and small >= self.tradeoff_ratio * big:
            label = MIXED_TRADEOFF
            rule = f"rule 1: {coords}: opposite signs beyond ±{g}, |smaller|/|larger|={small / big:.2f} >= {self.tradeoff_ratio}"
        elif abs(gt) < g and abs(gq) < g:
            label, rule = NO_CLEAR_CHANGE, f"rule 2: {coords}: both |gains| < {g}"
        elif max(gt, gq) < g:
            label, rule = REGRESSION, f"rule 3: {coords}: no gain >= {g}, at least one <= -{g}"
        elif min(gt, gq) <= -g and -min(gt, gq) > max(gt, gq):  # a lopsided tradeoff: the loss dominates
            label, rule = REGRESSION, (f"rule 3: {coords}: the loss outweighs the gain "
                                       f"(|smaller|/|larger|={small / big:.2f} < {self.tradeoff_ratio})")
        elif gt >= g and gt >= gq:
            scores = f"act_score={act:.2f}, grad_score={grad:.2f}"
            a_ok = math.isfinite(act) and act >= 1 and not (math.isfinite(grad) and grad > act)
            if a_ok:
                label, rule = ACTIVATION_LED, f"rule 4a: token-led ({coords}); {scores}: activation displacement clear and dominant"
            elif math.isfinite(grad) and grad >= 1:
                label, rule = GRADIENT_LED, f"rule 4b: token-led ({coords}); {scores}: gradient change clear and dominant"
            else:
                label, rule = UNATTRIBUTED_LEARNING, f"rule 4c: token-led ({coords}); {scores}: neither spectrum moved beyond threshold"
        else:
            label = THROUGHPUT_LEANING
            rule = f"rule 5: {coords}: throughput gain >= {g} dominates (act_score={act:.2f})"
        return TaxonomyResult(label, rule, ev, act, grad, self.thresholds)

    def classify_runs(self, run_a: RunRecord, run_b: RunRecord, target: float, **kwargs) -> TaxonomyResult:
        """:func:`transition_evidence` then :meth:`classify`; ``kwargs`` go to the evidence."""
        return self.classify(transition_evidence(run_a, run_b, target, **kwargs))

    def __repr__(self) -> str:
        return "TransitionClassifier(" + ", ".join(f"{k}={v}" for k, v in self.thresholds.items()) + ")"


def _gradient_name(run: RunRecord, gradient: str | None) -> str | None:
    names = run.spectrum_names("gradient")
    if gradient is not None:
        if gradient not in run.spectrum_names():
            raise ValueError(f"run {run.run_id!r}: no spectrum named {gradient!r}; available: {run.spectrum_names()}")
        return gradient
    if len(names) == 1:
        return names[0]
    if not names:
        return None
    raise ValueError(f"run {run.run_id!r}: several gradient spectra {names}; pass gradient=NAME")


def _alpha(spec: Spectrum, window: tuple[int, int]) -> float:
    """The band exponent over ``window``, NaN where the spectrum cannot resolve it (too short, zero
    eigenvalues in the window, or fewer rows than the window needs: as the run records' summaries)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsufficientRowsWarning)
        try:
            return float(BandAlphaFitter(window).fit(spec).alpha)
        except (ValueError, InsufficientRowsWarning):
            return math.nan


def _recorded_head_window(run_a: RunRecord, run_b: RunRecord) -> tuple[int, int]:
    """The head window both runs recorded (``run.summary_windows["head"]``), else ``(10, 40)``. A recorded
    window that is not 1-based ranks ``lo < hi`` raises ``ValueError`` naming the run and its run.json, as
    :func:`~spectral_lens.analysis.resolve_window` does for the tail window (it was an ``alpha_head`` of NaN,
    a transition without activation-head evidence, without a word)."""
    recorded = {r.run_id: (getattr(r, "summary_windows", None) or {}).get("head") for r in (run_a, run_b)}
    for r in (run_a, run_b):
        w = recorded[r.run_id]
        if w and not 1 <= int(w[0]) < int(w[1]):  # the reader checks types only (inspect shows such a run.json)
            where = f"{r.path / 'run.json'}" if getattr(r, "path", None) is not None else "its run.json"
            raise ValueError(f"run {r.run_id!r}: {where} records head window {[int(x) for x in w]}, not 1-based "
                             "ranks LO < HI; pass head_window=(LO, HI) to transition_evidence (the CLI has no option "
                             "for it: correct the run.json)")
    windows = {tuple(int(x) for x in w) for w in recorded.values() if w}
    if len(windows) > 1:
        raise ValueError(f"runs recorded different head windows {recorded}: pass head_window= to compare them on one")
    return windows.pop() if windows else (10, 40)


def transition_evidence(
    run_a: RunRecord,
    run_b: RunRecord,
    target: float,
    *,
    activation: str | None = None,
    gradient: str | None = None,
    head_window: tuple[int, int] | None = None,
    gradient_window: tuple[int, int] = (10, 40),
    at: str = "loss",
) -> TransitionEvidence:
    """Gains and spectral evidence of ``run_a -> run_b`` from their records.

    Args:
        run_a, run_b: the records of the two runs (``a``: the baseline, ``b``: the changed variant).
        target: target validation loss (for ``T`` and for the matched-loss measurement).
        activation: activation spectrum name (default :func:`~spectral_lens.analysis.resolve_spectrum`).
        gradient: gradient spectrum name (default: the run's only gradient spectrum; none -> NaN).
        head_window: window of ``alpha_head`` on the activation spectrum; ``None``: the head window
            both runs recorded (``RunWriter(head_window=...)``, in ``run.json``), else ``(10, 40)``. Two
            runs that recorded different head windows need it given (``ValueError``).
        gradient_window: window of the gradient-spectrum alpha (concentration of the head).
        at: ``"loss"``: each run's first measurement with ``val_loss <= target``; for measurements
            without ``val_loss``, the first one at or past the run's tokens-to-target (from its
            log); the last measurement when a run never reaches the target (noted in ``details``); ``"final"``:
            each run's last measurement (the paper's "final" spectra).
    """
    if at not in ("loss", "final"):
        raise ValueError(f"at must be 'loss' or 'final', got {at!r}")
    if head_window is None:
        head_window = _recorded_head_window(run_a, run_b)
    # a swapped window was an alpha of NaN (_alpha's "cannot resolve"), not an error
    head_window = check_window("transition_evidence", "head_window", head_window)
    gradient_window = check_window("transition_evidence", "gradient_window", gradient_window)
    gains = transition_gains(run_a, run_b, target)
    details: dict[str, Any] = {"target": float(target), "at": at, "T_a": gains.T_a, "T_b": gains.T_b,
                               "Q_a": gains.Q_a, "Q_b": gains.Q_b}
    for side, run in (("a", run_a), ("b", run_b)):  # rule 0 names a divergence rather than "did not reach"
        why = divergence(run)
        if why is not None:
            details[f"diverged_{side}"] = why
        elif not math.isfinite(details[f"T_{side}"]) and not ended(run):  # ... and a run that may still reach it
            details[f"not_ended_{side}"] = True
            if failure(run) is not None:  # ... once resumed: it failed, cut short
                details[f"failed_{side}"] = failure(run)
    picks = {}
    for side, run in (("a", run_a), ("b", run_b)):
        if not run.measurements:
            raise ValueError(f"run {run.run_id!r} has no measurements")
        m = None
        if at == "loss":
            m = measurement_at_loss(run, target)
            if m is not None and not (m.val_loss is not None and math.isfinite(m.val_loss) and m.val_loss <= target):
                details[f"matched_{side}"] = "first measurement at or past tokens-to-target (log's val_loss)"
            reached = gains.T_a if side == "a" else gains.T_b  # tokens-to-target, from the run's log
            if m is None:
                details[f"fallback_{side}"] = ("target never reached: last measurement used" if not math.isfinite(reached)
                                               else "no measurement at or past tokens-to-target: last measurement used")
        if m is None:
            m = max(run.measurements, key=lambda x: x.tokens)
        picks[side] = m
        details[f"step_{side}"] = m.step
        details[f"val_loss_{side}"] = m.val_loss
    act_a = resolve_spectrum(run_a, activation)
    act_b = resolve_spectrum(run_b, activation)
    sa, sb = picks["a"].spectra[act_a], picks["b"].spectra[act_b]
    d_head = _alpha(sb, head_window) - _alpha(sa, head_window)
    details.update(activation=(act_a, act_b), head_window=tuple(head_window),
                   alpha_head_a=_alpha(sa, head_window), alpha_head_b=_alpha(sb, head_window))
    d_grad = grad_jsd = math.nan
    g_a, g_b = _gradient_name(run_a, gradient), _gradient_name(run_b, gradient)
    if g_a and g_b and g_a in picks["a"].spectra and g_b in picks["b"].spectra:
        ga, gb = picks["a"].spectra[g_a], picks["b"].spectra[g_b]
        d_grad = _alpha(gb, gradient_window) - _alpha(ga, gradient_window)
        grad_jsd = js_divergence(ga, gb)
        details.update(gradient=(g_a, g_b), gradient_window=tuple(gradient_window))
    return TransitionEvidence(
        a=run_a.run_id,
        b=run_b.run_id,
        tok_gain=gains.tok_gain,
        thr_gain=gains.thr_gain,
        g_tok=gains.g_tok,
        g_thr=gains.g_thr,
        d_alpha_head=d_head,
        act_jsd=js_divergence(sa, sb),
        d_grad_alpha=d_grad,
        grad_jsd=grad_jsd,
        details=details,
    )


def replicate_evidence(runs: Iterable[RunRecord], target: float, **kwargs) -> list[TransitionEvidence]:
    """:func:`transition_evidence` of every pair ``a -> b`` (``a`` before ``b`` in ``runs``) of
    replicas of one configuration: the null transitions for
    :meth:`TransitionClassifier.from_replicates`. ``kwargs`` go to :func:`transition_evidence` (use
    the same ones as for the transitions you classify). Raises ``ValueError`` for fewer than 2 runs."""
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError(f"replicate_evidence: need >= 2 replicate runs, got {len(runs)}")
    return [transition_evidence(a, b, target, **kwargs) for a, b in combinations(runs, 2)]
