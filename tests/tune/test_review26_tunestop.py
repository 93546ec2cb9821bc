"""Review 26 (tunestop): the tuner's stop and signal paths.

- ``tune()``'s spawned workers share one stop deadline (``_STOP_TIMEOUT``) and a second Ctrl-C during
  that wait kills the rest at once: the wait used to end in a join without a deadline (a hang).
- The journal append's signal deferral put SIGINT's handler back, then SIGTERM's: a Ctrl-C between the
  two swaps left SIGTERM with the deferral (dropped from then on) and the pending signals unhandled.
- ``python -m examples.tune`` turns SIGTERM into an exception, so its trials are released (status 143).
- A candidate whose trials crash their worker (not an interrupt) is retried ``_MAX_CRASH_RETRIES`` times,
  then failed with an error that says so: a crash repeated on every rerun grew the study for ever.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import ClassVar

import pytest

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune  # noqa: E402
from examples.tune import tuner as tuner_mod  # noqa: E402
from examples.tune import worker as worker_mod  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.signals import signal_when  # noqa: E402
from support.tuning import outcome, quiet_tune, twice_interrupted_swallowing_tune  # noqa: E402

S = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parents[2]
CFG = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 8], reference_tier=8, rungs=[10, 20, 40])
GRACE = 30.0


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, injected at a chosen point."""


def _trials(journal: Path) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="tune", storage=storage).get_trials()


# ---------------------------------------------------------------- stopping the spawned workers

class _Stubborn:
    """A spawned worker whose trainable swallowed the interrupt: it ends only when killed. ``join`` with
    no timeout while it runs would hang ``tune()``: it raises instead. ``ctrl_c_in_wait``: the first
    timed join raises ``KeyboardInterrupt`` (a second Ctrl-C during the stop wait)."""

    log: ClassVar[list] = []
    ctrl_c_in_wait = False
    fail_start_at = 0

    def __init__(self, *a, **k) -> None:
        self.exitcode = None
        self.pid = 10 ** 6 + len(self.log)

    def start(self) -> None:
        self.log.append(("start", self, time.monotonic()))
        if type(self).fail_start_at == sum(what == "start" for what, _, _ in self.log):
            raise RuntimeError("cannot start a worker")

    def terminate(self) -> None:
        self.log.append(("terminate", self, time.monotonic()))

    def kill(self) -> None:
        self.log.append(("kill", self, time.monotonic()))
        self.exitcode = -signal.SIGKILL

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout=None) -> None:
        if self.exitcode is not None:
            return
        assert timeout is not None, "join() without a timeout on a worker that does not end: tune() hangs"
        if type(self).ctrl_c_in_wait:
            type(self).ctrl_c_in_wait = False
            raise KeyboardInterrupt
        time.sleep(timeout)


class _Context:
    Process = _Stubborn


@pytest.fixture
def stubborn(monkeypatch):
    """``tune(n_workers=k)`` spawning ``_Stubborn`` workers; the log of what was done to them."""
    import multiprocessing

    _Stubborn.log = []
    _Stubborn.ctrl_c_in_wait = False
    _Stubborn.fail_start_at = 0
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: _Context())
    return _Stubborn


def _interrupted_tune(tmp_path, monkeypatch, n_workers: int) -> float:
    """``tune(n_workers)`` on a journal, Ctrl-C in its own worker's first training; the seconds it took."""
    def ctrl_c(self, candidate, budget, **k):
        raise Interrupt()

    monkeypatch.setattr(SyntheticTrainable, "__call__", ctrl_c)
    t0 = time.monotonic()
    with pytest.raises(Interrupt):
        quiet_tune(SyntheticTrainable(), cfg=CFG, workdir=tmp_path / "w", storage=f"journal:{tmp_path / 'j.log'}",
                   n_workers=n_workers, grace_period=GRACE)
    return time.monotonic() - t0


def test_the_spawned_workers_share_one_stop_deadline(tmp_path, monkeypatch, stubborn):
    """Three workers that do not end on tune()'s SIGTERM: each is killed once the one deadline
    (``_STOP_TIMEOUT``, here 0.4 s) has passed, all at about the same time. A deadline per worker
    killed the k-th after k x 0.4 s; none (a plain join) hung."""
    timeout = 0.4
    monkeypatch.setattr(tuner_mod, "_STOP_TIMEOUT", timeout)
    _interrupted_tune(tmp_path, monkeypatch, n_workers=4)
    terms = [t for what, _, t in stubborn.log if what == "terminate"]
    kills = [t for what, _, t in stubborn.log if what == "kill"]
    assert len(terms) == 3 and len(kills) == 3
    assert [p for what, p, _ in stubborn.log if what == "kill"] == [p for what, p, _ in stubborn.log if what == "terminate"]
    waited = [k - terms[0] for k in kills]
    assert all(timeout * 0.9 <= w < timeout * 1.6 for w in waited), waited   # per worker: 0.4, 0.8, 1.2 s


