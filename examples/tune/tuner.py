"""The tuner: every candidate is an Optuna trial, trained rung by rung by one or more workers.

``tune`` enqueues one trial per candidate (fixed parameter ``lr_scale``; the candidate in user
attributes) and runs a worker loop; extra workers are processes (``n_workers``) or other machines
running the same call against the same storage. Two modes:

- ``"synchronized"`` (the paper's rule, App. B.3): one study; a worker that finished rung ``k`` of a
  trial *holds* the trial (state RUNNING) until every trial of its family/tier has a rung-``k`` loss
  or has failed; then ``trial.should_prune()`` asks :class:`SynchronizedHalvingPruner`, which
  replays :func:`~examples.tune.promotion.survivors` over the stored rung losses. Every worker
  reaches the same decision from the same storage, so no decision has to be communicated.
- ``"asynchronous"`` (ASHA proper): one study per family/tier (Optuna's pruner compares every trial
  of a study, so separate studies keep tiers from pruning each other), each with
  ``SuccessiveHalvingPruner(min_resource, reduction_factor, min_early_stopping_rate=0)``; a trial
  runs rung after rung and stops as soon as the pruner says so.

Fault tolerance: a worker writes a heartbeat (system attribute ``tune:heartbeat``) for the trials
it holds; a RUNNING trial whose heartbeat is older than ``grace_period`` seconds is failed by any
other worker and re-enqueued with its intermediate values and rung losses
(``RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)``; ``RetryFailedTrialCallback``
before Optuna 4.9), so the retry continues from the
candidate's checkpoint in ``workdir`` and never retrains a finished rung. A worker stopping on an
exception (Ctrl-C; SIGTERM in a spawned worker or in the command line's process) does the same to its
own trials on its way out, so a rerun need not wait ``grace_period`` for them; a crash of the worker's
own code counts against the trial it was working on, which is failed after ``_MAX_CRASH_RETRIES``
retries, and so does a take-over of a trial whose worker went silent while training it (an OOM kill on
every rerun; ``_MAX_TAKEOVER_RETRIES``) (:mod:`examples.tune.worker`). The spawned workers stamp the
trials they claim, so the ones ``tune()`` has to kill on its way out have their trials released at
once, uncounted, rather than left to the heartbeat.
"""
import contextlib
import dataclasses
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .candidates import PAPER_MULTIPLIERS, candidate_set
from .choices import write_choices
from .progress import Progress, summary_table
from .promotion import Entry, rank
from .storage import _optuna, _scheme, is_single_worker, open_storage
from .trainable import Candidate, Trainable
from .trials import (CandidateHalvingPruner, SynchronizedHalvingPruner, _candidate, _group_of, _group_state, _live,
                     _orphans, _retry_callback, _rung_losses)
from .worker import TrialFailed, _crashed_out, _release_owned, _Worker

optuna = _optuna()

__all__ = ["tune", "TuneResult", "TrialSummary", "SynchronizedHalvingPruner", "TrialFailed", "MODES"]

MODES = ("synchronized", "asynchronous")


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class TrialSummary:
    """One candidate's outcome.

    Attributes:
        number: the Optuna trial number standing for the candidate.
        candidate: the candidate.
        state: ``"complete"``, ``"pruned"``, ``"failed"``, ``"running"`` or ``"waiting"``.
        rung_losses: validation loss at each finished rung (last report at or before the rung budget).
        extrapolated_loss: power-law prediction at ``extrapolate_to`` (diagnostic only; NaN if none).
        error: why the trial failed, else ``None``.
    """

    number: int
    candidate: Candidate
    state: str
    rung_losses: tuple[float, ...]
    extrapolated_loss: float
    error: str | None


