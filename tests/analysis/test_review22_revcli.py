"""Adversarial review of the session-22 CLI change (``predict`` realized T / eps_tok and one-tier note,
``inspect`` summary windows): strict JSON aligned with ``runs`` across seeds, learning rates, failed
and budget-less runs; several families, one ranked and one not; a malformed ``n_layer``."""

from __future__ import annotations

import json
import shutil

import pytest

from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main

TARGET = 2.9  # tier 4 reaches it at ~72% of the budget, tier 16 never


def _strict(text: str):
    """``json.loads`` that refuses the bare ``NaN`` / ``Infinity`` tokens strict JSON does not have."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _set(run_dir, **fields):
    header = json.loads((run_dir / "run.json").read_text())
    extras = fields.pop("extras", {})
    header.update(fields)
    header["extras"].update(extras)
    (run_dir / "run.json").write_text(json.dumps(header))


def _cut(run_dir, share: float):
    for name in ("log.jsonl", "measurements.jsonl"):
        lines = (run_dir / name).read_text().splitlines()
        (run_dir / name).write_text("\n".join(lines[: int(len(lines) * share)]) + "\n")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Family 'toy' (tiers 2-16 at lr 1e-3; seeds at tiers 2, 4, 8; tier 8 also at lr 3e-3, two seeds, the
    worse rate; a failed seed of tier 4 cut at 40%; a seed of tier 2 without total_tokens cut at 60%) and a
    one-tier family 'solo'."""
    root = tmp_path_factory.mktemp("revcli")
    d = root / "toy"
    write_theorem6_sweep(d, (2, 4, 8, 16), family="toy", n_measure=20, n_eval=50)
    write_theorem6_sweep(root / "solo", (4,), family="solo", n_measure=20, n_eval=50)
    for rid in ("toy-b2", "toy-b4", "toy-b8", "toy-b16"):
        _set(d / rid, extras={"lr": 1e-3})

    def copy(src, dst, **fields):
        shutil.copytree(d / src, d / dst)
        _set(d / dst, run_id=dst, **fields)

    copy("toy-b8", "toy-b8-s1", seed=1)
    hi = dict(batch_tier=8, tokens_per_step=8 * 65536, batch_size=8 * 64, extras={"lr": 3e-3})
    copy("toy-b16", "toy-b8-hi", **hi)
    copy("toy-b16", "toy-b8-hi-s1", seed=1, **hi)
    copy("toy-b4", "toy-b4-s1", seed=1, extras={"status": "failed", "failure": "RuntimeError: boom"})
    _cut(d / "toy-b4-s1", 0.4)
    copy("toy-b2", "toy-b2-s1", seed=1, total_tokens=None)
    _cut(d / "toy-b2-s1", 0.6)
    return root


def test_predict_json_realized_cells_are_strict_and_aligned_with_runs(sweep, capsys):
    """Cells per ranked run in ``runs`` order; the other learning rate's runs neither ranked nor given cells."""
    assert main(["predict", str(sweep / "toy"), str(sweep / "solo"), "--json", "--target-loss", str(TARGET)]) == 0
    data = _strict(capsys.readouterr().out)
    assert set(data["excluded"]) == {"toy-b8-hi", "toy-b8-hi-s1"}
    toy = {t["tier"]: t for t in data["families"]["toy"]["tiers"]}
    for t in toy.values():
        assert len(t["tokens_to_target"]) == len(t["eps_tok"]) == len(t["target_status"]) == len(t["runs"])
    assert toy[8]["runs"] == ["toy-b8", "toy-b8-s1"] and toy[8]["target_status"] == ["reached", "reached"]
    assert toy[4]["runs"] == ["toy-b4", "toy-b4-s1"] and toy[4]["eps_tok"][0] == 1.0
    assert toy[4]["target_status"] == ["reached", "not reached (failed)"] and toy[4]["eps_tok"][1] is None
    assert toy[2]["runs"] == ["toy-b2", "toy-b2-s1"]
    assert toy[2]["target_status"] == ["not reached", "not reached yet"] and toy[2]["eps_tok"] == [None, None]
    assert toy[2]["eps_tok_status"] == ["not reached", "unknown"]  # inf (ranks last) vs NaN (left out), both null
    assert toy[16]["target_status"] == ["not reached"] and toy[16]["tokens_to_target"] == [None]
    assert data["families"]["toy"]["ranked"] is True and data["families"]["toy"]["note"] is None
    solo = data["families"]["solo"]
    assert solo["ranked"] is False and solo["note"] == "one tier (4): nothing to rank"
    assert solo["tiers"][0]["target_status"] == ["reached"] and solo["tiers"][0]["eps_tok"] == [1.0]
    assert data["score"]["within"]["solo"]["rho"] is None  # NaN as null, not a bare NaN token
    # the text table: one cell per run of the tier, in the runs column's order
    assert main(["predict", str(sweep / "toy"), str(sweep / "solo"), "--target-loss", str(TARGET)]) == 0
    out = capsys.readouterr().out
    assert "family solo: one tier (4): nothing to rank" in out and "family toy: recommended tier 4" in out
    row = next(x for x in out.splitlines() if x.rstrip().endswith("toy-b4, toy-b4-s1"))
    assert "not reached (failed)" in row and "1.000, unknown" in row  # eps_tok NaN: --json's word (was "nan")
    row = next(x for x in out.splitlines() if x.rstrip().endswith("toy-b2, toy-b2-s1"))
    assert "not reached, not reached yet" in row


