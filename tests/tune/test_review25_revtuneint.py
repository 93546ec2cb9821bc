"""Review 25 (revtuneint): adversarial checks of the tuner's clean-interrupt change (tuneint).

- The journal append's signal deferral (``examples/tune/storage.py``) lost signals: a SIGINT whose
  disposition is ``SIG_DFL`` arriving during an append was dropped (only SIGTERM's default action was
  re-taken), and a pending SIGTERM after a pending SIGINT was dropped when the SIGINT's handler raised
  ``KeyboardInterrupt``.
- A library call leaves the caller's handlers as they were, and works from a non-main thread.
- Interrupt + rerun at another point than tuneint's tests: the results of an uninterrupted tuning.
"""
import os
import signal
import threading
import time
import warnings

import pytest

pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

import optuna  # noqa: E402

from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.tuning import outcome, quiet_tune  # noqa: E402

S = optuna.trial.TrialState
CFG = dict(families={"f": {"lr": 1e-3}}, tiers=[1, 8], reference_tier=8, rungs=[10, 20, 40])
GRACE = 30.0


def _quiet_tune(trainable, **kw):
    return quiet_tune(trainable, cfg=CFG, **kw)


@pytest.fixture
def kills(monkeypatch):
    """``os.kill`` of this process recorded, not sent (a default action would end pytest); the
    SIGINT/SIGTERM handlers restored after the test."""
    import examples.tune.storage as storage_mod

    sent = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(storage_mod.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    try:
        yield sent
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_a_sigint_set_to_sig_dfl_during_an_append_still_ends_the_process(kills):
    """SIGINT's disposition SIG_DFL (a program that wants Ctrl-C to end it at once): the deferral held the
    signal off and then dropped it (only SIGTERM's default action was re-taken), so Ctrl-C during an
    append was lost and the process went on. Now its default action is taken once the append ended."""
    from examples.tune.storage import _signals_deferred

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with _signals_deferred():
        signal.raise_signal(signal.SIGINT)
        assert kills == []
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert kills == [(os.getpid(), signal.SIGINT)]


def test_a_sigterm_pending_after_a_ctrl_c_is_not_dropped(kills):
    """Ctrl-C, then SIGTERM (default action), both during one append: the SIGINT handler's
    KeyboardInterrupt ended the replay of the pending signals, so the SIGTERM, which ends the process,
    was lost. Now every pending signal is handled, and the KeyboardInterrupt raised after."""
    from examples.tune.storage import _signals_deferred

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
    assert kills == [(os.getpid(), signal.SIGTERM)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_each_pending_signal_is_handled_once_and_the_handlers_restored():
    """Handlers restored; two signals pending: each saved handler called once, in arrival order."""
    from examples.tune.storage import _signals_deferred

    seen = []
    old = {s: signal.signal(s, lambda n, f: seen.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        mine = {s: signal.getsignal(s) for s in old}
        with _signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGTERM, signal.SIGINT]
        assert {s: signal.getsignal(s) for s in old} == mine
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_tune_leaves_the_callers_handlers_and_runs_from_a_thread(tmp_path, monkeypatch):
    """tune() on a journal, returning and raising, in the main thread and in another thread (where
    ``signal.signal`` raises): the caller's SIGINT/SIGTERM handlers are the same objects afterwards."""
    def mine(n, f):
        pass

    old = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
        res = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "a", storage=f"journal:{tmp_path / 'a.log'}")
        assert outcome(res) == outcome(ref)
        assert all(signal.getsignal(s) is mine for s in old)

        def boom(self, candidate, budget, **k):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(SyntheticTrainable, "__call__", boom)
            with pytest.raises(KeyboardInterrupt):
                _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "b", storage=f"journal:{tmp_path / 'b.log'}")
        assert all(signal.getsignal(s) is mine for s in old)

        out = {}

        def in_thread():
            try:
                out["res"] = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "c",
                                         storage=f"journal:{tmp_path / 'c.log'}")
            except BaseException as e:  # noqa: BLE001 - reported below
                out["error"] = e

        t = threading.Thread(target=in_thread)
        t.start()
        t.join(120)
        assert "error" not in out, out.get("error")
        assert outcome(out["res"]) == outcome(ref)
        assert all(signal.getsignal(s) is mine for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, injected at a chosen point."""


def test_ctrl_c_mid_last_rung_then_rerun_equals_an_uninterrupted_tuning(tmp_path, monkeypatch):
    """Another interrupt point than tuneint's (rung 1's start): the second training of the last rung
    (rung 0 and 1 decided, one survivor finished), after its checkpoint's first points were reported.
    The rerun takes over at once and ends as an uninterrupted tuning (synchronized mode)."""
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    real, last = SyntheticTrainable.__call__, []

    def ctrl_c_in_second_last_rung(self, candidate, budget, *, report, **k):
        if budget == 40:
            last.append(candidate.key)

            def report_then_ctrl_c(resource, loss):
                report(resource, loss)
                if len(last) == 2 and resource > 20:
                    raise Interrupt()
            return real(self, candidate, budget, report=report_then_ctrl_c, **k)
        return real(self, candidate, budget, report=report, **k)

    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", ctrl_c_in_second_last_rung)
        with pytest.raises(Interrupt):
            _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = [t for s in optuna.get_all_study_summaries(storage)
              for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials()]
    assert not [t for t in trials if t.state == S.RUNNING]
    assert [t for t in trials if t.state == S.FAIL and "error" not in t.user_attrs]   # released
    t0 = time.monotonic()
    res = _quiet_tune(SyntheticTrainable(), **kw, heartbeat_interval=0.5, grace_period=GRACE, poll_interval=0.05)
    assert time.monotonic() - t0 < GRACE / 3
    assert outcome(res) == outcome(ref)


def test_ctrl_c_during_the_claims_journal_append_leaves_no_trial_running(tmp_path, monkeypatch):
    """Ctrl-C arriving while the claim (WAITING -> RUNNING) is appended to the journal: the append's
    deferral raised the KeyboardInterrupt as the append ended, inside ``set_trial_state_values``, before
    ``_claim`` noted the trial as the worker's; the release missed it and it stayed RUNNING (the rerun
    waited ``grace_period``; seen as a flaky CLI Ctrl-C test of tuneint under load). Now the claim and
    its note are one deferred step."""
    from examples.tune import storage as storage_mod

    backend = storage_mod._backend_class()
    real, claims = backend._append_logs, []

    def append_then_ctrl_c(self, logs):
        real(self, logs)
        if any(log.get("op_code") == 6 and log.get("state") == S.RUNNING for log in logs):
            claims.append(1)
            if len(claims) == 3:
                signal.raise_signal(signal.SIGINT)   # held off by the append's deferral, raised as it ends

    journal = tmp_path / "tune.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}")
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as m:
            m.setattr(backend, "_append_logs", append_then_ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                _quiet_tune(SyntheticTrainable(), **kw, grace_period=GRACE)
    finally:
        signal.signal(signal.SIGINT, old)
    assert len(claims) == 3
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = [t for s in optuna.get_all_study_summaries(storage)
              for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials()]
    assert not [t.number for t in trials if t.state == S.RUNNING], "a claimed trial was left RUNNING"
    ref = _quiet_tune(SyntheticTrainable(), workdir=tmp_path / "ref")
    t0 = time.monotonic()
    res = _quiet_tune(SyntheticTrainable(), **kw, heartbeat_interval=0.5, grace_period=GRACE, poll_interval=0.05)
    assert time.monotonic() - t0 < GRACE / 3
    assert outcome(res) == outcome(ref)


def test_a_spawned_worker_keeps_an_ignored_sigint_ignored(tmp_path):
    """A ``tune()`` started with SIGINT ignored (``nohup``, a background job of a script) ignores Ctrl-C,
    but its spawned workers (which inherit the ignored disposition) installed their stop handler over it:
    a SIGINT to the process group stopped the workers only, and the tuning went on short of them (seen:
    tuneint's CLI test run from a background job ended 0 with 'worker process ... exited with status
    130'). ``_worker_main`` is run here in this process, SIGINT ignored, with a SIGINT mid-training."""
    from examples.tune.tuner import _open_studies, _validate, _worker_main

    class CtrlCOnce(SyntheticTrainable):
        def __call__(self, candidate, budget, **k):
            if budget == 20 and not sent:
                sent.append(1)
                signal.raise_signal(signal.SIGINT)
            return super().__call__(candidate, budget, **k)

    sent = []
    storage = f"journal:{tmp_path}/j.log"
    cfg = _validate(CFG["families"], CFG["tiers"], CFG["reference_tier"], CFG["rungs"], "synchronized", 1, storage,
                    None, 2, (0.5, 1.0, 2.0), 1e-9, None)
    _open_studies(cfg, storage, "tune")
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _worker_main(CtrlCOnce(), cfg, storage, "tune", tmp_path / "w", 0.5, GRACE, 0.01)   # no SystemExit(130)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
    assert sent
    st = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp_path}/j.log"))
    trials = optuna.load_study(study_name="tune", storage=st).get_trials()
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]