@dataclass
class TuneResult:
    """What :func:`tune` returns.

    Attributes:
        choices: the chosen candidate per ``(family, tier)`` (lowest final-rung loss; ties to the
            smaller scale). A family/tier whose candidates all failed is missing and listed in ``missing``.
        losses: the chosen candidate's final-rung validation loss per ``(family, tier)``.
        trials: every candidate's :class:`TrialSummary`, by family, tier and scale.
        survivors: synchronized mode: the keys promoted at each rung per ``(family, tier)``.
        missing: family/tiers without a choice.
        mode, study_name, storage: how the study ran.
        choices_path: where the choices file was written.
        at_edge: ``(family, tier) -> "lowest" | "highest"`` for a choice that is the smallest or the
            largest candidate of its family/tier (of two or more): the best rate may lie beyond the
            grid; widen the multipliers. Also warned about, shown in the table and in the choices file.
        crashed: keys of the candidates failed for crashing their worker, or losing it while training
            them, too often (never tuned: their family/tier's choice was made without them); warned about
            on every call.
    """

    choices: dict[tuple[str, int], Candidate]
    losses: dict[tuple[str, int], float]
    trials: list[TrialSummary]
    survivors: dict[tuple[str, int], list[list[str]]]
    missing: list[tuple[str, int]]
    mode: str
    study_name: str
    storage: str | None
    choices_path: Path
    rungs: tuple[int, ...] = field(default=())
    at_edge: dict[tuple[str, int], str] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The summary table (one line per candidate) printed at the end of :func:`tune`."""
        return summary_table(self)

# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class _Config:
    families: dict[str, dict[str, float]]
    tiers: tuple[int, ...]
    reference_tier: int
    rungs: tuple[int, ...]
    multipliers: tuple[float, ...]
    rel_tol: float
    mode: str
    min_resource: int
    reduction_factor: int
    extrapolate_to: int
    trainable: dict | None = None  # the trainable's settings (dataclass fields), checked on resume

    def as_attr(self) -> dict:
        return dict(families=self.families, tiers=list(self.tiers), reference_tier=self.reference_tier,
                    rungs=list(self.rungs), multipliers=list(self.multipliers), rel_tol=self.rel_tol, mode=self.mode,
                    min_resource=self.min_resource, reduction_factor=self.reduction_factor)

    def candidates(self) -> list[Candidate]:
        out = []
        for family, lrs in self.families.items():
            for tier in self.tiers:
                cs = candidate_set(family, tier, reference_tier=self.reference_tier, reference_lrs=lrs,
                                   multipliers=self.multipliers, rel_tol=self.rel_tol)
                out.extend(cs)
        keys = [c.key for c in out]
        if len(set(keys)) != len(keys):
            clash = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"tune: candidates {clash} share a key (scales equal to 4 significant digits); "
                             "use multipliers further apart")
        return out


def _json_value(v):
    """A JSON stand-in for a field value: sets sorted (their order varies between processes), else ``str``."""
    return sorted(map(str, v)) if isinstance(v, (set, frozenset)) else str(v)


def _describe_trainable(trainable) -> dict | None:
    """A dataclass trainable's type and fields as JSON values (``None`` for any other trainable), less the
    fields its class names in ``resume_ignores`` (settings that do not change results, e.g. a demo's sleep)."""
    if not dataclasses.is_dataclass(trainable) or isinstance(trainable, type):
        return None
    ignored = set(getattr(type(trainable), "resume_ignores", ()))
    out = {"type": f"{type(trainable).__module__}.{type(trainable).__qualname__}"}
    for f in dataclasses.fields(trainable):
        if f.name not in ignored:
            out[f.name] = json.loads(json.dumps(getattr(trainable, f.name), default=_json_value))
    return out


def _validate(families, tiers, reference_tier, rungs, mode, n_workers, storage, min_resource, reduction_factor,
              multipliers, rel_tol, extrapolate_to, heartbeat_interval=10.0, grace_period=60.0) -> _Config:
    if mode not in MODES:
        raise ValueError(f"tune: mode={mode!r}; expected one of {MODES}")
    if not isinstance(families, Mapping) or not families:
        raise ValueError("tune: empty candidate set: families is empty (expected family -> {group: reference lr})")
    fam = {}
    for name, lrs in families.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"tune: family name {name!r} must be a non-empty string without '/'")
        if not isinstance(lrs, Mapping) or not lrs:
            raise ValueError(f"tune: empty candidate set: family {name!r} has no reference rates ({lrs!r})")
        for g, v in lrs.items():  # float() would take True for 1.0 and "3e-4" for a rate; "abc" named nothing
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"tune: family {name!r} group {g!r} has reference rate {v!r}; expected a finite "
                                 "rate > 0 (a number)")
        fam[name] = {str(g): float(v) for g, v in lrs.items()}
    tiers = tuple(tiers)
    if not tiers:
        raise ValueError("tune: empty candidate set: no tiers")
    for t in tiers:
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(f"tune: tier {t!r} must be a positive int")
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"tune: tiers {tiers} repeat a tier")
    if isinstance(reference_tier, bool) or not isinstance(reference_tier, int) or reference_tier <= 0:
        raise ValueError(f"tune: reference_tier {reference_tier!r} must be a positive int")
    rungs = tuple(rungs)
    if not rungs or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in rungs) \
            or any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"tune: rungs {rungs!r} must be strictly increasing positive int budgets (cumulative)")
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"tune: n_workers={n_workers!r} must be an int >= 1")
    if n_workers > 1 and is_single_worker(storage):
        raise ValueError(f"tune: n_workers={n_workers} needs a shared storage; {storage!r} is single-worker "
                         "(use 'journal:/path/file.log' on one machine or an RDB URL for several)")
    if mode == "synchronized" and (min_resource is not None or reduction_factor != 2):
        raise ValueError(f"tune: min_resource={min_resource!r} and reduction_factor={reduction_factor!r} are the "
                         "asynchronous pruner's settings; synchronized mode runs every rung of `rungs` and keeps "
                         "the better half at each (the paper's rule): leave them out, or pass mode='asynchronous'")
    min_resource = rungs[0] if min_resource is None else min_resource
    if isinstance(min_resource, bool) or not isinstance(min_resource, int) or min_resource <= 0:
        raise ValueError(f"tune: min_resource={min_resource!r} must be a positive int")
    asked = rungs[-2] if len(rungs) > 1 else rungs[-1]  # the pruner is asked at the end of every rung but the last
    if min_resource > asked:  # its first rung would never be reached: nothing would ever be pruned
        raise ValueError(f"tune: min_resource={min_resource!r} is beyond the last rung the asynchronous pruner is "
                         f"asked at ({asked}; rungs {list(rungs)}): it would never prune; expected at most {asked} "
                         "(default: the first rung)")
    if not isinstance(reduction_factor, int) or reduction_factor < 2:
        raise ValueError(f"tune: reduction_factor={reduction_factor!r} must be an int >= 2")
    if extrapolate_to is not None and (isinstance(extrapolate_to, bool) or not isinstance(extrapolate_to, (int, float))
                                       or not math.isfinite(extrapolate_to) or extrapolate_to <= 0):
        raise ValueError(f"tune: extrapolate_to={extrapolate_to!r} must be a positive budget "
                         "(default twice the last rung)")
    extrapolate_to = 2 * rungs[-1] if extrapolate_to is None else int(extrapolate_to)
    if not (0 < heartbeat_interval < grace_period):
        raise ValueError(f"tune: heartbeat_interval={heartbeat_interval!r} must be > 0 and below "
                         f"grace_period={grace_period!r} (a live worker's trials would be taken over)")
    cfg = _Config(fam, tiers, reference_tier, rungs, tuple(float(m) for m in multipliers), float(rel_tol), mode,
                  min_resource, reduction_factor, extrapolate_to)
    cfg.candidates()  # raises on an empty or invalid candidate set
    return cfg

