"""Review 27 (taxo): tokens-to-target, gains and the predict output against protocol sections 5-7.

References are written from the protocol text (float64), not from the code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_lens.analysis.efficiency import (measurement_at_loss, reached_at_first_evaluation, token_inefficiency,
                                               tokens_to_target, transition_gains)
from spectral_lens.records import RunInfo, RunRecord, RunWriter
from spectral_lens.spectrum import Spectrum


def _run(root, run_id, points, *, tier=8, q=1000.0, budget=600):
    """A run with a validation loss and a measurement at each ``(tokens, loss)`` of ``points``."""
    info = RunInfo(run_id, family="f", batch_tier=tier, total_tokens=budget, n_layer=12)
    r = np.arange(1, 301, dtype=float)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, (t, loss) in enumerate(points):
            w.log(i, t, val_loss=loss, **({} if q is None else {"tokens_per_s": q}))
            w.log_measurement(i, t, {"act": Spectrum(r**-1.0, n_rows=10_000, dim=300)}, val_loss=loss)
    return RunRecord.open(root / run_id)


def _ref_T(points, target):
    """Protocol sec. 5: tokens at the first checkpoint (token order) whose validation loss is <= target."""
    for t, loss in sorted(points, key=lambda p: p[0]):
        if math.isfinite(loss) and loss <= target:  # a loss is a finite number; -inf is no loss at all
            return float(t)
    return math.inf


def test_minus_inf_loss_does_not_reach_the_target(tmp_path):
    """A -inf validation loss (an overflow, a broken evaluation) counted as reaching any target: the run
    got the smallest T of its family (eps_tok 1) at the checkpoint where its loss broke."""
    pts = [(100, 4.0), (200, -math.inf), (600, 3.0)]
    assert tokens_to_target(([t for t, _ in pts], [v for _, v in pts]), 3.2) == _ref_T(pts, 3.2) == 600.0
    assert tokens_to_target(([t for t, _ in pts], [v for _, v in pts]), 3.2, interpolate=True) == pytest.approx(
        600.0)  # the -inf checkpoint brackets nothing: no line through it
    broken = _run(tmp_path, "broken", pts)
    ok = _run(tmp_path, "ok", [(100, 4.0), (200, 3.5), (400, 3.1), (600, 2.9)])
    assert tokens_to_target(broken, 3.2) == 600.0
    eps = token_inefficiency([broken, ok], 3.2)
    assert eps == {"broken": pytest.approx(1.5), "ok": 1.0}  # T 600 vs 400
    assert measurement_at_loss(broken, 3.2).tokens == 600  # not the measurement with the -inf loss
    # the -inf evaluation at 100 did not reach the target: 200 is not the first evaluation (as for NaN, review 22)
    assert not reached_at_first_evaluation(([100, 200], [-math.inf, 3.0]), 3.2)


def test_transition_gains_at_target_before_training_names_the_run(tmp_path):
    """A target above the loss of an evaluation at token 0 gives T = 0: transition_gains said only
    'T_a must be a positive number, got 0.0'; now it names the run and what to do, as eps_tok does."""
    a = _run(tmp_path, "a", [(0, 10.9), (100, 4.0), (600, 3.0)])
    b = _run(tmp_path, "b", [(0, 10.8), (100, 3.9), (600, 2.9)], q=1200.0)
    with pytest.raises(ValueError, match=r"transition_gains: run 'a' is at the target loss 11\.0 at its first "
                                         r"evaluation, before training \(T = 0 tokens\).*choose a lower target"):
        transition_gains(a, b, 11.0)
    g = transition_gains(a, b, 3.95)  # T(a) = 600, T(b) = 100; Q 1000 -> 1200
    assert (g.T_a, g.T_b) == (_ref_T([(0, 10.9), (100, 4.0), (600, 3.0)], 3.95), 100.0)
    assert g.tok_gain == pytest.approx(600 / 100 - 1) and g.thr_gain == pytest.approx(1200 / 1000 - 1)
    assert g.g_tok == pytest.approx(math.log(6.0)) and g.g_thr == pytest.approx(math.log(1.2))


def test_predict_output_says_what_each_number_means(tmp_path, capsys):
    """``predict`` printed alpha_tail, sigma, P(best), T and eps_tok without saying what they are, their
    units or which way is better: a key under the tables says it (window, spectrum, fraction, target)."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.cli import main

    write_theorem6_sweep(tmp_path, (2, 4, 8), n_eval=40, n_measure=20, dim=256, grad_dim=64, tail_window=(40, 80))
    assert main(["predict", str(tmp_path), "--target-loss", "3.0"]) == 0
    keys = [x for x in capsys.readouterr().out.splitlines() if x.startswith("key: ")]
    assert len(keys) == 5, keys  # (review 27 revtaxo: shorter lines, the spectrum named, not "activation")
    assert "(act:blocks.11, ranks 40-80) at 20% of each run's token budget" in keys[0]
    assert "smaller predicts fewer tokens" in keys[0] and "P(best) = the probability" in keys[1]
    assert "first evaluation with val loss <= 3;" in keys[2] and "eps_tok = T / the smallest T" in keys[2]
    assert keys[4].startswith("key: Spearman rho: +1 = alpha_tail ordered the runs as eps_tok did")
    assert main(["predict", str(tmp_path)]) == 0  # no target: only the alpha_tail, sigma and P(best) keys
    assert [x for x in capsys.readouterr().out.splitlines() if x.startswith("key: ")] == keys[:2]


