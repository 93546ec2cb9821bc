"""``NoiseScalePredictor``: the gradient-noise-scale baseline for ordering batch tiers."""

from __future__ import annotations

import math

from ..records import RunRecord
from .early import EarlyStatistic, NoEarlyStatisticError, early_value, require_known_progress
from .tier_predictor import TierPredictor

__all__ = ["NoiseScalePredictor"]


class NoiseScalePredictor(TierPredictor):
    """Baseline: the tier whose batch is closest to the gradient noise scale measured early.

    McCandlish et al.'s ``B_simple = tr(Sigma) / |G|^2`` approximates the critical batch; this
    baseline predicts that tiers whose batch is closer (in log) to it are more token-efficient.
    Statistic per run: ``|log(batch / B_simple)|`` with ``B_simple`` interpolated at ``fraction``
    in log space from ``Measurement.scalars[key]``.

    Args:
        fraction: progress fraction of the early measurement.
        key: the measurement scalar holding ``B_simple`` (the per-sample gradient probe's
            convention: ``"noise_scale"``, in samples per step).
        unit: ``"samples"``: compare with ``RunInfo.batch_size``; ``"tokens"``: with
            ``RunInfo.tokens_per_step`` (then ``key`` must hold tokens).
        noise_neighbors, n_draws, random_state: as in :class:`TailPredictor`.
    """

    statistic = "noise_scale_distance"

    def __init__(
        self,
        fraction: float = 0.2,
        *,
        key: str = "noise_scale",
        unit: str = "samples",
        noise_neighbors: int = 5,
        n_draws: int = 4000,
        random_state: int = 0,
    ):
        super().__init__(fraction, noise_neighbors=noise_neighbors, n_draws=n_draws, random_state=random_state)
        if unit not in ("samples", "tokens"):
            raise ValueError(f"unit must be 'samples' or 'tokens', got {unit!r}")
        self.key = key
        self.unit = unit

    def _batch(self, run: RunRecord) -> float:
        b = run.info.batch_size if self.unit == "samples" else run.info.tokens_per_step
        if not b:
            attr = "batch_size" if self.unit == "samples" else "tokens_per_step"
            raise ValueError(f"run {run.run_id!r}: RunInfo.{attr} is needed to compare with the noise scale")
        return float(b)

    def _early(self, run: RunRecord) -> EarlyStatistic:
        """Raises :class:`FractionNotReachedError` for a run without a measurement of known progress
        yet (a tier just launched; :class:`SweepController` then waits for it), as :func:`early_alpha`, and a
        ``ValueError`` for one whose measurements can never have a progress (no ``RunInfo.total_tokens``)."""
        require_known_progress(run)
        pts = []
        for m in run.measurements:
            f, v = run.progress(m), m.scalars.get(self.key)
            if f is not None and v is not None and v > 0 and math.isfinite(v):
                pts.append((f, math.log(v), m.step))
        if not pts:
            raise NoEarlyStatisticError(f"run {run.run_id!r}: no measurement has a positive scalar {self.key!r}")
        return early_value(run, self.fraction, pts, "log_noise_scale", self.noise_neighbors)

    def _badness(self, stat: EarlyStatistic, run: RunRecord) -> tuple[float, float]:
        return abs(math.log(self._batch(run)) - stat.value), stat.sigma

    def __repr__(self) -> str:
        return f"NoiseScalePredictor(fraction={self.fraction}, key={self.key!r}, unit={self.unit!r})"
