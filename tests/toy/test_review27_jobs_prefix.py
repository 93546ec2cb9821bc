"""Review 27 (jobs): every line a job command prints about itself starts with one program prefix. The toy's own
errors said ``examples.toy: error:`` while its argparse errors and its Ctrl-C / SIGTERM lines said
``python -m examples.toy:``; the speedrun and the tuner were already consistent (pinned here too)."""
import pytest

import examples.replicate.pipeline as pipeline


def _lines(main, argv, capsys, monkeypatch, patch):
    """stderr's first line of: an argparse error, the job's own error (``--threads 0``), and a Ctrl-C."""
    lines = []
    with pytest.raises(SystemExit):
        main([*argv, "--no-such-option"])
    lines.append(capsys.readouterr().err.strip().splitlines()[-1])
    assert main([*argv, "--threads", "0"]) == 2
    lines.append(capsys.readouterr().err.strip())

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(*patch, ctrl_c)
    assert main(argv) == 130
    lines.append(capsys.readouterr().err.strip())
    return lines


def test_the_toy_says_one_prefix_on_every_line(tmp_path, capsys, monkeypatch):
    from examples.toy.__main__ import main

    lines = _lines(main, ["--preset", "smoke", "--out", str(tmp_path / "toy")], capsys, monkeypatch,
                   (pipeline, "replicate"))
    assert [line.split(": ")[:2] for line in lines] == [["python -m examples.toy", "error"]] * 2 + \
        [["python -m examples.toy", "interrupted"]], lines


def test_the_speedrun_says_one_prefix_on_every_line(tmp_path, capsys, monkeypatch):
    import examples.replicate as rep
    from examples.speedrun.__main__ import main

    lines = _lines(main, ["--preset", "tiny", "--out", str(tmp_path / "sp"), "--no-progress"], capsys, monkeypatch,
                   (rep, "replicate"))
    assert [line.split(": ")[:2] for line in lines] == [["python -m examples.speedrun", "error"]] * 2 + \
        [["python -m examples.speedrun", "interrupted"]], lines


def test_the_tuner_says_one_prefix_on_every_line(tmp_path, capsys):
    from examples.tune.__main__ import main

    with pytest.raises(SystemExit):
        main(["synthetic", "--no-such-option"])
    first = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["synthetic", "--tiers", "8", "--rungs", "5", "--workdir", str(tmp_path / "w"),
                 "--min-resource", "5"]) == 2
    second = capsys.readouterr().err.strip()
    assert first.startswith("python -m examples.tune") and second.startswith("python -m examples.tune: error: ")


def test_the_toys_help_is_plain_text(capsys):
    # its description was the module docstring's first line, reST: ``python -m examples.toy --preset cpu ...``: ...
    from examples.toy.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "``" not in out
    assert "Rerun the same command to resume" in " ".join(out.split()) and "report.md" in out


def test_the_toy_without_optuna_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    # a first-time user's `pip install -e .` (no tune extra): the tuning stage's ImportError was a traceback (the
    # speedrun and the tuner already said it in one line)
    from examples.toy.__main__ import main

    def no_optuna(*args, **kwargs):
        raise ImportError("examples.tune needs Optuna: pip install 'spectral-lens[tune]'")
    monkeypatch.setattr(pipeline, "replicate", no_optuna)
    assert main(["--preset", "smoke", "--out", str(tmp_path / "toy")]) == 2
    assert capsys.readouterr().err == ("python -m examples.toy: error: examples.tune needs Optuna: "
                                       "pip install 'spectral-lens[tune]'\n")