def test_a_candidates_fault_is_not_released_and_a_worker_crash_is_released_once_per_run(tmp_path, monkeypatch):
    """The trainable raising on every attempt is the candidate's failure (FAIL with ``error``, never
    re-enqueued: a rerun adds no trial); a crash of the worker's own code on one candidate stops the
    call, and each run releases the trials it held once (a rerun adds as many trials as it held: no
    retry loop within a call)."""
    class Diverges(SyntheticTrainable):
        def __call__(self, candidate, budget, **k):
            if candidate.key == "f/b1/x0.125":
                raise ValueError("diverged")
            return super().__call__(candidate, budget, **k)

    journal = tmp_path / "j.log"
    kw = dict(workdir=tmp_path / "w", storage=f"journal:{journal}", grace_period=GRACE)

    def trials():
        st = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return optuna.load_study(study_name="tune", storage=st).get_trials()

    for _ in range(2):
        _quiet_tune(Diverges(), **kw)
        failed = [t for t in trials() if t.state == S.FAIL]
        assert [t.user_attrs["error"] for t in failed] == ["ValueError: diverged"]
    n0 = len(trials())

    from examples.tune import worker as worker_mod
    real = worker_mod._Worker._trial_dir

    def bug(self, cand):
        if cand.key == "f/b8/x1":
            raise RuntimeError("worker bug")
        return real(self, cand)

    journal, kw = tmp_path / "k.log", dict(workdir=tmp_path / "v", storage=f"journal:{tmp_path / 'k.log'}",
                                           grace_period=GRACE)
    monkeypatch.setattr(worker_mod._Worker, "_trial_dir", bug)
    counts = []
    for _ in range(3):
        with pytest.raises(RuntimeError, match="worker bug"):
            _quiet_tune(SyntheticTrainable(), **kw)
        ts = trials()
        assert not [t for t in ts if t.state == S.RUNNING]
        counts.append(len(ts))
    assert n0 > 0 and counts[2] - counts[1] == counts[1] - counts[0] > 0   # the same release per run, no more
