"""TailPredictor, the noise-scale baseline and the sweep controller on Theorem-6 sweeps."""

from __future__ import annotations

import math
import shutil

import warnings

import numpy as np
import pytest

from spectral_lens import Spectrum
from spectral_lens.analysis import (
    FractionNotReachedError,
    NoiseScalePredictor,
    SweepController,
    TailPredictor,
    early_alpha,
    rank_tiers,
    resolve_spectrum,
    token_inefficiency,
)
from spectral_lens.analysis.synthetic import default_q, write_theorem6_sweep
from spectral_lens.records import RunInfo, RunRecord, RunWriter, open_runs

TIERS = (1, 2, 4, 8, 16, 32)  # as in conftest.py


def test_clean_theorem6_sweep_is_ranked_perfectly(clean_runs):
    eps = token_inefficiency(clean_runs, 3.2)
    assert all(math.isfinite(v) for v in eps.values())
    # by construction (equal eta, q_B ordered) the token ordering is the q ordering
    by_q = sorted(TIERS, key=default_q)
    by_eps = sorted(TIERS, key=lambda t: eps[f"toy-b{t}"])
    assert by_q == by_eps
    pred = TailPredictor().fit(clean_runs)
    assert pred.statistics_[0].window == (100, 200)  # n_layer=12 -> the d12 window
    ranking = pred.predict()["toy"]
    assert list(ranking.tiers) == by_eps
    assert ranking.recommended == 4 and ranking.p_recommended > 0.99
    score = pred.score(targets=3.2)
    assert score.rho == pytest.approx(1.0)
    assert score.within["toy"].n == 6
    assert score.pvalue == pytest.approx(2 / math.factorial(6))  # exact permutation p-value
    # scoring against a mapping of eps_tok gives the same
    assert pred.score(targets=eps).rho == pytest.approx(1.0)


def test_noise_lowers_rho_and_widens_uncertainty(clean_runs, noisy_runs):
    clean = TailPredictor().fit(clean_runs)
    noisy = TailPredictor().fit(noisy_runs)
    rho_noisy = noisy.score(targets=3.2).rho
    assert rho_noisy < 1.0
    assert rho_noisy > 0.5  # still informative
    sig_clean = np.mean([s.sigma for s in clean.statistics_])
    sig_noisy = np.mean([s.sigma for s in noisy.statistics_])
    assert sig_noisy > 20 * sig_clean
    assert noisy.predict()["toy"].p_recommended < clean.predict()["toy"].p_recommended


def _manual_run(root, run_id, points, tier=1, total=1000, family="f", n_layer=None, scalars=None, batch_size=None):
    """points: [(progress, alpha)]: a pure power law with that alpha at each measurement."""
    info = RunInfo(run_id, family=family, batch_tier=tier, total_tokens=total, n_layer=n_layer, batch_size=batch_size)
    r = np.arange(1, 301, dtype=np.float64)
    with RunWriter(root / run_id, info, fsync=False) as w:
        for i, (f, a) in enumerate(points):
            w.log_measurement(i, int(f * total), {"act": Spectrum(r**-a, n_rows=10_000, dim=300)},
                              progress=f, scalars=(scalars or {}) and {k: v[i] for k, v in scalars.items()})
    return RunRecord.open(root / run_id)


def test_interpolation_between_bracketing_measurements(tmp_path):
    run = _manual_run(tmp_path, "a", [(0.1, 1.0), (0.3, 2.0), (0.5, 3.0)])
    s = early_alpha(run, 0.2, window=(100, 200))
    assert s.value == pytest.approx(1.5) and s.weight == pytest.approx(0.5) and s.steps == (0, 1)
    assert s.sigma == pytest.approx(0.0, abs=1e-9)  # alpha is exactly linear in progress: no jitter
    exact = early_alpha(run, 0.3, window=(100, 200))
    assert exact.value == pytest.approx(2.0) and exact.steps == (1, 1)
    with pytest.raises(FractionNotReachedError, match="latest measurement is at progress 0.500 < 0.6"):
        early_alpha(run, 0.6, window=(100, 200))
    with pytest.raises(ValueError, match="first measurement is at progress 0.100 > 0.05"):
        early_alpha(run, 0.05, window=(100, 200))


