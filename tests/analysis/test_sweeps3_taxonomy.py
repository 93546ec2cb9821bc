"""Taxonomy rule 0 names a divergence. Before: a transition whose run diverged (its losses turned NaN
before the target) was labelled "undetermined" with the rule text "<run> did not reach the target",
as if the run were merely slow."""

from __future__ import annotations

import math

import numpy as np

from spectral_lens.analysis import (
    UNDETERMINED,
    TransitionClassifier,
    transition_evidence,
)
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _run(root, run_id, losses, tps=1000.0):
    """A run with a validation loss per 100 tokens; a measurement at each finite one."""
    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=len(losses) * 100, n_layer=12)
    r = np.arange(1, 301, dtype=float)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, loss in enumerate(losses):
            w.log(i, (i + 1) * 100, val_loss=loss, tokens_per_s=tps)
            if math.isfinite(loss):
                w.log_measurement(i, (i + 1) * 100, {"act": Spectrum(r**-1.0, n_rows=10_000, dim=300)}, val_loss=loss)
    return RunRecord.open(root / run_id)


def test_rule_0_names_a_run_that_diverged_instead_of_saying_it_did_not_reach_the_target(tmp_path):
    base = _run(tmp_path, "base", [4.0, 3.6, 3.3, 3.1, 3.0, 2.9])
    blown = _run(tmp_path, "blown", [3.9, 3.4, 3.1, math.nan, math.nan, math.nan])  # NaN from step 3 on
    slow = _run(tmp_path, "slow", [4.0, 3.7, 3.5, 3.3, 3.2, 3.1])  # ran its budget, never reached 2.95
    clf = TransitionClassifier()

    ev = transition_evidence(base, blown, 2.95)
    assert ev.details["diverged_b"].startswith("run 'blown' (tier 8) diverged: val_loss nan at step 3")
    res = clf.classify(ev)
    assert res.label == UNDETERMINED
    # percent(): "66.7%", as the tail predictor writes fractions, where ":.0%" said "67%" (review 23 clileft)
    assert res.rule.startswith("rule 0: blown diverged: val_loss nan at step 3 (400 tokens, 66.7% of its token "
                               "budget), before reaching the target 2.95: the token gain is undefined"), res.rule
    assert "did not reach" not in res.rule  # before: "rule 0: blown did not reach the target 2.95"

    # a run that is only slow keeps "did not reach"; both kinds in one transition are each named
    both = clf.classify_runs(slow, blown, 2.95)
    assert both.rule.startswith("rule 0: slow did not reach the target 2.95; blown diverged: val_loss nan at step 3")
    assert "diverged_a" not in both.evidence.details
