"""Review 22 (rev-analysis2): adversarial review of the analysis2 cautions. A run evaluated before training
(token 0, as the example trainers do) that reaches the target at its first evaluation of training is flagged
like one without the token-0 evaluation; ``close_call`` on a hand-built ranking with no draws is a clear
error, not a ZeroDivisionError; the Monte Carlo error of the P(best) difference matches a simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spectral_lens.analysis import tokens_to_target
from spectral_lens.analysis.efficiency import reached_at_first_evaluation
from spectral_lens.analysis.ranking import TierRanking, close_call
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import RunRecord
from spectral_lens.report import target_flags


@pytest.fixture(scope="module")
def sweep0(tmp_path_factory):
    """Two tiers whose log.jsonl starts with an evaluation before training (token 0, loss 11)."""
    root = tmp_path_factory.mktemp("revanalysis2") / "s"
    write_theorem6_sweep(root, (2, 4), family="base", n_measure=20, n_eval=50)
    for d in sorted(root.iterdir()):
        log = d / "log.jsonl"
        log.write_text(json.dumps({"step": 0, "tokens": 0, "val_loss": 11.0, "time": 0.0}) + "\n" + log.read_text())
    return root


def test_token_zero_evaluation_does_not_hide_first_evaluation(sweep0, capsys):
    """With an evaluation at token 0 (above the target) the flag never fired, though T was still only
    where each run was first evaluated during training."""
    # curves
    assert reached_at_first_evaluation(([0, 100, 200], [5.0, 3.0, 2.0]), 3.0)  # token 0: before training
    assert reached_at_first_evaluation(([100, 100, 200], [4.0, 3.0, 2.0]), 3.0)  # same token count: no bracket
    assert reached_at_first_evaluation(([200, 0, 100], [2.0, 5.0, 3.0]), 3.0)  # unsorted
    assert not reached_at_first_evaluation(([0, 100, 200], [5.0, 4.0, 2.0]), 3.0)  # bracketed by (100, 200]
    assert not reached_at_first_evaluation(([100, 200], [math.nan, 2.0]), 3.0)  # an evaluation that did not reach
    assert not reached_at_first_evaluation(([0, 100], [5.0, 4.0]), 3.0)  # never reached
    assert not reached_at_first_evaluation(([0], [5.0]), 3.0) and not reached_at_first_evaluation(([], []), 3.0)
    assert reached_at_first_evaluation(([0, 100], [2.0, 1.0]), 3.0)  # at token 0 itself (eps_tok refuses T = 0)
    # records: the token-0 evaluation is there, and above the target
    runs = [RunRecord.open(p) for p in sorted(sweep0.iterdir())]
    for r in runs:
        tokens, losses = r.val_curve()
        assert tokens[0] == 0 and losses[0] == 11.0 and 0 < tokens_to_target(r, 10.0) == tokens[1]
        assert reached_at_first_evaluation(r, 10.0) and not reached_at_first_evaluation(r, 3.2)
    want = "family base: every run (2) reached val loss 10 at its first evaluation"
    assert [f[: len(want)] for f in target_flags(runs, 10.0)] == [want] and target_flags(runs, 3.2) == []
    assert main(["predict", str(sweep0), "--target-loss", "10"]) == 0
    assert f"caution: {want}" in capsys.readouterr().out


def _hand(n_draws):
    return TierRanking(family="f", statistic="alpha_tail", tiers=(4.0, 32.0), values={4.0: 1.0, 32.0: 1.0},
                       sigmas={4.0: 0.1, 32.0: 0.1}, p_best={4.0: 0.5, 32.0: 0.5}, recommended=4.0,
                       p_recommended=0.5, run_ids={4.0: ("a",), 32.0: ("b",)}, n_draws=n_draws)


def test_close_call_hand_built_ranking_without_draws():
    """n_draws = 0 was a ZeroDivisionError (negative: 'math domain error'), naming nothing."""
    for n in (0, -5):
        with pytest.raises(ValueError, match=r"close_call: family 'f': TierRanking.n_draws must be >= 1 .* got "):
            close_call(_hand(n))
    assert "4000 draws" in close_call(_hand(4000))
    fields = {k: v for k, v in _hand(1).__dict__.items() if k != "n_draws"}  # built without n_draws: 4000
    assert TierRanking(**fields).n_draws == 4000 and "4000 draws" in close_call(TierRanking(**fields))


def test_monte_carlo_error_of_the_difference_matches_simulation():
    """sd(p1 - p2) over 2,000 repetitions of rank_tiers' draws is (p1 + p2 - (p1 - p2)^2) / n, within 5%
    (measured: ratios 1.002 to 1.013 in four configurations)."""
    rng = np.random.default_rng(1)
    n, reps = 1000, 2000
    mu, sd = np.array([0.0, 0.05, 0.3]), np.array([0.1, 0.1, 0.1])
    d = mu + sd * rng.standard_normal((reps, n, 3))
    w = (d == d.min(axis=2, keepdims=True)).mean(axis=1)
    diff = w[:, 0] - w[:, 1]
    p1, p2 = w[:, 0].mean(), w[:, 1].mean()
    want = math.sqrt((p1 + p2 - (p1 - p2) ** 2) / n)
    assert abs(diff.std(ddof=1) / want - 1) < 0.05
    naive = math.sqrt(p1 * (1 - p1) / n)  # the one-share error would be far off: the shares covary
    assert abs(diff.std(ddof=1) / naive - 1) > 0.3
