"""Review 23 (cli): the ``spectral-lens`` command line as a new user meets it. A toss-up among three or
more tiers names every one of them; ``inspect FILE.npz`` compares r* with the window the run recorded
(or ``--window``) and says which; the public helpers' homes; adversarial argv gives one line and status 2."""

from __future__ import annotations

import json
import math

import pytest

from spectral_lens.analysis.ranking import TierRanking, close_call, rank_tiers


def _hand(p_best: dict, values: dict | None = None, n_draws: int = 4000) -> TierRanking:
    """A ranking with given shares (tiers in ``p_best``'s order, the first recommended)."""
    tiers = tuple(p_best)
    values = values or {t: 1.0 + 0.001 * i for i, t in enumerate(tiers)}
    return TierRanking(family="f", statistic="alpha_tail", tiers=tiers, values=values,
                       sigmas={t: 0.1 for t in tiers}, p_best=dict(p_best), recommended=tiers[0],
                       p_recommended=p_best[tiers[0]], run_ids={t: (f"r{t:g}",) for t in tiers}, n_draws=n_draws)


# ---- 1: a toss-up among three tiers names all three ---------------------------------------------------------


def test_close_call_names_every_tier_within_error_of_the_recommended():
    """Three tiers of equal value share P(best) about 1/3 each: the caution named only the top two ('tiers 4
    and 8'), as if tier 16 were clearly behind."""
    rk = rank_tiers("f", [(4, "a", 1.0, 0.01), (8, "b", 1.0, 0.01), (16, "c", 1.0, 0.01)], statistic="alpha_tail")
    assert all(abs(p - 1 / 3) < 0.05 for p in rk.p_best.values())
    c = close_call(rk)
    assert c.startswith("family f: tiers 4, 8 and 16 are too close to call: P(best) "), c
    assert f"{rk.p_best[4]:.3f} vs {rk.p_best[8]:.3f}, {rk.p_best[16]:.3f}" in c
    assert "equal values: the smaller tier first" in c and "treat these 3 as equal" in c
    # four tiers, the last clearly behind: the three within error are named, the fourth is not
    rk4 = rank_tiers("f", [(4, "a", 1.0, 0.01), (8, "b", 1.0, 0.01), (16, "c", 1.0, 0.01), (32, "d", 2.0, 0.01)])
    assert rk4.p_best[32] == 0.0
    c4 = close_call(rk4)
    assert c4.startswith("family f: tiers 4, 8 and 16 are too close to call: ") and "tier 32" not in c4
    assert c4.count(" vs ") == 2 and len(c4.split(" vs ")[1].split(" (")[0].split(", ")) == 2  # two rivals' P(best)


def test_close_call_wording_by_who_leads():
    # one rival with the larger share, one within error below
    c = close_call(_hand({4: 0.33, 8: 0.35, 16: 0.32}))
    assert c.startswith("family f: tiers 4, 8 and 16 are too close to call: P(best) 0.330 vs 0.350, 0.320 "
                        "(tier 8 has a larger P(best): +-"), c
    # two rivals with larger shares
    c = close_call(_hand({4: 0.30, 8: 0.36, 16: 0.34}))
    assert "(tiers 8 and 16 have a larger P(best): +-" in c
    # none larger, all within error: the largest margin is given, from the recommended tier
    c = close_call(_hand({4: 0.34, 8: 0.33, 16: 0.33}))
    assert "(all 3 are within Monte Carlo error: +-" in c and "or less on each difference from tier 4" in c
    m = 2 * math.sqrt((0.34 + 0.33 - 0.01 ** 2) / 4000)
    assert f"+-{m:.3f} or less" in c
    # a third tier clearly behind: the two-tier wording, unchanged
    c = close_call(_hand({4: 0.49, 8: 0.49, 16: 0.02}))
    assert c.startswith("family f: tiers 4 and 8 are too close to call: P(best) 0.490 vs 0.490 (the two are "
                        "within Monte Carlo error: +-"), c
    assert "on the difference, 4000 draws" in c and "treat them as equal" in c
    # a clear lead over both: nothing
    assert close_call(_hand({4: 0.80, 8: 0.15, 16: 0.05})) is None
