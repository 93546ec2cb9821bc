"""Every user error of the CLI is one line on stderr naming the path, exit status 2, no traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spectral_lens import Spectrum
from spectral_lens.cli import main
from spectral_lens.records import RunInfo, RunWriter

DEEP = "[" * 100_000 + "]" * 100_000


def _make(tmp_path, case: str):
    """Build the broken input of ``case``; returns (argv tail, path the message must name)."""
    p = tmp_path / case
    if case == "nested_run_json":
        p.mkdir()
        (p / "run.json").write_text(DEEP)
        return [str(p)], p / "run.json"
    if case == "run_json_is_a_directory":
        (p / "run.json").mkdir(parents=True)
        return [str(p)], p / "run.json"
    if case == "run_json_wrong_field_types":
        p.mkdir()
        (p / "run.json").write_text(json.dumps({"format": "spectral-lens/run", "version": 1, "run_id": {"a": 1}}))
        return [str(p)], p / "run.json"
    if case == "run_json_bad_windows":
        with RunWriter(p, RunInfo("r"), fsync=False):
            pass
        header = json.loads((p / "run.json").read_text())
        header["summary_windows"] = {"tail": "wide"}
        (p / "run.json").write_text(json.dumps(header))
        return [str(p)], p / "run.json"
    if case == "run_json_huge_batch_tier":  # an int float() refuses: was an OverflowError traceback
        with RunWriter(p, RunInfo("r"), fsync=False):
            pass
        header = json.loads((p / "run.json").read_text())
        header["batch_tier"] = 10**400
        (p / "run.json").write_text(json.dumps(header))
        return [str(p)], p / "run.json"
    if case == "spectra_dir_entry_is_a_directory":
        with RunWriter(p, RunInfo("r"), fsync=False) as w:
            w.log_measurement(1, 10, {"act": Spectrum(torch.tensor([2.0, 1.0]), n_rows=5, dim=2)})
        f = next((p / "spectra").iterdir())
        f.unlink()
        f.mkdir()
        return [str(p)], f
    raise AssertionError(case)


RUN_CASES = ["nested_run_json", "run_json_is_a_directory", "run_json_wrong_field_types", "run_json_bad_windows",
             "run_json_huge_batch_tier", "spectra_dir_entry_is_a_directory"]


def _status(argv) -> int:
    """main's exit status, also when argparse exits (bad arguments)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line_error(capsys, argv, path) -> str:
    code = _status(argv)
    out = capsys.readouterr()
    assert code == 2, (code, out)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in out.err, out.err
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", RUN_CASES)
def test_inspect_broken_run_directories(tmp_path, capsys, case):
    args, path = _make(tmp_path, case)
    if case == "spectra_dir_entry_is_a_directory":
        args = [str(path)]  # a directory where a spectrum file should be
    _one_line_error(capsys, ["inspect", *args], path)


@pytest.mark.parametrize("case", [c for c in RUN_CASES if c != "spectra_dir_entry_is_a_directory"])
def test_predict_broken_run_directories(tmp_path, capsys, case):
    args, path = _make(tmp_path, case)
    _one_line_error(capsys, ["predict", *args], path)


def test_report_on_a_broken_run(tmp_path, capsys):
    args, path = _make(tmp_path, "run_json_is_a_directory")
    _one_line_error(capsys, ["report", *args, "--out", str(tmp_path / "out"), "--no-plots"], path)


@pytest.mark.parametrize("value", [[1], "fast", 10**400], ids=["list", "string", "huge_int"])
def test_inspect_a_run_whose_recorded_throughput_is_not_a_number(tmp_path, capsys, value):
    """extras['throughput'] (update_info) of the wrong type was a TypeError / OverflowError traceback, or
    'could not convert string to float' without a file name."""
    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False):
        pass
    header = json.loads((tmp_path / "r" / "run.json").read_text())
    header["extras"]["throughput"] = value  # update_info refuses these now; another tool may write them
    (tmp_path / "r" / "run.json").write_text(json.dumps(header))
    line = _one_line_error(capsys, ["inspect", str(tmp_path / "r")], tmp_path / "r" / "run.json")
    assert "extras['throughput'] must be a number" in line


def test_inspect_a_path_that_is_neither_file_nor_directory(tmp_path, capsys):
    """A FIFO (or /dev/null) given to inspect was reported as 'no such file or directory'."""
    import os

    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    line = _one_line_error(capsys, ["inspect", str(fifo)], fifo)
    assert "not a regular file or a directory" in line and "no such file" not in line


