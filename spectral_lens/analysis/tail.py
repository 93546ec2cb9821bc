"""``TailPredictor``: the token-efficient batch tier from the early activation tail (paper Sec. 3, Cor. 8).

A flatter early tail (smaller ``alpha_tail`` at 20% of the token budget) predicts fewer tokens to
the target: ``T ~ (R/r_h)^((alpha_tail - p)/2)``.
"""

from __future__ import annotations

from ..records import RunRecord
from ..spectra.fit import window_ranks
from .early import EarlyStatistic, early_alpha
from .tier_predictor import TierPredictor, _differ
from .efficiency import group_by_family
from .windows import common_spectra, common_windows

__all__ = ["TailPredictor"]


class TailPredictor(TierPredictor):
    """Predicts the token-efficient batch tier from the early activation tail (paper Sec. 3, Cor. 8).

    Args:
        fraction: progress fraction of the early measurement (paper: 0.2, App. E.1).
        window: rank window of ``alpha_tail`` for every run. Default: the window each run recorded
            (``summary_windows`` in its ``run.json``), else the scale rule for ``RunInfo.n_layer``
            (d12 -> [100, 200], d36 -> [200, 400], d48 -> [400, 800]); the runs of a family must
            agree (:func:`~spectral_lens.analysis.common_windows`), else
            :class:`~spectral_lens.analysis.WindowMismatchError`. A window that is not a pair of integer
            ranks ``1 <= lo < hi`` (a float, fractions, a bool) raises ``ValueError`` here.
        spectrum: spectrum name; default :func:`resolve_spectrum` (the run's primary / only
            activation spectrum).
        noise_neighbors: measurements nearest to ``fraction`` used for the jitter ``sigma``.
        n_draws, random_state: Monte Carlo draws for ``p_best`` and their seed.

    A smaller early ``alpha_tail`` (flatter tail) predicts fewer tokens to target. ``fit(runs)``
    returns ``self`` with ``statistics_``, ``family_range_``, ``rankings_``; ``predict(runs)``
    returns family -> :class:`TierRanking`; ``score(runs, target_loss)`` returns
    :class:`PredictionScore`.

    Example::

        pred = TailPredictor().fit(open_runs(["runs/sweep"]))
        ranking = pred.predict()["FlexWin"]
        ranking.recommended, ranking.p_recommended
        pred.score(targets=3.2).rho
    """

    statistic = "alpha_tail"

    def __init__(
        self,
        fraction: float = 0.2,
        *,
        window: tuple[int, int] | None = None,
        spectrum: str | None = None,
        noise_neighbors: int = 5,
        n_draws: int = 4000,
        random_state: int = 0,
    ):
        super().__init__(fraction, noise_neighbors=noise_neighbors, n_draws=n_draws, random_state=random_state)
        # checked when built, as BandAlphaFitter does: int() made (0.1, 0.2) (0, 0) and (100.7, 200) (100, 200)
        self.window = None if window is None else window_ranks(window, "TailPredictor: window")
        self.spectrum = spectrum

    def _check_runs(self, runs: list[RunRecord]) -> None:
        """Every family's runs share one tail window and one spectrum (raises
        :class:`WindowMismatchError` / :class:`SpectrumMismatchError` otherwise)."""
        common_windows(runs, self.window)
        common_spectra(runs, self.spectrum)

    def _flags(self, runs, stats) -> list[str]:
        """Also: runs of a family whose spectra at the fraction have different numbers of probe rows
        (``Spectrum.n_rows``: a different held-out pool or pool size; ``alpha_tail`` depends on it)."""
        out = super()._flags(runs, stats)
        by_id = {s.run_id: s for s in stats}
        for family, members in group_by_family(r for r in runs if r.run_id in by_id).items():
            rows = {r.run_id: ", ".join(map(str, by_id[r.run_id].n_rows)) for r in members if by_id[r.run_id].n_rows}
            out += _differ(family, rows, "probe rows (Spectrum.n_rows) near the early checkpoint",
                           "they were measured on different held-out pools or pool sizes, and alpha_tail depends on "
                           "the sample; measure every tier on the same pool")
        return out

    def fit(self, runs) -> "TailPredictor":
        """As :meth:`TierPredictor.fit`; also learns ``windows_`` (family -> the tail window its runs
        were fitted on). ``predict(runs)``, ``score(runs)`` and :class:`SweepController` leave it as is."""
        super().fit(runs)
        self.windows_ = {s.family: s.window for s in self.statistics_}
        return self

    def _early(self, run: RunRecord) -> EarlyStatistic:
        return early_alpha(
            run, self.fraction, window=self.window, spectrum=self.spectrum, noise_neighbors=self.noise_neighbors
        )

    def __repr__(self) -> str:
        return f"TailPredictor(fraction={self.fraction}, window={self.window}, spectrum={self.spectrum!r})"