def test_sigma_is_local_residual_jitter(tmp_path):
    jitter = [0.0, 0.1, -0.1, 0.1, -0.1]
    f = [0.1, 0.15, 0.2, 0.25, 0.3]
    run = _manual_run(tmp_path, "a", [(fi, 1.0 + fi + j) for fi, j in zip(f, jitter)])
    s = early_alpha(run, 0.2, window=(100, 200))
    coef = np.polyfit(f, [1.0 + fi + j for fi, j in zip(f, jitter)], 1)
    resid = np.array([1.0 + fi + j for fi, j in zip(f, jitter)]) - np.polyval(coef, f)
    assert s.sigma == pytest.approx(math.sqrt((resid**2).sum() / 3))
    assert s.n_noise == 5
    two = _manual_run(tmp_path, "b", [(0.1, 1.0), (0.3, 2.0)])
    assert math.isnan(early_alpha(two, 0.2, window=(100, 200)).sigma)  # too few points: no made-up number


def test_rank_tiers_aggregates_seeds_and_uses_probabilities():
    rk = rank_tiers("f", [(1, "a1", 2.0, 0.1), (1, "a2", 2.2, 0.1), (2, "b", 1.0, 0.1)])
    assert rk.tiers == (2, 1) and rk.values[1] == pytest.approx(2.1)
    assert rk.sigmas[1] == pytest.approx(math.sqrt((0.01 + 0.02) / 2))
    assert rk.run_ids[1] == ("a1", "a2") and rk.p_best[2] == pytest.approx(1.0)
    close = rank_tiers("f", [(1, "a", 1.0, 0.5), (2, "b", 1.05, 0.5)])
    assert 0.4 < close.p_best[2] < 0.6 and close.recommended == 1
    unknown = rank_tiers("f", [(1, "a", 1.0, math.nan), (2, "b", 2.0, 0.1)])
    assert math.isnan(unknown.p_recommended)


def test_pooled_cross_family_score_uses_min_max_normalization(tmp_path):
    from scipy.stats import spearmanr

    runs = []
    # family f: alphas 1.0, 1.5, 2.0 ; family g: 3.0, 3.05, 3.2 (different scales, same order)
    alphas = {"f": [1.0, 1.5, 2.0], "g": [3.0, 3.05, 3.2]}
    for fam, vals in alphas.items():
        for tier, a in zip((1, 2, 4), vals):
            runs.append(_manual_run(tmp_path, f"{fam}{tier}", [(0.1, a), (0.2, a), (0.3, a)], tier=tier, family=fam))
    pred = TailPredictor(window=(100, 200)).fit(runs)
    norm = pred.normalized()
    assert norm["f1"] == 0.0 and norm["f2"] == pytest.approx(0.5) and norm["f4"] == pytest.approx(1.0)
    assert norm["g1"] == 0.0 and norm["g2"] == pytest.approx(0.25) and norm["g4"] == pytest.approx(1.0)
    # eps_tok follows the order within each family, not the raw alphas across families
    eps = {"f1": 1.0, "f2": 1.5, "f4": 3.0, "g1": 1.0, "g2": 1.4, "g4": 2.9}
    score = pred.score(targets=eps)
    assert score.within["f"].rho == pytest.approx(1.0) and score.within["g"].rho == pytest.approx(1.0)
    assert score.mean_within_rho == pytest.approx(1.0)
    ids = list(eps)
    assert score.rho == pytest.approx(spearmanr([norm[i] for i in ids], [eps[i] for i in ids]).statistic)
    raw = [1.0, 1.5, 2.0, 3.0, 3.05, 3.2]
    assert score.rho > spearmanr(raw, [eps[i] for i in ids]).statistic + 0.2  # normalization matters
    assert score.n == 6 and score.pvalue < 0.05
    with pytest.raises(ValueError, match="no eps_tok for runs"):
        pred.score(targets={"f1": 1.0})