def test_an_unreadable_run_json_is_not_called_corrupted(tmp_path, capsys, monkeypatch):
    """A run.json the user may not read (chmod 000; simulated, as root ignores permissions) was
    reported as 'corrupted run metadata', which invites deleting a good file."""
    import errno
    from pathlib import Path

    with RunWriter(tmp_path / "r", RunInfo("r"), fsync=False):
        pass
    run_json = tmp_path / "r" / "run.json"
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == run_json:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    line = _one_line_error(capsys, ["inspect", str(tmp_path / "r")], run_json)
    assert "cannot read run metadata (Permission denied)" in line and "corrupted" not in line, line


@pytest.mark.parametrize("name", ["a.npy", "nested.npz", "garbage.npz", "missing.npz"])
def test_bad_spectrum_files(tmp_path, capsys, name):
    path = tmp_path / name
    if name == "a.npy":
        np.save(path, np.arange(3.0))
    elif name == "nested.npz":
        np.savez(path, values=np.arange(3.0)[::-1], header=np.array(DEEP))
    elif name == "garbage.npz":
        path.write_bytes(b"not a zip")
    _one_line_error(capsys, ["inspect", str(path)], path)


def test_report_output_under_a_file(tmp_path, capsys):
    with RunWriter(tmp_path / "run", RunInfo("r", total_tokens=100), fsync=False):
        pass
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["report", str(tmp_path / "run"), "--out", str(blocker / "out"), "--no-plots"], blocker)


# ---- argument values, record lines, report options -------------------------------------------------


def _sweep(root, tiers=(1, 2, 4)):
    """Three small runs of one family (10 measurements each, val loss falling faster at larger tiers)."""
    for tier in tiers:
        rid = f"toy-b{tier}"
        with RunWriter(root / rid, RunInfo(rid, family="toy", batch_tier=tier, total_tokens=10000, n_layer=2,
                                           primary_spectrum="act"), fsync=False, tail_window=(10, 40)) as w:
            for k in range(10):
                vals = np.arange(1, 65, dtype=np.float64) ** -(1.0 + 0.1 * tier + 0.01 * k)
                vl = 3.0 - 0.02 * k * tier
                w.log(k * 10, k * 1000, val_loss=vl)
                w.log_measurement(k * 10, k * 1000, {"act": Spectrum(torch.from_numpy(vals), n_rows=1000, dim=64)},
                                  val_loss=vl)
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("sweep"))


@pytest.mark.parametrize("command, args, option, value", [
    ("predict", ["--window", "a", "b"], "--window", "'a'"),
    ("predict", ["--fraction", "abc"], "--fraction", "'abc'"),
    ("predict", ["--fraction", "1.5"], "--fraction", "'1.5'"),
    ("report", ["--fraction", "0"], "--fraction", "'0'"),
    ("predict", ["--window", "40", "10"], "--window", "40 10"),
    ("report", ["--window", "0", "5"], "--window", "0 5"),
    ("predict", ["--target-loss", "x"], "--target-loss", "'x'"),
    ("predict", ["--target-loss", "inf"], "--target-loss", "'inf'"),
    ("predict", ["--target-loss", "nan"], "--target-loss", "'nan'"),
    ("predict", ["--target-loss", "-1"], "--target-loss", "'-1'"),
    ("predict", ["--target-loss", "0"], "--target-loss", "'0'"),
    ("report", ["--target-loss", "inf"], "--target-loss", "'inf'"),
    ("report", ["--transition", "ab"], "--transition", "'ab'"),
    ("report", ["--format", "pdf"], "--format", "'pdf'"),
])
def test_bad_argument_values_are_one_line(sweep, tmp_path, capsys, command, args, option, value):
    """No usage block (it was 5 to 7 lines); nan and negative targets ran to exit 0, inf failed with a
    message naming neither option nor value."""
    out = ["--out", str(tmp_path / "out")] if command == "report" else []
    line = _one_line_error(capsys, [command, str(sweep), *out, *args], option)
    assert line.startswith(f"spectral-lens {command}: error: argument {option}") and value in line, line
    assert not (tmp_path / "out").exists()


def test_parser_errors_without_a_command_are_one_line(capsys):
    _one_line_error(capsys, [], "spectral-lens: error: the following arguments are required")
    _one_line_error(capsys, ["bogus"], "'bogus'")


@pytest.fixture()
def bad_sweep(sweep, tmp_path):
    """The sweep with line 3 of one run's measurements.jsonl and line 5 of another's log.jsonl broken."""
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(sweep, root)
    for f, n in ((root / "toy-b2" / "measurements.jsonl", 3), (root / "toy-b4" / "log.jsonl", 5)):
        lines = f.read_bytes().split(b"\n")
        lines[n - 1] = b'{"step": 20, "tokens": oops'
        f.write_bytes(b"\n".join(lines))
    return root


