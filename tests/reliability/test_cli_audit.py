"""User errors of every command line (``spectral-lens`` and the ``examples`` entry points) are one line
on stderr with the documented exit status: never a traceback, never a run written somewhere unasked."""

from __future__ import annotations

import pytest


def _status(main, argv) -> int:
    """``main(argv)``'s exit status, also when argparse exits (bad arguments)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
    except KeyboardInterrupt:  # would stop the whole pytest session
        pytest.fail("KeyboardInterrupt escaped main (a traceback for the user)")


def _one_line(capsys, main, argv, code: int = 2) -> str:
    status = _status(main, argv)
    out = capsys.readouterr()
    assert status == code, (status, out)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    return lines[0]


def test_spectral_lens_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a report (a long figure or a slow disk) printed a 20-60 line KeyboardInterrupt
    traceback; now one line and status 130, as the examples' commands do."""
    import spectral_lens.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_predict", interrupted)
    line = _one_line(capsys, cli.main, ["predict", str(tmp_path)], code=130)
    assert line == "spectral-lens predict: interrupted"


def test_nanogpt_train_refuses_an_empty_run_dir(tmp_path, capsys, monkeypatch):
    """--run-dir "" (an unset shell variable) trained into the current directory, replacing the user's
    config.json and metrics.jsonl there; refused before anything is loaded."""
    from examples.nanogpt.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("the user's own file\n")
    line = _one_line(capsys, main, ["train", "--steps", "1", "--run-dir", ""])
    assert "argument --run-dir" in line and "expected a directory, got ''" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == "the user's own file\n"


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_nanogpt_train_refuses_a_target_loss_that_cannot_work(tmp_path, capsys, value):
    """--target-val-loss nan was accepted and never stopped the run; inf stopped it at step 0 before any
    training and printed 'done: 0 steps' with status 0."""
    from examples.nanogpt.__main__ import main

    line = _one_line(capsys, main, ["train", "--steps", "1", "--device", "cpu", "--run-dir", str(tmp_path / "r"),
                                    "--target-val-loss", value])
    assert "target_val_loss" in line and "expected a finite loss > 0" in line
    assert not (tmp_path / "r").exists()


def test_tune_refuses_an_empty_workdir(tmp_path, capsys, monkeypatch):
    """--workdir "" was the current directory: the tuner filled it with trials/ and choices.json."""
    from examples.tune.__main__ import main

    monkeypatch.chdir(tmp_path)
    line = _one_line(capsys, main, ["synthetic", "--tiers", "1", "--rungs", "10", "--quiet", "--workdir", ""])
    assert "argument --workdir" in line and "expected a directory, got ''" in line
    assert not list(tmp_path.iterdir())


def test_tune_folds_a_multi_line_library_error(tmp_path, capsys):
    """A SQLite storage under a file: SQLAlchemy's message carries a second line ('Background on this
    error at: ...'), which the tune command printed as is (two lines)."""
    pytest.importorskip("optuna", reason="the tuner needs Optuna (tune extra)")
    from examples.tune.__main__ import main

    (tmp_path / "file").write_text("x")
    line = _one_line(capsys, main, ["synthetic", "--tiers", "1", "--rungs", "10", "--quiet",
                                    "--workdir", str(tmp_path / "w"), "--storage",
                                    f"sqlite:///{tmp_path / 'file' / 'x.db'}"])
    assert line.startswith("python -m examples.tune: error: storage") and "cannot be opened" in line


