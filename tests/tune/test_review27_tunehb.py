"""Review 27 (tunehb): the tuner's take-overs and its remaining stop gaps.

- A trial taken over because its worker went silent *while training it* (the OOM killer ending every rerun
  at the same candidate) was retried without limit; a crash of the worker's own code was failed after
  ``_MAX_CRASH_RETRIES``. Now such take-overs are counted on the candidate (in the study storage, so a
  restart of ``tune()`` keeps the count) and the ``_MAX_TAKEOVER_RETRIES + 1``-th fails it with a message
  naming it, the count and what to do. Trials a silent worker merely held, and releases, are not counted.
- After a second Ctrl-C, ``tune()`` killed its spawned workers and left their trials to the heartbeat
  (``grace_period``); the workers now stamp the trials they claim, and ``tune()`` releases the trials of
  the workers it killed at once (uncounted).
- A crash inside the pruner's decision (it reads every trial of the family/tier) was blamed on the trial
  asking: a fault of the study failed its candidates one by one, four crashes each.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import trials as trials_mod  # noqa: E402
from examples.tune import tuner as tuner_mod  # noqa: E402
from examples.tune import worker as worker_mod  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.tuning import journal_trials, outcome, quiet_tune, twice_interrupted_swallowing_tune  # noqa: E402

S = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parents[2]
GRACE = 30.0
TAKEOVER_LIMIT = getattr(worker_mod, "_MAX_TAKEOVER_RETRIES", 3)   # (the old code had no limit and no count)
TAKEOVERS = getattr(worker_mod, "_TAKEOVERS", "tune:takeovers")
CRASH_LIMIT = worker_mod._MAX_CRASH_RETRIES
CRASHES = worker_mod._CRASHES
SMALL = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10, 20], multipliers=(0.5, 1.0, 2.0))


_trials = journal_trials


def _config(storage: str, mode: str = "synchronized"):
    return tuner_mod._validate(SMALL["families"], SMALL["tiers"], SMALL["reference_tier"], SMALL["rungs"], mode, 1,
                               storage, None, 2, SMALL["multipliers"], 1e-9, None)


class Killed(BaseException):
    """A SIGKILL of the worker, injected: no handler of the worker sees it, and nothing is released."""


class DiesAt(SyntheticTrainable):
    """Kills its worker (:class:`Killed`) whenever it trains ``f/b8/x1``'s rung 0 (budget 10)."""

    def __call__(self, candidate, budget, **k):
        if candidate.key == "f/b8/x1" and budget == 10:
            raise Killed()
        return super().__call__(candidate, budget, **k)


# ---------------------------------------------------------------- the take-over limit

