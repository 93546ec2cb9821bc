"""Review 23 (rev-cli): adversarial review of the audit-cli merge. Every user error is one line on stderr
with status 2, never a traceback: an unknown argument with a newline in it, an ``--out`` whose name is too
long to stat, a run.json beside a spectrum file whose ``n_layer`` is beyond the float range. A spectrum file
takes a run's window only where the run keeps its spectra (``RUN/spectra``, or ``RUN`` itself), and a
path made of spaces that exists is a path."""

from __future__ import annotations

import json

import pytest
from support.cli import run_cli


_run = run_cli


def _run_with_spectrum(root, run_id, tail_window=(10, 40), n_layer=12):
    """A run directory with one small activation spectrum; returns its spectrum file."""
    import numpy as np
    import torch

    from spectral_lens import Spectrum
    from spectral_lens.records import RunInfo, RunWriter

    values = torch.tensor(np.arange(1, 301, dtype=np.float64) ** -1.5)
    info = RunInfo(run_id, family="f", batch_tier=8, total_tokens=1000, n_layer=n_layer)
    with RunWriter(root / run_id, info, fsync=False, tail_window=tail_window) as w:
        w.log_measurement(1, 100, {"act": Spectrum(values, n_rows=1000, dim=300)})
    (npz,) = sorted((root / run_id / "spectra").glob("*.npz"))
    return npz


def _tail_line(out: str) -> str:
    return next(x for x in out.splitlines() if x.startswith("  tail window: "))


def test_unknown_argument_with_a_newline_is_one_line():
    """parse_known_args' extras were printed as given: an argument holding a newline made the error two
    lines (argparse's own errors, through _Parser.error, fold whitespace)."""
    status, _, err = _run(["predict", "runs", "--x\ny"])
    assert status == 2 and err == ["spectral-lens predict: error: unrecognized arguments: --x y"], err


def test_out_whose_name_cannot_be_checked_is_one_line(tmp_path):
    """``--out`` with a 300-character name: the new is-it-a-file check stat()ed it inside argparse, whose
    type functions may raise only ValueError / ArgumentTypeError, and the OSError (File name too long) came
    out of main as a traceback."""
    long = tmp_path / ("a" * 300)
    status, _, err = _run(["report", tmp_path / "nonexistent", "--out", long, "--no-plots"])
    assert status == 2 and len(err) == 1 and err[0].startswith("spectral-lens report: error: "), err


def test_inspect_file_beside_a_run_json_with_an_n_layer_beyond_floats(tmp_path):
    """A run.json with no tail window and ``n_layer`` 10**400: inspect FILE.npz read n_layer from the raw
    header and the scale rule's ``n_layer / 48`` raised OverflowError (a traceback); predict and inspect RUN
    refuse that run.json (RunInfo checks the field), so inspect FILE.npz names it and uses the d12 window."""
    npz = _run_with_spectrum(tmp_path, "deep")
    run_json = tmp_path / "deep" / "run.json"
    header = json.loads(run_json.read_text())
    header["summary_windows"].pop("tail")
    header["n_layer"] = 10**400
    run_json.write_text(json.dumps(header))
    status, out, err = _run(["inspect", npz])
    assert status == 0 and err == [], err
    line = _tail_line(out)
    assert line.startswith(f"  tail window: ranks [100, 200] (the d12 window; {run_json} cannot be read: "), line
    assert "'n_layer' is an integer beyond the float range" in line
    # a deep but representable n_layer: the scale rule's window, too wide for the spectrum, said so
    header["n_layer"] = 10**300
    run_json.write_text(json.dumps(header))
    status, out, err = _run(["inspect", npz])
    assert status == 0 and err == [] and "(scale rule for n_layer 1000000000000000" in _tail_line(out)
    assert "  alpha_tail [" in out and "not fitted (the window does not fit this spectrum" in out


def test_inspect_file_takes_the_window_of_its_own_run_only(tmp_path):
    """``RUN/notes/FILE.npz`` (a spectrum kept inside another run, say copied from a second run) took RUN's
    recorded window as 'the run the file belongs to'; the library writes spectra to ``RUN/spectra`` only."""
    import shutil

    npz = _run_with_spectrum(tmp_path, "r", tail_window=(10, 40))
    (tmp_path / "r" / "notes").mkdir()
    foreign = tmp_path / "r" / "notes" / "other.npz"
    shutil.copy(npz, foreign)
    status, out, _ = _run(["inspect", foreign])
    assert status == 0 and _tail_line(out).startswith(
        "  tail window: ranks [100, 200] (the d12 window; the file is not in a run directory"), out
    # its own spectra/ directory, and a file directly in the run directory, still take the run's window
    dotted = tmp_path / "r" / "spectra" / "sub" / ".." / npz.name  # its parent is named "..", lexically
    (tmp_path / "r" / "spectra" / "sub").mkdir()
    for f in (npz, dotted, shutil.copy(npz, tmp_path / "r" / "top.npz")):
        status, out, _ = _run(["inspect", f])
        assert status == 0 and _tail_line(out).startswith("  tail window: ranks [10, 40] (recorded in "), out


def test_a_path_of_spaces_that_exists_is_a_path(tmp_path, monkeypatch):
    """The empty-path refusal stripped the text: a run directory named ' ' (it exists; it is not the current
    directory, as '' would be) was refused with 'expected a path'. A name of spaces that does not exist is
    still refused, and '' always."""
    _run_with_spectrum(tmp_path, " ")
    monkeypatch.chdir(tmp_path)
    status, out, err = _run(["inspect", " "])
    assert status == 0 and "run 'r'" not in out and out.startswith(" : run ' '"), (out, err)
    for argv in (["inspect", ""], ["inspect", "  "], ["predict", ""]):
        status, _, err = _run(argv)
        assert status == 2 and len(err) == 1 and "expected a path, got" in err[0], (argv, err)


@pytest.mark.parametrize("argv", [["predict", "--tar", "3.2", "{r}"], ["inspect", "{r}", "--str"],
                                  ["predict", "{r}", "--", "--json"], ["--bogus", "predict", "{r}"]])
def test_parse_known_args_keeps_what_parse_args_did(tmp_path, argv):
    """An abbreviation still works (this one-run predict then stops on the run, not on an argument); an
    argument after ``--`` is a RUN_DIR (here one that does not exist); an unknown option before the
    subcommand is named as the program's."""
    _run_with_spectrum(tmp_path, "r")
    status, out, err = _run([a.format(r=tmp_path / "r") for a in argv])
    if argv[0] == "--bogus":
        # the program's option, not the command's (review 23 clileft)
        assert status == 2 and err == ["spectral-lens: error: unrecognized arguments: --bogus"], err
    elif "--" in argv:
        assert status == 2 and len(err) == 1 and "--json: not a spectral-lens run directory" in err[0], err
    elif argv[0] == "predict":
        assert status == 2 and len(err) == 1 and err[0].startswith("spectral-lens predict: error: run 'r': "), err
    else:
        assert status == 0 and out.startswith(f"{tmp_path / 'r'}: run 'r'"), err
