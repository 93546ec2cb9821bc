"""Review 27 (revjobs): the refusal of a rerun whose bundled corpus changed (another Python) said to "rerun with the
Python that started it" and that ``preset.json`` does not record which, while every kept run's ``run.json`` does
(``extras.machine.python``): it names that version now."""
import json

import pytest

import examples.replicate as rep
from examples.speedrun.__main__ import main


@pytest.fixture
def stopped(monkeypatch):
    def stop(workload, out, *args, **kwargs):  # the pipeline stops at once, as Ctrl-C would
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "replicate", stop)


def _run(out) -> int:
    return main(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-progress"])


def _changed(out):
    path = out / "preset.json"
    have = json.loads(path.read_text())
    path.write_text(json.dumps({**have, "data_fingerprint": have["data_fingerprint"].replace("crc32 ", "crc32 0")}))


def test_the_refusal_names_the_python_a_kept_run_recorded(tmp_path, capsys, stopped):
    out = tmp_path / "out"
    assert _run(out) == 130
    _changed(out)
    (out / "runs" / "rope-b2").mkdir(parents=True)
    (out / "runs" / "rope-b2" / "run.json").write_text(json.dumps({"extras": {"machine": {"python": "3.10.4"}}}))
    capsys.readouterr()
    assert _run(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changes with the Python version" in err, err
    assert f"rerun with Python 3.10.4 (as {out / 'runs' / 'rope-b2' / 'run.json'} records)" in err, err


def test_without_a_run_it_says_the_python_that_started_it(tmp_path, capsys, stopped):
    out = tmp_path / "out"
    assert _run(out) == 130
    _changed(out)
    (out / "runs" / "bad").mkdir(parents=True)
    (out / "runs" / "bad" / "run.json").write_text("[1]")  # unreadable as a record: no version, not an error
    capsys.readouterr()
    assert _run(out) == 2
    err = capsys.readouterr().err.strip()
    assert "rerun with the Python that started it" in err and "records)" not in err, err
