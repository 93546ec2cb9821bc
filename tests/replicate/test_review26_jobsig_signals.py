"""Review 26 (jobsig), slow: ``kill`` (SIGTERM) of a real ``python -m examples.toy`` / ``python -m examples.speedrun``
process. Its default action ended the job at once, silently: the tuning stage's trial stayed RUNNING in the
journal (the rerun waited the 60 s grace for it) and a measured run's record said nothing. Now the job stops as on
Ctrl-C: one line with the program prefix, status 143, the trial released, the measured run's record marked failed
(``examples.cli.Terminated``), and the rerun finishes the job."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from support.signals import signal_when  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# a job whose patched step writes FLAG and then waits (to be killed there); PATCH names what is patched
_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import importlib
    module, cls, meth, flag = sys.argv[1:5]
    target = getattr(importlib.import_module(module), cls)
    def waiting(self, *a, **kw):
        Path(flag).write_text("in")
        time.sleep(120)
    setattr(target, meth, waiting)
    prog = sys.argv[5]
    main = importlib.import_module(prog + ".__main__").main
    sys.exit(main(sys.argv[6:]))
""")


def _kill_when_flagged(tmp_path, patch, prog, args) -> tuple[int, str]:
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, *patch, str(flag), prog, *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return signal_when(proc, flag.exists, signal.SIGTERM, within=240)


def _trials(journal: Path, study: str) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _running(journal: Path, study: str) -> list[int]:
    return [t.number for t in _trials(journal, study) if t.state == optuna.trial.TrialState.RUNNING]


def test_kill_in_the_toy_jobs_tuning_releases_the_trial_and_in_its_measured_run_marks_the_record(tmp_path):
    out = tmp_path / "toy"
    args = ["--preset", "smoke", "--out", str(out)]
    rc, err = _kill_when_flagged(tmp_path, ("examples.toy.workload", "ToyTrainable", "__call__"), "examples.toy", args)
    assert rc == 143, err
    assert err.splitlines()[-1] == ("python -m examples.toy: terminated: rerun the same command to resume "
                                    "(finished runs are kept)"), err
    assert not _running(out / "tune" / "tune.journal", "toy-smoke-tune")  # released: the rerun need not wait
    (tmp_path / "flag").unlink()
    # the tuning again (resumed), then killed inside the first measured run's RunWriter
    rc, err = _kill_when_flagged(tmp_path, ("examples.toy.measure", "ToyLens", "__init__"), "examples.toy", args)
    assert rc == 143, err
    (partial,) = (out / "runs" / ".partial").iterdir()
    extras = json.loads((partial / "run.json").read_text())["extras"]
    assert extras["status"] == "failed" and extras["failure"] == "examples.cli.Terminated: SIGTERM"
    done = subprocess.run([sys.executable, "-m", "examples.toy", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (out / "runs" / ".partial").exists() and (out / "runs" / partial.name / "run.json").exists()
    assert json.loads((out / "runs" / partial.name / "run.json").read_text())["extras"]["status"] == "complete"


def test_kill_in_the_speedrun_jobs_tuning_releases_the_trial(tmp_path):
    out = tmp_path / "sr"
    rc, err = _kill_when_flagged(tmp_path, ("examples.tune.zoo", "ZooTrainable", "__call__"), "examples.speedrun",
                                 ["--preset", "tiny", "--out", str(out), "--no-progress"])
    assert rc == 143, err
    assert err.splitlines()[-1] == ("python -m examples.speedrun: terminated: rerun the same command to resume "
                                    "(finished runs are kept)"), err
    assert not _running(out / "tune" / "tune.journal", "speedrun-tiny-tune")