# ---------------------------------------------------------------- study setup

@contextlib.contextmanager
def _setup_lock(storage_url: str | None):
    """Serialize study creation and enqueueing between processes sharing one journal file."""
    scheme = None if storage_url is None else _scheme(storage_url)
    if scheme is None or not (scheme == "journal" or (not scheme and storage_url.endswith((".log", ".journal")))):
        yield  # the same rule as open_storage: an RDB URL whose database file ends in .log is no journal
        return
    import fcntl

    path = Path(storage_url[len("journal:"):] if scheme == "journal" else storage_url).expanduser()
    with open(str(path) + ".setup.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_studies(cfg: _Config, storage_url: str | None, study_name: str, storage=None):
    storage = open_storage(storage_url) if storage is None else storage
    cands = cfg.candidates()
    names: dict[tuple[str, int] | None, str]
    if cfg.mode == "synchronized":
        names = {None: study_name}
    else:
        names = {(f, t): f"{study_name}/{f}/b{t}" for f in cfg.families for t in cfg.tiers}
    studies = {}
    with _setup_lock(storage_url):
        for group, name in names.items():
            pruner = (SynchronizedHalvingPruner(len(cfg.rungs)) if cfg.mode == "synchronized" else
                      CandidateHalvingPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor,
                                             min_early_stopping_rate=0))
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize", pruner=pruner,
                                        load_if_exists=True)
            stored = study.user_attrs.get("tune:config")
            if stored is None:
                study.set_user_attr("tune:config", cfg.as_attr())
            elif stored != cfg.as_attr():
                diff = sorted(k for k in cfg.as_attr() if stored.get(k) != cfg.as_attr()[k])
                raise ValueError(f"tune: study {name!r} in storage {storage_url!r} was started with other settings "
                                 f"({', '.join(diff)} differ); use another study_name or the same settings to resume")
            if cfg.trainable is not None:  # e.g. the zoo's val_tokens: a resumed study must not mix rung losses
                stored_t = study.user_attrs.get("tune:trainable")  # absent in a study made before this check
                if stored_t is None:
                    study.set_user_attr("tune:trainable", cfg.trainable)
                elif stored_t != cfg.trainable:
                    diff = sorted(k for k in set(stored_t) | set(cfg.trainable) if stored_t.get(k) != cfg.trainable.get(k))
                    raise ValueError(f"tune: study {name!r} in storage {storage_url!r} was started with another "
                                     f"trainable ({', '.join(diff)} differ); use another study_name or the same "
                                     "settings to resume")
            trials = study.get_trials(deepcopy=False)
            present = {t.user_attrs.get("key") for t in trials}
            for ft in _orphans(trials):  # a lost trial whose retry was never enqueued: retry it now
                _retry_callback()(study, ft)
            for c in cands:
                if (group is None or (c.family, c.tier) == group) and c.key not in present:
                    study.enqueue_trial({"lr_scale": c.scale}, user_attrs=dict(
                        key=c.key, family=c.family, tier=c.tier, scale=c.scale, lrs=dict(c.lrs),
                        origins=[list(o) for o in c.origins]), skip_if_exists=False)
            studies[group] = study
    return studies


