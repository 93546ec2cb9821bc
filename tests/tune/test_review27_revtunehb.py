"""Review 27 (revtunehb): an adversarial review of the tuner's take-over count (tunehb).

- A retry inherits its predecessor's system attributes, ``tune:training`` too: the retry of a trial released
  (Ctrl-C) or taken over while its rung was training named that rung without its loss, so a worker lost
  after *claiming* the retry, before training it (merely holding it), was counted as lost while training
  it, against the documented rule. The value now names the trial it was written for.
- The heartbeat thread died on the first storage error of a beat (only ``UpdateFinishedTrialError`` and
  ``KeyError`` were caught): a live worker's trials then went stale and were taken over while it trained
  them, and each take-over is now counted, failing candidates for good after four.
- A pruner exception, no longer blamed on the trial asking, stopped every call with the pruner's bare
  message: it now names the trial, says it was not counted and that a rerun stops there again.
"""
import sys
import threading
import time
import warnings

import pytest

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import trials as trials_mod  # noqa: E402
from examples.tune import tuner as tuner_mod  # noqa: E402
from examples.tune import worker as worker_mod  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.tuning import quiet_tune  # noqa: E402

S = optuna.trial.TrialState
GRACE = 30.0
TAKEOVERS = getattr(worker_mod, "_TAKEOVERS", "tune:takeovers")
TRAINING = getattr(worker_mod, "_TRAINING", "tune:training")
SMALL = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10, 20], multipliers=(0.5, 1.0, 2.0))


def _config(storage: str, mode: str):
    return tuner_mod._validate(SMALL["families"], SMALL["tiers"], SMALL["reference_tier"], SMALL["rungs"], mode, 1,
                               storage, None, 2, SMALL["multipliers"], 1e-9, None)


def _worker(study, cfg, tmp_path, trainable=None, **kw):
    kw = dict(heartbeat_interval=10.0, grace_period=GRACE) | kw
    return worker_mod._Worker({None: study}, trainable or SyntheticTrainable(), cfg, tmp_path / "w",
                              poll_interval=0.01, progress=None, study_name="tune", **kw)


class InterruptsX1(SyntheticTrainable):
    """Ctrl-C while ``f/b8/x1``'s rung 0 trains: its worker releases the trial, rung 0 not stored."""

    def __call__(self, candidate, budget, **k):
        if candidate.key == "f/b8/x1":
            raise KeyboardInterrupt
        return super().__call__(candidate, budget, **k)


@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_retry_claimed_but_not_trained_by_a_lost_worker_is_not_counted(tmp_path, mode):
    """``f/b8/x1`` is released by a Ctrl-C while its rung 0 trains; its retry inherits ``tune:training`` = 0
    and no ``rung:0``. A worker claims the retry (and the others waiting) and is killed before training it
    (in the synchronized mode it may hold it while it trains another trial first). It merely held the retry,
    so the take-over is not counted; it was, as a loss while training (four such kills failed the candidate
    for good)."""
    storage = f"journal:{tmp_path / 'j.log'}"
    cfg = _config(storage, mode)
    (study,) = tuner_mod._open_studies(cfg, storage, "tune").values()
    with pytest.raises(KeyboardInterrupt):
        _worker(study, cfg, tmp_path, InterruptsX1()).run()
    (retry,) = [t for t in study.get_trials() if t.user_attrs["key"] == "f/b8/x1" and t.state == S.WAITING]
    assert TRAINING in retry.system_attrs and "rung:0" not in retry.user_attrs   # inherited from the released one
    dying = _worker(study, cfg, tmp_path)
    while (trial := worker_mod._claim(study, dying._claimed(study))) is not None:
        dying._start(study, trial)   # held, not trained: then SIGKILLed (nothing released)
    assert any(t.user_attrs["key"] == "f/b8/x1" and t.state == S.RUNNING for t in study.get_trials())
    sweeper = _worker(study, cfg, tmp_path, heartbeat_interval=0.01, grace_period=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweeper._sweep_stale(study)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == S.RUNNING]
    assert not [(t.number, t.user_attrs["key"]) for t in trials if TAKEOVERS in t.system_attrs or
                t.user_attrs.get("error")], [str(w.message) for w in caught]


