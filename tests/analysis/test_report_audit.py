"""build_report against direct computation from the record files, escaping, and a report written
into a directory that holds an older one."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from support.figures import save_figures_unrendered

from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.report import build_report

TARGET = 3.0


@pytest.fixture
def figures_unrendered(monkeypatch):
    """Report figures built (every ``plot_*`` call runs, so one that cannot be drawn is still a note) and
    saved through the real ``save_figure`` (atomic, a real PNG), but as an empty figure: rendering the
    built one was most of these file-handling tests' time (~0.25 s a figure, 10 per test). The rendered
    figures are checked in test_report_real_records.py (the report's PNGs, each > 5 kB)."""
    save_figures_unrendered(monkeypatch)


def _sweep(root: Path) -> Path:
    sw = root / "sw"
    kw = dict(dim=256, grad_dim=32, n_eval=20, n_measure=10, noise=0.02)
    write_theorem6_sweep(sw, (1, 2, 4, 8), family='a<b&"c\'', **kw)  # recorded tail window [100, 200]
    write_theorem6_sweep(sw, (1, 4), family="fam|2", tail_window=(20, 60), **kw)
    return sw


def _runs_table(md: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = md.split("## Runs\n")[1].split("\n## ")[0].strip().splitlines()
    split = lambda line: [c.strip().replace("\0", "|") for c in line.replace("\\|", "\0").strip("|").split("|")]  # noqa: E731
    rows = [split(line) for line in lines[2:]]
    return split(lines[0]), {r[0]: r for r in rows}


def _direct(run_dir: Path) -> dict:
    """The runs-table quantities straight from run.json / log.jsonl / measurements.jsonl / .npz."""
    info = json.loads((run_dir / "run.json").read_text())
    events = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    meas = [json.loads(x) for x in (run_dir / "measurements.jsonl").read_text().splitlines() if x.strip()]
    pts = sorted({(e["tokens"], e["val_loss"]) for e in events if "val_loss" in e}
                 | {(m["tokens"], m["val_loss"]) for m in meas if m.get("val_loss") is not None})
    tps = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    m = min(meas, key=lambda m: abs(m["progress"] - 0.2))
    v = np.load(run_dir / m["spectra"]["act:blocks.11"]["file"])["values"]
    a, b = info["summary_windows"]["tail"]
    r = np.arange(a, b + 1)
    slope = np.polyfit(np.log(r), np.log(v[a - 1:b] / v.sum()), 1)[0]
    return {
        "family": info["family"], "final": pts[-1][1], "Q": float(np.median(tps[len(tps) // 10:])),
        "T": next((t for t, loss in pts if loss <= TARGET), math.inf), "alpha": -slope, "window": (a, b),
    }


def test_runs_table_matches_the_records_and_names_each_family_window(tmp_path):
    sw = _sweep(tmp_path)
    rep = build_report([sw], tmp_path / "md", target_loss=TARGET, plots=False, progress=False)
    headers, rows = _runs_table(rep.path.read_text())
    direct = {d.name: _direct(d) for d in sw.iterdir()}
    assert set(rows) == set(direct) and len(rows) == 6
    best = {}
    for d in direct.values():
        best[d["family"]] = min(best.get(d["family"], math.inf), d["T"])
    for rid, d in direct.items():
        row = rows[rid]
        assert row[1] == d["family"]
        assert float(row[4]) == pytest.approx(d["final"], rel=1e-3)
        assert float(row[5]) == pytest.approx(d["T"], rel=1e-3)
        assert float(row[6]) == pytest.approx(d["T"] / best[d["family"]], abs=1e-3)
        assert float(row[7]) == pytest.approx(d["Q"], rel=1e-3)
        assert float(row[8].split(" ± ")[0]) == pytest.approx(d["alpha"], abs=1e-3)
        # the families fit different windows: each cell says which (the header used to claim the
        # first family's window [100, 200] for every row, also for fam|2's [20, 60])
        assert f"(ranks {d['window']})" in row[8]
    assert "(100, 200)" not in headers[8] and "(20, 60)" not in headers[8]


def test_one_window_stays_in_the_header(tmp_path):
    sw = tmp_path / "sw"
    write_theorem6_sweep(sw, (1, 4), family="f", dim=256, grad_dim=32, n_eval=20, n_measure=10)
    rep = build_report([sw], tmp_path / "md", target_loss=TARGET, plots=False, progress=False)
    headers, rows = _runs_table(rep.path.read_text())
    assert headers[8] == "early α_tail ranks (100, 200)"
    assert all("ranks" not in r[8] for r in rows.values())


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append((tag, list(self.stack)))
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_html_is_well_formed_and_escapes_ids(tmp_path):
    sw = _sweep(tmp_path)
    rep = build_report([sw], tmp_path / "html", fmt="html", target_loss=TARGET, plots=False, progress=False)
    raw = rep.path.read_text()
    assert 'a<b&"c' not in raw and "a&lt;b&amp;&quot;c&#x27;-b1" in raw
    chk = _Checker()
    chk.feed(raw)
    chk.close()
    assert chk.errors == [] and chk.stack == []
    assert 'a<b&"c\'-b1' in "".join(chk.text)  # unescaped by a parser: the original id


def test_rerun_into_the_same_directory_leaves_no_figure_of_the_old_report(tmp_path, figures_unrendered):
    sw = tmp_path / "sw"
    write_theorem6_sweep(sw, (2, 4, 8), family="f", dim=256, grad_dim=64, n_eval=20, n_measure=8)
    out = tmp_path / "out"
    first = build_report([sw], out, target_loss=TARGET, transitions=[("f-b2", "f-b4")], progress=False)
    assert {"early_alpha_vs_eps.png", "gain_plane.png"} <= {p.name for p in first.figures}
    (out / "mine.txt").write_text("kept")
    second = build_report([sw], out, progress=False)  # no target: no score figure, no gain plane
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {p.name for p in second.figures} == {"loss.png", "spectra.png", "alpha_tail.png",
                                                         "gradient_spectra.png"}
    text = second.path.read_text()
    assert all(f"]({name})" in text for name in pngs)  # every figure left in out is one the report shows
    build_report([sw], out, plots=False, progress=False)
    assert list(out.glob("*.png")) == [] and (out / "mine.txt").read_text() == "kept"


def test_a_run_without_measurements_does_not_cost_the_spectra_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from spectral_lens import plot
    from spectral_lens.records import RunInfo, RunWriter, open_runs

    write_theorem6_sweep(tmp_path / "sw", (2, 4), family="f", dim=256, grad_dim=64, n_eval=20, n_measure=8)
    w = RunWriter(tmp_path / "sw" / "f-b8", RunInfo("f-b8", family="f", batch_tier=8, total_tokens=10**9), fsync=False)
    w.log(1, 1000, val_loss=5.0)  # stopped before its first spectral measurement
    w.close()
    runs = open_runs([tmp_path / "sw"])
    for fig in (plot.plot_spectra(runs, TARGET), plot.plot_alpha_trajectories(runs)):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("B=8" in t and "no measurements" in t for t in texts), texts
    fig = plot.plot_alpha_trajectories(runs)
    assert len([ln for ln in fig.axes[0].lines if ln.get_marker() == "o"]) == 2
    rep = build_report([tmp_path / "sw"], tmp_path / "out", target_loss=TARGET, progress=False)
    assert {"spectra.png", "alpha_tail.png"} <= {p.name for p in rep.figures}, rep.notes


def test_the_baseline_score_is_shown_when_the_tail_predictor_cannot_run(tmp_path):
    """With a window the spectra cannot hold, the tail predictor is skipped (a note says why) while the
    noise-scale baseline runs: its score was computed and returned but appeared nowhere in the report."""
    from spectral_lens.records import open_runs

    sw = tmp_path / "sw"
    write_theorem6_sweep(sw, (1, 2, 4, 8), family="f", dim=256, grad_dim=32, n_eval=20, n_measure=10, noise=0.02)
    rep = build_report(open_runs([sw]), tmp_path / "out", target_loss=TARGET, window=(300, 400), plots=False)
    assert rep.score is None and rep.baseline_score is not None
    assert any("tail predictor not run" in n for n in rep.notes)
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Score of the noise-scale baseline")[1].split("\n## ")[0]
    assert f"| f | {rep.baseline_score.within['f'].rho:.3f} |" in section


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_a_users_own_figure_names_in_out_are_left_alone(tmp_path, fmt, figures_unrendered):
    """Only figures an earlier report in ``out`` linked are removed: a report into a directory that
    holds the user's own ``loss.png`` / ``gain_plane.png`` (and no report) deleted them before."""
    sw = tmp_path / "sw"
    write_theorem6_sweep(sw, (2, 4, 8), family="f", dim=256, grad_dim=64, n_eval=20, n_measure=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.png").write_bytes(b"mine")
    (out / "gain_plane.png").write_bytes(b"mine too")
    build_report([sw], out, plots=False, progress=False, fmt=fmt)
    assert (out / "loss.png").read_bytes() == b"mine" and (out / "gain_plane.png").read_bytes() == b"mine too"
    # an earlier report's figures are still removed when the next one does not draw them
    first = build_report([sw], out, target_loss=TARGET, transitions=[("f-b2", "f-b4")], progress=False, fmt=fmt)
    assert "gain_plane.png" in {p.name for p in first.figures}
    second = build_report([sw], out, progress=False, fmt=fmt)
    assert not (out / "gain_plane.png").exists()
    assert {p.name for p in out.glob("*.png")} == {p.name for p in second.figures}
