"""What ``predict``, ``report`` and ``inspect`` tell a user (session 22 new-user walkthrough):
a one-tier family is not a ranking, ``predict --target-loss`` gives the realized answer, the runs
table names the tried window when the tail predictor fails, ``inspect`` shows the recorded windows."""

from __future__ import annotations

import json
import math

import pytest

from spectral_lens.analysis import token_inefficiency, tokens_to_target
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import RunRecord, open_runs


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("review22_cli")
    write_theorem6_sweep(root / "solo", (4,), family="solo", n_measure=20, n_eval=100)
    write_theorem6_sweep(root / "four", (2, 4, 8, 16), family="base", n_measure=20, n_eval=100)
    return root


def _predict_json(capsys, *argv):
    assert main(["predict", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_one_tier_says_nothing_to_rank(sweeps, capsys):
    """One tier: was 'recommended tier 4 (P(best) = 1.00)', a ranking of nothing."""
    assert main(["predict", str(sweeps / "solo")]) == 0
    out = capsys.readouterr().out
    assert "family solo: one tier (4): nothing to rank" in out and "recommended" not in out
    fam = _predict_json(capsys, sweeps / "solo")["families"]["solo"]
    assert fam["ranked"] is False and fam["note"] == "one tier (4): nothing to rank"
    assert fam["recommended"] == 4 and fam["p_recommended"] == 1.0  # existing keys kept
    fam = _predict_json(capsys, sweeps / "four")["families"]["base"]
    assert fam["ranked"] is True and fam["note"] is None and fam["recommended"] == 4


def test_predict_target_loss_gives_realized_tokens_and_eps(sweeps, capsys):
    """--target-loss: each tier's realized T and eps_tok (as the score computes them), the prediction unchanged."""
    plain = _predict_json(capsys, sweeps / "four")
    data = _predict_json(capsys, sweeps / "four", "--target-loss", "3.2")
    runs = {r.run_id: r for r in open_runs([sweeps / "four"])}
    eps = token_inefficiency(runs.values(), 3.2)
    tiers = data["families"]["base"]["tiers"]
    for t, p in zip(tiers, plain["families"]["base"]["tiers"]):
        assert {k: t[k] for k in p} == p  # the prediction itself is the same
        (rid,) = t["runs"]
        assert t["tokens_to_target"] == [pytest.approx(tokens_to_target(runs[rid], 3.2))]
        assert t["eps_tok"] == [pytest.approx(eps[rid])] and t["target_status"] == ["reached"]
    assert data["target_loss"] == 3.2 and "tokens_to_target" not in plain["families"]["base"]["tiers"][0]
    assert sorted(e for t in tiers for e in t["eps_tok"])[0] == 1.0
    assert main(["predict", str(sweeps / "four"), "--target-loss", "3.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "T (tokens to target)" in lines[1] and "eps_tok" in lines[1]
    row = next(x for x in lines if x.rstrip().endswith("base-b16"))
    assert f"{tokens_to_target(runs['base-b16'], 3.2):.4g}" in row and f"{eps['base-b16']:.3f}" in row
    # a target no run reached: T 'not reached', eps_tok unknown (null in JSON), still one ranking
    data = _predict_json(capsys, sweeps / "four", "--target-loss", "1.0")
    t = data["families"]["base"]["tiers"][0]
    assert t["tokens_to_target"] == [None] and t["eps_tok"] == [None] and t["target_status"] == ["not reached"]
    capsys.readouterr()
    assert main(["predict", str(sweeps / "four"), "--target-loss", "1.0"]) == 0
    assert "not reached" in capsys.readouterr().out


def test_predict_realized_for_a_run_still_going(tmp_path, capsys):
    """A run whose records end short of its budget above the target: 'not reached yet', eps_tok unknown."""
    write_theorem6_sweep(tmp_path, (2, 4, 8), family="g", n_measure=20, n_eval=100)
    run = tmp_path / "g-b8"
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # cut short at ~50%
    meas = (run / "measurements.jsonl").read_text().splitlines()
    (run / "measurements.jsonl").write_text("\n".join(meas[: len(meas) // 2]) + "\n")
    assert not math.isfinite(tokens_to_target(RunRecord.open(run), 2.9))  # b4 reaches 2.9 at ~71%
    tiers = _predict_json(capsys, tmp_path, "--target-loss", "2.9")["families"]["g"]["tiers"]
    t = next(t for t in tiers if t["runs"] == ["g-b8"])
    assert t["target_status"] == ["not reached yet"] and t["eps_tok"] == [None] and t["tokens_to_target"] == [None]
    t = next(t for t in tiers if t["runs"] == ["g-b4"])
    assert t["target_status"] == ["reached"] and t["eps_tok"] == [1.0]
    assert main(["predict", str(tmp_path), "--target-loss", "2.9"]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.rstrip().endswith("g-b8"))
    assert "not reached yet" in row and "unknown" in row  # eps_tok NaN: the word --json gives it (was "nan")


def test_report_header_names_the_tried_window_when_the_tail_predictor_fails(sweeps, tmp_path):
    """Was 'early α_tail ' with the window missing when the tail predictor was not run."""
    from spectral_lens.report import build_report

    def header(**kw):
        rep = build_report([sweeps / "four"], tmp_path / "r", plots=False, target_loss=3.2, **kw)
        text = rep.path.read_text()
        line = next(x for x in text.splitlines() if x.startswith("| run | family |"))
        return [c.strip() for c in line.strip("|").split("|")][8], rep

    h, rep = header(spectrum="act:nope")
    assert any(n.startswith("tail predictor not run") for n in rep.notes)
    assert h == "early α_tail ranks (100, 200)"
    assert header(spectrum="act:nope", window=(20, 60))[0] == "early α_tail ranks (20, 60)"
    assert header()[0] == "early α_tail ranks (100, 200)"


def test_report_one_tier_heading_says_nothing_to_rank(sweeps, tmp_path):
    from spectral_lens.report import build_report

    text = build_report([sweeps / "solo"], tmp_path / "r", plots=False).path.read_text()
    assert "### solo: one tier (4): nothing to rank" in text and "recommended tier" not in text


def test_inspect_run_shows_its_summary_windows(tmp_path, capsys):
    """A run whose recorded tail window does not fit its spectra has no alpha_tail: inspect names the window."""
    (run,) = write_theorem6_sweep(tmp_path / "a", (4,), family="w", n_measure=5, n_eval=20, tail_window=(300, 900))
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "  summary windows: tail ranks [300, 900], head ranks [10, 40] (run.json)" in out
    last = next(x for x in out.splitlines() if "'act:blocks.11'" in x)
    assert "alpha_tail" not in last and "alpha_head" in last
    header = json.loads((run / "run.json").read_text())
    del header["summary_windows"]  # an older record: say what predict uses instead
    (run / "run.json").write_text(json.dumps(header))
    assert main(["inspect", str(run)]) == 0
    assert ("summary windows: none recorded in run.json; predict and report use tail ranks [100, 200] "
            "(scale rule for n_layer 12)") in capsys.readouterr().out


def test_inspect_spectrum_compares_the_tail_window_to_r_star(tmp_path, capsys):
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.analysis.synthetic import theorem6_activation

    for name, t in (("early", 0.5), ("late", 1.2)):
        v = torch.tensor(theorem6_activation(t, dim=768, eta=25.0, q=0.6).copy())
        Spectrum(v, n_rows=10_000, dim=768).save(tmp_path / f"{name}.npz")
    assert main(["inspect", str(tmp_path / "early.npz")]) == 0
    assert ("crossover rank r*: 67.3 (head alpha 1.000, tail alpha 2.200); the alpha_tail window [100, 200] "
            "starts beyond it") in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "late.npz")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "crossover rank r*:" in x)
    assert "starts before it (in the head" in line, line
