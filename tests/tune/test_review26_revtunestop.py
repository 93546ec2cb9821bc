"""Review 26 (revtunestop): adversarial review of the tuner's stop, signal and crash-limit changes.

- A storage write of the trainable's ``report()`` that fails (a full disk, a database gone away) failed
  the candidate for good, as if its training had: the study went on and chose without it (a whole
  family/tier's candidates failed during an outage). It now stops the worker, as a storage error
  outside the trainable does; the trial is released, and a rerun resumes it.
- Storage and file-system errors (``OSError``, Optuna's ``StorageInternalError``) are not crashes of
  the candidate: they were counted, and four of them failed the candidate for good.
- A candidate failed for crashing its worker was dropped from the choice in silence on every later
  run (the warning came once, in the run that failed it): the result names it and a warning says the
  choice of its family/tier was made without it.
- ``_stop_workers``: a Ctrl-C while the workers were being sent SIGTERM left the rest running.
"""
import errno
import signal
import warnings
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune  # noqa: E402
from examples.tune import tuner as tuner_mod  # noqa: E402
from examples.tune import worker as worker_mod  # noqa: E402
from examples.tune.synthetic import SyntheticTrainable  # noqa: E402
from support.tuning import journal_trials, outcome, quiet_tune  # noqa: E402

S = optuna.trial.TrialState
GRACE = 30.0
LIMIT = worker_mod._MAX_CRASH_RETRIES
CRASHES = worker_mod._CRASHES
SMALL = dict(families={"f": {"lr": 1.0}}, tiers=[8], reference_tier=8, rungs=[10, 20], multipliers=(0.5, 1.0, 2.0))


_trials = journal_trials


def _kw(tmp_path) -> dict:
    return dict(workdir=tmp_path / "w", storage=f"journal:{tmp_path / 'j.log'}", grace_period=GRACE)


# ---------------------------------------------------------------- storage errors are not the candidate's fault

@pytest.mark.parametrize("mode", ["synchronized", "asynchronous"])
def test_a_storage_error_in_report_stops_the_call_and_fails_no_candidate(tmp_path, monkeypatch, mode):
    """The journal's write of one report fails (disk full): the call stops with that error (one line from
    the command line, status 2), no candidate is failed or counted as crashed, nothing is left RUNNING,
    and the rerun ends as an uninterrupted tuning. It used to fail the candidate for good (its ``error``:
    the storage's), and the study chose without it."""
    cfg = dict(SMALL, mode=mode)
    real = optuna.storages.JournalStorage.set_trial_intermediate_value
    hit = []

    def disk_full(self, trial_id, step, value):
        if not hit and step > 0:
            hit.append(trial_id)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, trial_id, step, value)

    with monkeypatch.context() as m:
        m.setattr(optuna.storages.JournalStorage, "set_trial_intermediate_value", disk_full)
        with pytest.raises(OSError, match="No space left"):
            quiet_tune(SyntheticTrainable(), cfg=cfg, **_kw(tmp_path))
    assert hit
    trials = _trials(tmp_path / "j.log")
    assert not [t.number for t in trials if t.user_attrs.get("error") or CRASHES in t.system_attrs]
    assert not [t.number for t in trials if t.state == S.RUNNING]      # released on the way out
    res = quiet_tune(SyntheticTrainable(), cfg=cfg, **_kw(tmp_path))
    assert not [s for s in res.trials if s.state == "failed"] and ("f", 8) in res.choices
    if mode == "synchronized":   # (ASHA's promotions depend on the order trials report in)
        assert outcome(res) == outcome(quiet_tune(SyntheticTrainable(), cfg=cfg, workdir=tmp_path / "ref"))


