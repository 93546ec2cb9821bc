"""What a study's trials say: the candidate of a trial, its rung losses, which trial stands for a
candidate, and the replay of the synchronized rule over a family/tier (its Optuna pruner).

Rung ``k``'s loss is stored in the trial's user attribute ``rung:<k>`` once the trainable returned
from that rung; a retried trial inherits it. Everything here is a pure function of the stored trials,
so every worker reaches the same decisions.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

from .promotion import Entry, rank, survivors
from .storage import _optuna
from .trainable import Candidate

optuna = _optuna()

__all__ = ["SynchronizedHalvingPruner", "CandidateHalvingPruner"]

def _candidate(ft) -> Candidate:
    a = ft.user_attrs
    return Candidate(family=a["family"], tier=int(a["tier"]), scale=float(a["scale"]),
                     lrs={k: float(v) for k, v in a["lrs"].items()},
                     origins=tuple((str(n), float(m)) for n, m in a["origins"]))


def _rung_losses(ft, n_rungs: int) -> list[float]:
    """The stored rung losses of a trial, rung 0 first, up to the first missing one."""
    out = []
    for k in range(n_rungs):
        v = ft.user_attrs.get(f"rung:{k}")
        if v is None:
            break
        out.append(float(v))
    return out


def _is_stale_fail(ft) -> bool:
    return ft.state == optuna.trial.TrialState.FAIL and "error" not in ft.user_attrs


def _live(trials) -> dict[str, object]:
    """Per candidate key, the trial that stands for it: the lowest-numbered one that is neither a
    duplicate nor a trial failed for a lost worker (its retry stands for it instead). A key whose
    only trials are such failures (its retry not enqueued yet) is stood for by the newest of them, an
    *orphan*: the synchronized rule waits for it (a rung is never decided without a candidate that
    is about to be retried), and the next sweep retries it (:func:`_orphans`)."""
    out: dict[str, object] = {}
    stale: dict[str, object] = {}
    for ft in sorted(trials, key=lambda t: t.number):
        key = ft.user_attrs.get("key")
        if key is None or "duplicate_of" in ft.user_attrs:
            continue
        if _is_stale_fail(ft):
            stale[key] = ft
        elif key not in out:
            out[key] = ft
    for key, ft in stale.items():
        out.setdefault(key, ft)
    return out


def _orphans(trials) -> list:
    """Trials failed for a lost worker whose retry was never enqueued (the worker that failed them died
    first, or is about to enqueue it): per candidate key without another trial, its newest such trial."""
    return [ft for ft in _live(trials).values() if _is_stale_fail(ft)]


def _retry_callback():
    """Optuna's re-enqueue of a lost trial, keeping its intermediate values and attributes."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cls is None:
            return optuna.storages.RetryFailedTrialCallback(inherit_intermediate_values=True)
        return cls(inherit_intermediate_values=True)


def _is_failed(ft) -> bool:
    return ft.state == optuna.trial.TrialState.FAIL


@dataclass(frozen=True)
class _GroupState:
    """Replay of the synchronized rule for one family/tier: who entered each decided rung, who survived."""
    entered: list[list[str]]      # keys that entered rung k, for every rung reached
    survived: list[list[str]]     # keys promoted at rung k, for every decided rung
    pending: int | None           # the first undecided rung, None when all are decided


