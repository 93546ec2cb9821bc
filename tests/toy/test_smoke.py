"""The `smoke` preset through the README main job's code path (`python -m examples.toy`), and resume."""
import json
import os
import shutil

import pytest
from support.figures import save_figures_unrendered

from examples.replicate.settings import check_settings
from examples.toy.__main__ import main
from examples.toy.presets import PRESETS


def test_smoke_preset_end_to_end_then_resume(smoke_job, tmp_path, capsys, monkeypatch):
    pytest.importorskip("optuna", reason="the toy's tuner needs the tune extra: pip install -e '.[tune]'")
    status, finished, printed = smoke_job  # main(["--preset", "smoke", "--out", DIR]), run once per session
    assert status == 0
    out = tmp_path / "toy"
    shutil.copytree(finished, out)  # the shared job is read only: its rerun below runs in a copy
    assert "Verdict:" in printed and "Pre-registered: target validation loss 2" in printed
    report = (out / "report" / "report.md").read_text()
    for section in ("## Verdict", "## Learning rates chosen by the tuner", "Fig. 4a analogue",
                    "Matched-loss spectra by tier", "Fourier probes", "Our numbers beside the paper's"):
        assert section in report
    verdict = json.loads((out / "report" / "verdict.json").read_text())
    assert verdict["target"] == 2.0 and list(verdict["families"]) == ["Muon"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["muon-b16", "muon-b32", "muon-b64"]
    choices = json.loads((out / "tune" / "choices.json").read_text())
    assert {(c["family"], c["tier"]) for c in choices["choices"]} == {("Muon", 16), ("Muon", 32), ("Muon", 64)}
    stamps = {p.name: os.stat(p / "measurements.jsonl").st_mtime_ns for p in (out / "runs").iterdir()}
    # second call: tuning and training are complete, only the report is rebuilt. Its figures are built and
    # saved through the real save_figure, as empty figures: the shared job rendered every one of them, and
    # rendering them again was most of this call's time
    save_figures_unrendered(monkeypatch)
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert "3 of 3 runs already complete; training 0" in capsys.readouterr().out
    assert stamps == {p.name: os.stat(p / "measurements.jsonl").st_mtime_ns for p in (out / "runs").iterdir()}


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("not a toy run")
    assert main(["--preset", "smoke", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty and holds no toy run" in err
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "preset.json").write_text('{"preset": "cpu"}')
    assert main(["--preset", "smoke", "--out", str(tmp_path / "cpu")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings" in err and "name" in err and "new --out" in err
    assert main(["--preset", "smoke", "--out", str(tmp_path / "new"), "--threads", "0"]) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--preset", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()   # argparse's errors are one line too (no usage block)
    assert len(err) == 1 and "invalid choice: 'nope'" in err[0]


def test_a_pipeline_error_is_one_line_with_status_2(tmp_path, capsys):
    out = tmp_path / "bad"
    check_settings(out, PRESETS["smoke"], "toy run")
    (out / "tune").mkdir()
    (out / "tune" / "choices.json").write_text("garbage")   # a malformed stage result: refused before training
    assert main(["--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choices.json" in err[0] and "not JSON" in err[0]


def test_resume_refuses_a_changed_preset(tmp_path, capsys, monkeypatch):
    """The same preset name with other settings (an edited or updated preset) must not reuse the old results."""
    import dataclasses

    import examples.toy.__main__ as toy_main
    from examples.replicate.settings import check_settings

    out = tmp_path / "toy"
    check_settings(out, PRESETS["smoke"], "toy run")  # what the first call writes before any stage
    (out / "runs").mkdir()
    changed = dataclasses.replace(PRESETS["smoke"], budget=1280, seed=1,
                                  tuner=dataclasses.replace(PRESETS["smoke"].tuner, rungs=(64, 128)))
    monkeypatch.setitem(toy_main.PRESETS, "smoke", changed)
    assert main(["--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "differs in: budget, seed, tuner.rungs" in err and "new --out" in err


@pytest.mark.parametrize("case", ["file", "list", "directory", "garbage"])
def test_bad_out_is_one_line_exit_2(tmp_path, capsys, case):
    """--out that is a file, or whose preset.json is a list, a directory or not JSON: one line, status 2."""
    out = tmp_path / "out"
    if case == "file":
        out.write_text("x")
    else:
        out.mkdir()
        marker = out / "preset.json"
        if case == "list":
            marker.write_text("[1]")
        elif case == "directory":
            marker.mkdir()
        else:
            marker.write_bytes(b"\xff{")
    assert main(["--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m examples.toy: error: ") and str(out) in err


def test_resume_of_an_older_name_only_preset_json_says_why(tmp_path, capsys):
    """Older versions wrote preset.json as {"preset": NAME}: refused with the real reason (its settings
    cannot be checked), not as a directory whose every field differs."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "preset.json").write_text('{"preset": "smoke"}\n')
    assert main(["--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records only the preset name ('smoke')" in err and "differs in" not in err
