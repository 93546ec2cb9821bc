"""A taxonomy rule's text printed a tiny negative gain as ``g_tok=-0.000`` (noticed by the session-23 CLI review):
a value that rounds to zero is ``+0.000``."""

from __future__ import annotations

import math

from spectral_lens.analysis import TransitionEvidence
from spectral_lens.analysis.taxonomy import TransitionClassifier


def test_a_gain_that_rounds_to_zero_has_no_minus_sign():
    ev = TransitionEvidence("a", "b", math.expm1(-0.0004), math.expm1(-0.0002), -0.0004, -0.0002)
    rule = TransitionClassifier().classify(ev).rule
    assert "g_tok=+0.000, g_thr=+0.000" in rule and "-0.000" not in rule, rule
    ev = TransitionEvidence("a", "b", math.expm1(-0.25), 0.0, -0.25, 0.0)
    assert "g_tok=-0.250" in TransitionClassifier().classify(ev).rule  # a real loss keeps its sign
