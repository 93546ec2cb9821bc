"""Review 25 (tuneint): a clean interrupt of the tuner releases the trials its workers hold.

A Ctrl-C during tuning (the README's main command runs the tuner first) left every trial the worker
held RUNNING: nothing told the storage its worker was gone, so the rerun waited the heartbeat's
whole ``grace_period`` (60 s) before it took them over. Now a worker stopping on an exception fails
its own trials as lost and re-enqueues them (what the heartbeat sweep would do later), and a spawned
worker turns ``tune()``'s SIGTERM into that exception: the rerun takes over at once, with the results
of an uninterrupted tuning. A hard kill still relies on the heartbeat (tests/tune/test_workers.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

import optuna  # noqa: E402

from examples.tune import worker as worker_mod  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.signals import signal_when  # noqa: E402
from support.tuning import outcome, quiet_tune  # noqa: E402
from support.workers import worker_pids  # noqa: E402

S = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parents[2]
CFG = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 8], reference_tier=8, rungs=[10, 20, 40])
GRACE = 30.0   # the rerun must take over far sooner than this (it used to wait all of it)


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, injected at a chosen point."""


def _quiet_tune(trainable, **kw):
    return quiet_tune(trainable, cfg=CFG, **kw)


def _trials(journal: Path) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return [t for s in optuna.get_all_study_summaries(storage)
            for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)]


def _retry_of(t):
    """The number of the trial ``t`` retries (``failed_trial`` names the first of a chain), else None."""
    history = t.system_attrs.get("retry_history")
    return history[-1] if history else None


def _check_released(journal: Path) -> list:
    """No trial is left RUNNING; each trial failed for a lost worker has exactly one retry. Returns the
    lost trials."""
    trials = _trials(journal)
    assert not [t.number for t in trials if t.state == S.RUNNING], "a trial was left RUNNING: the rerun waits"
    lost = [t for t in trials if t.state == S.FAIL and "error" not in t.user_attrs and "duplicate_of" not in t.user_attrs]
    retried = Counter(_retry_of(t) for t in trials)
    assert all(retried[t.number] == 1 for t in lost), [(t.number, retried[t.number]) for t in lost]
    return lost


def _calls(workdir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(Path(workdir).rglob("calls.jsonl")) for line in open(f)]


def _timed_rerun(tmp_path, kw, trainable=None):
    """The rerun, with a ``grace_period`` it must not wait out; (result, seconds)."""
    t0 = time.monotonic()
    res = _quiet_tune(trainable or SyntheticTrainable(), **kw, heartbeat_interval=0.5, grace_period=GRACE, poll_interval=0.05)
    return res, time.monotonic() - t0


# ---------------------------------------------------------------- the fast path

def _ctrl_c_at_rung_1(monkeypatch, kw, release=True):
    """Run the tuning until Ctrl-C as the worker begins a rung-1 training; ``release=False``: as before
    this change (the trials the worker held are left RUNNING, for the heartbeat)."""
    real = SyntheticTrainable.__call__

    def ctrl_c_at_rung_1(self, candidate, budget, **k):
        if budget == 20:
            raise Interrupt()
        return real(self, candidate, budget, **k)

    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", ctrl_c_at_rung_1)
        if not release:
            m.setattr(worker_mod._Worker, "_release", lambda self: None)
        with pytest.raises(Interrupt):
            _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)