def test_a_second_ctrl_c_during_the_stop_wait_kills_the_workers_at_once(tmp_path, monkeypatch, stubborn):
    """A second Ctrl-C while tune() waits for its workers to release their trials (one swallowed the
    interrupt): the KeyboardInterrupt left the wait, and the join that followed had no deadline: tune()
    hung as long as that worker trained on. Now the rest are killed at once and tune() raises the first
    interrupt."""
    monkeypatch.setattr(tuner_mod, "_STOP_TIMEOUT", 30.0)
    stubborn.ctrl_c_in_wait = True
    took = _interrupted_tune(tmp_path, monkeypatch, n_workers=3)
    assert took < 10, f"tune() took {took:.1f} s to stop"
    assert sorted(what for what, _, _ in stubborn.log if what != "start") == ["kill", "kill", "terminate", "terminate"]


def test_a_worker_that_cannot_start_stops_those_already_started(tmp_path, monkeypatch, stubborn):
    """The third worker's start fails (e.g. a trainable that cannot be pickled for it): the two started
    before were left running (spawning was outside the stop); now they are stopped as on any exception."""
    monkeypatch.setattr(tuner_mod, "_STOP_TIMEOUT", 0.1)
    stubborn.fail_start_at = 3
    with pytest.raises(RuntimeError, match="cannot start a worker"):
        quiet_tune(SyntheticTrainable(), cfg=CFG, workdir=tmp_path / "w", storage=f"journal:{tmp_path / 'j.log'}",
                   n_workers=4, grace_period=GRACE)
    started = [p for what, p, _ in stubborn.log if what == "start"][:2]
    assert [p for what, p, _ in stubborn.log if what == "kill"] == started


def test_stop_workers_kills_what_a_second_ctrl_c_left_running():
    """The stop routine alone: a deadline shared by all, and a KeyboardInterrupt in the wait ends it."""
    _Stubborn.log, _Stubborn.ctrl_c_in_wait, _Stubborn.fail_start_at = [], False, 0
    procs = [_Stubborn() for _ in range(3)]
    t0 = time.monotonic()
    tuner_mod._stop_workers(procs, timeout=0.3)
    assert 0.27 <= time.monotonic() - t0 < 0.5 and all(p.exitcode == -signal.SIGKILL for p in procs)
    _Stubborn.ctrl_c_in_wait = True
    procs = [_Stubborn() for _ in range(2)]
    t0 = time.monotonic()
    tuner_mod._stop_workers(procs, timeout=30.0)
    assert time.monotonic() - t0 < 5 and all(p.exitcode == -signal.SIGKILL for p in procs)


@pytest.mark.slow  # ~5-10 s: a real spawned worker
def test_a_second_ctrl_c_ends_tune_while_a_worker_swallowed_the_first(tmp_path):
    """A real ``tune(n_workers=2)`` whose spawned worker's trainable swallows interrupts: the first
    SIGINT stops tune()'s own worker and starts the 60 s stop wait; a second SIGINT ends it: tune()
    raises at once and the worker is killed (it used to hang in a join without a deadline)."""
    code, err, took, _ = twice_interrupted_swallowing_tune(tmp_path, grace_period=30.0)
    assert code == 130, err
    assert took < 15, f"tune() took {took:.1f} s after the second Ctrl-C"


# ---------------------------------------------------------------- the deferral's restore

