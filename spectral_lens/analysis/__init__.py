"""Analyses of run records: token efficiency, alignment, early prediction, taxonomy.

* :mod:`~spectral_lens.analysis.efficiency`: tokens-to-target ``T(B)``, ``eps_tok``, token and
  throughput gains, matched-loss / matched-token / matched-fraction alignment.
* Early prediction, one module per concept (all re-exported by :mod:`~spectral_lens.analysis.predictor`):
  :mod:`.windows` (spectrum and rank window per run), :mod:`.early` (early statistic with jitter),
  :mod:`.ranking`, :mod:`.spearman`, :mod:`.tier_predictor` (fit / predict / score),
  :class:`TailPredictor` (:mod:`.tail`, early ``alpha_tail`` orders batch tiers),
  :class:`NoiseScalePredictor` (:mod:`.noise_predictor`, gradient-noise-scale baseline) and
  :class:`SweepController` (:mod:`.sweep`, stop / continue decisions for a sweep in progress).
* :mod:`~spectral_lens.analysis.taxonomy`: :class:`TransitionClassifier` for architectural transitions.
* :mod:`~spectral_lens.analysis.synthetic`: sweeps generated from the paper's Theorem-6 model.
"""

from .efficiency import (
    COMPLETE_COVERAGE,
    NO_FAMILY,
    Matched,
    SweepWarning,
    coverage,
    divergence,
    ended,
    learning_rate,
    pick_learning_rates,
    DIVERGED_AFTER,
    ENDED_STATUSES,
    TransitionGains,
    align,
    eps_tok,
    group_by_family,
    log_gains,
    matched_fraction,
    matched_loss,
    measurement_at_loss,
    matched_tokens,
    thr_gain,
    tok_gain,
    token_inefficiency,
    tokens_to_target,
    transition_gains,
)
from .early import EarlyStatistic, FractionNotReachedError, NoEarlyStatisticError, alpha_trajectory, early_alpha
from .noise_predictor import NoiseScalePredictor
from .ranking import TierRanking, rank_tiers
from .spearman import spearman
from .sweep import SweepController, SweepDecision, TierDecision
from .tail import TailPredictor
from .tier_predictor import FamilyScore, PredictionScore, TierPredictor
from .windows import SpectrumMismatchError, WindowMismatchError, common_spectra, common_windows, resolve_spectrum, resolve_window
from .taxonomy import (
    ACTIVATION_LED,
    GRADIENT_LED,
    LABELS,
    MIXED_TRADEOFF,
    NO_CLEAR_CHANGE,
    REGRESSION,
    THROUGHPUT_LEANING,
    UNDETERMINED,
    UNATTRIBUTED_LEARNING,
    TaxonomyResult,
    TransitionClassifier,
    TransitionEvidence,
    js_divergence,
    replicate_evidence,
    transition_evidence,
)

__all__ = [
    "ACTIVATION_LED",
    "GRADIENT_LED",
    "LABELS",
    "MIXED_TRADEOFF",
    "NO_CLEAR_CHANGE",
    "NO_FAMILY",
    "REGRESSION",
    "THROUGHPUT_LEANING",
    "UNDETERMINED",
    "UNATTRIBUTED_LEARNING",
    "COMPLETE_COVERAGE",
    "EarlyStatistic",
    "NoEarlyStatisticError",
    "SpectrumMismatchError",
    "SweepWarning",
    "common_spectra",
    "coverage",
    "divergence",
    "FamilyScore",
    "FractionNotReachedError",
    "Matched",
    "NoiseScalePredictor",
    "PredictionScore",
    "SweepController",
    "SweepDecision",
    "TailPredictor",
    "TaxonomyResult",
    "TierDecision",
    "TierPredictor",
    "TierRanking",
    "TransitionClassifier",
    "TransitionEvidence",
    "TransitionGains",
    "WindowMismatchError",
    "align",
    "alpha_trajectory",
    "common_windows",
    "early_alpha",
    "eps_tok",
    "ended",
    "learning_rate",
    "pick_learning_rates",
    "DIVERGED_AFTER",
    "ENDED_STATUSES",
    "group_by_family",
    "js_divergence",
    "log_gains",
    "matched_fraction",
    "matched_loss",
    "measurement_at_loss",
    "matched_tokens",
    "rank_tiers",
    "replicate_evidence",
    "spearman",
    "resolve_spectrum",
    "resolve_window",
    "thr_gain",
    "tok_gain",
    "token_inefficiency",
    "tokens_to_target",
    "transition_evidence",
    "transition_gains",
]
