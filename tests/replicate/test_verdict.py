"""The verdict on synthetic sweeps whose ordering is known (Theorem-6 model), and its flags."""
import math

import pytest

from examples.replicate.pipeline import chain_transitions
from spectral_lens.atomic import write_text_atomic
from examples.replicate.progress import Progress
from examples.replicate.verdict import verdict
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import open_runs

TIERS = (1, 2, 4, 8, 16)


def _sweep(root, family, q, eta=25.0):
    return write_theorem6_sweep(root, TIERS, family=family, q=q, eta=eta, dim=256, grad_dim=64, n_eval=60,
                                n_measure=20, total_tokens=10_000_000, tokens_per_tier=1024)


def test_known_ordering_reproduces_and_reversed_is_flagged(tmp_path):
    # family "good": larger tiers learn slower (q grows) -> flatter early tail = fewer tokens: rho = +1
    good = _sweep(tmp_path, "good", q={t: 0.4 + 0.1 * i for i, t in enumerate(TIERS)})
    runs = open_runs(good)
    target = 3.2
    v = verdict(runs, target=target, families=["good"], unit="tokens", window=(20, 60))
    fam = v.families["good"]
    assert fam.rho == pytest.approx(1.0) and fam.pvalue == pytest.approx(2 / 120)
    assert fam.flags == ("reproduced",) and not fam.missed and len(fam.reached) == 5
    assert "reproduced the claim" in v.lines[-1]
    # a pre-registered target nobody reaches: every tier missed, no ranking, flagged
    v2 = verdict(runs, target=0.1, families=["good"], unit="tokens", window=(20, 60))
    f2 = v2.families["good"]
    assert f2.missed == TIERS and "underpowered" in f2.flags and f2.flags[0].startswith("no ranking")
    assert "Did not reproduce" in v2.lines[-1]


def test_flags_say_negative_and_weak_results():
    from examples.replicate.verdict import _flags

    assert _flags(-0.9, 0.03, 5) == ("not reproduced", "negative rho (the early tail ranks the tiers backwards)")
    assert _flags(0.9, 0.08, 5) == ("reproduced", "not significant (p > 0.05)")
    assert _flags(0.8, 0.01, 2) == ("reproduced", "underpowered")
    assert _flags(0.79, 0.01, 5) == ("not reproduced",)
    assert _flags(0.7999999999999999, 0.01, 5) == ("reproduced",)  # rank arithmetic rounding
    assert _flags(float("nan"), float("nan"), 5)[0].startswith("no ranking")


def test_chain_transitions_pick_best_runs(tmp_path):
    a = _sweep(tmp_path, "A", q={t: 0.4 + 0.1 * i for i, t in enumerate(TIERS)})
    b = _sweep(tmp_path, "B", q={t: 0.4 + 0.1 * i for i, t in enumerate(TIERS)}, eta=40.0)
    runs = open_runs(a + b)
    pairs = chain_transitions(runs, ["A", "B"], 3.2)
    assert pairs == [("A-b1", "B-b1")]
    assert chain_transitions(runs, ["A", "B"], 0.1) == []


def test_write_atomic_and_progress(tmp_path, capsys):
    write_text_atomic(tmp_path / "x.txt", "hello")
    assert (tmp_path / "x.txt").read_text() == "hello" and len(list(tmp_path.iterdir())) == 1
    p = Progress(10, "stage")
    assert p.eta() is None
    p.advance(5, "half")
    assert p.eta() is not None
    out = capsys.readouterr().out
    assert "[stage]  50.0%" in out and "half" in out
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")


def test_a_statistic_that_cannot_be_scored_says_why(tmp_path):
    # A rank window beyond the spectrum (256 eigenvalues): the verdict named "fewer than 3 tiers or
    # constant values" and "not significant (p > 0.05)", neither of which was the cause.
    runs = open_runs(_sweep(tmp_path, "good", q={t: 0.4 + 0.1 * i for i, t in enumerate(TIERS)}))
    fam = verdict(runs, target=3.2, families=["good"], unit="tokens", window=(300, 400)).families["good"]
    assert len(fam.reached) == 5 and math.isnan(fam.rho)
    assert len(fam.flags) == 1 and fam.flags[0].startswith("no ranking (") and "exceeds the spectrum" in fam.flags[0]