def test_a_storage_error_in_a_report_the_trainable_swallowed_stops_the_call_too(tmp_path, monkeypatch):
    """A trainable that catches the failed report and trains on (it returns normally) left the trial with
    a hole in its reports (or failed it for a missing rung report): the worker stops all the same."""
    real_call = SyntheticTrainable.__call__
    real = optuna.storages.JournalStorage.set_trial_intermediate_value
    hit = []

    def swallowing(self, candidate, budget, *, report, **k):
        def lenient(resource, loss):
            try:
                report(resource, loss)
            except OSError:
                pass
        return real_call(self, candidate, budget, report=lenient, **k)

    def disk_full(self, trial_id, step, value):
        if not hit and step > 0:
            hit.append(trial_id)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, trial_id, step, value)

    with monkeypatch.context() as m:
        m.setattr(SyntheticTrainable, "__call__", swallowing)
        m.setattr(optuna.storages.JournalStorage, "set_trial_intermediate_value", disk_full)
        with pytest.raises(OSError, match="No space left"):
            quiet_tune(SyntheticTrainable(), cfg=SMALL, **_kw(tmp_path))
    trials = _trials(tmp_path / "j.log")
    assert hit and not [t.number for t in trials if t.user_attrs.get("error") or t.state == S.RUNNING]
    ref = quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "ref")
    assert outcome(quiet_tune(SyntheticTrainable(), cfg=SMALL, **_kw(tmp_path))) == outcome(ref)


def test_a_report_taken_over_by_another_worker_lets_the_trial_go(tmp_path, monkeypatch):
    """A report refused because another worker took the trial over (our heartbeat was late) is no
    storage failure: the trial is let go (its retry trains on), with the take-over warning, and the
    call goes on (a guard for the storage-error path above)."""
    real = optuna.storages.JournalStorage.set_trial_intermediate_value
    hit = []

    def taken_over(self, trial_id, step, value):
        if not hit and step > 0:
            hit.append(trial_id)
            self.set_trial_state_values(trial_id, state=S.FAIL)      # as another worker's sweep
            return real(self, trial_id, step, value)                  # refused: the trial is finished
        return real(self, trial_id, step, value)

    monkeypatch.setattr(optuna.storages.JournalStorage, "set_trial_intermediate_value", taken_over)
    with pytest.warns(UserWarning, match="by another worker"):
        res = tune(SyntheticTrainable(), **SMALL, **_kw(tmp_path), progress=False)
    assert hit and not [s for s in res.trials if s.error]


@pytest.mark.parametrize("error", [OSError(errno.EACCES, "Permission denied"),
                                   optuna.exceptions.StorageInternalError("database gone away")],
                         ids=["OSError", "StorageInternalError"])
def test_storage_and_file_errors_are_not_counted_as_crashes(tmp_path, monkeypatch, error):
    """The worker's own file or storage operation fails at the same candidate on more runs than the crash
    limit (a directory it cannot write, a database outage): every run stops with the error, and the
    candidate is released uncounted each time (the cause lies outside the candidate, and failing it for
    good would cost the user the study); the rerun once it is fixed ends as an uninterrupted tuning."""
    real = worker_mod._Worker._trial_dir

    def broken(self, cand):
        if cand.key == "f/b8/x1":
            raise error
        return real(self, cand)

    with monkeypatch.context() as m:
        m.setattr(worker_mod._Worker, "_trial_dir", broken)
        for _ in range(LIMIT + 1):
            with pytest.raises(type(error)):
                quiet_tune(SyntheticTrainable(), cfg=SMALL, **_kw(tmp_path))
    trials = _trials(tmp_path / "j.log")
    assert not [t.number for t in trials if t.user_attrs.get("error") or CRASHES in t.system_attrs]
    ref = quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "ref")
    assert outcome(quiet_tune(SyntheticTrainable(), cfg=SMALL, **_kw(tmp_path))) == outcome(ref)


# ---------------------------------------------------------------- a candidate failed for crashing is named