def test_report_transition_table_says_what_its_gains_mean(tmp_path):
    """The taxonomy table showed TokGain -0.066 with no word on its definition or sign (a fraction, T(a)/T(b) - 1:
    positive = b needs fewer tokens); the section now says it, with the target, under the thresholds."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.cli import main

    write_theorem6_sweep(tmp_path / "runs", (4, 8), n_eval=40, n_measure=20, dim=256, grad_dim=64,
                         tail_window=(40, 80))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--target-loss", "3.0",
                 "--transition", "toy-b4:toy-b8", "--no-plots"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    section = text[text.index("## Taxonomy of transitions"):]
    assert "TokGain = T(a)/T(b) - 1, with T the training tokens at the first validation checkpoint with val loss <= 3:" \
        in section
    assert "ThrGain = Q(b)/Q(a) - 1, with Q the median logged training throughput in tokens/s" in section
    assert section.index("TokGain = ") < section.index("| transition | label |")


def test_rule_text_says_an_unknown_gain_is_unknown(tmp_path):
    """Runs that log no tokens_per_s have no throughput: the rule text said ``g_thr=+0.000``, as if the two
    were measured equally fast; it says ``g_thr=unknown (as 0)`` (the rule still counts it as 0, as documented)."""
    from spectral_lens.analysis.taxonomy import (ACTIVATION_LED, TransitionClassifier, TransitionEvidence,
                                                 transition_evidence)

    clf = TransitionClassifier()
    res = clf.classify(TransitionEvidence("a", "b", math.expm1(0.3), math.nan, 0.3, math.nan, d_alpha_head=0.2))
    assert res.label == ACTIVATION_LED and "g_tok=+0.300, g_thr=unknown (as 0)" in res.rule, res.rule
    res = clf.classify(TransitionEvidence("a", "b", 0.0, 0.0, 0.0, 0.0))
    assert "g_tok=+0.000, g_thr=+0.000" in res.rule  # measured equal stays a number
    a = _run(tmp_path, "a", [(100, 4.0), (600, 3.0)], q=None)
    b = _run(tmp_path, "b", [(100, 3.9), (300, 3.1), (600, 2.9)], q=None)
    res = clf.classify(transition_evidence(a, b, 3.15))
    assert res.evidence.details["Q_a"] is None and "g_thr=unknown (as 0)" in res.rule, res.rule


def test_predict_key_names_each_familys_window(tmp_path, capsys):
    """Families that recorded different tail windows: the key names each one's, not one of them."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.cli import main

    kw = dict(n_eval=20, n_measure=15, dim=256, grad_dim=64)
    write_theorem6_sweep(tmp_path, (2, 4), family="f1", tail_window=(40, 80), **kw)
    write_theorem6_sweep(tmp_path, (2, 4), family="f2", tail_window=(50, 100), **kw)
    assert main(["predict", str(tmp_path)]) == 0
    key = [x for x in capsys.readouterr().out.splitlines() if x.startswith("key: ")][0]
    assert "(act:blocks.11, ranks 40-80 in family f1; act:blocks.11, ranks 50-100 in family f2)" in key, key


def test_tokens_to_target_matches_the_protocol_on_random_curves():
    """2,000 random curves: unequal grids, repeated token counts, NaN / +-inf losses, non-monotone losses,
    targets above, below and exactly at a checkpoint's loss; T against the protocol's first-checkpoint rule."""
    rng = np.random.default_rng(27)
    for _ in range(2000):
        k = int(rng.integers(1, 10))
        tokens = rng.choice([0, 1, 2, 3, 5, 8, 13, 21], size=k).astype(float) * 1e6
        losses = rng.uniform(2.5, 4.0, size=k)
        losses[rng.random(k) < 0.15] = np.nan
        losses[rng.random(k) < 0.1] = rng.choice([np.inf, -np.inf])
        finite = losses[np.isfinite(losses)]
        target = float(rng.choice(finite)) if finite.size and rng.random() < 0.4 else float(rng.choice([2.4, 3.2, 4.1]))
        pts = list(zip(tokens.tolist(), losses.tolist()))
        assert tokens_to_target((tokens, losses), target) == _ref_T(pts, target), (pts, target)