def test_speedrun_refuses_a_non_empty_out_that_holds_no_speedrun(tmp_path, capsys):
    """--out naming a directory with other files (another run's, the user's) was accepted: preset.json,
    tune/, runs/ and report/ were written among them. examples.toy refuses such a directory; so does
    the speedrun now, before writing anything."""
    from examples.speedrun.__main__ import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("another run\n")
    line = _one_line(capsys, main, ["--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert str(out) in line and "not empty and holds no speedrun" in line
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("module", ["toy", "speedrun"])
def test_replications_refuse_an_empty_out(tmp_path, capsys, monkeypatch, module):
    """--out "" (an unset shell variable) silently meant the default runs/<module>-<preset>: a rerun
    there with the same preset took that directory's earlier results as its own."""
    import importlib

    main = importlib.import_module(f"examples.{module}.__main__").main
    monkeypatch.chdir(tmp_path)
    line = _one_line(capsys, main, ["--preset", "smoke" if module == "toy" else "tiny", "--out", ""])
    assert "argument --out" in line and "expected a directory, got ''" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("shards", ["none", "corrupt"])
def test_tune_zoo_refuses_unusable_data_before_any_trial(tmp_path, capsys, shards):
    """--data naming a directory without .bin shards, or with a corrupt one, passed the argument check:
    every trial failed on it alone and the command printed 'choices written' with status 0 and an
    empty choices file. Now refused in one line naming the directory or shard, before any trial."""
    pytest.importorskip("optuna", reason="the tuner needs Optuna (tune extra)")
    from examples.tune.__main__ import main

    data = tmp_path / "shards"
    data.mkdir()
    if shards == "corrupt":
        (data / "x_train_000.bin").write_bytes(b"\x01" * 2000)
        (data / "x_val_000.bin").write_bytes(b"\x01" * 2000)
    line = _one_line(capsys, main, ["zoo", "--tiers", "1", "--rungs", "512", "--variants", "Baseline", "--quiet",
                                    "--eval-every-tokens", "512", "--device", "cpu", "--data", str(data),
                                    "--workdir", str(tmp_path / "w")])
    assert line.startswith("python -m examples.tune: error: " + str(data)), line
    assert ("need *train*.bin" if shards == "none" else "bad magic number") in line
    assert not (tmp_path / "w" / "choices.json").exists()


@pytest.fixture(scope="module")
def gpt2_shards(tmp_path_factory):
    """A directory of valid .bin shards with GPT-2 token ids (beyond the byte-level profiles' vocabulary)."""
    import numpy as np

    from examples.nanogpt.data import write_shard

    d = tmp_path_factory.mktemp("gpt2")
    ids = np.random.default_rng(0).integers(0, 50257, 20_000)
    write_shard(d / "fw_train_000.bin", ids)
    write_shard(d / "fw_val_000.bin", ids[:5_000])
    return d


@pytest.mark.parametrize("module", ["tune", "speedrun"])
def test_data_beyond_the_profiles_vocabulary_is_refused_before_any_trial(tmp_path, capsys, gpt2_shards, module):
    """GPT-2 shards with a byte-level profile: every tuner trial failed on the vocabulary alone. The
    tuner then exited 0 with no choice; the speedrun exited 2 blaming tune/choices.json ('delete ... to
    tune again', which fails the same way) and left a failed study behind. Now one line naming the
    data and the profile, before anything is written."""
    if module == "tune":
        pytest.importorskip("optuna", reason="the tuner needs Optuna (tune extra)")
    import importlib

    main = importlib.import_module(f"examples.{module}.__main__").main
    out = tmp_path / "w"
    argv = (["zoo", "--tiers", "1", "--rungs", "512", "--variants", "Baseline", "--quiet", "--eval-every-tokens",
             "512", "--device", "cpu", "--profile", "tiny", "--data", str(gpt2_shards), "--workdir", str(out)]
            if module == "tune" else
            ["--preset", "tiny", "--device", "cpu", "--data", str(gpt2_shards), "--out", str(out), "--no-progress"])
    line = _one_line(capsys, main, argv)
    assert "50257 token ids but profile 'tiny' has vocab_size=320" in line, line
    assert not out.exists()


def test_nanogpt_listing_into_a_closed_pipe_stops_quietly():
    """`python -m examples.nanogpt variants | head -1` printed a 9-line BrokenPipeError traceback with
    exit status 1 once the reader left; now nothing on stderr and status 141, as spectral-lens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "examples.nanogpt", "variants"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert err == "", err
