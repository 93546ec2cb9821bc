"""Report additions of issue #12: loss curves, gradient spectra, plain-words cautions on the score,
and a readable eps_tok axis for a single run."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from spectral_lens import plot  # noqa: E402
from spectral_lens.analysis import FamilyScore, PredictionScore, TailPredictor  # noqa: E402
from spectral_lens.analysis.synthetic import write_theorem6_sweep  # noqa: E402
from spectral_lens.cli import main  # noqa: E402
from spectral_lens.records import RunInfo, RunWriter, open_runs  # noqa: E402
from spectral_lens.report import MAX_PVALUE, MIN_TIERS, score_flags  # noqa: E402


def _score(within: dict[str, tuple[float, float, int]]) -> PredictionScore:
    fam = {f: FamilyScore(*v) for f, v in within.items()}
    return PredictionScore("alpha_tail", math.nan, math.nan, sum(v[2] for v in within.values()), fam, math.nan, ())


def test_score_flags_in_plain_words():
    assert MIN_TIERS == 4 and MAX_PVALUE == 0.1
    assert score_flags(_score({"good": (0.94, 0.005, 6)})) == []
    (neg,) = score_flags(_score({"inv": (-0.9, 0.03, 6)}))
    assert neg.startswith("family inv: ρ = -0.90 is negative") and "MORE tokens" in neg
    (few,) = score_flags(_score({"few": (1.0, 0.33, 3)}))
    assert "underpowered (only 3 runs (fewer than 4), p = 0.33 > 0.1)" in few and "a guess" in few
    (weak,) = score_flags(_score({"weak": (0.5, 0.3, 6)}))
    assert "underpowered (p = 0.3 > 0.1)" in weak
    both = score_flags(_score({"x": (-0.4, 0.5, 5)}))
    assert len(both) == 2 and "negative" in both[0] and "underpowered" in both[1]
    (undef,) = score_flags(_score({"two": (math.nan, math.nan, 2)}))
    assert "undefined" in undef


def test_report_prints_cautions_for_three_tiers(tmp_path, capsys):
    write_theorem6_sweep(tmp_path / "runs", (2, 4, 8), family="three", n_measure=12, n_eval=30)
    # --no-plots: the cautions are text; rendering the figures was most of this test's time
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--target-loss", "3.2",
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "caution: family three: underpowered (only 3 runs (fewer than 4)" in out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "### Caution" in text and "underpowered" in text
    assert main(["predict", str(tmp_path / "runs"), "--target-loss", "3.2"]) == 0
    assert "caution: family three: underpowered" in capsys.readouterr().out


def test_loss_curves_plot_the_records(tmp_path):
    paths = write_theorem6_sweep(tmp_path, (2, 8), family="f", n_measure=5, n_eval=12)
    runs = open_runs(paths)
    fig = plot.plot_loss_curves(runs, target_loss=3.2)
    ax = fig.axes[0]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    assert len(solid) == 2
    for run, line in zip(sorted(runs, key=lambda r: r.info.batch_tier), solid):
        tokens, losses = run.val_curve()
        np.testing.assert_allclose(line.get_xdata(), tokens[tokens > 0])
        np.testing.assert_allclose(line.get_ydata(), losses[tokens > 0])
    assert any(ln.get_linestyle() == "--" for ln in ax.lines)  # training loss
    assert ax.get_xscale() == "log"


def test_loss_curves_of_a_run_with_only_training_losses(tmp_path):
    """A Trainer run without evaluation records train_loss events only: its panel draws them (labelled, log x),
    not "no loss recorded" over the curve."""
    w = RunWriter(tmp_path / "trainonly", RunInfo("trainonly", family="f", batch_tier=8, total_tokens=1000), fsync=False)
    points = [(100, 4.0), (200, 3.5), (400, 3.1)]
    for step, (tokens, loss) in enumerate(points, 1):
        w.log(step, tokens, train_loss=loss)
    w.close()
    ax = plot.plot_loss_curves(open_runs([tmp_path / "trainonly"])).axes[0]
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), [p[0] for p in points])
    np.testing.assert_allclose(line.get_ydata(), [p[1] for p in points])
    assert line.get_linestyle() == "--" and "training" in line.get_label()
    assert ax.get_xscale() == "log"
    assert not [t for t in ax.texts if t.get_text() == "no loss recorded"]


def test_gradient_spectra_plot_the_matched_measurement(tmp_path):
    (path,) = write_theorem6_sweep(tmp_path, (4,), family="g", n_measure=6, n_eval=12, grad_dim=32)
    (run,) = open_runs([path])
    fig = plot.plot_gradient_spectra([run], target_loss=None)
    (line,) = fig.axes[0].lines
    last = max(run.measurements, key=lambda m: m.tokens)
    p = last.spectra["grad:blocks.11.attn.c_proj"].normalized.numpy()
    np.testing.assert_allclose(line.get_ydata(), p[p > 0])
    w = RunWriter(tmp_path / "nograd", RunInfo("nograd", total_tokens=10), fsync=False)
    w.close()
    with pytest.raises(ValueError, match="no run recorded a gradient spectrum"):
        plot.plot_gradient_spectra(open_runs([tmp_path / "nograd"]))


def test_single_run_eps_axis_keeps_one_in_view(tmp_path):
    write_theorem6_sweep(tmp_path, (4,), family="one", n_measure=12, n_eval=30)
    runs = open_runs([tmp_path])
    score = TailPredictor().fit(runs).score(targets=3.2)
    assert score.n == 1
    ax = plot.plot_early_vs_eps(score).axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 0.97 and hi >= 1.1  # was 0.96..1.04 around the lone point: a meaningless scale
    assert any("one run: nothing to rank" in t.get_text() for t in ax.texts)