@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_rerun_after_ctrl_c_takes_the_interrupted_trials_over_without_waiting(tmp_path, monkeypatch, mode):
    """Ctrl-C as the worker begins rung 1 (synchronized: it then holds every trial of the family/tier,
    waiting at rung 0): the rerun took them over only after grace_period; now at once, and no finished
    rung is trained twice. Synchronized: the results of an uninterrupted tuning. Asynchronous (results
    depend on the order trials finish in): those of the same interrupt taken over by the heartbeat."""
    extra = {} if mode == "synchronized" else dict(mode="asynchronous")
    if mode == "synchronized":
        ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref", **extra)
    else:
        slow = dict(workdir=tmp_path / "ref", storage=f"journal:{tmp_path / 'ref.log'}", **extra)
        _ctrl_c_at_rung_1(monkeypatch, slow, release=False)
        ref = _quiet_tune(SyntheticTrainable(), **slow, heartbeat_interval=0.1, grace_period=0.3, poll_interval=0.05)
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}", **extra)
    _ctrl_c_at_rung_1(monkeypatch, kw)
    lost = _check_released(journal)
    assert lost, "the interrupted worker held trials"
    if mode == "synchronized":
        assert len(lost) > 1                          # all it held, not only the one it was training
    res, took = _timed_rerun(tmp_path, kw)
    assert took < GRACE / 3, f"the rerun took {took:.1f} s: it waited for the interrupted trials"
    assert outcome(res) == outcome(ref)
    ends = Counter((c["key"], c["budget"]) for c in _calls(tmp_path / "w") if c["event"] == "end")
    assert all(n == 1 for n in ends.values()), ends    # nothing finished twice


def test_a_second_ctrl_c_during_the_release_leaves_a_study_that_resumes(tmp_path, monkeypatch):
    """A second Ctrl-C while the worker marks its trials: the one being re-enqueued is left failed but
    not re-enqueued (an orphan), the ones not reached stay RUNNING; the rerun re-enqueues the orphan at
    once, takes the others over after grace_period (as before this change) and ends as an uninterrupted
    tuning."""
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    real, real_retry = SyntheticTrainable.__call__, worker_mod._retry_callback
    retries = []

    def ctrl_c_at_rung_1(self, candidate, budget, **k):
        if budget == 20:
            raise Interrupt()
        return real(self, candidate, budget, **k)

    def retry_then_ctrl_c_again():
        retries.append(1)
        if len(retries) == 2:   # the second trial's re-enqueueing: after its FAIL, before its retry
            raise Interrupt()
        return real_retry()

    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", ctrl_c_at_rung_1)
        m.setattr(worker_mod, "_retry_callback", retry_then_ctrl_c_again)
        with pytest.raises(Interrupt):
            _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)
    trials = _trials(journal)
    lost = [t for t in trials if t.state == S.FAIL and "error" not in t.user_attrs]
    waiting_retries = {t.system_attrs["failed_trial"] for t in trials if t.state == S.WAITING and
                       "failed_trial" in t.system_attrs}
    assert len(lost) == 2 and len(waiting_retries) == 1                    # released, and an orphan
    assert any(t.state == S.RUNNING for t in trials)                       # not reached: the heartbeat's
    for line in journal.read_bytes().splitlines():                         # the journal is whole
        json.loads(line)
    res = _quiet_tune(SyntheticTrainable(), **kw, heartbeat_interval=0.1, grace_period=0.5, poll_interval=0.05)
    assert outcome(res) == outcome(ref)


def test_the_release_leaves_a_trial_another_worker_took_over_to_its_retry(tmp_path):
    """The worker holds two trials; another worker has failed one of them (late heartbeats) and claimed
    its retry. The release fails and re-enqueues only the other: the taken-over trial is not failed again,
    not re-enqueued a second time, and its retry, RUNNING with the other worker, is untouched."""
    from examples.tune.storage import open_storage
    from examples.tune.trials import _candidate, _retry_callback
    from examples.tune.tuner import _open_studies, _validate
    from examples.tune.worker import _claim, _Worker

    storage = f"journal:{tmp_path}/j.log"
    cfg = _validate({"f": {"lr": 1.0}}, [8], 8, [10, 20], "synchronized", 1, storage, None, 2, (1.0, 2.0),
                    1e-9, None)
    (study,) = _open_studies(cfg, storage, "tune").values()
    w = _Worker({None: study}, SyntheticTrainable(), cfg, tmp_path / "w", heartbeat_interval=1.0, grace_period=60.0,
                poll_interval=0.01, progress=None)
    mine = []
    for _ in range(2):
        t = _claim(study, w._claimed(study))
        w._start(study, t)
        assert w._train_rung(study, t, _candidate(study._storage.get_trial(t._trial_id)), 0)
        mine.append(t)
    other = optuna.load_study(study_name="tune", storage=open_storage(storage))   # another process
    taken = mine[0]._trial_id
    assert other._storage.set_trial_state_values(taken, state=S.FAIL)
    _retry_callback()(other, other._storage.get_trial(taken))
    retry = _claim(other)
    assert other._storage.get_trial(retry._trial_id).system_attrs["failed_trial"] == mine[0].number
    w._release()
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[retry.number].state == S.RUNNING                      # the other worker's: untouched
    assert by_number[mine[1].number].state == S.FAIL                       # ours: released
    retried = Counter(t.system_attrs.get("failed_trial") for t in study.get_trials() if "failed_trial" in t.system_attrs)
    assert retried == Counter({mine[0].number: 1, mine[1].number: 1})       # one retry each
    assert by_number[mine[0].number].state == S.FAIL and not w.held and not w.claimed