def test_a_retry_taken_over_while_training_counts_once_per_loss_not_per_claim(tmp_path):
    """The retry of a trial counted as lost while training keeps the count (1) and its predecessor's
    ``tune:training``: claimed by a worker killed before training it, it was counted again (2)."""
    storage = f"journal:{tmp_path / 'j.log'}"
    cfg = _config(storage, "asynchronous")
    (study,) = tuner_mod._open_studies(cfg, storage, "tune").values()

    class Killed(BaseException):
        pass

    class DiesAtX1(SyntheticTrainable):
        def __call__(self, candidate, budget, **k):
            if candidate.key == "f/b8/x1":
                raise Killed
            return super().__call__(candidate, budget, **k)

    w = _worker(study, cfg, tmp_path, DiesAtX1())
    with pytest.raises(Killed):
        for _ in range(20):
            w._async_step()
    w.held.clear()   # (a SIGKILL: nothing released)
    w.claimed.clear()
    sweep = _worker(study, cfg, tmp_path, heartbeat_interval=0.01, grace_period=0.0)
    sweep._sweep_stale(study)
    (retry,) = [t for t in study.get_trials() if t.user_attrs["key"] == "f/b8/x1" and t.state == S.WAITING]
    assert retry.system_attrs[TAKEOVERS] == 1
    dying = _worker(study, cfg, tmp_path)
    while (trial := worker_mod._claim(study, dying._claimed(study))) is not None:
        dying._start(study, trial)
    sweep._sweep_stale(study)
    counts = [t.system_attrs.get(TAKEOVERS) for t in study.get_trials() if t.user_attrs["key"] == "f/b8/x1"]
    assert counts == [1, 1, 1], counts


def test_the_heartbeat_survives_a_storage_error(tmp_path, monkeypatch):
    """One heartbeat the storage fails to write (a full disk for a moment, a database connection dropped)
    ended the heartbeat thread for good: the worker trained on, its trials went stale, other workers took
    them over while it trained them, counting each take-over against the candidates. The next beat
    now retries."""
    storage = f"journal:{tmp_path / 'j.log'}"
    cfg = _config(storage, "synchronized")
    (study,) = tuner_mod._open_studies(cfg, storage, "tune").values()
    w = _worker(study, cfg, tmp_path, heartbeat_interval=0.01, grace_period=1.0)
    trial = worker_mod._claim(study, w._claimed(study))
    w._start(study, trial)
    real = study._storage.set_trial_system_attr
    failures = []

    def flaky(trial_id, key, value):
        if key == worker_mod._HEARTBEAT and not failures:
            failures.append(key)
            raise OSError(28, "No space left on device")
        return real(trial_id, key, value)

    monkeypatch.setattr(study._storage, "set_trial_system_attr", flaky)
    t0 = time.time()
    beat = threading.Thread(target=w._heartbeat_loop, daemon=True)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)   # (the old thread's death, unprinted)
    beat.start()
    deadline = time.monotonic() + 5.0
    try:
        while time.monotonic() < deadline:
            hb = study._storage.get_trial(trial._trial_id).system_attrs.get(worker_mod._HEARTBEAT, 0.0)
            if failures and hb > t0:
                break
            time.sleep(0.02)
        alive = beat.is_alive()
    finally:
        w.stop.set()
        beat.join(5.0)
    assert failures and alive and hb > t0, (failures, alive, hb - t0)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_pruner_exception_says_whose_decision_it_was_and_that_it_was_not_counted(tmp_path, monkeypatch, mode):
    """An exception of the pruner stops the call uncounted, and the rerun stops there again until its cause
    is fixed; the message was the pruner's bare one (``RuntimeError: pruner bug``), not saying the tuner's
    pruner raised, for which trial, or what to do."""
    def bug(self, study, trial):
        raise RuntimeError("pruner bug")

    monkeypatch.setattr(trials_mod.SynchronizedHalvingPruner, "prune", bug)
    monkeypatch.setattr(trials_mod.CandidateHalvingPruner, "prune", bug)
    with pytest.raises(RuntimeError, match="pruner bug") as info:
        quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "w", storage=f"journal:{tmp_path / 'j.log'}",
                   grace_period=GRACE, mode=mode)
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and "the pruner raised" in notes[0] and "f/b8/x" in notes[0], notes
    assert "not counted" in notes[0] and "until" in notes[0] and "\n" not in notes[0], notes


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_the_command_line_keeps_the_pruners_note(tmp_path, monkeypatch, capsys):
    """The command line prints a ``ValueError`` (or ``KeyError``, ``OSError``) as one line of the message
    alone, the form of a user error: a pruner's ``KeyError`` read ``error: scale``, the note naming the
    trial dropped."""
    from examples.tune.__main__ import main

    def bug(self, study, trial):
        raise KeyError("scale")

    monkeypatch.setattr(trials_mod.SynchronizedHalvingPruner, "prune", bug)
    rc = main(["synthetic", "--tiers", "8", "--rungs", "10", "20", "--workdir", str(tmp_path / "w"), "--quiet",
               "--storage", f"journal:{tmp_path / 'j.log'}"])
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and "error: scale; tune: the pruner raised deciding trial" in line and "not counted" in line, err


