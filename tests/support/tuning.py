"""Shared by the tuner's interrupt tests: a ``tune()`` call without its progress bar or the synthetic grid's
at-edge warning, and what two tunings are compared by."""

from __future__ import annotations

import warnings


def quiet_tune(trainable, *, cfg: dict, **kw):
    """``tune(trainable, **cfg, **kw)`` without a progress bar, the synthetic grid's at-edge warning ignored."""
    from examples.tune import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # the at-edge warning of the synthetic grid
        return tune(trainable, progress=False, **(cfg | kw))


def outcome(res):
    """What an interrupted-then-resumed tuning must share with an uninterrupted one."""
    return res.choices, res.losses, res.survivors, [(s.candidate.key, s.state, s.rung_losses) for s in res.trials]


_SWALLOWING_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from examples.tune import tune
from examples.tune.synthetic import SyntheticTrainable


class Swallows(SyntheticTrainable):
    # in the spawned worker: a trainable that swallows every interrupt and trains on
    def __call__(self, candidate, budget, **k):
        if os.getpid() == int(os.environ["SWALLOWING_MAIN"]):
            return super().__call__(candidate, budget, **k)
        open({flag!r}, "w").close()
        while True:
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    os.environ["SWALLOWING_MAIN"] = str(os.getpid())
    try:
        tune(Swallows(sleep=0.2), families={{"f": {{"lr": 1e-3}}}}, tiers=[1, 8], reference_tier=8, rungs=[10, 20, 40],
             workdir={workdir!r}, storage="journal:" + {journal!r}, n_workers=2, progress=False,
             grace_period={grace_period!r})
    except KeyboardInterrupt:
        sys.exit(130)
"""


def twice_interrupted_swallowing_tune(tmp_path, grace_period: float):
    """A real ``tune(n_workers=2)`` in a subprocess whose spawned worker's trainable swallows interrupts, sent
    SIGINT once that worker trains and again 1 s later (the first must not end it: the worker holds it up).
    Returns ``(returncode, stderr, seconds after the second SIGINT, journal path)``."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    flag, journal, script = tmp_path / "worker-training", tmp_path / "j.log", tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SWALLOWING_SCRIPT.format(
        root=str(root), flag=str(flag), workdir=str(tmp_path / "w"), journal=str(journal),
        grace_period=grace_period)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)   # the main process only: its worker gets tune()'s SIGTERM
        time.sleep(1.0)
        assert proc.poll() is None, "tune() stopped at once: its worker did not hold it up"
        os.kill(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, took, journal


def journal_trials(journal) -> list:
    """Every trial of every study in a tuner's journal file (asynchronous mode: one study per family/tier)."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