def _collect(studies, cfg: _Config, storage_url, study_name, choices_path: Path) -> TuneResult:
    n = len(cfg.rungs)
    summaries, choices, losses, surv, missing, crashed = [], {}, {}, {}, [], []
    groups: dict[tuple[str, int], dict] = defaultdict(dict)
    for study in studies.values():
        for key, ft in _live(study.get_trials(deepcopy=False)).items():
            groups[_group_of(ft)][key] = ft
    names = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned",
             optuna.trial.TrialState.FAIL: "failed", optuna.trial.TrialState.RUNNING: "running",
             optuna.trial.TrialState.WAITING: "waiting"}
    for g in sorted(groups):
        members = groups[g]
        for ft in members.values():
            if _crashed_out(ft):
                crashed.append(ft.user_attrs["key"])
            ex = ft.user_attrs.get("extrapolated_loss")
            summaries.append(TrialSummary(ft.number, _candidate(ft), names[ft.state], tuple(_rung_losses(ft, n)),
                                          float("nan") if ex is None else float(ex), ft.user_attrs.get("error")))
        if cfg.mode == "synchronized":
            surv[g] = _group_state(members, n).survived
        done = [Entry(k, float(ft.user_attrs["scale"]), float(ft.value)) for k, ft in members.items()
                if ft.state == optuna.trial.TrialState.COMPLETE]
        best = rank(done)[:1]
        if best and math.isfinite(best[0].loss):
            choices[g] = _candidate(members[best[0].key])
            losses[g] = best[0].loss
    for f in cfg.families:
        for t in cfg.tiers:
            if (f, t) not in choices:
                missing.append((f, t))
    at_edge = _at_edge(choices, cfg.candidates())
    summaries.sort(key=lambda s: (s.candidate.family, s.candidate.tier, s.candidate.scale))
    write_choices(choices_path, choices, losses=losses, at_edge=at_edge,
                  meta=dict(study_name=study_name, mode=cfg.mode, rungs=list(cfg.rungs),
                            reference_tier=cfg.reference_tier, missing=[list(m) for m in missing]))
    return TuneResult(choices, losses, summaries, surv, missing, cfg.mode, study_name, storage_url, choices_path,
                      cfg.rungs, at_edge, sorted(crashed))