def _group_state(live: Mapping[str, object], n_rungs: int) -> _GroupState:
    entered, survived = [sorted(live)], []
    for k in range(n_rungs):
        if not entered[k]:  # every candidate failed: nothing left to decide
            survived.append([])
            if k + 1 < n_rungs:
                entered.append([])
            continue
        entries = []
        for key in entered[k]:
            ft = live[key]
            losses = _rung_losses(ft, n_rungs)
            if len(losses) > k:
                entries.append(Entry(key, float(ft.user_attrs["scale"]), losses[k]))
            elif _is_failed(ft) and not _is_stale_fail(ft):  # an orphan is not failed: its retry will report
                entries.append(Entry(key, float(ft.user_attrs["scale"]), None))
            else:
                return _GroupState(entered, survived, k)
        if k == n_rungs - 1:
            survived.append([e.key for e in rank(entries)[:1] if e.loss is not None and math.isfinite(e.loss)])
        else:
            keep = [e.key for e in survivors(entries)]
            survived.append(keep)
            if k + 1 < n_rungs:
                entered.append(sorted(keep))
    return _GroupState(entered, survived, None)


def _group_of(ft) -> tuple[str, int]:
    return ft.user_attrs["family"], int(ft.user_attrs["tier"])


class SynchronizedHalvingPruner(optuna.pruners.BasePruner):
    """Optuna pruner of the paper's synchronized rule (see :mod:`examples.tune.promotion`).

    ``prune(study, trial)`` is true when the trial's last finished rung is decided and the trial is
    not among its survivors. The tuner asks only once the rung is decided (every trial of the
    family/tier reported it or failed); before that it answers ``False``.
    """

    def __init__(self, n_rungs: int) -> None:
        self.n_rungs = n_rungs

    def prune(self, study, trial) -> bool:
        """Whether ``trial`` (a ``FrozenTrial``) is out of the race at its last finished rung."""
        done = len(_rung_losses(trial, self.n_rungs))
        if done == 0:
            return False
        group = _group_of(trial)
        live = {k: t for k, t in _live(study.get_trials(deepcopy=False)).items() if _group_of(t) == group}
        state = _group_state(live, self.n_rungs)
        if state.pending is not None and state.pending < done:
            return False
        return trial.user_attrs["key"] not in state.survived[done - 1]


def _standing(trials) -> list:
    """``trials`` less those that do not stand for their candidate (:func:`_live`): duplicates, and
    trials failed for a lost worker once a retry stands for the candidate. A lost trial not retried
    yet (the sweep enqueues the retry just after, or an orphan) still stands for it: it counts once.
    A trial without a candidate key (not the tuner's) counts unless it is a duplicate or failed lost."""
    live = {ft.number for ft in _live(trials).values()}
    return [t for t in trials if (t.number in live if "key" in t.user_attrs
                                  else not _is_stale_fail(t) and "duplicate_of" not in t.user_attrs)]


class _CandidateTrials:
    """A study seen by Optuna's pruner: its trials less those that do not stand for a candidate.

    Optuna's ``SuccessiveHalvingPruner.prune`` reads the trials through ``study.get_trials`` (2.x to
    5.0); ``_get_trials`` and ``trials`` are filtered too, so a version reading them instead still sees
    each candidate once (the property test against Optuna's pruner checks the installed version)."""

    def __init__(self, study) -> None:
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _keep(self, trials) -> list:
        keep = {t.number for t in _standing(self._study.get_trials(deepcopy=False))}
        return [t for t in trials if t.number in keep]

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return self._keep(self._study.get_trials(deepcopy=deepcopy, states=states))

    def _get_trials(self, *args, **kwargs) -> list:
        return self._keep(self._study._get_trials(*args, **kwargs))

    @property
    def trials(self) -> list:
        return self.get_trials()


class CandidateHalvingPruner(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's ``SuccessiveHalvingPruner`` (ASHA) counting each candidate once at a rung.

    A trial failed for a lost worker keeps its ``completed_rung_<k>`` values and its retry inherits
    them, so Optuna's pruner counted that candidate twice in every later comparison at those rungs
    (a promotion decided against a doubled competitor). Here the failed trial is left out once its
    retry stands for the candidate (as everywhere else in the tuner, :func:`_live`), and so are
    dropped duplicates; every other trial counts as in Optuna's pruner.
    """

    def prune(self, study, trial) -> bool:
        return super().prune(_CandidateTrials(study), trial)
