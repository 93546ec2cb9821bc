"""Adversarial review (session 25) of the tuner's audit: the asynchronous pruner against Optuna's own
on random report histories, a trial lost between its rung report and the pruner's decision, and the
journal's torn-tail cut while another process appends."""
import json
import multiprocessing as mp
import os
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

optuna = pytest.importorskip("optuna", reason="examples.tune needs the tune extra: pip install -e '.[tune]'")

from examples.tune import tune
from examples.tune.synthetic import SyntheticTrainable
from examples.tune.trials import CandidateHalvingPruner, _retry_callback
from examples.tune.worker import _claim, _Worker

S = optuna.trial.TrialState
STEPS = (1, 2, 4, 8)            # report steps: the pruner's rungs are at 1, 2, 4 (min_resource 1, factor 2)
KW = dict(min_resource=1, reduction_factor=2, min_early_stopping_rate=0)


class _Sim:
    """One study driven by a report history: candidate ``i``'s current trial, its next report step."""

    def __init__(self, pruner) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(pruner=pruner)
        self.trial: dict[int, object] = {}
        self.next: dict[int, int] = {}
        self.orphan: dict[int, object] = {}

    def start(self, i: int) -> None:
        self.trial[i], self.next[i] = self.study.ask(), 0
        self.trial[i].set_user_attr("key", f"c{i}")   # as the tuner's enqueued trials (a retry inherits it)

    def lose(self, i: int, duplicate: bool, retry: bool = True) -> None:
        """The worker of candidate ``i`` is lost mid-rung: another worker's sweep fails its trial (no
        ``error``) and re-enqueues it with its reports and attributes; the retry is claimed. With
        ``duplicate``, a second sweep re-enqueued it too, and that copy was dropped as a duplicate.
        Without ``retry``, the failing worker died before re-enqueueing it (an orphan, see ``retry``)."""
        storage, t = self.study._storage, self.trial[i]
        assert storage.set_trial_state_values(t._trial_id, state=S.FAIL)
        self.orphan[i] = storage.get_trial(t._trial_id)
        if retry:
            self.retry(i, duplicate)

    def retry(self, i: int, duplicate: bool = False) -> None:
        """The re-enqueueing of candidate ``i``'s lost trial (by the failing worker, or the next sweep)."""
        lost = self.orphan.pop(i)
        _retry_callback()(self.study, lost)
        self.trial[i] = _claim(self.study)
        if duplicate:
            _retry_callback()(self.study, lost)
            dup = _claim(self.study)
            dup.set_user_attr("duplicate_of", self.trial[i].number)
            self.study.tell(dup, state=S.FAIL)

    def step(self, i: int, value: float, error: bool) -> str:
        """Candidate ``i`` reports its next rung; the pruner decides (the last rung completes)."""
        t, k = self.trial[i], self.next[i]
        if error:  # the trainable raised: the tuner records the error, then fails the trial
            t.set_user_attr("error", "TrialFailed: boom")
            self.study.tell(t, state=S.FAIL)
            return "failed"
        t.report(value, STEPS[k])
        self.next[i] = k + 1
        if k + 1 == len(STEPS):
            self.study.tell(t, value)
            return "complete"
        if t.should_prune():
            self.study.tell(t, state=S.PRUNED)
            return "pruned"
        return "promoted"


# each event: (which running candidate acts, its loss (4.0 after a first rung: it fails with an error
# instead), its worker lost during this rung, its retry re-enqueued twice, or not re-enqueued until the
# candidate's next event (an orphan meanwhile: this event reports nothing))
_events = st.lists(st.tuples(st.integers(0, 9), st.sampled_from([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]),
                             st.booleans(), st.booleans(), st.booleans()),
                   min_size=1, max_size=60)


def _replay(events, n_candidates, lose: bool, errors: bool):
    """Decisions of Optuna's pruner (no lost worker) and of the tuner's (with lost workers when ``lose``)."""
    ref, ours = _Sim(optuna.pruners.SuccessiveHalvingPruner(**KW)), _Sim(CandidateHalvingPruner(**KW))
    for sim in (ref, ours):
        for i in range(n_candidates):
            sim.start(i)
    running = list(range(n_candidates))
    got, want = [], []
    for pick, value, lost, dup, orphan in events:
        if not running:
            break
        i = running[pick % len(running)]
        error = errors and value == 4.0 and ref.next[i] > 0   # a failure after reporting some rungs
        if i in ours.orphan:
            ours.retry(i)
        if lose and lost and orphan:
            ours.lose(i, dup, retry=False)
            continue
        if lose and lost:
            ours.lose(i, dup)
        want.append((i, ref.step(i, value, error)))
        got.append((i, ours.step(i, value, error)))
        if got[-1] != want[-1]:
            break
        if want[-1][1] != "promoted":
            running.remove(i)
    return got, want


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=_events, n_candidates=st.integers(1, 10))
def test_without_lost_workers_the_pruner_decides_as_optunas(events, n_candidates):
    """No trial lost (failures with an error included): every decision is Optuna's own."""
    got, want = _replay(events, n_candidates, lose=False, errors=True)
    assert got == want


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=_events, n_candidates=st.integers(1, 10))
# Optuna's pruner counts candidate 2's rung-0 loss 3.0 twice (lost trial and retry): candidate 0's 3.0
# then ties the bar (top 2 of 4) and is promoted; counted once it is pruned (top 1 of 3 is 1.0)
@example(events=[(2, 3.0, False, False, False), (1, 1.0, False, False, False), (2, 2.0, True, False, False),
                 (0, 3.0, False, False, False)], n_candidates=3)
