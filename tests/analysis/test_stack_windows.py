"""Analyses and the CLI use the tail window each run recorded (``summary_windows`` in run.json);
``--window``/``window=`` overrides; runs of a family that disagree fail with one clear line."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from spectral_lens import SweepController, TailPredictor
from spectral_lens.analysis import WindowMismatchError, common_windows, early_alpha, resolve_window
from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.cli import main
from spectral_lens.records import open_runs
from spectral_lens.summaries import BandAlphaFitter

TIERS = (2, 4, 8, 16)


def _sweep(root, family="w128", tiers=TIERS, window=(10, 40)):
    """Runs of a 128-wide model (spectra of 128 eigenvalues) that record the tail window (10, 40)."""
    return write_theorem6_sweep(root, tiers, family=family, dim=128, grad_dim=64, n_measure=15, n_eval=40,
                                tail_window=window, head_window=(2, 8))


@pytest.fixture(scope="module")
def w128(tmp_path_factory):
    root = tmp_path_factory.mktemp("w128")
    _sweep(root)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One family whose runs recorded different windows."""
    root = tmp_path_factory.mktemp("mixed")
    _sweep(root, tiers=(2, 4), window=(10, 40))
    _sweep(root, tiers=(8, 16), window=(20, 60))
    return root


def test_recorded_window_is_the_default(w128):
    runs = open_runs([w128])
    assert all(r.summary_windows["tail"] == (10, 40) for r in runs)
    assert runs[0].info.n_layer == 12  # the scale rule would say (100, 200), which 128 ranks cannot hold
    assert resolve_window(runs[0]) == (10, 40) and resolve_window(runs[0], (5, 20)) == (5, 20)
    assert common_windows(runs) == {"w128": (10, 40)}
    s = early_alpha(runs[0], 0.2)
    m = next(m for m in runs[0].measurements if math.isclose(runs[0].progress(m), 0.2))
    assert s.window == (10, 40)
    assert s.value == pytest.approx(BandAlphaFitter((10, 40)).fit(m.spectra["act:blocks.11"]).alpha, rel=1e-12)


def test_predictor_and_controller_use_recorded_windows(w128):
    pred = TailPredictor().fit(open_runs([w128]))
    assert pred.windows_ == {"w128": (10, 40)} and all(s.window == (10, 40) for s in pred.statistics_)
    ctrl = SweepController().decide([w128])
    assert ctrl["w128"].ready and ctrl["w128"].continue_tiers
    explicit = SweepController(window=(5, 30)).decide([w128])["w128"].decisions[0]
    default = ctrl["w128"].decisions[0]
    assert explicit.value != pytest.approx(default.value)  # the window really is used
    with pytest.raises(ValueError, match="not both"):
        SweepController(TailPredictor(), window=(5, 30))


def test_runs_that_disagree_raise(mixed):
    runs = open_runs([mixed])
    with pytest.raises(WindowMismatchError, match=r"family 'w128' recorded different tail windows .*\[10, 40\].*\[20, 60\]"):
        TailPredictor().fit(runs)
    with pytest.raises(WindowMismatchError):
        SweepController().decide(runs)
    assert TailPredictor(window=(10, 40)).fit(runs).windows_ == {"w128": (10, 40)}  # an explicit window settles it


def test_families_may_differ(tmp_path):
    _sweep(tmp_path, family="a", tiers=(2, 4, 8), window=(10, 40))
    _sweep(tmp_path, family="b", tiers=(2, 4, 8), window=(20, 60))
    assert common_windows(open_runs([tmp_path])) == {"a": (10, 40), "b": (20, 60)}


def test_cli_predict_and_report_use_recorded_windows(w128, tmp_path, capsys):
    assert main(["predict", str(w128), "--target-loss", "3.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["tier"] for t in out["families"]["w128"]["tiers"]]
    rep = tmp_path / "rep"
    assert main(["report", str(w128), "--out", str(rep), "--target-loss", "3.5"]) == 0
    text = (rep / "report.md").read_text()
    assert "w128 ranks [10, 40]" in text and "early α_tail ranks (10, 40)" in text
    if importlib.util.find_spec("matplotlib") is not None:  # the figures need the plot extra
        for name in ("loss.png", "spectra.png", "alpha_tail.png", "gradient_spectra.png", "early_alpha_vs_eps.png"):
            assert (rep / name).exists(), name
        assert "skipped" not in text
    # the d12 window on 128-wide spectra fails, as it did by default before
    assert main(["predict", str(w128), "--window", "100", "200"]) == 2
    assert "window [100, 200] exceeds the spectrum" in capsys.readouterr().err


# ``python -m spectral_lens.cli COMMAND ...`` per command, each in a fork of one fresh interpreter that
# imported spectral_lens (and so torch; not spectral_lens.cli itself, which runpy runs as __main__): one
# interpreter start instead of one per command; what the user sees on stderr (warnings included) and the
# exit status, as from the command line.
_FORKED_CLI = r"""
import json, os, runpy, sys
import spectral_lens
status = []
for i, argv in enumerate(json.loads(sys.argv[1])):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(f"{name}{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["spectral_lens.cli", *argv]
        code = 0
        try:
            runpy.run_module("spectral_lens.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    status.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(status))
"""

_COMMANDS = ["predict", "report"]


@pytest.fixture(scope="module")
def disagreeing_cli(mixed, tmp_path_factory):
    """Per command: (``args`` as run after ``python -m spectral_lens.cli``, its output directory,
    a ``CompletedProcess`` with the exit status and stderr)."""
    work = tmp_path_factory.mktemp("cli")
    runs = {}
    for command in _COMMANDS:
        args = [command, str(mixed)]
        if command == "report":
            args += ["--out", str(work / "rep")]
        runs[command] = args
    proc = subprocess.run([sys.executable, "-c", _FORKED_CLI, json.dumps(list(runs.values()))], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    return {command: (args, work, subprocess.CompletedProcess(args, code, (work / f"stdout{i}").read_text(),
                                                               (work / f"stderr{i}").read_text()))
            for i, ((command, args), code) in enumerate(zip(runs.items(), status))}


@pytest.mark.parametrize("command", _COMMANDS)
def test_cli_fails_with_one_line_when_windows_disagree(disagreeing_cli, tmp_path, command):
    args, work, proc = disagreeing_cli[command]
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"spectral-lens {command}: error: runs of family 'w128' recorded different tail windows")
    assert "--window LO HI" in lines[0] and "Traceback" not in proc.stderr
    assert not (work / "rep" / "report.md").exists()
    # an explicit window settles it (in-process: the subprocess above is what shows the one-line error)
    if command == "report":
        args = [command, str(args[1]), "--out", str(tmp_path / "rep")]
    assert main(args + ["--window", "10", "40"]) == 0