def test_noise_scale_baseline(tmp_path):
    runs = []
    for tier, bs in zip((1, 2, 4, 8), (64, 128, 256, 512)):
        runs.append(_manual_run(tmp_path, f"b{tier}", [(0.1, 1.0), (0.2, 1.0), (0.3, 1.0)], tier=tier,
                                batch_size=bs, scalars={"noise_scale": [200.0, 200.0, 200.0]}))
    rk = NoiseScalePredictor().fit(runs).predict()["f"]
    assert rk.recommended == 4  # 256 is closest to B_simple = 200 in log
    assert list(rk.tiers) == [4, 2, 8, 1]
    assert rk.values[4] == pytest.approx(abs(math.log(256 / 200)))
    nobatch = _manual_run(tmp_path, "nb", [(0.1, 1.0), (0.3, 1.0)], scalars={"noise_scale": [1.0, 1.0]})
    with pytest.raises(ValueError, match="RunInfo.batch_size is needed"):
        NoiseScalePredictor().fit([nobatch])
    with pytest.raises(ValueError, match="no measurement has a positive scalar 'noise_scale'"):
        NoiseScalePredictor().fit([_manual_run(tmp_path, "ns", [(0.1, 1.0), (0.3, 1.0)], batch_size=4)])


def test_theorem6_noise_scale_baseline_is_weaker(clean_runs):
    tail = TailPredictor().fit(clean_runs).score(targets=3.2)
    base = NoiseScalePredictor().fit(clean_runs).score(targets=3.2)
    assert base.rho < tail.rho


def test_controller_decisions(clean_runs, noisy_runs):
    dec = SweepController().decide(clean_runs)["toy"]
    assert dec.ready and dec.continue_tiers == [4]
    assert set(dec.stop_tiers) == {1, 2, 8, 16, 32}
    stop8 = next(d for d in dec.decisions if d.tier == 8)
    assert "above the best (tier 4" in stop8.reason and "sigma" in stop8.reason
    assert SweepController(keep=2).decide(clean_runs)["toy"].continue_tiers == [4, 8]
    assert SweepController(margin=0.1).decide(clean_runs)["toy"].continue_tiers == [4, 8]
    noisy = SweepController().decide(noisy_runs)["toy"]
    assert noisy.continue_tiers[0] == 4 and len(noisy.continue_tiers) >= 2  # uncertainty keeps a runner-up
    assert any("p_best" in d.reason or "within" in d.reason for d in noisy.decisions if d.tier != 4 and d.action == "continue")