def test_a_candidate_lost_while_training_on_every_run_is_failed_after_the_takeover_limit(tmp_path):
    """Each run (a fresh set-up of the studies and workers on the journal: a restart of ``tune()``) dies while
    training ``f/b8/x1``, and another worker's sweep takes its trials over. It retried the candidate on every
    run, for ever. Now the take-over is counted on that candidate only (the other trials the dead worker
    merely held, waiting for the rung decision, are taken over uncounted); the ``_MAX_TAKEOVER_RETRIES +
    1``-th fails it with a one-line warning naming it, the count and what to do, and a rerun finishes the
    study without it, naming it in ``crashed``."""
    journal = tmp_path / "j.log"
    storage = f"journal:{journal}"
    cfg = _config(storage)
    for run in range(TAKEOVER_LIMIT + 1):
        (study,) = tuner_mod._open_studies(cfg, storage, "tune").values()
        dying = worker_mod._Worker({None: study}, DiesAt(), cfg, tmp_path / "w", heartbeat_interval=10.0,
                                   grace_period=GRACE, poll_interval=0.01, progress=None, study_name="tune")
        with pytest.raises(Killed):
            for _ in range(100):
                assert dying._sync_step(study) != "done"
        held = {t.user_attrs["key"] for t in study.get_trials() if t.state == S.RUNNING}
        assert "f/b8/x1" in held and len(held) >= 2, held          # it also held trials it was not training
        sweeper = worker_mod._Worker({None: study}, SyntheticTrainable(), cfg, tmp_path / "w",
                                     heartbeat_interval=0.01, grace_period=0.0, poll_interval=0.01, progress=None,
                                     study_name="tune")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sweeper._sweep_stale(study)
        said = [str(w.message) for w in caught if "f/b8/x1" in str(w.message)]
        assert len(said) == (run == TAKEOVER_LIMIT), said
        assert not [t for t in study.get_trials() if t.state == S.RUNNING]
    line = said[0]
    assert line.count("\n") == 0 and f"lost its worker {TAKEOVER_LIMIT + 1} times while training it" in line
    assert "out-of-memory" in line and "new study_name" in line
    trials = _trials(journal)
    x1 = [t for t in trials if t.user_attrs["key"] == "f/b8/x1"]
    assert not [t for t in x1 if t.state == S.WAITING]                                  # not retried
    # each retry inherits the count (a restart keeps it); the last trial, failed for good, keeps the limit
    assert [t.system_attrs.get(TAKEOVERS) for t in x1] == list(range(1, TAKEOVER_LIMIT + 1)) + [TAKEOVER_LIMIT]
    assert [bool(t.user_attrs.get("error")) for t in x1] == [False] * TAKEOVER_LIMIT + [True]
    assert all(TAKEOVERS not in t.system_attrs for t in trials if t.user_attrs["key"] != "f/b8/x1")
    n = len(trials)
    for _ in range(2):   # the run finishing the study, then a rerun of the finished study
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = tuner_mod.tune(SyntheticTrainable(), **SMALL, workdir=tmp_path / "w", storage=storage,
                                 progress=False, grace_period=GRACE)
        (bad,) = [s for s in res.trials if s.candidate.key == "f/b8/x1"]
        assert bad.state == "failed" and bad.error.startswith("lost its worker")
        assert res.crashed == ["f/b8/x1"] and res.choices[("f", 8)].key != "f/b8/x1"
        named = [str(w.message) for w in caught if "was never tuned" in str(w.message)]
        assert len(named) == 1 and f"f/b8/x1 lost its worker {TAKEOVER_LIMIT + 1} times while training it" \
            in named[0], named
    assert len(_trials(journal)) == n                       # no retry added by the finishing runs


def test_a_takeover_of_a_trial_merely_held_is_not_counted(tmp_path):
    """A worker killed while it holds trials whose rung loss is stored (waiting for the synchronized
    decision; a worker killed while finishing a trial leaves it so too) was not training them: a kill then
    (the machine preempted, the OOM killer choosing it for another trial) is not their candidates' doing,
    and is not counted."""
    storage = f"journal:{tmp_path / 'j.log'}"
    cfg = _config(storage)
    (study,) = tuner_mod._open_studies(cfg, storage, "tune").values()
    w = worker_mod._Worker({None: study}, SyntheticTrainable(), cfg, tmp_path / "w", heartbeat_interval=10.0,
                           grace_period=GRACE, poll_interval=0.01, progress=None, study_name="tune")
    for _ in range(6):   # claims and trains rung 0 of each candidate; then each waits for the decision
        w._sync_step(study)
    held = [t for t in study.get_trials() if t.state == S.RUNNING]
    assert len(held) == 3 and all("rung:0" in t.user_attrs for t in held)
    sweeper = worker_mod._Worker({None: study}, SyntheticTrainable(), cfg, tmp_path / "w", heartbeat_interval=0.01,
                                 grace_period=0.0, poll_interval=0.01, progress=None, study_name="tune")
    sweeper._sweep_stale(study)
    trials = study.get_trials()
    assert [t.state for t in trials[:3]] == [S.FAIL] * 3 and [t.state for t in trials[3:]] == [S.WAITING] * 3
    assert not [t for t in trials if TAKEOVERS in t.system_attrs or t.user_attrs.get("error")]


# ---------------------------------------------------------------- tune() releases the trials of the workers it kills

class _Stuck:
    """A spawned worker stand-in that claims one trial as a real one does (stamped with the owner ``tune()``
    gives it, where it gives one) and never ends until killed: a trainable that swallowed the interrupt."""

    def __init__(self, target=None, args=()) -> None:
        self.args, self.exitcode, self.pid = args, None, 10 ** 6

    def start(self) -> None:
        trainable, cfg, storage, study_name, workdir, hb, grace, poll = self.args[:8]
        owner = dict(owner=self.args[10]) if len(self.args) > 10 else {}   # (the old code gave none)
        studies = tuner_mod._open_studies(cfg, storage, study_name)
        (study,) = studies.values()
        w = worker_mod._Worker(studies, trainable, cfg, workdir, heartbeat_interval=hb, grace_period=grace,
                               poll_interval=poll, progress=None, study_name=study_name, **owner)
        self.claimed = worker_mod._claim(study, w._claimed(study)).number

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        self.exitcode = -signal.SIGKILL

    def join(self, timeout=None) -> None:
        if self.exitcode is None and timeout:
            time.sleep(timeout)


