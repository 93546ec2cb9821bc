"""Review 27 (revjobs): the speedrun workload's line per finished run called a run the lens could not measure (a
finite loss: kept, read by the verdict as cut short) ``diverged``, where the printed verdict and the report say
"stopped unmeasured"."""
import pytest

import examples.speedrun.workload as wl
from examples.speedrun.presets import PRESETS
from support.lens_faults import overflow_on_second_measure  # noqa: E402


@pytest.mark.slow  # one tiny zoo run: ~4 s on the shared 2-core machine
def test_the_run_line_says_stopped_unmeasured(tmp_path, monkeypatch, capsys):
    overflow_on_second_measure(monkeypatch)
    w = wl.ZooWorkload(PRESETS["tiny"], verbose=True)
    family = w.families[0]
    w.run(family, 4, w.reference_lrs(family), tmp_path / "run")
    out = capsys.readouterr().out
    assert "  run: stopped unmeasured (speedrun run: the lens could not measure at" in out and "diverged" not in out, out


def test_no_progress_silences_the_line_per_run_too(tmp_path, monkeypatch):
    # --no-progress ("no progress lines") silenced the pipeline's lines but not the workload's line per finished run
    import examples.replicate as rep
    from examples.speedrun.__main__ import main

    seen = []

    def stop(workload, out, *args, **kwargs):
        seen.append(workload.verbose)
        raise KeyboardInterrupt
    monkeypatch.setattr(rep, "replicate", stop)
    argv = ["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 130 and main(argv) == 130
    assert seen == [False, True]
