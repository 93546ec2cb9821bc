"""Tokens-to-target, eps_tok, gains and alignment against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spectral_lens import Spectrum
from spectral_lens._warnings import SpectralLensWarning
from spectral_lens.analysis import (
    align,
    eps_tok,
    log_gains,
    matched_fraction,
    matched_loss,
    matched_tokens,
    thr_gain,
    tok_gain,
    token_inefficiency,
    tokens_to_target,
    transition_gains,
)
from spectral_lens.records import RunInfo, RunRecord, RunWriter


def test_tokens_to_target_first_checkpoint_at_or_below():
    tokens = [10, 20, 30, 40]
    losses = [4.0, 3.5, 3.2, 3.0]
    assert tokens_to_target((tokens, losses), 3.2) == 30  # equality counts as reached
    assert tokens_to_target((tokens, losses), 3.3) == 30
    assert tokens_to_target((tokens, losses), 3.5) == 20


def test_tokens_to_target_never_reached_and_first_checkpoint():
    assert tokens_to_target(([10, 20], [4.0, 3.9]), 3.2) == math.inf
    assert tokens_to_target(([10, 20], [3.0, 2.9]), 3.2) == 10
    assert tokens_to_target(([10, 20], [3.0, 2.9]), 3.2, interpolate=True) == 10
    assert tokens_to_target(([], []), 3.2) == math.inf


def test_tokens_to_target_non_monotone_and_ties():
    # a later spike above the target does not matter: the FIRST checkpoint at/below counts
    assert tokens_to_target(([10, 20, 30], [3.1, 3.6, 3.0]), 3.2) == 10
    # unsorted input is sorted by tokens; NaN never reaches
    assert tokens_to_target(([30, 10, 20], [3.0, 4.0, float("nan")]), 3.2) == 30
    # two checkpoints at the same token count: file order decides (stable sort)
    assert tokens_to_target(([10, 10, 20], [3.5, 3.1, 3.0]), 3.2) == 10


def test_tokens_to_target_interpolation():
    # line from (10, 4.0) to (20, 3.0) crosses 3.2 at 18
    assert tokens_to_target(([10, 20], [4.0, 3.0]), 3.2, interpolate=True) == pytest.approx(18.0)


def test_tokens_to_target_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        tokens_to_target(([1, 2], [3.0]), 3.2)
    with pytest.raises(TypeError, match="RunRecord or a pair"):
        tokens_to_target(5, 3.2)


def test_eps_tok_and_ties():
    eps = eps_tok({"a": 200.0, "b": 100.0, "c": 100.0, "d": math.inf})
    assert eps == {"a": 2.0, "b": 1.0, "c": 1.0, "d": math.inf}
    with pytest.warns(SpectralLensWarning, match="no run reached"):
        nan = eps_tok({"a": math.inf, "b": math.inf})
    assert all(math.isnan(v) for v in nan.values())
    with pytest.raises(ValueError, match="positive|at the target loss at its first evaluation"):
        eps_tok({"a": 0.0})


def test_gains_hand_computed():
    assert tok_gain(150.0, 100.0) == pytest.approx(0.5)
    assert thr_gain(100.0, 80.0) == pytest.approx(-0.2)
    g_tok, g_thr = log_gains(150.0, 100.0, 100.0, 80.0)
    assert g_tok == pytest.approx(math.log(1.5))
    assert g_thr == pytest.approx(math.log(0.8))
    with pytest.raises(ValueError, match="T_b must be a positive"):
        tok_gain(1.0, 0.0)


def _run(root, run_id, family, losses, tokens, tps=None, total=1000):
    info = RunInfo(run_id, family=family, batch_tier=1, total_tokens=total)
    spec = Spectrum(np.array([3.0, 2.0, 1.0]), n_rows=10, dim=3)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, (t, l) in enumerate(zip(tokens, losses)):
            if tps is not None:
                w.log(i, t, tokens_per_s=tps)
            w.log_measurement(i, t, {"act": spec}, val_loss=l)
    return RunRecord.open(root / run_id)


def test_token_inefficiency_within_family_and_transition_gains(tmp_path):
    a = _run(tmp_path, "a", "f", [4.0, 3.1, 3.0], [100, 200, 300], tps=1000.0)
    b = _run(tmp_path, "b", "f", [3.9, 3.5, 3.1], [100, 200, 300], tps=1250.0)
    c = _run(tmp_path, "c", "g", [3.9, 3.8, 3.7], [100, 200, 300])
    with pytest.warns(SpectralLensWarning, match="family 'g'"):
        eps = token_inefficiency([a, b, c], 3.2)
    assert eps["a"] == 1.0 and eps["b"] == 1.5 and math.isnan(eps["c"])
    g = transition_gains(a, b, 3.2)
    assert (g.T_a, g.T_b, g.Q_a, g.Q_b) == (200, 300, 1000.0, 1250.0)
    assert g.tok_gain == pytest.approx(200 / 300 - 1)
    assert g.thr_gain == pytest.approx(0.25)
    assert g.g_tok == pytest.approx(math.log(2 / 3)) and g.g_thr == pytest.approx(math.log(1.25))
    g2 = transition_gains(a, c, 3.2)
    assert math.isinf(g2.T_b) and math.isnan(g2.tok_gain) and math.isnan(g2.thr_gain)


def test_matched_loss_alignment(tmp_path):
    # losses chosen exactly representable, so distances tie exactly
    a = _run(tmp_path, "a", "f", [4.0, 3.5, 3.0, 2.5], [100, 200, 300, 400])
    b = _run(tmp_path, "b", "f", [3.75, 3.375, 3.3125, 3.0], [100, 200, 300, 400])
    c = _run(tmp_path, "c", "f", [3.9, 3.8, 3.7, 3.6], [100, 200, 300, 400])
    first = matched_loss([a, b, c], 3.25)
    assert first["a"].measurement.tokens == 300 and first["a"].gap == pytest.approx(-0.25)
    assert first["b"].measurement.tokens == 400 and first["b"].index == 3
    assert first["c"] is None  # never reached
    near = matched_loss([a, b, c], 3.25, rule="nearest")
    assert near["a"].measurement.tokens == 200  # 3.5 and 3.0 are equally near: the earlier wins
    assert near["b"].measurement.tokens == 300 and near["b"].gap == pytest.approx(0.0625)
    assert near["c"].measurement.tokens == 400
    assert matched_loss([c], 3.25, rule="nearest", tolerance=0.1)["c"] is None


def test_matched_tokens_and_fraction(tmp_path):
    a = _run(tmp_path, "a", "f", [4.0, 3.5, 3.0], [100, 200, 300], total=400)
    assert matched_tokens([a], 160)["a"].measurement.tokens == 200
    assert matched_tokens([a], 150)["a"].measurement.tokens == 100  # tie -> earlier
    assert matched_tokens([a], 150, rule="first_after")["a"].measurement.tokens == 200
    m = matched_fraction([a], 0.5)["a"]
    assert m.measurement.tokens == 200 and m.value == pytest.approx(0.5)
    assert matched_fraction([a], 0.9, rule="first_after")["a"] is None
    with pytest.raises(ValueError, match="rule for by='loss'"):
        align([a], "loss", 3.2, rule="first_after")
    with pytest.raises(ValueError, match="by must be one of"):
        align([a], "steps", 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.floats(2.0, 5.0)), max_size=30), st.floats(2.0, 5.0))
def test_tokens_to_target_is_the_earliest_checkpoint_at_or_below(points, target):
    tokens = [p[0] for p in points]
    losses = [p[1] for p in points]
    expected = min((t for t, l in points if l <= target), default=math.inf)
    assert tokens_to_target((tokens, losses), target) == expected
    interp = tokens_to_target((tokens, losses), target, interpolate=True)
    assert interp <= expected and (math.isinf(expected) or interp >= min(tokens))