def test_training_lost_reads_only_a_value_naming_the_trial():
    """``[rung, trial id]`` of the trial itself, its rung's loss not stored: lost while training. A value
    naming another trial (inherited by a retry) or a bare rung (the first version of the count) is not."""
    study = optuna.create_study()
    t = study.ask()
    storage, tid = study._storage, t._trial_id

    def lost(value, stored=False):
        storage.set_trial_system_attr(tid, TRAINING, value)
        if stored:
            storage.set_trial_user_attr(tid, "rung:1", 0.5)
        return worker_mod._training_lost(storage.get_trial(tid))

    assert lost([1, tid]) and not lost([1, tid + 1]) and not lost(1) and not lost(None)
    assert not lost([1, tid], stored=True)


_ORPHAN_SCRIPT = """
import os, sys, time
sys.path[:0] = {path!r}
import examples.tune.tuner as t
from examples.tune.synthetic import SyntheticTrainable

watch = t.exit_with_parent
t.exit_with_parent = lambda parent, **k: None   # armed below, once the worker trains


class Orphaned(SyntheticTrainable):
    # while it trains, its tune() process is killed (SIGKILL: the worker sees only that its parent is gone)
    def __call__(self, candidate, budget, **k):
        watch(-1, interval=0.01)
        time.sleep(30)


cfg = t._validate({{"f": {{"lr": 1.0}}}}, [8], 8, [10, 20], "synchronized", 1, {storage!r}, None, 2, (0.5, 1.0, 2.0),
                  1e-9, None)
t._worker_main(Orphaned(), cfg, {storage!r}, "tune", {workdir!r}, 10.0, 60.0, 0.01, parent=os.getppid())
"""


@pytest.mark.slow  # ~3-12 s: a real process importing Optuna
def test_a_worker_whose_tune_process_died_releases_its_trial_uncounted(tmp_path):
    """The out-of-memory killer (or ``kill -9``) ends ``tune()``'s process while a spawned worker trains a
    candidate; the worker, seeing its parent gone, ended at once (``os._exit``) and left that candidate's
    trial to the heartbeat, which now counts it as lost while training: every kill of ``tune()`` counted
    against each spawned worker's candidate (four, and an innocent candidate was failed for good). It now
    releases its trials as on ``tune()``'s SIGTERM: failed as lost, re-enqueued, uncounted."""
    import subprocess

    storage = f"journal:{tmp_path / 'j.log'}"
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT.format(path=sys.path, storage=storage, workdir=str(tmp_path / "w")))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    storage_ = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log")))
    (study,) = storage_.get_all_studies()
    trials = storage_.get_all_trials(study._study_id)
    assert not [t.number for t in trials if t.state == S.RUNNING]
    (lost,) = [t for t in trials if t.state == S.FAIL]
    assert TAKEOVERS not in lost.system_attrs and "error" not in lost.user_attrs
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == lost.number] == [S.WAITING]
