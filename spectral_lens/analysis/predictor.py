"""Early prediction of the token-efficient batch tier (paper Sec. 3, App. E): the names, in one place.

The pieces live in one module per concept; this module re-exports them for existing imports:

* :mod:`.windows`: which spectrum and which rank window (``resolve_spectrum``, ``resolve_window``,
  ``common_windows``, ``common_spectra``);
* :mod:`.early`: a run's statistic at an early fraction with its jitter (``early_alpha``,
  ``EarlyStatistic``, ``alpha_trajectory``);
* :mod:`.ranking`: tiers ranked with ``p_best`` (``rank_tiers``, ``TierRanking``);
* :mod:`.spearman`: the rank correlation and its exact permutation p-value;
* :mod:`.tier_predictor`: fit / predict / score (``PredictionScore``, ``FamilyScore``);
* :mod:`.tail`: :class:`TailPredictor`; :mod:`.noise_predictor`: :class:`NoiseScalePredictor`;
* :mod:`.sweep`: :class:`SweepController` and its decisions.
"""

from .early import EarlyStatistic, FractionNotReachedError, NoEarlyStatisticError, alpha_trajectory, early_alpha
from .noise_predictor import NoiseScalePredictor
from .ranking import TierRanking, rank_tiers
from .sweep import SweepController, SweepDecision, TierDecision
from .tail import TailPredictor
from .tier_predictor import FamilyScore, PredictionScore, TierPredictor
from .windows import (DEFAULT_WINDOW, SpectrumMismatchError, WindowMismatchError, common_spectra, common_windows,
                      resolve_spectrum, resolve_window)

__all__ = [
    "DEFAULT_WINDOW",
    "FractionNotReachedError",
    "NoEarlyStatisticError",
    "SpectrumMismatchError",
    "common_spectra",
    "EarlyStatistic",
    "TierRanking",
    "FamilyScore",
    "PredictionScore",
    "TierPredictor",
    "TailPredictor",
    "NoiseScalePredictor",
    "TierDecision",
    "SweepDecision",
    "SweepController",
    "WindowMismatchError",
    "common_windows",
    "resolve_spectrum",
    "resolve_window",
    "alpha_trajectory",
    "early_alpha",
    "rank_tiers",
]
