"""Review 26 (revzoofix): ``python -m examples.speedrun`` takes the job's lock before it reads or writes
``OUT/preset.json``, as ``examples.toy`` does (merge 667e5df). It checked ``preset.json`` first and the pipeline took
the lock after: two jobs started at once into one new ``--out`` with different presets both found no
``preset.json``, both wrote theirs, and both ran, one under the other's settings."""
import dataclasses
import json

from examples.replicate import pipeline
from examples.replicate.settings import LOCK_FILE
from examples.speedrun import presets
from examples.speedrun.__main__ import main
from spectral_lens import atomic


def test_two_jobs_started_at_once_with_different_presets_do_not_both_run(tmp_path, monkeypatch, capsys):
    # job B (another preset) is started at the worst moment: from inside job A's write of preset.json
    other = dataclasses.replace(presets.PRESETS["tiny"], name="tiny-other")
    monkeypatch.setitem(presets.PRESETS, other.name, other)
    out = tmp_path / "speedrun"
    ran, statuses = [], []

    def fake_replicate(workload, out_dir, tuner, stream):
        ran.append((workload.name, json.loads((out_dir / "preset.json").read_text())["name"]))
        raise KeyboardInterrupt  # stops here: what is checked is who ran under which preset.json
    monkeypatch.setattr(pipeline, "_replicate", fake_replicate)
    real_write = atomic.write_text_atomic

    def write(path, text, *a, **k):
        if path.name == "preset.json" and not statuses:
            statuses.append(None)
            statuses.append(main(["--preset", other.name, "--out", str(out), "--no-progress"]))  # job B
        return real_write(path, text, *a, **k)
    monkeypatch.setattr(atomic, "write_text_atomic", write)
    assert main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 130  # job A
    assert statuses[1] == 2, ran
    assert "another replication is running into this directory" in capsys.readouterr().err
    assert ran == [("speedrun-tiny", "tiny")]
    assert json.loads((out / "preset.json").read_text())["name"] == "tiny"


def test_a_refused_directory_gets_no_lock_file_and_a_lock_file_alone_is_a_fresh_directory(tmp_path, monkeypatch,
                                                                                            capsys):
    monkeypatch.setattr(pipeline, "_replicate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("another tool's output\n")
    assert main(["--preset", "tiny", "--out", str(taken), "--no-progress"]) == 2
    assert "holds no speedrun" in capsys.readouterr().err
    assert not (taken / LOCK_FILE).exists() and not (taken / "preset.json").exists()
    # a job killed after taking the lock but before writing preset.json leaves the lock file only
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_FILE).touch()
    assert main(["--preset", "tiny", "--out", str(fresh), "--no-progress"]) == 130
    assert json.loads((fresh / "preset.json").read_text())["name"] == "tiny"


def test_missing_shards_for_a_new_output_directory_write_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["--preset", "tiny", "--out", str(out), "--data", str(tmp_path / "no-such-shards")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()
