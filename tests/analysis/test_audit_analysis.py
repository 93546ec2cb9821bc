"""Analysis-layer defects found by an audit (2026-11-27); each test fails on the code before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_lens.analysis import SweepController, TailPredictor, TransitionClassifier, transition_evidence
from spectral_lens.analysis.efficiency import eps_tok
from spectral_lens.analysis.ranking import rank_tiers
from spectral_lens.records import RunInfo, RunWriter, open_runs
from spectral_lens.spectrum import Spectrum


def _run(root, run_id, tier, alphas, fracs, losses=None, on_measurements=True, total=1_000_000, tps=1000):
    info = RunInfo(run_id=run_id, family="fam", batch_tier=tier, tokens_per_step=tps, total_tokens=total, n_layer=12,
                   primary_spectrum="act", batch_size=tps // 10)
    with RunWriter(root / run_id, info, fsync=False, tail_window=(20, 60)) as w:
        for f, loss in zip(fracs, losses or []):
            w.log(int(f * total / tps), int(f * total), val_loss=loss, tokens_per_s=1e5)
        for i, (a, f) in enumerate(zip(alphas, fracs)):
            tok = int(round(f * total))
            sp = {"act": Spectrum(np.arange(1, 129, dtype=float) ** -a, n_rows=1000, dim=128)}
            w.log_measurement(tok // tps, tok, sp, val_loss=losses[i] if losses and on_measurements else None)
    return root / run_id


def test_sweep_controller_waits_for_a_tier_without_measurements(tmp_path):
    """A tier just launched (run.json, no measurement) made decide() raise for the whole sweep."""
    fr = [0.1, 0.2, 0.3, 0.4]
    _run(tmp_path, "b4", 4, [1.5, 1.6, 1.7, 1.8], fr)
    _run(tmp_path, "b8", 8, [1.9, 2.0, 2.1, 2.2], fr)
    _run(tmp_path, "b16", 16, [], [])
    for wait_for_all in (True, False):
        decision = SweepController(wait_for_all=wait_for_all).decide(open_runs([tmp_path]))["fam"]
        actions = {d.tier: d.action for d in decision.decisions}
        assert actions[16] == "wait"


def test_taxonomy_matches_loss_from_the_log_when_measurements_carry_none(tmp_path):
    """The integrations' step schedules record no val_loss on measurements: the matched-loss spectra
    came from each run's last measurement, noted as 'target never reached' though both reached it."""
    fr = [0.1, 0.2, 0.5, 1.0]
    a = _run(tmp_path, "a", 8, [1.3, 1.1, 1.0, 1.0], fr, [4, 3.5, 3.2, 3.0], on_measurements=False)
    b = _run(tmp_path, "b", 8, [1.2, 1.0, 1.0, 1.4], fr, [3.6, 3.2, 3.0, 2.8], on_measurements=False)
    ra, rb = open_runs([a, b])
    ev = transition_evidence(ra, rb, 3.2, head_window=(10, 40))
    assert (ev.details["step_a"], ev.details["step_b"]) == (500, 200)
    assert not any(k.startswith("fallback") for k in ev.details)
    assert ev.d_alpha_head == pytest.approx(0.0, abs=1e-9)
    with_loss = transition_evidence(*open_runs([_run(tmp_path / "x", "a", 8, [1.3, 1.1, 1.0, 1.0], fr, [4, 3.5, 3.2, 3.0]),
                                                _run(tmp_path / "x", "b", 8, [1.2, 1.0, 1.0, 1.4], fr, [3.6, 3.2, 3.0, 2.8])]),
                                     3.2, head_window=(10, 40))
    assert TransitionClassifier().classify(ev).label == TransitionClassifier().classify(with_loss).label


def test_rank_tiers_refuses_a_non_finite_statistic_and_shares_ties():
    with pytest.raises(ValueError, match=r"fam: alpha of run 'a' \(tier 4\) is nan"):
        rank_tiers("fam", [(4, "a", math.nan, 0.1), (8, "b", 1.0, 0.1)], statistic="alpha")
    r = rank_tiers("fam", [(4, "a", 1.5, 0.0), (8, "b", 1.5, 0.0), (16, "c", 1.5, 0.0)])
    assert all(p == pytest.approx(1 / 3) for p in r.p_best.values())  # was 1.0 for the first tier


def test_noise_neighbors_below_three_and_a_run_at_target_before_training():
    with pytest.raises(ValueError, match="noise_neighbors must be >= 3"):
        TailPredictor(noise_neighbors=2)
    with pytest.raises(ValueError, match=r"T\['b4'\] = 0: that run is at the target loss at its first evaluation"):
        eps_tok({"b4": 0.0, "b8": 5e5})
