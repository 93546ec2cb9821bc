"""Taxonomy rule 0 for a run that has not reached the target and has not ended (cut short, or still
running). Before: "<run> did not reach the target", as if it had run its budget, while the report's
runs table beside it said "not reached yet" and gave it no eps_tok."""

from __future__ import annotations

import numpy as np

from spectral_lens.analysis import (
    UNDETERMINED,
    TransitionClassifier,
    ended,
    transition_evidence,
)
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _run(root, run_id, losses, budget_evals):
    """A validation loss and a measurement per 100 tokens, of a budget of ``budget_evals`` * 100 tokens."""
    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=budget_evals * 100, n_layer=12)
    r = np.arange(1, 301, dtype=float)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, loss in enumerate(losses):
            w.log(i, (i + 1) * 100, val_loss=loss, tokens_per_s=1000.0)
            w.log_measurement(i, (i + 1) * 100, {"act": Spectrum(r**-1.0, n_rows=10_000, dim=300)}, val_loss=loss)
    return RunRecord.open(root / run_id)


def test_rule_0_says_a_run_that_has_not_ended_has_not_reached_the_target_yet(tmp_path):
    base = _run(tmp_path, "base", [4.0, 3.6, 3.3, 3.1, 3.0, 2.9], 6)
    going = _run(tmp_path, "going", [4.0, 3.7, 3.5], 6)  # at 50% of its budget
    slow = _run(tmp_path, "slow", [4.0, 3.7, 3.5, 3.3, 3.2, 3.1], 6)  # ran its budget
    assert not ended(going) and ended(slow)
    clf = TransitionClassifier()
    res = clf.classify(transition_evidence(base, going, 2.95))
    assert res.label == UNDETERMINED
    assert res.rule.startswith("rule 0: going has not reached the target 2.95 yet (its record does not say it "
                               "ended: cut short or still running): the token gain is undefined"), res.rule
    both = clf.classify(transition_evidence(slow, going, 2.95))
    assert both.rule.startswith("rule 0: slow did not reach the target 2.95; going has not reached the target "
                                "2.95 yet"), both.rule
    assert "not_ended_a" not in both.evidence.details and both.evidence.details["not_ended_b"] is True
