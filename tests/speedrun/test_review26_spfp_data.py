"""Review 26 (spfp): a rerun into the same ``--out`` resumes (finished runs kept), but ``OUT/preset.json`` recorded no
fingerprint of the data, so shards changed in place between two invocations mixed runs trained on the old tokens with
runs trained on the new ones, silently. ``preset.json`` records the trainer's data fingerprint now and a rerun on
changed data is refused with one line (exit 2) naming the changed shards; an older ``preset.json`` (no fingerprint)
is accepted and the fingerprint recorded then."""
import json

import numpy as np
import pytest

import examples.replicate as rep
from examples.nanogpt.data import bin_data, write_shard
from examples.speedrun.__main__ import main


@pytest.fixture
def stopped(monkeypatch):
    """The pipeline stops at once (as Ctrl-C would): what is checked is main()'s settings record and check."""
    def stop(workload, out, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "replicate", stop)


def _write(d, split, seed, n):
    d.mkdir(exist_ok=True)
    write_shard(d / f"fineweb_{split}_000000.bin", np.random.default_rng(seed).integers(0, 50257, n))


def _shards(d):
    _write(d, "train", 0, 5_000)
    _write(d, "val", 1, 2_000)


def _run(out, data) -> int:
    return main(["--preset", "paper-d12", "--device", "cpu", "--out", str(out), "--data", str(data), "--no-progress"])


def test_preset_json_records_the_trainers_fingerprint(tmp_path, capsys, stopped):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    have = json.loads((tmp_path / "out" / "preset.json").read_text())
    assert have["data_fingerprint"] == bin_data(tmp_path / "shards").fingerprint
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 130, capsys.readouterr().err  # the same data resumes


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_changed_in_place_are_refused(tmp_path, capsys, stopped, split):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    before = (tmp_path / "out" / "preset.json").read_text()
    _write(tmp_path / "shards", split, 7, 5_000 if split == "train" else 2_000)  # same name and length, new tokens
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 2
    err = capsys.readouterr().err.strip().splitlines()
    other = "val" if split == "train" else "train"
    assert len(err) == 1 and f"the {split} data of" in err[0] and f"{other} shards:" not in err[0], err
    assert "restore the data or use a new --out" in err[0]
    assert (tmp_path / "out" / "preset.json").read_text() == before


def test_a_shard_added_is_refused(tmp_path, capsys, stopped):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    write_shard(tmp_path / "shards" / "fineweb_train_000001.bin", np.arange(3_000) % 50257)
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 2
    err = capsys.readouterr().err.strip()
    assert "the train data of" in err and "recorded 1 shards" in err and "now 2 shards" in err


def test_a_preset_json_without_fingerprint_is_accepted_and_records_it(tmp_path, capsys, stopped):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    path = tmp_path / "out" / "preset.json"
    old = json.loads(path.read_text())
    del old["data_fingerprint"]  # as written before review 26
    path.write_text(json.dumps(old, indent=1) + "\n")
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 130, capsys.readouterr().err
    assert json.loads(path.read_text()) == {**old, "data_fingerprint": bin_data(tmp_path / "shards").fingerprint}
    _write(tmp_path / "shards", "train", 7, 5_000)  # changed after the fingerprint was recorded: refused
    assert _run(tmp_path / "out", tmp_path / "shards") == 2


def test_other_settings_are_refused_before_the_data_is_compared(tmp_path, capsys, stopped):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    path = tmp_path / "out" / "preset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "budget": 1}))
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 2
    err = capsys.readouterr().err.strip()
    assert "differs in: budget)" in err  # the data fingerprint is not reported as a difference


def test_a_fingerprint_that_is_no_string_is_refused(tmp_path, capsys, stopped):
    _shards(tmp_path / "shards")
    assert _run(tmp_path / "out", tmp_path / "shards") == 130
    path = tmp_path / "out" / "preset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data_fingerprint": 3}))
    capsys.readouterr()
    assert _run(tmp_path / "out", tmp_path / "shards") == 2
    assert "records data_fingerprint 3, expected a string" in capsys.readouterr().err