def test_a_trial_claimed_but_not_yet_set_up_is_released_too(tmp_path, monkeypatch):
    """Ctrl-C between the claim (WAITING -> RUNNING) and the trial's set-up (its candidate, heartbeat and
    place among the held trials): the claim alone makes it the worker's, so it is released as well."""
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    real_start, n = worker_mod._Worker._start, []

    def ctrl_c_in_set_up(self, study, trial):
        n.append(1)
        if len(n) == 3:
            raise Interrupt()
        return real_start(self, study, trial)

    with monkeypatch.context() as m:
        m.setattr(worker_mod._Worker, "_start", ctrl_c_in_set_up)
        with pytest.raises(Interrupt):
            _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)
    assert len(_check_released(journal)) == 3
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    res, took = _timed_rerun(tmp_path, kw)
    assert took < GRACE / 3 and outcome(res) == outcome(ref)


# ---------------------------------------------------------------- several workers: each releases its own

def _journal_owners(journal: Path) -> tuple[dict[int, str], dict[int, str]]:
    """Per trial id, the journal worker that claimed it (RUNNING) and the one whose finishing operation
    (COMPLETE, PRUNED or FAIL) was applied: the first of each, as the journal's replay applies them."""
    created, claimed, finished = 0, {}, {}
    for line in journal.read_bytes().split(b"\n")[:-1]:       # complete lines (a writer may be mid-line)
        op = json.loads(line)
        if op["op_code"] == 4:                                  # CREATE_TRIAL
            created += 1
        elif op["op_code"] == 6:                                # SET_TRIAL_STATE_VALUES
            state = S(op["state"])
            if state == S.RUNNING:
                claimed.setdefault(op["trial_id"], op["worker_id"])
            elif state.is_finished() and op["trial_id"] in claimed:
                finished.setdefault(op["trial_id"], op["worker_id"])
    return claimed, finished


def _check_each_released_its_own(journal: Path, workers: int) -> None:
    lost = _check_released(journal)
    claimed, finished = _journal_owners(journal)
    assert all(finished[t] == claimed[t] for t in finished), "a worker finished another's trial"
    lost_by = Counter(claimed[t._trial_id] for t in lost)
    assert len(lost_by) == workers, f"each worker held and released trials: {lost_by}"


@pytest.mark.slow  # ~2-6 s: a spawned worker imports the library
def test_two_workers_interrupted_each_release_their_own_trials(tmp_path, monkeypatch):
    """``tune(n_workers=2)`` stopped by an exception in its own worker: it releases its trials and
    terminates the spawned worker (SIGTERM), which used to die at once and leave its trials to the
    heartbeat; now it releases its own, and the rerun takes over at once."""
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    real = worker_mod._Worker._sync_step

    def ctrl_c_once_both_hold_trials(self, study):   # this process's worker only (the spawned one is not patched)
        theirs = [t for t in study.get_trials(deepcopy=False)
                  if t.state == S.RUNNING and t._trial_id not in self.held and t._trial_id not in getattr(self, "claimed", ())]
        begun = bool(worker_pids(tmp_path / "w") - {os.getpid()})   # the spawned worker began a trial
        if self.held and theirs and begun:
            raise Interrupt()
        if self.held and not begun:   # hold the first trial, untrained, until the spawned worker began one:
            time.sleep(0.05)          # its family/tier's rung 0 cannot be decided, so the other's trials stay held
            return "waiting"
        return real(self, study)

    monkeypatch.setattr(worker_mod._Worker, "_sync_step", ctrl_c_once_both_hold_trials)
    with pytest.raises(Interrupt):
        _quiet_tune(SyntheticTrainable(), **kw, n_workers=2, grace_period=GRACE, poll_interval=0.05)
    monkeypatch.setattr(worker_mod._Worker, "_sync_step", real)
    _check_each_released_its_own(journal, workers=2)
    res, took = _timed_rerun(tmp_path, kw)
    assert took < GRACE / 3, f"the rerun took {took:.1f} s: it waited for the interrupted trials"
    assert outcome(res) == outcome(ref)