def _ref_label(gt, gq, act, grad, g=0.02, ratio=0.5):
    """The documented rules 1-5 (docs/analysis.md, taxonomy table), from the text; unknown gains count as 0."""
    gt, gq = (v if math.isfinite(v) else 0.0 for v in (gt, gq))
    big, small = max(abs(gt), abs(gq)), min(abs(gt), abs(gq))
    if max(gt, gq) >= g and min(gt, gq) <= -g and small >= ratio * big:
        return "mixed/tradeoff"
    if big < g:
        return "no clear change"
    if max(gt, gq) < g or (min(gt, gq) <= -g and -min(gt, gq) > max(gt, gq)):
        return "regression"
    if gt >= g and gt >= gq:
        a, r = (v if math.isfinite(v) else -math.inf for v in (act, grad))
        if a >= 1 and a >= r:
            return "activation-led learning"
        return "gradient-led learning" if r >= 1 else "learning gain, spectrally unattributed"
    return "throughput/execution-leaning"


def test_classifier_matches_the_documented_rules_on_a_grid():
    """Every pair of log gains on a grid with the threshold and its neighbours, NaN, ties (g_tok = g_thr) and
    equal-magnitude tradeoffs, times spectral evidence that is absent, below, at and above its thresholds."""
    from spectral_lens.analysis.taxonomy import TransitionClassifier, TransitionEvidence

    clf = TransitionClassifier()
    grid = [-0.5, -0.1, -0.03, -0.02, -0.0199, 0.0, 0.0199, 0.02, 0.03, 0.05, 0.1, 0.5, math.nan]
    spectral = [(0.0, 0.0, 0.0, 0.0), (0.05, 0.0, 0.0, 0.0), (0.0, 0.0, 0.1, 0.0), (0.06, 0.0, 0.2, 0.0),
                (0.1, 0.0, 0.1, 0.0), (math.nan,) * 4, (0.0, 0.006, math.nan, math.nan), (-0.05, 0.0, -0.1, 0.0),
                (0.049, 0.0049, 0.099, 0.0049)]
    for gt in grid:
        for gq in grid:
            for dh, jsd, dg, gj in spectral:
                ev = TransitionEvidence("a", "b", math.expm1(gt), math.expm1(gq), gt, gq, dh, jsd, dg, gj)
                act = max((abs(v) / t for v, t in ((dh, 0.05), (jsd, 0.005)) if math.isfinite(v)), default=math.nan)
                grad = max((abs(v) / t for v, t in ((dg, 0.1), (gj, 0.005)) if math.isfinite(v)), default=math.nan)
                res = clf.classify(ev)
                assert res.label == _ref_label(gt, gq, act, grad), (gt, gq, dh, jsd, dg, gj, res.rule)


def test_report_cautions_a_transition_across_batch_tiers(tmp_path, capsys):
    """``--transition toy-b4:toy-b8`` (one variant, two batch tiers) was labelled throughput-leaning without a
    word: its gains are the batch size's, not an architectural change's (the paper compares variants at one
    tier). The report and the CLI now say so; a transition within one tier has no such caution."""
    from spectral_lens.analysis.synthetic import write_theorem6_sweep
    from spectral_lens.cli import main
    from spectral_lens.records import open_runs
    from spectral_lens.report import transition_flags

    write_theorem6_sweep(tmp_path / "runs", (4, 8), n_eval=20, n_measure=15, dim=256, grad_dim=64,
                         tail_window=(40, 80))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--target-loss", "3.0",
                 "--transition", "toy-b4:toy-b8", "--no-plots"]) == 0
    want = "transition toy-b4 -> toy-b8: the runs are of batch tiers 4 and 8, so its gains mix the batch size's effect"
    assert any(x.startswith(f"caution: {want}") for x in capsys.readouterr().out.splitlines())
    assert f"Caution: {want}" in (tmp_path / "rep" / "report.md").read_text()
    b4, b8 = open_runs([tmp_path / "runs"])
    assert transition_flags([(b4, b4), (b8, b8)]) == [] and len(transition_flags([(b8, b4)])) == 1