def test_controller_waits_for_runs_in_progress(clean_sweep_dir, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(clean_sweep_dir, root)
    mfile = root / "toy-b16" / "measurements.jsonl"
    lines = mfile.read_text().splitlines(keepends=True)
    mfile.write_text("".join(lines[:4]))  # b16 is only at 10% progress
    runs = open_runs([root])
    dec = SweepController().decide(runs)["toy"]
    assert not dec.ready and set(dec.waiting_tiers) == {1, 2, 4, 8, 16, 32}
    wait16 = next(d for d in dec.decisions if d.tier == 16)
    assert "not yet at 20% progress" in wait16.reason
    partial = SweepController(wait_for_all=False).decide(runs)["toy"]
    assert partial.ready and partial.waiting_tiers == [16] and partial.continue_tiers == [4]


def test_predictor_errors_name_the_run(tmp_path, clean_runs):
    with pytest.raises(RuntimeError, match="not fitted"):
        TailPredictor().predict()
    with pytest.raises(ValueError, match="score needs targets"):
        TailPredictor().fit(clean_runs).score()
    info = RunInfo("two", batch_tier=1, total_tokens=100)
    spec = Spectrum(np.arange(1, 301.0) ** -1, n_rows=1000, dim=300)
    with RunWriter(tmp_path / "two", info, fsync=False) as w:
        w.log_measurement(0, 10, {"act:a": spec, "act:b": spec})
    run = RunRecord.open(tmp_path / "two")
    with pytest.raises(ValueError, match=r"run 'two': several activation spectra \['act:a', 'act:b'\]"):
        resolve_spectrum(run)
    with pytest.raises(ValueError, match="no spectrum named 'x'"):
        resolve_spectrum(run, "x")
    info = RunInfo("notier", total_tokens=100)
    with RunWriter(tmp_path / "notier", info, fsync=False) as w:
        w.log_measurement(0, 50, {"act": spec})
    with pytest.raises(ValueError, match="run 'notier': RunInfo.batch_tier is not set"):
        TailPredictor(window=(100, 200)).fit([tmp_path / "notier"])


def test_window_beyond_spectrum_is_a_clear_error(tmp_path):
    run = _manual_run(tmp_path, "a", [(0.1, 1.0), (0.3, 2.0)], n_layer=36)  # d36 -> [200, 400] > 300 ranks
    with pytest.raises(ValueError, match=r"run 'a', step \d+: .*window \[200, 400\] exceeds the spectrum"):
        early_alpha(run, 0.2)


def test_seeds_of_a_tier_are_averaged(tmp_path):
    roots = []
    for seed in (0, 1):
        root = tmp_path / f"s{seed}"
        write_theorem6_sweep(root, (2, 4, 8), family="toy", noise=0.1, seed=seed, n_measure=20, n_eval=40)
        for p in root.iterdir():  # make run ids unique across seeds
            info = p / "run.json"
            info.write_text(info.read_text().replace(f'"toy-{p.name[4:]}"', f'"toy-{p.name[4:]}-s{seed}"'))
        roots.append(root)
    runs = open_runs(roots)
    rk = TailPredictor().fit(runs).predict()["toy"]
    assert rk.run_ids[4] == ("toy-b4-s0", "toy-b4-s1")
    assert rk.recommended == 4


def test_alpha_trajectory(tmp_path):
    from spectral_lens.analysis import alpha_trajectory

    run = _manual_run(tmp_path, "a", [(0.3, 2.0), (0.1, 1.0), (0.5, 3.0)])
    assert run.summary_windows["tail"] == (100, 200)  # recorded by RunWriter: used without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prog, alpha, steps = alpha_trajectory(run)
    np.testing.assert_allclose(prog, [0.1, 0.3, 0.5])  # sorted by progress
    np.testing.assert_allclose(alpha, [1.0, 2.0, 3.0])
    assert steps.tolist() == [1, 0, 2]


def test_synthetic_spectra_follow_theorem6():
    from spectral_lens.analysis.synthetic import theorem6_activation, theorem6_gradient, theorem6_loss
    from spectral_lens.spectra.fit import band_alpha

    p, q, eta, t = 1.0, 0.6, 25.0, 0.01  # r* = (eta t)^(1/q) ~ 0.6: the window is deep in the tail
    lam = theorem6_activation(t, dim=2000, p=p, eta=eta, q=q)
    assert band_alpha(lam, (400, 800)).alpha == pytest.approx(p + 2 * q, abs=0.01)
    late = theorem6_activation(1e6, dim=2000, p=p, eta=eta, q=q)  # everything learned: head exponent p
    assert band_alpha(late, (10, 40)).alpha == pytest.approx(p, abs=1e-6)
    g = theorem6_gradient(0.0, dim=500, p=p, eta=eta, q=q)  # at t=0: kappa_r^2 C r^-p = eta^2 r^-(p+2q)
    assert band_alpha(g, (10, 40)).alpha == pytest.approx(p + 2 * q, abs=1e-9)
    assert theorem6_loss(0.0, loss_floor=2.8, loss_scale=1.5) == pytest.approx(4.3)
    assert theorem6_loss(0.5, q=0.5) < theorem6_loss(0.5, q=0.7)  # faster modes, lower loss