def test_the_trials_of_the_workers_tune_kills_are_released_at_once(tmp_path, monkeypatch):
    """Ctrl-C stops ``tune(n_workers=2)``; its spawned worker does not end (its trainable swallowed the
    interrupt, or a second Ctrl-C cut the wait short) and is killed. Its trial stayed RUNNING, and a rerun
    waited ``grace_period`` for it, then counted it as a take-over. Now ``tune()`` releases it as it
    kills the worker: failed as lost, re-enqueued, uncounted."""
    import multiprocessing

    procs = []

    class Context:
        @staticmethod
        def Process(*a, **k):
            procs.append(_Stuck(*a, **k))
            return procs[-1]

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: Context())
    monkeypatch.setattr(tuner_mod, "_STOP_TIMEOUT", 0.05)

    def ctrl_c(self, candidate, budget, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(SyntheticTrainable, "__call__", ctrl_c)
    journal = tmp_path / "j.log"
    with pytest.raises(KeyboardInterrupt):
        quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "w", storage=f"journal:{journal}", n_workers=2,
                   grace_period=GRACE)
    (proc,) = procs
    assert proc.exitcode == -signal.SIGKILL
    trials = _trials(journal)
    assert not [t.number for t in trials if t.state == S.RUNNING]
    stuck = trials[proc.claimed]
    assert stuck.state == S.FAIL and "error" not in stuck.user_attrs and TAKEOVERS not in stuck.system_attrs
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == stuck.number] == [S.WAITING]


def test_release_owned_takes_only_the_trials_stamped_by_those_workers(tmp_path):
    """A retry inherits its predecessor's system attributes, the owner's stamp too: a stamp counts on the
    trial it names only, so a retry claimed by a live worker, not stamped yet, is never taken from it."""
    storage = f"journal:{tmp_path / 'j.log'}"
    cfg = _config(storage)
    studies = tuner_mod._open_studies(cfg, storage, "tune")
    (study,) = studies.values()

    def worker(owner):
        return worker_mod._Worker(studies, SyntheticTrainable(), cfg, tmp_path / "w", heartbeat_interval=10.0,
                                  grace_period=GRACE, poll_interval=0.01, progress=None, study_name="tune", owner=owner)

    a, b = worker("a"), worker("b")
    first = worker_mod._claim(study, a._claimed(study))
    other = worker_mod._claim(study, b._claimed(study))
    worker_mod._claim(study, b._claimed(study))      # the last candidate: the retry below is the only one waiting
    assert worker_mod._release_owned(studies, {"a"}) == 1
    retry = worker_mod._claim(study)                 # a live worker's claim, its stamp not written yet
    (ft,) = [t for t in study.get_trials() if t.number == retry.number]
    assert ft.system_attrs.get("failed_trial") == first.number and ft.system_attrs[worker_mod._OWNER][0] == "a"
    assert worker_mod._release_owned(studies, {"a"}) == 0
    states = {t.number: t.state for t in study.get_trials()}
    assert states[first.number] == S.FAIL and states[retry.number] == S.RUNNING and states[other.number] == S.RUNNING


# ---------------------------------------------------------------- the pruner's failure is not the candidate's crash

@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_crash_in_the_pruners_decision_is_not_counted_on_the_trial_asking(tmp_path, monkeypatch, mode):
    """The pruner decides over every trial of the family/tier: an exception it raises (another trial's data,
    a bug of the pruner) was counted as a crash of the trial asking, and four runs failed that candidate for
    good, then the next one. Now it stops the call uncounted, on every run, until the cause is fixed; the
    rerun then decides every candidate (synchronized: as an uninterrupted tuning)."""
    def bug(self, study, trial):
        raise RuntimeError("pruner bug")

    kw = dict(workdir=tmp_path / "w", storage=f"journal:{tmp_path / 'j.log'}", grace_period=GRACE, mode=mode)
    with monkeypatch.context() as m:
        m.setattr(trials_mod.SynchronizedHalvingPruner, "prune", bug)
        m.setattr(trials_mod.CandidateHalvingPruner, "prune", bug)
        for _ in range(CRASH_LIMIT + 1):
            with pytest.raises(RuntimeError, match="pruner bug"):
                quiet_tune(SyntheticTrainable(), cfg=SMALL, **kw)
    trials = _trials(tmp_path / "j.log")
    assert not [t.number for t in trials if CRASHES in t.system_attrs or t.user_attrs.get("error")]
    assert not [t.number for t in trials if t.state == S.RUNNING]      # released on the way out
    res = quiet_tune(SyntheticTrainable(), cfg=SMALL, **kw)
    assert not [s for s in res.trials if s.state == "failed"] and ("f", 8) in res.choices and not res.crashed
    if mode == "synchronized":   # (ASHA's promotions depend on the order trials report in)
        assert outcome(res) == outcome(quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "ref"))


