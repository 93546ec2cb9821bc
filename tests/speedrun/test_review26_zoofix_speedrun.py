"""Review 26 (zoofix): a speedrun's ``--data DIR`` was recorded in ``OUT/preset.json`` as typed, so rerunning the same
command to resume with ``./shards`` after ``shards`` (or the absolute path, or a symlink) was refused as "other
settings (differs in: data)". The directory is recorded resolved now, and an output directory that recorded another
spelling of the same directory (older versions) resumes; other shards are still refused."""
import json
import os

import numpy as np
import pytest

import examples.replicate as rep
from examples.nanogpt.data import write_shard
from examples.speedrun.__main__ import main


@pytest.fixture
def stopped(monkeypatch):
    """The pipeline stops at once (as Ctrl-C would): what is checked is main()'s settings record and check."""
    def stop(workload, out, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "replicate", stop)


def _shards(d, seed=0):
    d.mkdir()
    rng = np.random.default_rng(seed)
    write_shard(d / "fineweb_train_000000.bin", rng.integers(0, 50257, 5_000))
    write_shard(d / "fineweb_val_000000.bin", rng.integers(0, 50257, 2_000))


def _run(out, data) -> int:
    return main(["--preset", "paper-d12", "--device", "cpu", "--out", str(out), "--data", str(data), "--no-progress"])


@pytest.mark.parametrize("spelling", ["./shards", "absolute", "link"])
def test_a_rerun_naming_the_same_shards_otherwise_resumes(tmp_path, monkeypatch, capsys, stopped, spelling):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "shards")
    os.symlink(tmp_path / "shards", tmp_path / "link")
    assert _run("out", "shards") == 130
    assert json.loads((tmp_path / "out" / "preset.json").read_text())["data"] == str((tmp_path / "shards").resolve())
    other = str(tmp_path / "shards") if spelling == "absolute" else spelling
    capsys.readouterr()
    assert _run("out", other) == 130, capsys.readouterr().err


def test_an_output_directory_recording_the_typed_path_resumes(tmp_path, monkeypatch, capsys, stopped):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "shards")
    assert _run("out", "shards") == 130
    path = tmp_path / "out" / "preset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data": "shards"}))  # as written before review 26
    assert _run("out", tmp_path / "shards") == 130, capsys.readouterr().err
    assert json.loads(path.read_text())["data"] == "shards"  # left as it was


def test_other_shards_are_still_refused(tmp_path, monkeypatch, capsys, stopped):
    monkeypatch.chdir(tmp_path)
    _shards(tmp_path / "shards")
    _shards(tmp_path / "other", seed=1)
    assert _run("out", "shards") == 130
    capsys.readouterr()
    assert _run("out", "other") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (differs in: data)" in err[0]
