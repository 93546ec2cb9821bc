"""Transition taxonomy: one constructed transition per label, evidence and thresholds checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_lens import BandAlphaFitter, Spectrum
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
    js_divergence,
    replicate_evidence,
    transition_evidence,
)
from spectral_lens.records import RunInfo, RunRecord, RunWriter

E = TransitionEvidence.from_gains
STATIC = dict(d_alpha_head=0.01, act_jsd=0.0005, d_grad_alpha=0.02, grad_jsd=0.0005)


@pytest.mark.parametrize(
    "ev, label, rule",
    [
        (E("a", "b", 0.15, 0.0, d_alpha_head=0.2, act_jsd=0.01, d_grad_alpha=0.05, grad_jsd=0.001), ACTIVATION_LED, "rule 4a"),
        (E("a", "b", 0.10, 0.01, d_alpha_head=0.01, act_jsd=0.001, d_grad_alpha=0.3, grad_jsd=0.02), GRADIENT_LED, "rule 4b"),
        (E("a", "b", 0.005, 0.20, **STATIC), THROUGHPUT_LEANING, "rule 5"),
        (E("a", "b", 0.15, -0.10, **STATIC), MIXED_TRADEOFF, "rule 1"),
        (E("a", "b", 0.01, -0.01, **STATIC), NO_CLEAR_CHANGE, "rule 2"),
        (E("a", "b", 0.10, 0.0, **STATIC), UNATTRIBUTED_LEARNING, "rule 4c"),
        (E("a", "b", -0.10, 0.0, **STATIC), REGRESSION, "rule 3"),
        # a token gain with a small, non-comparable throughput loss is still learning-side
        (E("a", "b", 0.30, -0.03, d_alpha_head=0.2, act_jsd=0.01), ACTIVATION_LED, "rule 4a"),
        # a joint gain where throughput dominates is throughput-leaning
        (E("a", "b", 0.05, 0.25, d_alpha_head=0.2), THROUGHPUT_LEANING, "rule 5"),
        # a lopsided tradeoff whose loss dominates is a regression: it was labelled by its small gain
        # ("throughput gain dominates" for a token loss five times larger; token-led in the mirror case)
        (E("a", "b", -0.40, 0.10, **STATIC), REGRESSION, "rule 3"),
        (E("a", "b", 0.10, -0.40, d_alpha_head=0.2, act_jsd=0.01), REGRESSION, "rule 3"),
    ],
)
def test_labels(ev, label, rule):
    res = TransitionClassifier().classify(ev)
    assert res.label == label
    assert res.rule.startswith(rule)
    assert res.evidence is ev
    assert res.thresholds["gain_threshold"] == 0.02


def test_evidence_scores_and_thresholds():
    ev = E("a", "b", 0.15, 0.0, d_alpha_head=0.2, act_jsd=0.01, d_grad_alpha=0.05, grad_jsd=0.001)
    assert ev.g_tok == pytest.approx(math.log(1.15)) and ev.g_thr == 0.0
    res = TransitionClassifier().classify(ev)
    assert res.act_score == pytest.approx(4.0)  # max(0.2/0.05, 0.01/0.005)
    assert res.grad_score == pytest.approx(0.5)  # max(0.05/0.1, 0.001/0.005)
    assert "act_score=4.00" in res.rule and "g_tok=+0.140" in res.rule
    # raising the activation thresholds moves the same evidence out of "activation-led"
    strict = TransitionClassifier(head_threshold=1.0, act_jsd_threshold=1.0).classify(ev)
    assert strict.label == UNATTRIBUTED_LEARNING
    # a gradient change larger than the activation one wins
    both = E("a", "b", 0.15, 0.0, d_alpha_head=0.06, d_grad_alpha=0.5)
    assert TransitionClassifier().classify(both).label == GRADIENT_LED
    # unknown throughput counts as 0, unknown spectra as no evidence
    res = TransitionClassifier().classify(E("a", "b", 0.15, math.nan))
    assert res.label == UNATTRIBUTED_LEARNING and math.isnan(res.act_score)


def test_classifier_validates_thresholds():
    with pytest.raises(ValueError, match="gain_threshold must be > 0"):
        TransitionClassifier(gain_threshold=0)
    with pytest.raises(ValueError, match="tradeoff_ratio must be in"):
        TransitionClassifier(tradeoff_ratio=1.5)


def test_js_divergence():
    p = np.arange(1, 101, dtype=float) ** -1.0
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    q = np.arange(1, 101, dtype=float) ** -1.5
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(math.log(2))
    assert js_divergence(np.array([1.0]), np.array([1.0, 0.0])) == pytest.approx(0.0)  # zero padding
    s = Spectrum(p[::-1].copy()[::-1].copy(), n_rows=1000, dim=100)
    assert js_divergence(s, p * 7) == pytest.approx(0.0, abs=1e-15)  # scale-free


def _run(root, run_id, *, losses, act_alpha, grad_alpha, tps):
    info = RunInfo(run_id, family=run_id, batch_tier=8, total_tokens=len(losses) * 100, n_layer=12)
    r = np.arange(1, 301, dtype=float)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, loss in enumerate(losses):
            w.log(i, (i + 1) * 100, val_loss=loss, tokens_per_s=tps)
            w.log_measurement(i, (i + 1) * 100, {
                "act": Spectrum(r**-act_alpha, n_rows=10_000, dim=300),
                "grad": Spectrum(r[:200] ** -grad_alpha, n_rows=200, dim=200, kind="gradient"),
            }, val_loss=loss)
    return RunRecord.open(root / run_id)


def test_evidence_from_records(tmp_path):
    base = _run(tmp_path, "base", losses=[4.0, 3.6, 3.3, 3.1, 3.0], act_alpha=1.0, grad_alpha=0.5, tps=1000.0)
    act = _run(tmp_path, "act", losses=[3.9, 3.4, 3.1, 3.0, 2.9], act_alpha=1.3, grad_alpha=0.5, tps=1000.0)
    grad = _run(tmp_path, "grad", losses=[3.9, 3.4, 3.1, 3.0, 2.9], act_alpha=1.0, grad_alpha=0.9, tps=1000.0)
    fast = _run(tmp_path, "fast", losses=[4.0, 3.6, 3.3, 3.1, 3.0], act_alpha=1.0, grad_alpha=0.5, tps=1300.0)
    clf = TransitionClassifier()

    ev = transition_evidence(base, act, 3.2)
    assert ev.tok_gain == pytest.approx(400 / 300 - 1) and ev.thr_gain == pytest.approx(0.0)
    assert ev.d_alpha_head == pytest.approx(0.3)
    p_a = base.measurements[3].spectra["act"]
    p_b = act.measurements[2].spectra["act"]
    assert ev.act_jsd == pytest.approx(js_divergence(p_a, p_b))
    assert ev.details["step_a"] == 3 and ev.details["step_b"] == 2  # first checkpoints at loss <= 3.2
    assert ev.details["alpha_head_a"] == pytest.approx(BandAlphaFitter((10, 40)).fit(p_a).alpha)
    assert ev.d_grad_alpha == pytest.approx(0.0, abs=1e-9) and ev.grad_jsd == pytest.approx(0.0, abs=1e-12)
    assert clf.classify(ev).label == ACTIVATION_LED

    res = clf.classify_runs(base, grad, 3.2)
    assert res.label == GRADIENT_LED
    assert res.evidence.d_alpha_head == pytest.approx(0.0, abs=1e-9)
    assert res.evidence.d_grad_alpha == pytest.approx(0.4)

    res = clf.classify_runs(base, fast, 3.2)
    assert res.label == THROUGHPUT_LEANING and res.evidence.thr_gain == pytest.approx(0.3)

    res = clf.classify_runs(base, base, 3.2)
    assert res.label == NO_CLEAR_CHANGE

    final = transition_evidence(base, act, 3.2, at="final")
    assert final.details["step_a"] == 4 and final.details["step_b"] == 4
    never = transition_evidence(base, act, 2.0)
    assert "fallback_a" in never.details and math.isnan(never.tok_gain)
    with pytest.raises(ValueError, match="at must be"):
        transition_evidence(base, act, 3.2, at="middle")


def test_a_run_that_never_reaches_the_target_makes_the_token_gain_undefined(tmp_path):
    # base never reaches 2.95 (best 3.0); fast reaches it and is 30% faster: before the fix the
    # unknown token gain counted as 0 and the step was labelled throughput-leaning with g_tok=+0.000
    base = _run(tmp_path, "base", losses=[4.0, 3.6, 3.3, 3.1, 3.0], act_alpha=1.0, grad_alpha=0.5, tps=1000.0)
    fast = _run(tmp_path, "fast", losses=[3.9, 3.4, 3.1, 3.0, 2.9], act_alpha=1.0, grad_alpha=0.5, tps=1300.0)
    clf = TransitionClassifier()
    res = clf.classify_runs(base, fast, 2.95)
    assert res.label == UNDETERMINED and "base did not reach the target 2.95" in res.rule
    assert "token gain is undefined" in res.rule and "g_tok" not in res.rule
    back = clf.classify_runs(fast, base, 2.95)
    assert back.label == UNDETERMINED and "base did not reach" in back.rule and "fast did not" not in back.rule
    both = clf.classify_runs(base, base, 2.0)
    assert both.label == UNDETERMINED and "base and base did not reach" in both.rule
    # gains built by hand (no T in the details) keep the documented rule: an unknown gain counts as 0
    assert clf.classify(E("a", "b", math.nan, 0.3)).label == THROUGHPUT_LEANING
    # both reached: the ordinary rules apply
    assert clf.classify_runs(base, fast, 3.2).label != UNDETERMINED


def test_thresholds_from_replicates():
    """Each threshold is margin x the largest magnitude its quantity takes over the null
    transitions; quantities never measured keep their defaults; the result classifies with them."""
    null = [
        E("s0", "s1", 0.01, -0.005, d_alpha_head=0.02, act_jsd=1e-4),
        E("s0", "s2", -0.03, 0.004, d_alpha_head=-0.01, act_jsd=3e-4),
        E("s1", "s2", 0.02, 0.0, d_alpha_head=0.005, act_jsd=2e-4),
    ]
    clf = TransitionClassifier.from_replicates(null)
    t = clf.thresholds
    assert t["gain_threshold"] == pytest.approx(2 * abs(math.log1p(-0.03)))
    assert t["head_threshold"] == pytest.approx(0.04)
    assert t["act_jsd_threshold"] == pytest.approx(6e-4)
    assert t["grad_alpha_threshold"] == 0.1 and t["grad_jsd_threshold"] == 0.005  # no gradient spectra: defaults
    assert t["tradeoff_ratio"] == 0.5
    assert TransitionClassifier.from_replicates(null, margin=3.0).thresholds["head_threshold"] == pytest.approx(0.06)
    # a head move within twice the seed noise (0.035 < 0.04) is not clear, one beyond it (0.045) is ...
    small = E("a", "b", 0.10, 0.0, d_alpha_head=0.035, act_jsd=5e-4)
    assert TransitionClassifier().classify(small).label == UNATTRIBUTED_LEARNING  # 0.035 < 0.05, 5e-4 < 5e-3
    assert clf.classify(small).label == UNATTRIBUTED_LEARNING
    assert clf.classify(E("a", "b", 0.10, 0.0, d_alpha_head=0.045, act_jsd=5e-4)).label == ACTIVATION_LED
    # ... and a token gain inside seed noise is no clear change
    assert clf.classify(E("a", "b", 0.05, 0.0, d_alpha_head=0.2)).label == NO_CLEAR_CHANGE
    assert TransitionClassifier().classify(E("a", "b", 0.05, 0.0, d_alpha_head=0.2)).label == ACTIVATION_LED


def test_thresholds_from_replicates_errors():
    with pytest.raises(ValueError, match="no usable null transition"):
        TransitionClassifier.from_replicates([])
    with pytest.raises(ValueError, match="margin must be > 0"):
        TransitionClassifier.from_replicates([E("a", "b", 0.01, 0.01, d_alpha_head=0.01)], margin=0)
    with pytest.raises(ValueError, match=r"head_threshold has zero spread over 2 null transition\(s\) \(a->b, a->c\)"):
        TransitionClassifier.from_replicates([E("a", "b", 0.01, 0.0, d_alpha_head=0.0), E("a", "c", 0.0, 0.01, d_alpha_head=0.0)])
    # seeds that reach the target at the same checkpoint (no throughput logged) while their spectra differ:
    # the gains' noise is below the records' resolution, not "identical replicas" as the old message said
    with pytest.raises(ValueError, match=r"gain_threshold has zero spread .*same token count .*validate more often"):
        TransitionClassifier.from_replicates([E("a", "b", 0.0, 0.0, d_alpha_head=0.03), E("a", "c", 0.0, 0.0, d_alpha_head=0.01)])
    undetermined = TransitionEvidence("a", "b", math.nan, 0.0, math.nan, 0.0, d_alpha_head=0.3,
                                      details={"T_a": math.inf, "T_b": 100.0})
    with pytest.raises(ValueError, match="1 given"):
        TransitionClassifier.from_replicates([undetermined])
    # left out when others are usable: its large d_alpha_head does not set the threshold
    clf = TransitionClassifier.from_replicates([undetermined, E("a", "c", 0.01, 0.0, d_alpha_head=0.01)])
    assert clf.thresholds["head_threshold"] == pytest.approx(0.02)


def test_replicate_evidence_from_records(tmp_path):
    seeds = [_run(tmp_path, f"seed{i}", losses=[4.0 + e, 3.6 + e, 3.3 + e, 3.1 + e, 3.0 + e], act_alpha=1.0 + a,
                  grad_alpha=0.5 + g, tps=1000.0 * (1 + e))
             for i, (e, a, g) in enumerate([(0.0, 0.0, 0.0), (0.01, 0.02, -0.03), (-0.01, -0.01, 0.01)])]
    null = replicate_evidence(seeds, 3.2)
    assert [(ev.a, ev.b) for ev in null] == [("seed0", "seed1"), ("seed0", "seed2"), ("seed1", "seed2")]
    assert null[0].d_alpha_head == pytest.approx(0.02) and null[2].d_alpha_head == pytest.approx(-0.03)
    clf = TransitionClassifier.from_replicates(null)
    assert clf.thresholds["head_threshold"] == pytest.approx(2 * 0.03)
    assert clf.thresholds["grad_alpha_threshold"] == pytest.approx(2 * 0.04)
    assert clf.thresholds["gain_threshold"] == pytest.approx(2 * max(abs(v) for ev in null for v in (ev.g_tok, ev.g_thr)))
    assert replicate_evidence(seeds, 3.2, at="final")[0].details["at"] == "final"
    with pytest.raises(ValueError, match="need >= 2 replicate runs, got 1"):
        replicate_evidence(seeds[:1], 3.2)


def test_a_window_beyond_the_sample_rank_is_unresolved_not_fitted():
    """A gradient spectrum of 32 sequences has at most 32 nonzero eigenvalues: the (10, 40) window
    went through with an InsufficientRowsWarning on the user's console, and where round-off left
    ranks 33-40 nonzero it fitted them. Now NaN (shown as '-'), as in the records' summaries."""
    import warnings

    import numpy as np
    import torch

    import spectral_lens as sl
    from spectral_lens.analysis.taxonomy import _alpha

    values = torch.from_numpy(np.arange(1, 65.0) ** -1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(_alpha(sl.Spectrum(values, n_rows=32, dim=64, kind="gradient"), (10, 40)))
    assert _alpha(sl.Spectrum(values, n_rows=100, dim=64, kind="gradient"), (10, 40)) == pytest.approx(1.5, rel=1e-12)


def test_transition_evidence_reads_alpha_head_on_the_head_window_the_runs_recorded(tmp_path):
    """Narrow models record a narrower head window (``RunWriter(head_window=(4, 16))``); the evidence
    used the fixed (10, 40), which a 32-dimensional spectrum cannot fit: d_alpha_head was always NaN.
    Now the recorded window is the default; different recorded windows need head_window= given."""
    from spectral_lens.analysis import transition_evidence
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.records import open_runs

    kw = dict(dim=32, grad_dim=16, n_eval=20, n_measure=10, total_tokens=1_000_000, tokens_per_tier=1024,
              head_window=(4, 16), tail_window=(8, 24))
    a, = open_runs(write_theorem6_sweep(tmp_path / "a", (1,), family="a", q={1: 0.4}, **kw))
    b, = open_runs(write_theorem6_sweep(tmp_path / "b", (1,), family="b", q={1: 0.6}, **kw))
    ev = transition_evidence(a, b, 3.3)
    assert ev.details["head_window"] == (4, 16)
    pa = ev.details["step_a"]
    spec_a = next(m for m in a.measurements if m.step == pa).spectra["act:blocks.11"]
    assert ev.details["alpha_head_a"] == pytest.approx(BandAlphaFitter((4, 16)).fit(spec_a).alpha, rel=1e-12)
    assert math.isfinite(ev.d_alpha_head)
    assert transition_evidence(a, b, 3.3, head_window=(2, 8)).details["head_window"] == (2, 8)
    c, = open_runs(write_theorem6_sweep(tmp_path / "c", (1,), family="c", q={1: 0.5},
                                        **{**kw, "head_window": (2, 8)}))
    with pytest.raises(ValueError, match="recorded different head windows"):
        transition_evidence(a, c, 3.3)
    assert transition_evidence(a, c, 3.3, head_window=(4, 16)).details["head_window"] == (4, 16)
