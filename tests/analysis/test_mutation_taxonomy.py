"""TransitionClassifier rules exactly at their thresholds (found by hand mutation testing).

The class docstring states which comparisons are inclusive: rule 1 "one gain >= g, the other
<= -g, and min >= tradeoff_ratio * max"; rule 2 "|g_tok| < g and |g_thr| < g" (strict); rule 3 "no
gain >= g"; rule 4 "g_tok >= g and g_tok >= g_thr", "act_score >= 1 and act_score >= grad_score",
"grad_score >= 1". The suite's transitions never sat on a threshold, so flipping any of these
comparisons passed. Log gains and spectral numbers here are exact binary fractions, so every
boundary is hit exactly.
"""

from __future__ import annotations

import math

import pytest

from spectral_lens.analysis import (
    ACTIVATION_LED,
    GRADIENT_LED,
    MIXED_TRADEOFF,
    NO_CLEAR_CHANGE,
    REGRESSION,
    THROUGHPUT_LEANING,
    UNATTRIBUTED_LEARNING,
    UNDETERMINED,
    TransitionClassifier,
    TransitionEvidence,
)

CLF = TransitionClassifier(gain_threshold=0.25, tradeoff_ratio=0.5, head_threshold=0.25, act_jsd_threshold=0.5,
                           grad_alpha_threshold=0.25, grad_jsd_threshold=0.5)


def _ev(g_tok, g_thr, **spectral):
    return TransitionEvidence("a", "b", math.expm1(g_tok), math.expm1(g_thr), g_tok, g_thr, **spectral)


@pytest.mark.parametrize(
    "g_tok, g_thr, spectral, label",
    [
        # a gain exactly at the threshold counts (rule 2 is strict, rule 3 needs max < g)
        (0.25, 0.0, {}, UNATTRIBUTED_LEARNING),
        (0.0, 0.25, {}, THROUGHPUT_LEANING),
        (0.125, -0.125, {}, NO_CLEAR_CHANGE),
        (-0.25, 0.0, {}, REGRESSION),
        # rule 1 at tradeoff_ratio exactly: comparable
        (0.5, -0.25, {}, MIXED_TRADEOFF),
        (-0.25, 0.5, {}, MIXED_TRADEOFF),
        (0.5, -0.1875, {}, UNATTRIBUTED_LEARNING),  # below the ratio: the gain dominates
        # rule 4 vs 5 when the two gains are equal: token-led
        (0.5, 0.5, {}, UNATTRIBUTED_LEARNING),
        # act_score exactly 1 is clear; equal to grad_score it still wins
        (0.5, 0.0, {"d_alpha_head": 0.25}, ACTIVATION_LED),
        (0.5, 0.0, {"d_alpha_head": -0.25}, ACTIVATION_LED),  # a displacement either way
        (0.5, 0.0, {"d_alpha_head": 0.5, "d_grad_alpha": 0.5}, ACTIVATION_LED),
        (0.5, 0.0, {"d_alpha_head": 0.25, "d_grad_alpha": 0.375}, GRADIENT_LED),
        # grad_score exactly 1 is clear
        (0.5, 0.0, {"d_alpha_head": 0.125, "d_grad_alpha": 0.25}, GRADIENT_LED),
        (0.5, 0.0, {"d_alpha_head": 0.125, "d_grad_alpha": -0.25}, GRADIENT_LED),
        (0.5, 0.0, {"d_alpha_head": 0.125, "d_grad_alpha": 0.1875}, UNATTRIBUTED_LEARNING),
        # the JSD half of a score (max over the two pairs)
        (0.5, 0.0, {"d_alpha_head": 0.0, "act_jsd": 0.5}, ACTIVATION_LED),
    ],
)
def test_rules_at_their_thresholds(g_tok, g_thr, spectral, label):
    res = CLF.classify(_ev(g_tok, g_thr, **spectral))
    assert res.label == label, res.rule


def test_scores_are_max_of_absolute_ratios():
    res = CLF.classify(_ev(0.5, 0.0, d_alpha_head=-0.125, act_jsd=0.25, d_grad_alpha=-0.75, grad_jsd=0.125))
    assert res.act_score == 0.5 and res.grad_score == 3.0


def test_an_infinite_tokens_to_target_is_undetermined():
    ev = TransitionEvidence("a", "b", math.nan, 0.0, math.nan, 0.0,
                            details={"target": 3.2, "T_a": math.inf, "T_b": 100.0})
    assert CLF.classify(ev).label == UNDETERMINED


def test_from_replicates_scales_the_largest_spread_by_margin():
    null = [
        _ev(0.0625, -0.125, d_alpha_head=0.0625, act_jsd=0.03125, d_grad_alpha=-0.25, grad_jsd=0.015625),
        _ev(-0.03125, 0.25, d_alpha_head=-0.125, act_jsd=0.0625, d_grad_alpha=0.125, grad_jsd=0.03125),
    ]
    clf = TransitionClassifier.from_replicates(null, margin=2.0)
    assert clf.gain_threshold == 0.5  # 2 x max |g_tok|, |g_thr| (the throughput spread is the larger)
    assert clf.head_threshold == 0.25 and clf.act_jsd_threshold == 0.125
    assert clf.grad_alpha_threshold == 0.5 and clf.grad_jsd_threshold == 0.0625
