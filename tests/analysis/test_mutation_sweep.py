"""SweepController's continue rules at their boundaries (found by hand mutation testing).

The class docstring: a tier continues if it is among the ``keep`` best, or its statistic is
*within* ``margin + n_sigma * sqrt(sigma^2 + sigma_best^2)`` of the best (a gap equal to the
allowance is within), or ``p_best >= min_probability``. The suite's sweeps never sat on a boundary,
so ``gap < allowed``, ``p > min_probability`` and ``n_sigma * sigma`` (without the best tier's
sigma) all passed. The rankings here are built by hand (exactly representable numbers) and decided
by the controller's rule step.
"""

from __future__ import annotations

import math

from spectral_lens.analysis import SweepController
from spectral_lens.analysis.ranking import TierRanking


def _ranking(rows):
    """rows: [(tier, value, sigma, p_best)], best first."""
    tiers = tuple(r[0] for r in rows)
    return TierRanking(
        family="f", statistic="alpha_tail", tiers=tiers,
        values={r[0]: r[1] for r in rows}, sigmas={r[0]: r[2] for r in rows}, p_best={r[0]: r[3] for r in rows},
        recommended=tiers[0], p_recommended=rows[0][3], run_ids={r[0]: (f"b{r[0]}",) for r in rows},
    )


def _actions(ctrl, rows):
    rk = _ranking(rows)
    return {d.tier: d.action for d in ctrl._decide(rk, rk.run_ids)}


def test_a_gap_equal_to_the_margin_is_within():
    rows = [(4, 1.0, math.nan, math.nan), (8, 1.5, math.nan, math.nan), (16, 1.5625, math.nan, math.nan)]
    assert _actions(SweepController(margin=0.5), rows) == {4: "continue", 8: "continue", 16: "stop"}


def test_p_best_equal_to_min_probability_continues():
    rows = [(4, 1.0, 0.0, 0.75), (8, 9.0, 0.0, 0.25), (16, 9.0, 0.0, 0.0)]
    assert _actions(SweepController(min_probability=0.25), rows) == {4: "continue", 8: "continue", 16: "stop"}


def test_allowance_combines_both_sigmas():
    # n_sigma * hypot(0.3, 0.4) = 2 * 0.5 = 1.0: a gap of 0.875 is within, 1.125 is not
    rows = [(4, 1.0, 0.4, 0.99), (8, 1.875, 0.3, 0.0), (16, 2.125, 0.3, 0.0)]
    assert _actions(SweepController(n_sigma=2.0), rows) == {4: "continue", 8: "continue", 16: "stop"}


def test_a_tier_with_one_seed_past_the_fraction_is_decided_not_waiting(tmp_path):
    """``wait_for_all=False``: a tier with some runs past the fraction is decided on those, and its
    decision names every run of the tier (the waiting seed too)."""
    import numpy as np

    from spectral_lens import Spectrum
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    r = np.arange(1, 301, dtype=np.float64)

    def run(run_id, tier, alpha, fractions):
        info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=1000)
        with RunWriter(tmp_path / run_id, info, fsync=False) as w:
            for i, f in enumerate(fractions):
                w.log_measurement(i, int(f * 1000), {"act": Spectrum(r**-alpha, n_rows=10_000, dim=300)}, progress=f)
        return RunRecord.open(tmp_path / run_id)

    runs = [run("b1", 1, 1.0, (0.1, 0.2, 0.3)), run("b2s0", 2, 2.0, (0.1, 0.2, 0.3)), run("b2s1", 2, 2.0, (0.1,))]
    dec = SweepController(window=(100, 200), wait_for_all=False).decide(runs)["f"]
    assert dec.ready and dec.waiting_tiers == [] and dec.continue_tiers == [1] and dec.stop_tiers == [2]
    assert next(d for d in dec.decisions if d.tier == 2).run_ids == ("b2s0", "b2s1")
    held = SweepController(window=(100, 200)).decide(runs)["f"]  # wait_for_all: the seed holds the family
    assert not held.ready and set(held.waiting_tiers) == {1, 2}