def test_a_ctrl_c_between_restoring_the_two_handlers_drops_no_signal(monkeypatch):
    """A Ctrl-C arriving just after SIGINT's handler was put back, before SIGTERM's: its handler's
    KeyboardInterrupt cut the restore short, so SIGTERM kept the deferral's handler (every later SIGTERM
    was noted for nobody) and the SIGTERM pending from the block was never handled. Now both handlers
    are back, the pending SIGTERM and a later one are each handled once, and the KeyboardInterrupt raised."""
    from examples.tune.storage import _signals_deferred

    seen = []

    def on_int(n, f):
        seen.append("INT")
        raise KeyboardInterrupt

    def on_term(n, f):
        seen.append("TERM")

    real_signal, forced = signal.signal, []

    def swap_then_ctrl_c(signum, handler):
        old = real_signal(signum, handler)
        if signum == signal.SIGINT and handler is on_int and not forced:
            forced.append(1)
            signal.raise_signal(signal.SIGINT)   # in the window: SIGINT is back, SIGTERM not yet
        return old

    old = {s: real_signal(s, h) for s, h in ((signal.SIGINT, on_int), (signal.SIGTERM, on_term))}
    try:
        with pytest.raises(KeyboardInterrupt), monkeypatch.context() as m:
            m.setattr(signal, "signal", swap_then_ctrl_c)
            with _signals_deferred():
                signal.raise_signal(signal.SIGTERM)
                assert seen == []
        assert forced and seen == ["TERM", "INT"]
        assert signal.getsignal(signal.SIGINT) is on_int and signal.getsignal(signal.SIGTERM) is on_term
        signal.raise_signal(signal.SIGTERM)
        assert seen == ["TERM", "INT", "TERM"]
    finally:
        for s, h in old.items():
            real_signal(s, h)


def test_a_deferral_left_installed_hands_signals_on_and_is_unwrapped(monkeypatch):
    """Should a swap back be cut short anyway (a handler raising where no retry reaches), the deferral
    left installed hands each signal to the handler it stood for, and the next deferral puts that
    handler back."""
    from examples.tune.storage import _Deferral, _signals_deferred

    seen = []

    def on_term(n, f):
        seen.append(n)

    left = _Deferral()
    left.saved[signal.SIGTERM] = on_term
    left.active = False
    old = signal.signal(signal.SIGTERM, left)
    try:
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        with _signals_deferred():
            pass
        assert signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- the command line's SIGTERM

@pytest.mark.slow  # ~4-8 s: the command line and its spawned worker
def test_cli_sigterm_releases_the_trials_and_says_one_line(tmp_path):
    """``kill`` (SIGTERM) of ``python -m examples.tune ... --workers 2``'s main process: it ended at once
    (status -15) and left its trials RUNNING until ``--grace`` ran out; now it releases them, stops its
    worker (which releases its own), says one line and exits with status 143."""
    journal = tmp_path / "tune.log"
    cmd = [sys.executable, "-m", "examples.tune", "synthetic", "--tiers", "1", "8", "--reference-tier", "8",
           "--rungs", "10", "20", "40", "--family", "f=lr:1e-3", "--workdir", str(tmp_path / "w"),
           "--storage", f"journal:{journal}", "--workers", "2", "--sleep", "0.2", "--grace", str(GRACE), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def both_began_a_trial():
        return len({json.loads(line)["pid"] for f in (tmp_path / "w").rglob("calls.jsonl")
                    for line in f.read_text().splitlines() if line.endswith("}")}) == 2

    returncode, err = signal_when(proc, both_began_a_trial, signal.SIGTERM)
    assert returncode == 143, err
    assert err.count("\n") == 1 and err.startswith("python -m examples.tune: terminated: rerun"), err
    trials = _trials(journal)
    assert not [t.number for t in trials if t.state == S.RUNNING], "a trial was left RUNNING: the rerun waits"
    assert [t for t in trials if t.state == S.FAIL and "error" not in t.user_attrs]   # released as lost


def test_cli_sigterm_is_an_exception_only_while_it_runs(monkeypatch):
    """In process: SIGTERM raises (one line, status 143) while the command runs, and the default
    disposition is back after; a SIGTERM the caller handles itself is left to its handler."""
    from examples.tune import __main__ as cli

    def terminated(argv):
        signal.raise_signal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(cli, "_main", terminated)
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert cli.main([]) == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        seen = []
        signal.signal(signal.SIGTERM, lambda n, f: seen.append(n))
        assert cli.main([]) == 0 and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- the crash retry limit

LIMIT = getattr(worker_mod, "_MAX_CRASH_RETRIES", 3)        # (the old code had no limit and no count)
CRASHES = getattr(worker_mod, "_CRASHES", "tune:crashes")
SMALL = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10, 20], multipliers=(0.5, 1.0, 2.0))


