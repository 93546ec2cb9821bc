"""Review 27 (jobs): ``examples.speedrun``'s ``preset.json`` data fingerprint (review 26, spfp).

1. The migration of an older ``preset.json`` (no fingerprint) writes through a symlinked ``preset.json`` (the link is
   kept, its target gets the fingerprint), atomically: ``spectral_lens.atomic.write_atomic`` has written through
   links since 21ff8a0; pinned here for this file.
2. A refused rerun on the bundled corpus (``--data pydoc``/``stdlib``: this Python's own text, which changes with
   the Python version) said "restore the data", which nobody can: it says what changed and what to do."""
import json
import os

import pytest

import examples.replicate as rep
from examples.nanogpt.data import load_data
from examples.speedrun.__main__ import main


@pytest.fixture
def stopped(monkeypatch):
    """The pipeline stops at once (as Ctrl-C would): what is checked is main()'s settings record and check."""
    def stop(workload, out, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "replicate", stop)


def _run(out) -> int:
    return main(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])


def test_the_fingerprint_migration_writes_through_a_symlinked_preset_json(tmp_path, capsys, stopped):
    assert _run(tmp_path / "out") == 130
    path = tmp_path / "out" / "preset.json"
    old = json.loads(path.read_text())
    del old["data_fingerprint"]  # as written before review 26
    kept = tmp_path / "kept" / "preset.json"  # e.g. the settings kept under version control, linked into --out
    kept.parent.mkdir()
    kept.write_text(json.dumps(old, indent=1) + "\n")
    path.unlink()
    path.symlink_to(kept)
    capsys.readouterr()
    assert _run(tmp_path / "out") == 130, capsys.readouterr().err
    assert path.is_symlink() and os.readlink(path) == str(kept)  # still the link
    assert json.loads(kept.read_text()) == {**old, "data_fingerprint": load_data("pydoc").fingerprint}
    assert [p.name for p in kept.parent.iterdir()] == ["preset.json"]  # no temporary file left beside it


def test_a_changed_bundled_corpus_is_not_told_to_restore_the_data(tmp_path, capsys, stopped):
    assert _run(tmp_path / "out") == 130
    path = tmp_path / "out" / "preset.json"
    have = json.loads(path.read_text())
    # as made by another Python: its pydoc topics differ, so both streams' lengths and crc32 do
    recorded = have["data_fingerprint"].replace("crc32 ", "crc32 0")[:-1]
    path.write_text(json.dumps({**have, "data_fingerprint": recorded}, indent=1) + "\n")
    capsys.readouterr()
    assert _run(tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m examples.speedrun: error: ")
    assert "restore the data" not in err
    assert "changes with the Python version" in err and "rerun with the Python that started it" in err
    assert "does not record which Python" in err and load_data("pydoc").name in err