def test_with_lost_workers_the_pruner_decides_as_optuna_on_the_uninterrupted_history(events, n_candidates):
    """Trials lost mid-rung (and retried, some retried twice and dropped as duplicates): every
    decision is the one Optuna's pruner takes when no worker was lost (the candidate counted once)."""
    got, want = _replay(events, n_candidates, lose=True, errors=True)
    assert got == want


# ---------------------------------------------------------------- lost between the rung report and the decision

def test_a_trial_lost_between_its_rung_loss_and_the_pruners_decision_is_still_decided(tmp_path, monkeypatch):
    """Asynchronous mode: the worker stored rung 0's loss, then its trial was failed by another
    worker before the pruner was asked (late heartbeats). The retry inherits ``rung:0`` but not the
    pruner's ``completed_rung_0``, and went straight on to rung 1: rung 0 was never decided for the
    candidate (reference: pruned there), which trained a rung more and was then compared at rung 0
    with its rung-1 loss. Now a retry asks the pruner first, and the run ends as an uninterrupted one."""
    cfg = dict(families={"f": {"lr": 1e-3}}, tiers=[8], reference_tier=8, rungs=[10, 20, 40], mode="asynchronous",
               progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = tune(SyntheticTrainable(), workdir=tmp_path / "ref", **cfg)
    key = "f/b8/x2"
    assert [(s.state, len(s.rung_losses)) for s in ref.trials if s.candidate.key == key] == [("pruned", 1)]

    original, lost = _Worker._train_rung, []

    def train_rung_then_lost(self, study, trial, cand, k):
        ok = original(self, study, trial, cand, k)
        if ok and cand.key == key and k == 0 and not lost:   # another worker's sweep, just now
            lost.append(trial.number)
            study._storage.set_trial_state_values(trial._trial_id, state=S.FAIL)
            _retry_callback()(study, study._storage.get_trial(trial._trial_id))
        return ok

    monkeypatch.setattr(_Worker, "_train_rung", train_rung_then_lost)
    storage = f"journal:{tmp_path}/j.log"
    with pytest.warns(UserWarning, match="taken over by another worker"):
        res = tune(SyntheticTrainable(), workdir=tmp_path / "w", storage=storage, **cfg)
    assert lost
    assert [(s.candidate.key, s.state, s.rung_losses) for s in res.trials] == \
        [(s.candidate.key, s.state, s.rung_losses) for s in ref.trials]
    assert res.choices == ref.choices


# ---------------------------------------------------------------- the journal's torn-tail cut, concurrently

def _plain_optuna_appender(path: str, tag: str, n: int, go) -> None:
    """Another process appending through Optuna's own backend (its lock, its ``ab`` writes)."""
    from optuna.storages.journal import JournalFileBackend

    backend = JournalFileBackend(path)
    go.wait()
    for i in range(n):
        backend.append_logs([{"op_code": 99, "who": tag, "i": i, "pad": "x" * (i % 200)}])


@pytest.mark.slow
def test_the_torn_tail_cut_loses_no_line_of_a_process_appending_meanwhile(tmp_path):
    """The cut runs under the lock Optuna's writers take: while a plain Optuna process appends
    (it does not cut), ours cuts torn tails (left, under the lock, as by a writer killed mid-line)
    and appends. Every line of the journal is one JSON operation, and none of either process is lost."""
    from examples.tune.storage import _journal_backend

    path = tmp_path / "tune.log"
    ours = _journal_backend(path)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    n = 300
    other = ctx.Process(target=_plain_optuna_appender, args=(str(path), "other", n, go))
    other.start()
    try:
        go.set()
        for i in range(n):
            if i % 3 == 0:  # a writer killed mid-append: a line without its newline, left under the lock
                ours._lock.acquire()
                try:
                    with open(path, "ab") as f:
                        f.write(b'{"op_code":8,"torn":' + str(i).encode())
                finally:
                    ours._lock.release()
            ours.append_logs([{"op_code": 99, "who": "ours", "i": i}])
        other.join(120)
    finally:
        if other.is_alive():
            other.terminate()
    assert other.exitcode == 0
    data = path.read_bytes()
    assert data.endswith(b"\n")
    ops = [json.loads(line) for line in data.splitlines()]
    for who in ("ours", "other"):
        assert sorted(o["i"] for o in ops if o.get("who") == who) == list(range(n)), who
    assert not any("torn" in o for o in ops)
    # Optuna's reader replays it all
    from optuna.storages.journal import JournalFileBackend

    assert len(list(JournalFileBackend(str(path)).read_logs(0))) == len(ops) == 2 * n
    assert not os.path.exists(str(path) + ".lock")


def test_the_pruners_view_of_the_study_filters_every_way_of_reading_trials():
    """``CandidateHalvingPruner`` hands Optuna's pruner a study whose ``get_trials`` leaves out lost
    trials and duplicates; ``_get_trials`` (Optuna's cached reader) and ``trials`` were passed through
    unfiltered, so an Optuna version reading those would count a lost candidate twice again."""
    from examples.tune.trials import _CandidateTrials

    sim = _Sim(CandidateHalvingPruner(**KW))
    for i in range(2):
        sim.start(i)
    sim.step(0, 1.0, False)
    sim.lose(0, duplicate=True)
    view = _CandidateTrials(sim.study)
    want = [t.number for t in sim.study.get_trials() if t.state == S.RUNNING]
    assert [t.number for t in view.get_trials(deepcopy=False)] == want
    assert [t.number for t in view._get_trials(deepcopy=False)] == want
    assert [t.number for t in view.trials] == want
    assert view.direction == sim.study.direction and view._storage is sim.study._storage


def test_a_lost_trial_not_yet_retried_still_counts_once():
    """Between a sweep failing a lost trial and re-enqueueing it (or until the next sweep, if the
    failing worker died in between: an *orphan*), the candidate has no other trial. The pruner left
    the failed trial out all the same, so the candidate was not counted at all: a trial that the
    uninterrupted history prunes was promoted. Now a lost trial is left out only once a retry stands
    for its candidate."""
    def decide(lose: bool, pruner):
        sim = _Sim(pruner)
        for i in range(3):
            sim.start(i)
        assert sim.step(0, 1.0, False) == "promoted"
        assert sim.step(1, 3.0, False) == "pruned"
        if lose:
            sim.lose(0, duplicate=False, retry=False)
        return sim.step(2, 2.0, False)

    assert decide(False, optuna.pruners.SuccessiveHalvingPruner(**KW)) == "pruned"   # 2.0 vs 1.0, 3.0: top 1 of 3
    assert decide(True, optuna.pruners.SuccessiveHalvingPruner(**KW)) == "pruned"
    assert decide(True, CandidateHalvingPruner(**KW)) == "pruned"


# ---------------------------------------------------------------- the new refusals refuse nothing valid

@pytest.mark.parametrize("rungs, min_resource", [((10, 20, 40), 20), ((10, 20, 40), 15), ((40,), None), ((40,), 40)])
def test_asynchronous_min_resource_up_to_the_last_rung_asked_is_accepted(tmp_path, rungs, min_resource):
    """``min_resource`` at the last rung the pruner is asked at (or between rungs), and a single rung
    (the pruner is never asked), still run."""
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = tune(SyntheticTrainable(), families={"f": {"lr": np.float32(1e-3), "head": np.float64(2e-3)}},
                   tiers=[8], reference_tier=8, rungs=rungs, mode="asynchronous", min_resource=min_resource,
                   workdir=tmp_path, progress=False)
    assert res.choices and not res.missing


# ---------------------------------------------------------------- what the cut relies on

def test_a_last_line_complete_but_for_its_newline_was_never_applied_so_cutting_it_loses_nothing(tmp_path):
    """The cut drops a last line without its newline even when it is valid JSON (cut one byte short).
    That is safe only because Optuna's reader never applies such a line (its writer had not
    returned): pinned here, for the installed Optuna."""
    from examples.tune.storage import open_storage

    log = tmp_path / "tune.log"
    study = optuna.create_study(storage=open_storage(f"journal:{log}"), study_name="s")
    before = log.read_bytes()
    study.set_user_attr("a", 1)
    op = log.read_bytes()[len(before):]
    assert op.endswith(b"\n") and json.loads(op)["user_attr"] == {"a": 1}
    log.write_bytes(before + op[:-1])   # the writer was killed just before its newline
    fresh = optuna.load_study(study_name="s", storage=open_storage(f"journal:{log}"))
    assert "a" not in fresh.user_attrs   # never applied by a reader
    fresh.set_user_attr("b", 2)
    assert log.read_bytes().startswith(before) and b'"a"' not in log.read_bytes()
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{log}"))
    assert again.user_attrs == {"b": 2}
