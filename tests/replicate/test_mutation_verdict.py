"""Mutation audit (verdict.py): which fraction and window feed which number, the pooled rho, the flags.

The synthetic Theorem-6 sweeps of test_verdict.py give rho = 1 at every fraction and window, so
mutants that scored the main rho at 20% whatever the pre-registered fraction, scanned without the
window, reported a family's rho as the pooled one, moved the 0.8 tolerance to 1e-3, flagged only
rho < -0.5 as negative or dropped the "weakly" sentence all passed. Here the predictors are stubs
whose rho encodes their (fraction, window), so each number's provenance is checked exactly.
"""
import math
from types import SimpleNamespace

import pytest

from examples.replicate import verdict as vmod
from examples.replicate.verdict import _flags, verdict


def _code(fraction, window, family):
    # a distinct rho for every (fraction, window, family): 0.5 + fraction/10 (+0.01 with a window) (+0.001 for B)
    return 0.5 + fraction / 10 + (0.01 if window is not None else 0.0) + (0.001 if family == "B" else 0.0)


class _Tail:
    def __init__(self, fraction=0.2, *, window=None, **_):
        self.fraction, self.window = fraction, window

    def fit(self, runs):
        return self

    def score(self, targets=None):
        within = {f: SimpleNamespace(rho=_code(self.fraction, self.window, f), pvalue=self.fraction / 100, n=5)
                  for f in ("A", "B")}
        return SimpleNamespace(within=within, rho=-0.25 - self.fraction, pvalue=0.5 + self.fraction, n=10)


class _Noise(_Tail):
    def score(self, targets=None):
        within = {f: SimpleNamespace(rho=-0.7 - self.fraction, pvalue=0.9, n=5) for f in ("A", "B")}
        return SimpleNamespace(within=within, rho=0.0, pvalue=1.0, n=10)


@pytest.fixture
def runs(monkeypatch):
    monkeypatch.setattr(vmod, "TailPredictor", _Tail)
    monkeypatch.setattr(vmod, "NoiseScalePredictor", _Noise)
    monkeypatch.setattr(vmod, "token_inefficiency", lambda runs, target: {})
    monkeypatch.setattr(vmod, "tokens_to_target", lambda r, target: 100.0 * r.info.batch_tier)
    monkeypatch.setattr(vmod, "divergence", lambda r: None)  # these stub runs have no records to read
    return [SimpleNamespace(info=SimpleNamespace(family=f, batch_tier=t)) for f in ("A", "B") for t in (1, 2, 4, 8, 16)]


def test_each_number_comes_from_the_preregistered_fraction_and_window(runs):
    v = verdict(runs, target=2.0, families=["A", "B"], unit="examples", fraction=0.4, window=(10, 40),
                fractions=(0.1, 0.3))
    for fam in ("A", "B"):
        f = v.families[fam]
        assert f.rho == _code(0.4, (10, 40), fam) and f.pvalue == 0.4 / 100 and f.n == 5
        assert f.rho_by_fraction == {0.1: _code(0.1, (10, 40), fam), 0.3: _code(0.3, (10, 40), fam)}
        assert f.baseline_rho == pytest.approx(-1.1) and f.baseline_pvalue == 0.9
    assert (v.pooled_rho, v.pooled_pvalue, v.pooled_n) == (pytest.approx(-0.65), pytest.approx(0.9), 10)
    assert v.fraction == 0.4 and v.window == (10, 40)
    assert "rho = -0.65" in v.lines[-2] and "n = 10" in v.lines[-2]


def test_flags_at_the_threshold_and_for_any_negative_rho():
    assert _flags(0.799, 0.01, 5) == ("not reproduced",)  # only float rounding is forgiven, not 1e-3
    assert _flags(0.8 - 1e-12, 0.01, 5) == ("reproduced",)
    assert _flags(-0.1, 0.5, 5) == ("not reproduced", "negative rho (the early tail ranks the tiers backwards)",
                                    "not significant (p > 0.05)")
    assert _flags(0.9, 0.05, 5) == ("reproduced",)  # p = alpha is significant (p <= alpha)


def test_weak_reproduction_is_said_in_the_last_line(runs, monkeypatch):
    # fraction 0.2 with a window: rho 0.53 / 0.531 -> not reproduced, named in the last line
    v = verdict(runs, target=2.0, families=["A", "B"], unit="examples", window=(10, 40))
    assert "Did not reproduce" in v.lines[-1] and "A, B" in v.lines[-1]
    # reproduced but with p > 0.05: the last line says "weakly"
    monkeypatch.setattr(_Tail, "score", lambda self, targets=None: SimpleNamespace(
        within={f: SimpleNamespace(rho=0.9, pvalue=0.09, n=5) for f in ("A", "B")}, rho=0.9, pvalue=0.01, n=10))
    w = verdict(runs, target=2.0, families=["A", "B"], unit="examples", window=(10, 40))
    assert all(f.flags == ("reproduced", "not significant (p > 0.05)") for f in w.families.values())
    assert w.lines[-1] == ("Every family reproduced the claim at the pre-registered fraction, but weakly for A, B "
                           "(see the flags above).")
    assert math.isfinite(w.pooled_rho)