def test_a_candidate_that_keeps_crashing_its_worker_is_failed_after_the_retry_limit(tmp_path, monkeypatch):
    """A bug of the worker's own code on one candidate stops every run; each rerun released and retried
    it again, for ever (the study grew by a retry per rerun, the candidate never decided). Now the
    crash is counted on that candidate only (the trials merely held alongside are released uncounted):
    after ``_MAX_CRASH_RETRIES`` retries the next crash fails it with an error that names it and says what
    to do, and the rerun after finishes the study without it."""
    journal = tmp_path / "j.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}", grace_period=GRACE)
    real = worker_mod._Worker._trial_dir

    def bug(self, cand):
        if cand.key == "f/b8/x1":
            raise RuntimeError("worker bug")
        return real(self, cand)

    monkeypatch.setattr(worker_mod._Worker, "_trial_dir", bug)
    limit = LIMIT
    for run in range(limit + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match="worker bug"):
                tune(SyntheticTrainable(), **SMALL, **kw, progress=False)
        said = [str(w.message) for w in caught if "crashed its worker" in str(w.message)]
        assert len(said) == (run == limit), said
    assert said[0].count("\n") == 0 and "f/b8/x1" in said[0] and "new study_name" in said[0]
    trials = _trials(journal)
    assert not [t for t in trials if t.state == S.RUNNING]
    assert not [t for t in trials if t.state == S.WAITING and t.user_attrs["key"] == "f/b8/x1"]   # not retried
    errors = [t.user_attrs["error"] for t in trials if t.user_attrs.get("error")]
    assert len(errors) == 1 and f"crashed its worker {limit + 1} times (last: RuntimeError: worker bug)" in errors[0]
    others = [t for t in trials if t.user_attrs["key"] != "f/b8/x1"]
    assert others and all(CRASHES not in t.system_attrs for t in others)
    n = len(trials)
    res = quiet_tune(SyntheticTrainable(), cfg=SMALL, **kw)   # goes on without it
    (bad,) = [s for s in res.trials if s.candidate.key == "f/b8/x1"]
    assert bad.state == "failed" and "crashed its worker" in bad.error
    assert ("f", 8) in res.choices and res.choices[("f", 8)].key != "f/b8/x1"
    assert len(_trials(journal)) == n                         # no retry added by the finishing run


def test_interrupts_are_not_counted_as_crashes(tmp_path, monkeypatch):
    """Ctrl-C at the same candidate on more runs than the crash limit: it is released and resumed every
    time (no crash count), and the last rerun ends as an uninterrupted tuning."""
    journal = tmp_path / "j.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}", grace_period=GRACE)
    real = SyntheticTrainable.__call__

    def ctrl_c(self, candidate, budget, **k):
        if candidate.key == "f/b8/x1":
            raise Interrupt()
        return real(self, candidate, budget, **k)

    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", ctrl_c)
        for _ in range(LIMIT + 2):
            with pytest.raises(Interrupt):
                quiet_tune(SyntheticTrainable(), cfg=SMALL, **kw)
    assert not [t for t in _trials(journal) if CRASHES in t.system_attrs or t.user_attrs.get("error")]
    ref = quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "ref")
    assert outcome(quiet_tune(SyntheticTrainable(), cfg=SMALL, **kw)) == outcome(ref)


def test_a_trial_failed_by_hand_is_treated_as_lost_and_retried(tmp_path):
    """A RUNNING trial failed by hand through Optuna (``study.tell(n, state=FAIL)``, e.g. to take it off a
    stuck worker) carries no ``error``: like the tuner's own take-over, it is lost, not the candidate's
    failure. The rerun retries it at once (no ``grace_period`` wait) and ends as an uninterrupted tuning."""
    from examples.tune.storage import open_storage
    from examples.tune.worker import _claim

    journal = tmp_path / "j.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    cfg = dict(SMALL, multipliers=(0.5, 1.0, 2.0))
    ref = quiet_tune(SyntheticTrainable(), cfg=cfg, workdir=tmp_path / "ref")
    from examples.tune.tuner import _open_studies, _validate

    v = _validate(cfg["families"], cfg["tiers"], cfg["reference_tier"], cfg["rungs"], "synchronized", 1, kw["storage"],
                  None, 2, cfg["multipliers"], 1e-9, None)
    _open_studies(v, kw["storage"], "tune")
    study = optuna.load_study(study_name="tune", storage=open_storage(kw["storage"]))
    stuck = _claim(study)                                   # a worker that claimed it and hangs
    study.tell(stuck.number, state=S.FAIL)                  # the user fails it by hand
    t0 = time.monotonic()
    res = quiet_tune(SyntheticTrainable(), cfg=cfg, **kw, heartbeat_interval=0.5, grace_period=GRACE,
                     poll_interval=0.05)
    assert time.monotonic() - t0 < GRACE / 3
    assert outcome(res) == outcome(ref)
    assert [s.state for s in res.trials if s.number == stuck.number] == []   # its retry stands for it