def _at_edge(choices: Mapping[tuple[str, int], Candidate],
             candidates: Sequence[Candidate]) -> dict[tuple[str, int], str]:
    """``(family, tier) -> "lowest" | "highest"`` for choices at an end of a grid of two or more candidates."""
    scales: dict[tuple[str, int], list[float]] = defaultdict(list)
    for c in candidates:
        scales[(c.family, c.tier)].append(c.scale)
    out = {}
    for g, c in choices.items():
        grid = scales.get(g, [])
        if len(grid) >= 2 and c.scale in (min(grid), max(grid)):
            out[g] = "lowest" if c.scale == min(grid) else "highest"
    return out


_STOP_TIMEOUT = 60.0  # seconds the spawned workers get, all together, to release their trials once tune() stopped


def _stop_workers(procs, timeout: float | None = None, release=None) -> None:
    """Stop the worker processes ``procs`` that :func:`tune` started, when it stops on an exception.

    Each is sent SIGTERM (it releases its trials, :func:`_worker_main`); they share one deadline,
    ``timeout`` seconds (default ``_STOP_TIMEOUT``) from now, and any still running then (a trainable
    that swallowed the interrupt) is killed: ``k`` workers cost at most ``timeout``, not ``k x timeout``.
    A second Ctrl-C (or the command line's SIGTERM) during that wait ends it: the rest are killed at
    once and the caller raises its first exception at once; the wait used to end in a join without a
    deadline, and ``tune()`` hung as long as such a worker ran.

    ``release(killed)``, called with the processes killed here once they ended, releases their trials
    (``tune()``: :func:`~examples.tune.worker._release_owned`); they used to wait ``grace_period`` for
    the heartbeat, and were then counted as take-overs although our own stop ended their worker. A
    storage error or another Ctrl-C there leaves the rest to the heartbeat, as before."""
    timeout = _STOP_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    try:
        for p in procs:  # (in the try: a Ctrl-C between two of these used to leave the rest running)
            p.terminate()
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # the user does not want to wait: kill the rest now
        pass
    finally:
        killed = [p for p in procs if p.exitcode is None]
        for p in killed:
            p.kill()
        for p in procs:  # a killed process ends at once
            p.join()
        if killed and release is not None:
            try:
                release(killed)
            except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the heartbeat covers them; raise the first
                pass