def test_a_candidate_failed_for_crashing_is_named_whenever_the_choice_is_made(tmp_path, monkeypatch):
    """After the crash limit failed a candidate, each later run (the one finishing the study, and any
    rerun of the finished study, e.g. the main job's tuning step) chose among the others without a word:
    its grid had a hole (the best rate could be the untried one). The result lists it (``crashed``) and
    a warning names it, its family/tier and the choice made without it."""
    real = worker_mod._Worker._trial_dir

    def bug(self, cand):
        if cand.key == "f/b8/x2":
            raise RuntimeError("worker bug")
        return real(self, cand)

    with monkeypatch.context() as m:
        m.setattr(worker_mod._Worker, "_trial_dir", bug)
        for _ in range(LIMIT + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(RuntimeError, match="worker bug"):
                    tune(SyntheticTrainable(), **SMALL, **_kw(tmp_path), progress=False)
    for _ in range(2):   # the run finishing the study, then a rerun of the finished study
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = tune(SyntheticTrainable(), **SMALL, **_kw(tmp_path), progress=False)
        said = [str(w.message) for w in caught if "crashed its worker" in str(w.message)]
        assert len(said) == 1 and said[0].count("\n") == 0, said
        assert "f/b8/x2" in said[0] and "f/b8" in said[0] and res.choices[("f", 8)].key in said[0]
        assert res.crashed == ["f/b8/x2"]
    clean = quiet_tune(SyntheticTrainable(), cfg=SMALL, workdir=tmp_path / "ref")
    assert clean.crashed == []


# ---------------------------------------------------------------- stopping the spawned workers

class _Proc:
    """A spawned worker stand-in: ``terminate`` of the first raises ``KeyboardInterrupt`` (a second Ctrl-C
    while tune() sends SIGTERM); ``join`` ends it at once once killed or terminated."""

    def __init__(self, log, ctrl_c_in_terminate=False):
        self.log, self.ctrl_c, self.exitcode = log, ctrl_c_in_terminate, None

    def terminate(self):
        self.log.append(("terminate", self))
        if self.ctrl_c:
            self.ctrl_c = False
            raise KeyboardInterrupt

    def kill(self):
        self.log.append(("kill", self))
        self.exitcode = -signal.SIGKILL

    def join(self, timeout=None):
        if timeout is None:
            assert self.exitcode is not None, "join() without a timeout on a worker never stopped: tune() hangs"
        if ("terminate", self) in self.log:
            self.exitcode = self.exitcode if self.exitcode is not None else 130


def test_a_ctrl_c_while_the_workers_are_sent_sigterm_still_stops_every_one():
    """A second Ctrl-C while ``_stop_workers`` sent the first worker its SIGTERM: the others were never
    stopped (left training the study, unseen, as long as the process that called tune() lived). Now
    every one is stopped (killed at once) before the stop returns."""
    log = []
    procs = [_Proc(log, ctrl_c_in_terminate=True), _Proc(log), _Proc(log)]
    try:
        tuner_mod._stop_workers(procs, timeout=5.0)
    except KeyboardInterrupt:   # (the old code let it out: tune() then raised it instead of its first exception)
        pass
    assert all(p.exitcode is not None for p in procs), log


# ---------------------------------------------------------------- the command line

def test_cli_a_storage_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A database gone away mid-run (Optuna's ``StorageInternalError``; a storage error in a report now
    stops the call instead of failing the candidate) is the user's to fix, like a full disk: one line
    naming it, status 2, not a traceback."""
    from examples.tune.__main__ import main

    def gone(*args, **kwargs):
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.\n(connection lost)")

    monkeypatch.setattr(tuner_mod, "tune", gone)
    try:
        rc = main(["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", str(tmp_path / "w"), "--quiet"])
    except optuna.exceptions.StorageInternalError:
        pytest.fail("the command let a storage error through (a traceback)")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "error: storage:" in err and "connection lost" in err
    monkeypatch.setattr(tuner_mod, "tune", lambda *a, **k: 1 / 0)   # a bug stays a traceback
    with pytest.raises(ZeroDivisionError):
        main(["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", str(tmp_path / "w"), "--quiet"])


def test_cli_ctrl_c_while_starting_up_is_one_line(tmp_path, capsys, monkeypatch):
    """``python -m examples.tune`` spent its first seconds importing torch (through ``examples.tune``'s
    choices module, before ``main()`` ran): a Ctrl-C then printed a KeyboardInterrupt traceback and a SIGTERM
    ended it without a word. The package now imports no torch, so that happens inside ``main()``, where
    Ctrl-C anywhere (importing, parsing, printing the result) is one line with status 130."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    probe = ("import sys, examples.tune.__main__; "
             "print(sorted(m for m in ('torch', 'spectral_lens', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
    import examples.tune.__main__ as cli

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_parser", ctrl_c)
    try:
        rc = cli.main(["synthetic", "--tiers", "8", "--rungs", "30", "--workdir", str(tmp_path / "w")])
    except KeyboardInterrupt:
        pytest.fail("the command let KeyboardInterrupt through (a traceback)")
    err = capsys.readouterr().err.strip()
    assert rc == 130 and len(err.splitlines()) == 1 and "interrupted" in err