@pytest.mark.slow  # ~4-9 s: a real Ctrl-C to the command line and its spawned worker
def test_cli_ctrl_c_with_two_workers_releases_every_trial_and_says_one_line(tmp_path):
    """SIGINT to the process group (what Ctrl-C does) of ``python -m examples.tune ... --workers 2``:
    status 130, one line on stderr, and every trial either worker held is released by that worker
    (``tune()``'s SIGTERM to its worker, right after the Ctrl-C, does not cut the worker's release short)."""
    journal = tmp_path / "tune.log"
    cmd = [sys.executable, "-m", "examples.tune", "synthetic", "--tiers", "1", "8", "--reference-tier", "8",
           "--rungs", "10", "20", "40", "--family", "f=lr:1e-3", "--workdir", str(tmp_path / "w"),
           "--storage", f"journal:{journal}", "--workers", "2", "--sleep", "0.5", "--grace", str(GRACE), "--quiet"]
    # SIGINT at its default in the child: pytest run as a background job (or under nohup) ignores it, and
    # the command line would inherit that (and rightly ignore the Ctrl-C)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def both_hold_trials():   # the spawned process has begun one too
        return len(worker_pids(tmp_path / "w")) == 2 and journal.exists() and \
            len({w for t, w in _journal_owners(journal)[0].items()}) == 2

    returncode, err = signal_when(proc, both_hold_trials, signal.SIGINT, group=True)
    assert returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("python -m examples.tune: interrupted"), err
    _check_each_released_its_own(journal, workers=2)


def test_a_trial_interrupted_while_it_is_being_finished_is_released(tmp_path, monkeypatch):
    """Ctrl-C inside the finishing of a trial (its extrapolation stored, Optuna not told yet): the trial
    was forgotten on the way out (``_finish`` dropped it in a ``finally``) although still RUNNING, so the
    release missed it and the rerun waited for it. Now it stays held until told, and is released."""
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")

    def ctrl_c(*a, **k):
        raise Interrupt()

    with monkeypatch.context() as m:
        m.setattr(worker_mod, "extrapolate_loss", ctrl_c)   # the first pruned trial's finishing
        with pytest.raises(Interrupt):
            _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)
    assert _check_released(journal)
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    res, took = _timed_rerun(tmp_path, kw)
    assert took < GRACE / 3 and outcome(res) == outcome(ref)


# ---------------------------------------------------------------- Ctrl-C inside a journal append

def test_ctrl_c_at_the_journal_locks_release_waits_for_the_append(tmp_path):
    """SIGINT handled just before Optuna's lock release: the ``KeyboardInterrupt`` left the lock file
    behind (every process then waits 30 s to break it) or, inside the release, became a
    ``FileNotFoundError`` ('error: ... .rename', exit 2, on the command line). Now it is raised once the
    append is done and the lock released."""
    from examples.tune.storage import _journal_backend

    path = tmp_path / "tune.log"
    backend = _journal_backend(path)
    real_release = backend._lock.release

    def ctrl_c_then_release():
        signal.raise_signal(signal.SIGINT)   # its handler runs at the next bytecode
        real_release()

    backend._lock.release = ctrl_c_then_release
    old = signal.signal(signal.SIGINT, signal.default_int_handler)   # pytest as a background job ignores it
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.append_logs([{"op_code": 99, "i": 1}])
    finally:
        signal.signal(signal.SIGINT, old)
    assert not os.path.lexists(str(path) + ".lock"), "the journal's lock file was left behind"
    assert [json.loads(line) for line in path.read_bytes().splitlines()] == [{"op_code": 99, "i": 1}]