@pytest.mark.parametrize("command", ["predict", "report", "inspect"])
def test_a_malformed_record_line_costs_that_line_only(bad_sweep, tmp_path, capsys, command):
    """The CLI skips a malformed line with one warning line naming file and line (it refused the whole
    sweep, telling the user to pass errors='skip', which the CLI has no way to pass); --strict refuses,
    naming the option that would skip it."""
    mfile = bad_sweep / "toy-b2" / "measurements.jsonl"
    argv = {"predict": ["predict", str(bad_sweep), "--target-loss", "2.9"],
            "report": ["report", str(bad_sweep), "--out", str(tmp_path / "out"), "--no-plots", "--target-loss", "2.9"],
            "inspect": ["inspect", str(bad_sweep / "toy-b2")]}[command]
    assert main(argv) == 0
    out = capsys.readouterr()
    warned = [x for x in out.err.splitlines() if "line 3" in x or "line 5" in x]
    assert out.err.count("measurements.jsonl, line 3: corrupted record line") == 1, out.err
    assert warned[0].startswith(f"spectral-lens {command}: warning: {mfile}, line 3:") and warned[0].endswith("skipped")
    if command != "inspect":
        assert len(warned) == 2 and f"{bad_sweep / 'toy-b4' / 'log.jsonl'}, line 5:" in warned[1], out.err
    if command == "inspect":
        assert "measurements: 9" in out.out
    line = _one_line_error(capsys, [*argv, "--strict"], mfile)
    assert "line 3" in line and "run without --strict to skip it" in line and "errors=" not in line


def test_report_checks_transitions_and_replicates_without_a_target(sweep, tmp_path, capsys):
    """Unknown transition ids and a missing replicates path were accepted (exit 0) unless
    --target-loss was given; now they are one-line errors before anything is written."""
    out = tmp_path / "out"
    base = ["report", str(sweep), "--out", str(out), "--no-plots"]
    line = _one_line_error(capsys, [*base, "--transition", "toy-b1:nosuch"], "'nosuch'")
    assert "no run with id" in line and "toy-b1" in line
    _one_line_error(capsys, [*base, "--replicates", str(tmp_path / "missing")], tmp_path / "missing")
    _one_line_error(capsys, [*base, "--transition", "toy-b1:toy-b2", "--replicates", str(tmp_path / "missing")],
                    tmp_path / "missing")
    assert not out.exists()
    assert main([*base, "--transition", "toy-b1:toy-b2"]) == 0  # valid ids, no target: skipped with a note
    assert "transitions given but no target loss" in capsys.readouterr().out


def test_a_closed_pipe_stops_quietly(sweep):
    """`spectral-lens inspect RUN | head -1` printed 'error: [Errno 32] Broken pipe' once the reader left."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "spectral_lens.cli", "inspect", str(sweep / "toy-b2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (deterministic: `head` gone early)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert "Broken pipe" not in err and "Traceback" not in err, err


def test_predict_json_is_strict_json(sweep, capsys):
    """predict --json printed Python's NaN token for an undefined rho / sigma, which strict JSON parsers
    (jq, JSON.parse) refuse; now such values are null."""
    assert main(["predict", str(sweep / "toy-b1"), str(sweep / "toy-b2"), "--json", "--target-loss", "2.9"]) == 0
    text = capsys.readouterr().out

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    data = json.loads(text, parse_constant=refuse)
    assert data["score"]["rho"] is None  # two runs: the rank correlation is undefined


def test_report_refuses_an_empty_out(sweep, tmp_path, capsys, monkeypatch):
    """--out "" (an unset shell variable) was the current directory: report.md was written there and
    the user's own loss.png, spectra.png, ... were removed as a previous report's figures."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loss.png").write_bytes(b"the user's own figure")
    line = _one_line_error(capsys, ["report", str(sweep), "--out", "", "--no-plots"], "--out")
    assert "expected an output directory, got ''" in line
    assert (tmp_path / "loss.png").read_bytes() == b"the user's own figure"
    assert not (tmp_path / "report.md").exists()


def test_report_refuses_an_unknown_spectrum_name(sweep, tmp_path, capsys):
    """A mistyped --spectrum was accepted by report (exit 0, a report of notes), where predict refused it;
    now both name the recorded spectra in one line, before anything is written."""
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["report", str(sweep), "--out", str(out), "--no-plots", "--spectrum", "act:nosuch"],
                           "'act:nosuch'")
    assert "no run records it" in line and "recorded spectra: ['act']" in line
    assert not out.exists()
    assert main(["report", str(sweep), "--out", str(out), "--no-plots", "--spectrum", "act"]) == 0
