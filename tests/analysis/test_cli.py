"""The ``spectral-lens`` CLI and reports, built from synthetic Theorem-6 sweeps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from spectral_lens.analysis import TailPredictor, token_inefficiency, tokens_to_target
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import open_runs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    write_theorem6_sweep(root, (2, 4, 8, 16), family="base", n_measure=20, n_eval=100)
    write_theorem6_sweep(root, (2, 4, 8, 16), family="fast", eta=40.0, n_measure=20, n_eval=100,
                         throughput=lambda b: 5e5 * b / (b + 4))
    return root


def test_report_markdown_with_figures(two_families, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the report's figures need matplotlib (plot extra)")
    out = tmp_path / "rep"
    rc = main(["report", str(two_families), "--out", str(out), "--target-loss", "3.2",
               "--transition", "base-b8:fast-b8", "--transition", "fast-b8:base-b8"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    for name in ("spectra.png", "alpha_tail.png", "early_alpha_vs_eps.png", "gain_plane.png"):
        assert (out / name).read_bytes().startswith(PNG)
        assert f"]({name})" in text
    runs = open_runs([two_families])
    eps = token_inefficiency(runs, 3.2)
    # every run's row carries its T and eps_tok as computed by the library
    for r in runs:
        row = next(line for line in text.splitlines() if line.startswith(f"| {r.run_id} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[5]) == pytest.approx(tokens_to_target(r, 3.2), rel=1e-3)
        assert float(cells[6]) == pytest.approx(eps[r.run_id], abs=5e-4)
    assert "### base: recommended tier 4" in text and "### fast: recommended tier 4" in text
    score_rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (base|fast) \| ([0-9.\-]+) \|", text, re.M)}
    assert score_rows == {"base": 1.0, "fast": 1.0}
    assert "Noise-scale baseline" in text
    # taxonomy table: both directions present with opposite token gains
    tax = [line for line in text.splitlines() if line.startswith("| base-b8 → fast-b8") or line.startswith("| fast-b8 → base-b8")]
    assert len(tax) == 2
    assert "+" in tax[0].split("|")[3] and "-" in tax[1].split("|")[3]


def test_report_html_is_self_contained(two_families, tmp_path):
    pytest.importorskip("matplotlib", reason="the report's figures need matplotlib (plot extra)")
    out = tmp_path / "rep"
    assert main(["report", str(two_families / "base-b4"), str(two_families / "base-b8"), "--out", str(out),
                 "--format", "html", "--target-loss", "3.2"]) == 0
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") == 5  # loss, spectra, alpha_tail, gradient spectra, score
    assert "<table>" in html and "base-b4" in html


def test_report_without_matplotlib_has_tables_and_a_note(two_families, tmp_path, monkeypatch):
    from spectral_lens import report

    monkeypatch.setattr(report, "_matplotlib_available", lambda: False)
    rep = report.build_report([two_families], tmp_path / "rep", target_loss=3.2)
    text = rep.path.read_text()
    assert rep.figures == [] and not list((tmp_path / "rep").glob("*.png"))
    assert "matplotlib is not installed" in text and "| run | family | tier |" in text
    assert rep.score is not None and rep.score.within["base"].rho == pytest.approx(1.0)


def test_report_without_target_skips_scores(two_families, tmp_path):
    from spectral_lens.report import build_report

    rep = build_report([two_families], tmp_path / "rep", plots=False)
    assert rep.score is None and rep.rankings["base"].recommended == 4
    assert "No target loss given" in rep.path.read_text()


def test_require_matplotlib_names_the_extra(monkeypatch):
    from spectral_lens import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"spectral-lens\[plot\]"):
        plot.require_matplotlib()


def test_predict_text_and_json(two_families, capsys):
    assert main(["predict", str(two_families), "--target-loss", "3.2"]) == 0
    out = capsys.readouterr().out
    assert "family base: recommended tier 4" in out and "base: 1.000" in out
    assert main(["predict", str(two_families), "--json", "--target-loss", "3.2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["families"]["fast"]["recommended"] == 4
    assert [t["tier"] for t in data["families"]["base"]["tiers"]] == list(
        TailPredictor().fit(open_runs([two_families])).predict()["base"].tiers
    )
    assert data["score"]["within"]["base"]["rho"] == pytest.approx(1.0)


def test_inspect_file_and_run(two_families, capsys):
    run = two_families / "base-b4"
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "run 'base-b4'" in out and "measurements: 20" in out and "'act:blocks.11' (activation_covariance)" in out
    npz = sorted((run / "spectra").glob("*act_blocks.11.npz"))[0]
    assert main(["inspect", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "activation_covariance spectrum" in out and "alpha_tail [100, 200]" in out and "RankMe" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["predict", str(tmp_path)]) == 2
    assert "not a spectral-lens run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--out", str(tmp_path), "--transition", "nocolon"])


def test_console_script_runs(two_families):
    exe = os.path.join(os.path.dirname(sys.executable), "spectral-lens")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "spectral_lens.cli"]
    res = subprocess.run(cmd + ["predict", str(two_families)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "recommended tier 4" in res.stdout


def test_report_thresholds_from_seed_replicates(two_families, tmp_path, capsys):
    """``--replicates``: the taxonomy's thresholds come from the seed noise of the given runs (twice
    the largest null difference), the report says so, and the labels use them."""
    seeds = [write_theorem6_sweep(tmp_path / f"s{i}", (8,), family=f"seed{i}", n_measure=20, n_eval=100, noise=0.02,
                                  seed=i)[0] for i in range(3)]
    out = tmp_path / "rep"
    assert main(["report", str(two_families), "--out", str(out), "--target-loss", "3.2", "--no-plots",
                 "--transition", "base-b8:fast-b8", "--replicates", *map(str, seeds)]) == 0
    text = (out / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("Thresholds (from the seed noise of 3 replicas"))
    assert "seed0-b8, seed1-b8, seed2-b8" in line and "over 3 null transitions" in line
    from spectral_lens.analysis import TransitionClassifier, replicate_evidence

    want = TransitionClassifier.from_replicates(replicate_evidence(open_runs(seeds), 3.2)).thresholds
    assert f"head_threshold={want['head_threshold']:g}" in line and want["head_threshold"] != 0.05
    default = (tmp_path / "rep0")
    assert main(["report", str(two_families), "--out", str(default), "--target-loss", "3.2", "--no-plots",
                 "--transition", "base-b8:fast-b8"]) == 0
    assert "Thresholds (defaults): gain_threshold=0.02" in (default / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(two_families), "--out", str(default), "--target-loss", "3.2", "--no-plots",
                 "--replicates", *map(str, seeds)]) == 0
    assert "note: replicates given but no transitions" in capsys.readouterr().out
    # identical replicas (same seed, no noise): one line, exit 2
    same = [write_theorem6_sweep(tmp_path / f"same{i}", (8,), family=f"same{i}", n_measure=20, n_eval=100)[0]
            for i in range(2)]
    capsys.readouterr()
    assert main(["report", str(two_families), "--out", str(out), "--target-loss", "3.2", "--no-plots",
                 "--transition", "base-b8:fast-b8", "--replicates", *map(str, same)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zero spread" in err and "different seeds" in err


def test_report_rejects_classifier_with_replicates(two_families, tmp_path):
    from spectral_lens.analysis import TransitionClassifier
    from spectral_lens.report import build_report

    with pytest.raises(ValueError, match="give classifier or replicates, not both"):
        build_report([two_families], tmp_path / "r", target_loss=3.2, transitions=[("base-b8", "fast-b8")],
                     classifier=TransitionClassifier(), replicates=[two_families / "base-b8"], plots=False)
    rep = build_report([two_families], tmp_path / "r2", target_loss=3.2, transitions=[("base-b8", "fast-b8")],
                       classifier=TransitionClassifier(head_threshold=0.5), plots=False)
    assert "Thresholds (given):" in rep.path.read_text() and rep.taxonomy[0].thresholds["head_threshold"] == 0.5


def test_inspect_says_when_no_crossover_is_located(tmp_path, capsys):
    """A spectrum without a bend inside its ranks: inspect printed the fit's bound artefacts as a crossover
    ('tail alpha 100.x'); now it says none was located. A Theorem-6 spectrum still prints its r*."""
    import numpy as np
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.analysis.synthetic import theorem6_activation

    r = np.arange(1, 201, dtype=np.float64)
    Spectrum(torch.tensor(np.where(r <= 20, r**-0.5, 1e-6 * r**-0.5)), n_rows=1000, dim=200).save(tmp_path / "cliff.npz")
    assert main(["inspect", str(tmp_path / "cliff.npz")]) == 0
    out = capsys.readouterr().out
    assert "crossover rank r*: not located within ranks 1-200" in out and "tail alpha" not in out
    v = torch.tensor(theorem6_activation(0.5, dim=768, eta=25.0, q=0.6).copy())
    Spectrum(v, n_rows=10_000, dim=768).save(tmp_path / "t6.npz")
    assert main(["inspect", str(tmp_path / "t6.npz")]) == 0
    assert "crossover rank r*: 67.3 (head alpha 1.000, tail alpha 2.200)" in capsys.readouterr().out
