"""Analysis-layer defects found by the second audit; each test fails on the code before its fix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.analysis import NoiseScalePredictor, SweepController
from spectral_lens.records import RunInfo, RunRecord, RunWriter

PTS = [(0.1, 1.0), (0.15, 1.3), (0.2, 1.1), (0.25, 1.35), (0.3, 1.2)]


def _run(root, run_id, points, tier=1, total=1000, family="f", noise=None, batch_size=None):
    """points: [(progress, alpha)] power-law spectra; noise: the 'noise_scale' scalar per point."""
    info = RunInfo(run_id, family=family, batch_tier=tier, total_tokens=total, batch_size=batch_size)
    r = np.arange(1, 301, dtype=np.float64)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, (f, a) in enumerate(points):
            w.log_measurement(i, int(f * total), {"act": Spectrum(r**-a, n_rows=10_000, dim=300)}, progress=f,
                              scalars={"noise_scale": noise[i]} if noise else {})
    return RunRecord.open(root / run_id)


def test_noise_scale_controller_waits_for_a_tier_just_launched(tmp_path):
    # before: NoiseScalePredictor._early raised a plain ValueError for a run with no measurement
    # yet, so SweepController(NoiseScalePredictor()).decide crashed instead of waiting for the tier
    a = _run(tmp_path, "a", PTS, tier=1, batch_size=8, noise=[10.0] * 5)
    b = _run(tmp_path, "b", [], tier=2, batch_size=16)
    dec = SweepController(NoiseScalePredictor()).decide([a, b])["f"]
    assert not dec.ready and dec.waiting_tiers == [1, 2]
    assert "no measurement with a known progress yet" in next(d for d in dec.decisions if d.tier == 2).reason
    partial = SweepController(NoiseScalePredictor(), wait_for_all=False).decide([a, b])["f"]
    assert partial.ready and partial.continue_tiers == [1] and partial.waiting_tiers == [2]
    # a run with measurements but no noise scale is still a clear error when no run has one; beside runs
    # that have one it is continued unjudged with that reason (review20: as predict leaves it out)
    c = _run(tmp_path, "c", PTS, tier=4, batch_size=32)
    with pytest.raises(ValueError, match="no measurement has a positive scalar 'noise_scale'"):
        SweepController(NoiseScalePredictor()).decide([c])
    d4 = next(d for d in SweepController(NoiseScalePredictor()).decide([a, c])["f"].decisions if d.tier == 4)
    assert d4.action == "continue" and "no measurement has a positive scalar 'noise_scale'" in d4.reason


def test_controller_run_without_batch_tier_is_a_clear_error(tmp_path):
    # before: a run with batch_tier None that had not reached the fraction was put in the waiting
    # list under tier None and the controller crashed with TypeError (float(None) / sorting None)
    a = _run(tmp_path, "a", PTS, tier=1)
    for name, pts in (("new", []), ("early", [(0.1, 1.0)])):
        n = _run(tmp_path, name, pts, tier=None)
        with pytest.raises(ValueError, match=f"run '{name}': RunInfo.batch_tier is not set"):
            SweepController(window=(100, 200)).decide([a, n])


def test_controller_decision_lists_every_run_of_the_tier(tmp_path):
    # before: a tier with one seed past the fraction and one short of it listed only some of its
    # runs (waiting: the late seed; wait_for_all=False: the early seed), so stopping run_ids left
    # the other seed training
    a1 = _run(tmp_path, "a1", PTS, tier=1)
    a2 = _run(tmp_path, "a2", [(0.1, 1.0)], tier=1)
    b = _run(tmp_path, "b", [(f, v + 0.5) for f, v in PTS], tier=2)
    dec = SweepController(window=(100, 200)).decide([a1, a2, b])["f"]
    assert not dec.ready
    assert {d.tier: d.run_ids for d in dec.decisions} == {1: ("a1", "a2"), 2: ("b",)}
    partial = SweepController(window=(100, 200), wait_for_all=False).decide([a1, a2, b])["f"]
    assert partial.ready and partial.stop_tiers == [2] and partial.continue_tiers == [1]
    assert {d.tier: d.run_ids for d in partial.decisions} == {1: ("a1", "a2"), 2: ("b",)}
    assert partial.decisions[0].value == pytest.approx(1.1)  # decided on the seed that reached 20%


def test_powerlaw_fit_rejects_bad_input_clearly():
    from spectral_lens.weights import powerlaw_fit

    x = np.random.default_rng(0).pareto(2.0, 300) + 1.0
    # before: an Inf eigenvalue gave alpha=1.0, ks=1.0 silently; a NaN was dropped silently
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="powerlaw_fit: 1 of 301 eigenvalues are NaN or Inf"):
            powerlaw_fit(np.r_[x, bad])
    # before: 'math domain error'
    for xmin in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="xmin must be a finite number > 0"):
            powerlaw_fit(x, xmin=xmin)
    # before: 'every candidate tail is degenerate (equal eigenvalues)', which they are not
    with pytest.raises(ValueError, match="max_candidates must be >= 1, got 0"):
        powerlaw_fit(x, max_candidates=0)
    # before: a matrix (e.g. the weight itself) was flattened and its entries fitted as eigenvalues
    with pytest.raises(ValueError, match=r"expected a 1-D array of eigenvalues, got shape \(20, 15\)"):
        powerlaw_fit(np.abs(np.random.default_rng(1).normal(size=(20, 15))))
    # the MLE itself is unchanged: alpha = 1 + n / sum log(x / xmin)
    assert powerlaw_fit(x, xmin=1.0).alpha == pytest.approx(1 + x.size / np.log(x).sum(), rel=1e-12)


def test_tokens_to_target_rejects_nan_target_and_tokens():
    from spectral_lens.analysis import tokens_to_target

    curve = ([0, 10, 20], [3.0, 2.5, 2.0])
    # before: a NaN target returned inf ("never reached"), which downstream became NaN eps_tok
    # and an 'undetermined' taxonomy label; an infinite one returned the first checkpoint
    for target in (math.nan, math.inf):
        with pytest.raises(ValueError, match="target validation loss must be a finite number"):
            tokens_to_target(curve, target)
    # before: a NaN token count sorted last and was returned as T = nan
    with pytest.raises(ValueError, match="tokens must be finite, got nan at index 2"):
        tokens_to_target(([0, 10, math.nan], [3.0, 2.5, 2.0]), 2.2)
    assert tokens_to_target(curve, 2.2, interpolate=True) == pytest.approx(16.0)


def test_predict_on_other_runs_keeps_the_fitted_windows(tmp_path):
    # before: TailPredictor._check_runs stored windows_, so predict(other_runs), score(other_runs)
    # and SweepController(pred).decide(other_runs) overwrote the fitted windows_ with the other runs'
    from spectral_lens.analysis import TailPredictor

    fitted = [_run(tmp_path / "A", f"a{t}", [(f, v + 0.1 * t) for f, v in PTS], tier=t) for t in (1, 2)]
    for r in fitted:
        r.summary_windows = {"tail": (100, 200)}
    other = [_run(tmp_path / "B", f"b{t}", [(f, v + 0.1 * t) for f, v in PTS], tier=t) for t in (1, 2)]
    for r in other:
        r.summary_windows = {"tail": (50, 150)}
    pred = TailPredictor().fit(fitted)
    assert pred.windows_ == {"f": (100, 200)}
    assert pred.predict(other)["f"].recommended == 1
    SweepController(pred).decide(other)
    assert pred.windows_ == {"f": (100, 200)}
    assert pred.statistics_[0].window == (100, 200)


def test_rank_tiers_rejects_no_entries_and_no_draws():
    from spectral_lens.analysis import rank_tiers

    # before: IndexError 'tuple index out of range'
    with pytest.raises(ValueError, match="family 'f' has no .* entries"):
        rank_tiers("f", [])
    # before: p_best silently NaN for every tier (mean of zero draws) with a numpy RuntimeWarning
    with pytest.raises(ValueError, match=r"n_draws must be >= 1 .*, got 0"):
        rank_tiers("f", [(1, "a", 1.0, 0.1), (2, "b", 2.0, 0.1)], n_draws=0)
    rk = rank_tiers("f", [(1, "a", 1.0, 0.1), (2, "b", 1.1, 0.1)], n_draws=1000, random_state=7)
    assert sum(rk.p_best.values()) == pytest.approx(1.0)
    assert rk.p_best == rank_tiers("f", [(1, "a", 1.0, 0.1), (2, "b", 1.1, 0.1)], n_draws=1000, random_state=7).p_best
