"""The replications (toy, speedrun) run in one process: started under torchrun, every rank refuses at once with one
line, before anything is written (rank 1 used to stop on the directory's lock while rank 0 waited for it in
``init_process_group`` until the process-group timeout)."""
import pytest

from examples.replicate.pipeline import replicate
from examples.toy.__main__ import main as toy_main


@pytest.mark.parametrize("world", ["2", "8"])
def test_toy_under_torchrun_refuses_before_writing(tmp_path, monkeypatch, capsys, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    out = tmp_path / "toy"
    assert toy_main(["--preset", "smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"WORLD_SIZE={world}" in err and "torchrun" in err, err
    assert not any(out.rglob("*")) if out.exists() else True


def test_a_world_of_one_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")

    class Stop(Exception):
        pass

    class Workload:  # refused only after the check: reaching the pipeline proper is enough
        name = "w"

        def __getattr__(self, item):
            raise Stop(item)

    with pytest.raises(Stop):
        replicate(Workload(), tmp_path / "out", tuner=None)


def test_speedrun_under_torchrun_refuses_before_writing(tmp_path, monkeypatch, capsys):
    from examples.speedrun.__main__ import main as speedrun_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "speedrun"
    assert speedrun_main(["--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WORLD_SIZE=2" in err and "examples.speedrun" in err, err
    assert not out.exists()