def exit_with_parent(parent: int, interval: float = 1.0, timeout: float | None = None) -> threading.Thread:
    """Watch, from a daemon thread, whether the process ``parent`` is still this process's parent, and
    end this process when it is not: a worker whose ``tune()`` process was killed (SIGKILL reaches no
    child) would otherwise train on to the study's end, unseen. It is sent SIGTERM first, which a
    spawned worker turns into the release of its trials (:func:`_worker_main`, uncounted: the worker
    did not fail its candidate), and ended at once (status 1) ``timeout`` seconds later (default
    ``_STOP_TIMEOUT``: a trainable that swallowed the interrupt). It used to end at once, leaving the
    trial it was training to the heartbeat, which counts it as lost while training
    (``tune:takeovers``): every kill of ``tune()`` counted against each spawned worker's candidate.
    The journal and checkpoints are written atomically, so a kill at any point is safe."""
    timeout = _STOP_TIMEOUT if timeout is None else timeout

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(timeout)
                os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _signal_handler(handler, *signums):
    """Install ``handler`` for ``signums`` (in the main thread only: elsewhere Python refuses), restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _worker_main(trainable, cfg: _Config, storage_url, study_name, workdir, heartbeat_interval, grace_period,
                 poll_interval, parent: int | None = None, verbosity: int | None = None,
                 owner: str | None = None) -> None:
    """Entry point of an extra worker process started by :func:`tune` (spawn); it ends with ``parent``
    and logs at its parent's Optuna ``verbosity`` (a spawned process starts at Optuna's INFO default:
    the command line's worker printed a ``[I ...] Using an existing study`` line its parent silences).
    It stamps ``owner`` on the trials it claims, so that ``tune()`` can release them should it kill it.

    The first SIGTERM (``tune()`` terminates its workers when it stops on an exception) or SIGINT (Ctrl-C
    reaches the whole process group; unless ignored, as in a background job) raises ``KeyboardInterrupt``,
    so the worker releases its trials on its way out (:meth:`_Worker._release`; SIGTERM used to end it
    at once, and a rerun waited ``grace_period`` for its trials). Later ones (``tune()``'s SIGTERM right
    after the Ctrl-C) are ignored, so as not to cut that release short; ``tune()`` kills a worker that does not end within
    ``_STOP_TIMEOUT`` s, and the worker ends with its parent (:func:`exit_with_parent`)."""
    if parent is not None:
        exit_with_parent(parent)
    if verbosity is not None:
        optuna.logging.set_verbosity(verbosity)
    stopping = []

    def stop(signum, frame) -> None:
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt

    # an ignored SIGINT (tune() started under nohup or as a background job; the worker inherits it) stays
    # ignored, as in tune()'s own process: Ctrl-C to the process group must not stop the workers alone
    signums = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) != signal.SIG_IGN else [])
    with _signal_handler(stop, *signums):
        try:
            studies = _open_studies(cfg, storage_url, study_name)
            _Worker(studies, trainable, cfg, workdir, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period, poll_interval=poll_interval, progress=None,
                    study_name=study_name, owner=owner).run()
        except KeyboardInterrupt:  # Ctrl-C or tune()'s SIGTERM: stop without a traceback
            raise SystemExit(130) from None


def tune(trainable: Trainable, *, families: Mapping[str, Mapping[str, float]], tiers: Sequence[int],
         reference_tier: int, rungs: Sequence[int], workdir: Path, choices_path: Path | None = None,
         mode: str = "synchronized", storage: str | None = None, study_name: str = "tune", n_workers: int = 1,
         progress: bool | None = None, min_resource: int | None = None, reduction_factor: int = 2,
         multipliers: Sequence[float] = PAPER_MULTIPLIERS, rel_tol: float = 1e-9,
         extrapolate_to: int | None = None, heartbeat_interval: float = 10.0, grace_period: float = 60.0,
         poll_interval: float = 1.0) -> TuneResult:
    """Tune the learning rate of every family at every batch tier and write the choices file.

    Args:
        trainable: trains one candidate to a budget (see :class:`~examples.tune.trainable.Trainable`);
            must be picklable when ``n_workers > 1``.
        families: family -> reference learning rate per optimizer group at ``reference_tier``.
        tiers: the batch tiers to tune.
        reference_tier: ``B0``.
        rungs: cumulative budgets in the workload's unit (paper: 50M, 150M, 500M tokens); the last is
            the horizon every trainable schedules its learning rate against.
        workdir: candidate checkpoints live in ``workdir/trials/<study_name>/<family>/b<tier>/x<scale>``
            (per study; a ``trial.json`` there records the study, rungs and candidate, and a trial
            directory made under other ones stops the call with a ``ValueError``).
        choices_path: the choices file (default ``workdir/choices.json``); one that cannot be written
            (its directory cannot be made or written, or it is a directory) is a ``ValueError`` before
            any training.
        mode: ``"synchronized"`` (the paper's rule) or ``"asynchronous"`` (ASHA via Optuna's
            ``SuccessiveHalvingPruner``, one study per family/tier named ``<study_name>/<family>/b<tier>``).
        storage: ``None`` (in-memory), ``"journal:/path/file.log"``, ``"sqlite:///file.db"`` (one
            worker) or an RDB URL (``"postgresql://..."``). A persistent storage resumes: run the
            same call again and it continues where it stopped.
        study_name: the Optuna study (one per run of the tuner).
        n_workers: worker processes on this machine (this one plus ``n_workers - 1`` spawned);
            more than one needs a journal or RDB storage.
        progress: print progress (tqdm on a TTY) and the summary table; ``None``: when stderr is a TTY.
        min_resource, reduction_factor: the asynchronous pruner's settings (default: the first rung, 2);
            synchronized mode refuses other values (it keeps the better half at every rung).
        multipliers, rel_tol: candidate generation (see :func:`~examples.tune.candidates.candidate_set`).
        extrapolate_to: budget of the power-law extrapolation diagnostic (default: twice the horizon).
        heartbeat_interval, grace_period: seconds between heartbeats of held trials, and the silence
            after which another worker takes a trial over.
        poll_interval: seconds a worker sleeps while waiting for other workers.

    Returns:
        A :class:`TuneResult`; the choices file is written atomically.
    """
    cfg = _validate(families, tiers, reference_tier, rungs, mode, n_workers, storage, min_resource,
                    reduction_factor, multipliers, rel_tol, extrapolate_to, heartbeat_interval, grace_period)
    cfg = dataclasses.replace(cfg, trainable=_describe_trainable(trainable))
    if not isinstance(study_name, str) or not study_name:
        raise ValueError(f"tune: study_name={study_name!r}; expected a non-empty string (it names the study and "
                         "its trial directories)")
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file of that name: say which argument and what was expected
        raise ValueError(f"tune: workdir {str(workdir)!r} cannot be made ({e.strerror or e}: "
                         f"{e.filename or workdir}); expected a directory or a path where one can be made") from None
    choices_path = Path(choices_path) if choices_path is not None else workdir / "choices.json"
    try:  # refuse a choices path that cannot be written before any training, not after the study
        choices_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"tune: choices file {str(choices_path)!r} cannot be written: {e}") from None
    if choices_path.is_dir() or not os.access(choices_path.parent, os.W_OK):
        raise ValueError(f"tune: choices file {str(choices_path)!r} cannot be written "
                         f"({'a directory' if choices_path.is_dir() else 'directory not writable'})")
    if progress is None:
        progress = sys.stderr.isatty()
    studies = _open_studies(cfg, storage, study_name)
    procs, owners, bar = [], {}, None
    try:  # spawning too: a Ctrl-C (or a worker that cannot start) there stops the workers already started
        if n_workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            for _ in range(n_workers - 1):
                owner = uuid.uuid4().hex
                p = ctx.Process(target=_worker_main, args=(trainable, cfg, storage, study_name, workdir,
                                                           heartbeat_interval, grace_period, poll_interval,
                                                           os.getpid(), optuna.logging.get_verbosity(), owner))
                p.start()
                procs.append(p)
                owners[id(p)] = owner
        bar = Progress(total=len(cfg.candidates())) if progress else None
        _Worker(studies, trainable, cfg, workdir, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                poll_interval=poll_interval, progress=bar, study_name=study_name).run()
        for p in procs:  # the study is finished: they end on their own (a Ctrl-C here stops them as below)
            p.join()
    except BaseException:
        # they release their trials (those we kill: released here); a later run resumes
        _stop_workers(procs, release=lambda killed: _release_owned(studies, {owners[id(p)] for p in killed}))
        raise
    finally:
        if bar:
            bar.close()
    for p in procs:
        if p.exitcode != 0:
            warnings.warn(f"tune: worker process {p.pid} exited with status {p.exitcode}; its trials were taken over")
    result = _collect(studies, cfg, storage, study_name, choices_path)
    for s in result.trials:  # each call: a rerun of the finished study (the main job's tuning step) says it too
        if s.candidate.key in result.crashed:
            g = (s.candidate.family, s.candidate.tier)
            tail = (f"the choice for {g[0]}/b{g[1]} ({result.choices[g].key}) was made without it" if g in result.choices
                    else f"{g[0]}/b{g[1]} has no choice")
            what = s.error.split(" (", 1)[0]   # "crashed its worker 4 times", "lost its worker 4 times while ..."
            warnings.warn(f"tune: candidate {s.candidate.key} {what} and was never tuned: {tail} (fix the cause, "
                          "then tune under a new study_name to include it)", stacklevel=2)
    if result.at_edge:
        warnings.warn("tune: the chosen learning rate is the " + "; ".join(
            f"{e} candidate for {f}/b{t}" for (f, t), e in sorted(result.at_edge.items())) +
            " of the grid: the best rate may lie beyond it (widen the multipliers)", stacklevel=2)
    if progress:
        print(result.table(), file=sys.stderr)
    return result
