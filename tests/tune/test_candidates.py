"""candidate_set against hand-computed factors for tiers {1, 2, 4, 8, 16, 32} from B0 = 8 (paper App. B.3)."""
import math

import pytest

from examples.tune import PAPER_MULTIPLIERS, candidate_set

R2 = math.sqrt(2.0)
# Hand-computed: centers sqrt(B/8) and B/8, times {1/2, 1/sqrt2, 1, sqrt2, 2}; coincident factors merged.
EXPECTED = {
    1: [1 / 16, 1 / (8 * R2), 1 / 8, 1 / (4 * R2), 1 / 4, 1 / (2 * R2), 1 / 2, 1 / R2],
    2: [1 / 8, 1 / (4 * R2), 1 / 4, 1 / (2 * R2), 1 / 2, 1 / R2, 1.0],
    4: [1 / 4, 1 / (2 * R2), 1 / 2, 1 / R2, 1.0, R2],
    8: [1 / 2, 1 / R2, 1.0, R2, 2.0],
    16: [1 / R2, 1.0, R2, 2.0, 2 * R2, 4.0],
    32: [1.0, R2, 2.0, 2 * R2, 4.0, 4 * R2, 8.0],
}


@pytest.mark.parametrize("tier", sorted(EXPECTED))
def test_factors_match_hand_computed_sets(tier):
    cands = candidate_set("f", tier, reference_tier=8, reference_lrs={"lr": 1.0})
    scales = [c.scale for c in cands]
    assert len(scales) == len(EXPECTED[tier])
    for got, want in zip(scales, EXPECTED[tier]):
        assert got == pytest.approx(want, rel=1e-12)
    assert scales == sorted(scales)


def test_b32_origins_name_every_producing_pair():
    cands = {round(c.scale, 9): c for c in candidate_set("f", 32, reference_tier=8, reference_lrs={"lr": 1.0})}
    # sqrt(32/8) = 2 and 32/8 = 4: 2 = 2 x 1 = 4 x 1/2, 2 sqrt2 = 2 x sqrt2 = 4 / sqrt2, 4 = 2 x 2 = 4 x 1
    assert cands[2.0].origins == (("sqrt", 1.0), ("linear", 0.5))
    assert cands[round(2 * R2, 9)].origins == (("sqrt", 2 ** 0.5), ("linear", 2 ** -0.5))
    assert cands[4.0].origins == (("sqrt", 2.0), ("linear", 1.0))
    assert cands[1.0].origins == (("sqrt", 0.5),)
    assert cands[8.0].origins == (("linear", 2.0),)
    # the kept factor is the first generated one (the sqrt center's)
    assert cands[round(2 * R2, 9)].scale == 2.0 * R2


def test_b8_both_centers_coincide_everywhere():
    cands = candidate_set("f", 8, reference_tier=8, reference_lrs={"lr": 1.0})
    assert all(len(c.origins) == 2 and c.origins[0][0] == "sqrt" and c.origins[1][0] == "linear" for c in cands)


def test_tolerance_is_what_merges_rounded_duplicates():
    # At B = 4: sqrt(1/2) / sqrt2 = 0.5000000000000001 is not 1/2 x 1, and sqrt(1/2) x sqrt2 is not
    # 1/2 x 2; with rel_tol = 0 they stay apart (8 candidates), with the default 1e-9 they merge (6).
    assert math.sqrt(0.5) * 2 ** -0.5 != 0.5 and math.sqrt(0.5) * 2 ** 0.5 != 1.0
    assert len(candidate_set("f", 4, reference_tier=8, reference_lrs={"lr": 1.0}, rel_tol=0.0)) == 8
    assert len(candidate_set("f", 4, reference_tier=8, reference_lrs={"lr": 1.0})) == 6
    # a wide tolerance merges neighbours sqrt2 apart (ratio 1.414 -> rel diff 0.29)
    assert len(candidate_set("f", 8, reference_tier=8, reference_lrs={"lr": 1.0}, rel_tol=0.3)) < 5


def test_one_multiplier_scales_every_group_together():
    ref = {"embed": 0.6, "head": 0.008, "hidden": 0.04, "scalar": 0.04}
    for c in candidate_set("trunk", 2, reference_tier=8, reference_lrs=ref):
        assert set(c.lrs) == set(ref)
        for g in ref:
            assert c.lrs[g] == pytest.approx(ref[g] * c.scale, rel=1e-15)
        assert c.lrs["embed"] / c.lrs["head"] == pytest.approx(0.6 / 0.008)
    assert candidate_set("trunk", 2, reference_tier=8, reference_lrs=ref)[0].key == "trunk/b2/x0.125"


def test_other_reference_tier_and_multipliers():
    cands = candidate_set("f", 4, reference_tier=2, reference_lrs={"lr": 1.0}, multipliers=(1.0, 2.0))
    assert [c.scale for c in cands] == pytest.approx([R2, 2.0, 2 * R2, 4.0])
    assert PAPER_MULTIPLIERS == pytest.approx((0.5, 1 / R2, 1.0, R2, 2.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(tier=0), "tier must be a positive int"),
    (dict(tier=2.0), "tier must be a positive int"),
    (dict(reference_tier=-8), "reference_tier must be a positive int"),
    (dict(reference_lrs={}), "family 'f' has no reference rates"),
    (dict(reference_lrs={"adam": float("nan")}), "group 'adam' has reference rate nan"),
    (dict(reference_lrs={"adam": 0.0}), "expected a finite rate > 0"),
    (dict(multipliers=()), "empty candidate set for family 'f' tier 4"),
    (dict(multipliers=(1.0, -2.0)), "multiplier -2.0 must be a finite number > 0"),
    (dict(rel_tol=1.5), "rel_tol must be in"),
    (dict(family=""), "family must be a non-empty string"),
])
def test_bad_input_is_named(kwargs, match):
    args = dict(family="f", tier=4, reference_tier=8, reference_lrs={"lr": 1.0}) | kwargs
    family, tier = args.pop("family"), args.pop("tier")
    with pytest.raises(ValueError, match=match):
        candidate_set(family, tier, **args)