# ---------------------------------------------------------------- real processes, killed by SIGKILL

_OOM_SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
from examples.tune import tune
from examples.tune.synthetic import SyntheticTrainable


class OutOfMemory(SyntheticTrainable):
    # the OOM killer ends the process whenever it trains f/b8/x1's rung 0
    def __call__(self, candidate, budget, **k):
        if candidate.key == "f/b8/x1" and budget == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(candidate, budget, **k)


if __name__ == "__main__":
    res = tune(OutOfMemory(), families={{"f": {{"lr": 1.0}}}}, tiers=[8], reference_tier=8, rungs=[10, 20],
               multipliers=(0.5, 1.0, 2.0), workdir={workdir!r}, storage="journal:" + {journal!r}, progress=False,
               heartbeat_interval=0.2, grace_period=1.0, poll_interval=0.05)
    print(json.dumps(dict(crashed=res.crashed, choice=res.choices[("f", 8)].key)))
"""


@pytest.mark.slow  # ~15-25 s: five real processes, four of them killed
def test_a_process_killed_at_the_same_candidate_on_every_run_ends_the_retries(tmp_path):
    """``tune()`` in a real process SIGKILLed (as by the OOM killer) whenever it trains ``f/b8/x1``'s rung 0:
    each rerun took the trial over after ``grace_period`` and was killed again, for ever. Now the
    ``_MAX_TAKEOVER_RETRIES + 1``-th take-over fails the candidate, and that run finishes the study
    without it, naming it; the candidates the killed processes merely held are not counted."""
    journal = tmp_path / "j.log"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_OOM_SCRIPT.format(root=str(ROOT), workdir=str(tmp_path / "w"),
                                                         journal=str(journal))))
    codes = []
    for _ in range(TAKEOVER_LIMIT + 2):
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, PYTHONWARNINGS="always"))
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
    assert codes == [-signal.SIGKILL] * (TAKEOVER_LIMIT + 1) + [0], (codes, proc.stderr[-2000:])
    assert json.loads(proc.stdout.splitlines()[-1])["crashed"] == ["f/b8/x1"]
    assert f"candidate f/b8/x1 lost its worker {TAKEOVER_LIMIT + 1} times while training it" in proc.stderr
    trials = _trials(journal)
    assert all(TAKEOVERS not in t.system_attrs for t in trials if t.user_attrs["key"] != "f/b8/x1")
    assert max(t.system_attrs.get(TAKEOVERS, 0) for t in trials) == TAKEOVER_LIMIT


@pytest.mark.slow  # ~5-10 s: a real spawned worker
def test_a_second_ctrl_c_leaves_no_trial_of_the_killed_worker_to_the_heartbeat(tmp_path):
    """A real ``tune(n_workers=2)`` whose spawned worker swallows interrupts, stopped by two Ctrl-Cs: the
    second kills that worker, whose trial stayed RUNNING until ``grace_period`` passed (a rerun waited 60 s
    for it, then counted a take-over). Now nothing is left RUNNING: its trial is released, uncounted."""
    code, err, _, journal = twice_interrupted_swallowing_tune(tmp_path, grace_period=60.0)
    assert code == 130, err
    trials = _trials(journal)
    assert not [t.number for t in trials if t.state == S.RUNNING], err
    lost = [t for t in trials if t.state == S.FAIL]
    assert lost and not [t for t in lost if t.user_attrs.get("error") or TAKEOVERS in t.system_attrs]
    retried = {t.system_attrs.get("failed_trial") for t in trials if t.state == S.WAITING}
    assert {t.number for t in lost} <= retried