def test_inspect_a_run_whose_n_layer_is_not_a_depth_says_so_in_its_windows_line(tmp_path, capsys):
    """Was: 'error: n_layer must be >= 1, got -1', exit 2, nothing of the run shown and no file named
    (the scale rule raised inside the summary-windows line); now the line says it and inspect goes on."""
    (run,) = write_theorem6_sweep(tmp_path, (4,), family="w", n_measure=5, n_eval=20)
    header = json.loads((run / "run.json").read_text())
    del header["summary_windows"]  # an older record: inspect names the window predict would use
    header["n_layer"] = -1
    (run / "run.json").write_text(json.dumps(header))
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert ("  summary windows: none recorded in run.json; predict and report stop on it: n_layer -1 in "
            "run.json is not a depth (>= 1) for the scale rule (pass --window LO HI)") in out
    assert "  status: " in out and "  events: " in out  # the rest of the run is still shown
    header["summary_windows"] = {"tail": None, "head": [10, 40]}
    (run / "run.json").write_text(json.dumps(header))
    assert main(["inspect", str(run)]) == 0
    assert "summary windows: head ranks [10, 40] (run.json); predict and report stop on it: n_layer -1" in (
        capsys.readouterr().out)
    assert main(["predict", str(run), "--window", "100", "200"]) == 0  # as the line says: --window works
    capsys.readouterr()
    assert main(["predict", str(run)]) == 2  # and without it predict does stop, one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_layer must be >= 1, got -1" in err


def test_inspect_old_and_malformed_summary_windows_are_one_line_or_shown(tmp_path, capsys):
    (run,) = write_theorem6_sweep(tmp_path, (4,), family="w", n_measure=5, n_eval=20)
    header = json.loads((run / "run.json").read_text())
    for bad in ([[100, 200]], {"tail": "ab"}, {"tail": [1.0, 2]}, {"tail": [1, 2, 3]}):
        (run / "run.json").write_text(json.dumps({**header, "summary_windows": bad}))
        assert main(["inspect", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'summary_windows' must map names to [lo, hi]" in err
        assert str(run / "run.json") in err
    (run / "run.json").write_text(json.dumps({**header, "summary_windows": {}, "n_layer": None}))
    assert main(["inspect", str(run)]) == 0
    assert ("summary windows: none recorded in run.json; predict and report use tail ranks [100, 200] "
            "(n_layer unknown: the d12 window)") in capsys.readouterr().out


def test_inspect_spectrum_too_short_for_r_star_or_the_tail_window_is_quiet_about_the_window(tmp_path, capsys):
    import numpy as np
    import torch

    from spectral_lens import Spectrum

    for name, v in (("nine", np.r_[1.0 / np.arange(1, 10), np.zeros(5)]), ("short", 1.0 / np.arange(1, 61) ** 1.5)):
        Spectrum(torch.tensor(v), n_rows=10_000, dim=v.size).save(tmp_path / f"{name}.npz")
        assert main(["inspect", str(tmp_path / f"{name}.npz")]) == 0
        out = capsys.readouterr().out
        assert "alpha_tail [100, 200]" not in out and "alpha_tail window" not in out
