"""The worker loop: claim trials, train them rung by rung, hold them for synchronized decisions, and
take over the trials of workers that stopped beating.

Claiming is Optuna's atomic WAITING -> RUNNING transition (``set_trial_state_values`` answers
``False`` to every claimant but one), so no candidate is trained by two workers. A worker writes a
heartbeat (system attribute ``tune:heartbeat``) for the trials it holds; a RUNNING trial whose
heartbeat is older than ``grace_period`` is failed by another worker and re-enqueued with its
intermediate values and rung losses. A worker that stops on an exception (Ctrl-C, a SIGTERM turned
into one, a crash) does that to its own trials on its way out (:meth:`_Worker._release`), so a rerun
takes them over at once instead of after ``grace_period``; a hard kill leaves them to the heartbeat.

A candidate that keeps stopping its worker is failed after a limit, not retried for ever: a crash of
the worker's own code (counted on the trial it was working on, ``_MAX_CRASH_RETRIES``), and a
take-over of a trial whose worker went silent while *training* it (the OOM killer ending every rerun
at the same candidate; ``_MAX_TAKEOVER_RETRIES``). Both counts are system attributes of the trial,
inherited by each retry, so they survive a restart of ``tune()``. Releases (our own stop) are never
counted, nor are take-overs of trials a silent worker merely held.
"""
from __future__ import annotations

import json
import math
import numbers
import threading
import time
import uuid
import warnings
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import quote

from spectral_lens.atomic import TMP_SUFFIX, write_text_atomic

from .extrapolate import extrapolate_loss
from .progress import Progress
from .storage import _optuna, _signals_deferred
from .trainable import Candidate, Trainable
from .trials import _candidate, _group_of, _group_state, _is_stale_fail, _live, _orphans, _retry_callback, _rung_losses

if TYPE_CHECKING:  # the tuner's settings (tuner.py imports this module)
    from .tuner import _Config

optuna = _optuna()
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402

__all__ = ["TrialFailed", "TrialDirMismatch"]

_HEARTBEAT = "tune:heartbeat"
_CRASHES = "tune:crashes"   # how often the candidate's trials crashed their worker (inherited by each retry)
_MAX_CRASH_RETRIES = 3      # as Optuna's max_retry: retried after 3 crashes; the 4th fails the candidate
_CRASHED = "crashed its worker"   # how the error of a candidate failed by that limit begins (see _crashed_out)
_TAKEOVERS = "tune:takeovers"  # how often the candidate was taken over while being trained (inherited by each retry)
_MAX_TAKEOVER_RETRIES = 3      # as for crashes: the 4th take-over during training fails the candidate
_LOST = "lost its worker"      # how the error of a candidate failed by that limit begins (see _crashed_out)
_TRAINING = "tune:training"    # [rung, trial id]: the rung the trial's worker is training (set before the trainable)
_OWNER = "tune:owner"          # [worker token, trial id]: which of tune()'s spawned workers claimed the trial


class TrialFailed(RuntimeError):
    """A trial reported a non-finite validation loss or did not report at its rung budget."""


class TrialDirMismatch(ValueError):
    """A trial's checkpoint directory was made by another study or under another rung schedule."""


def _claim(study, on_claim=None):
    """Atomically move one WAITING trial of ``study`` to RUNNING; an ``optuna.Trial`` or None.

    ``on_claim(trial_id)`` is called as soon as the claim succeeded, before the trial object is made
    (storage reads), so a worker interrupted in between still knows the trial is its own. Ctrl-C is
    held off from the claim's write to that call (a journal append raises it as the append ends, inside
    ``set_trial_state_values``: the trial was RUNNING and nobody's)."""
    storage = study._storage
    for ft in storage.get_all_trials(study._study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        try:
            with _signals_deferred():
                claimed = storage.set_trial_state_values(ft._trial_id, state=optuna.trial.TrialState.RUNNING)
                if claimed and on_claim is not None:
                    on_claim(ft._trial_id)
        except UpdateFinishedTrialError:
            continue
        if claimed:
            return optuna.trial.Trial(study, ft._trial_id)
    return None


def _fail_lost(study, ft, live) -> bool:
    """Fail the RUNNING trial ``ft`` as lost (state FAIL, no ``error``) and re-enqueue it with its reports
    and rung losses when it stands for its candidate (``live``: :func:`_live` of the trials read with it).

    The heartbeat sweep's take-over and a stopping worker's release both come here, so both leave the
    same trials. False, touching nothing, when the trial is no longer RUNNING: another worker failed it
    first (its retry owns the candidate) or it finished. Each step is one atomic storage operation; a
    process stopped between the two leaves an *orphan*, which the next sweep or resume re-enqueues."""
    try:
        if not study._storage.set_trial_state_values(ft._trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    if "key" in ft.user_attrs and live.get(ft.user_attrs["key"]) is ft:
        _retry_callback()(study, study._storage.get_trial(ft._trial_id))
    return True


def _fail_counted(study, ft, live, counter: str, limit: int, why) -> bool:
    """Count one more loss of its worker on the candidate of the RUNNING trial ``ft`` (system attribute
    ``counter``, kept by every retry, so the count survives a restart of ``tune()``) and release ``ft``
    as lost (:func:`_fail_lost`), or, at the ``limit + 1``-th, fail it as the candidate's failure
    (``error`` = ``why(count)``: never retried, ranked last) and say so in one line. False when the
    trial is no longer RUNNING (another worker took it over, or it finished)."""
    count = int(ft.system_attrs.get(counter, 0)) + 1
    storage = study._storage
    try:
        if count <= limit:
            storage.set_trial_system_attr(ft._trial_id, counter, count)
            return _fail_lost(study, ft, live)   # its retry is made from the trial as stored now: it keeps the count
        key = ft.user_attrs.get("key", f"trial {ft.number}")
        reason = why(count)
        with _signals_deferred():   # both or neither: a RUNNING trial with an error would be retried
            storage.set_trial_user_attr(ft._trial_id, "error", reason)
            failed = storage.set_trial_state_values(ft._trial_id, state=optuna.trial.TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if failed:
        warnings.warn(f"tune: candidate {key} (trial {ft.number}) {reason}", stacklevel=3)
    return failed


def _fail_crashed(study, ft, live, error: BaseException) -> bool:
    """The trial ``ft`` was being worked on when its worker crashed (an exception other than an interrupt,
    raised outside the trainable: the trainable's own are the trial's failure). Count the crash on the
    candidate (``tune:crashes``) and release the trial, or, at the ``_MAX_CRASH_RETRIES + 1``-th crash,
    fail it for good (:func:`_fail_counted`): without a limit, a crash repeated on every rerun added a
    retry per rerun and the candidate was never decided."""
    return _fail_counted(study, ft, live, _CRASHES, _MAX_CRASH_RETRIES, lambda n: (
        f"{_CRASHED} {n} times (last: {type(error).__name__}: {error}); not retried: fix the cause, then tune "
        "it under a new study_name (this study keeps it failed)"))


def _training_lost(ft) -> bool:
    """Whether the trial ``ft`` was being trained when its worker went silent: it names the rung its worker
    started (``tune:training``) and that rung's loss is not stored. A trial its worker merely held (waiting
    for a synchronized decision) or was finishing is not: a kill then is not the candidate's doing.

    The value names the trial it was written for: a retry inherits its predecessor's, which, after a loss
    mid-rung, names that rung without its loss; a worker lost after claiming the retry, before training it,
    merely held it, and was counted. A bare rung (written by the first version of this count, which did
    not name the trial) is not trusted either: that take-over is not counted."""
    v = ft.system_attrs.get(_TRAINING)
    return isinstance(v, list) and len(v) == 2 and v[1] == ft._trial_id and f"rung:{v[0]}" not in ft.user_attrs


def _fail_taken_over(study, ft, live, grace_period: float) -> bool:
    """Take over the trial ``ft``, whose worker went silent while training it (:func:`_training_lost`):
    count it on the candidate (``tune:takeovers``) and release it, or, at the ``_MAX_TAKEOVER_RETRIES +
    1``-th, fail it for good (:func:`_fail_counted`). A worker killed by the OOM killer on every rerun
    at the same candidate used to have its trial taken over and retried without end."""
    return _fail_counted(study, ft, live, _TAKEOVERS, _MAX_TAKEOVER_RETRIES, lambda n: (
        f"{_LOST} {n} times while training it (no heartbeat for {grace_period:g} s: killed, e.g. by the "
        "out-of-memory killer, or hung); not retried: find why (memory: a smaller model or batch tier, or fewer "
        "workers per machine), then tune it under a new study_name (this study keeps it failed)"))


def _is_crash(error: BaseException) -> bool:
    """Whether ``error``, which stopped a worker, counts as a crash against the trial it was working on:
    an ``Exception`` of the worker's own code. Not an interrupt (Ctrl-C, a SIGTERM turned into one), not a
    trial directory to be deleted by hand (``TrialDirMismatch``), and not a file-system or storage error
    (``OSError``, Optuna's ``StorageInternalError``: a full disk, a directory it may not write, a database
    gone away): their cause lies outside the candidate, and counting them failed it for good after four
    (the study lost to a passing outage); such a trial is released, and retried as often as it stops."""
    return isinstance(error, Exception) and not isinstance(
        error, (TrialDirMismatch, OSError, optuna.exceptions.StorageInternalError))


def _crashed_out(ft) -> bool:
    """Whether the trial ``ft`` was failed for crashing or losing its worker too often (:func:`_fail_crashed`,
    :func:`_fail_taken_over`); a trainable's error reads ``"<ExceptionType>: ..."``, so it never begins so."""
    return ft.state == optuna.trial.TrialState.FAIL and str(ft.user_attrs.get("error", "")).startswith(
        (_CRASHED, _LOST))


def _release_owned(studies, owners) -> int:
    """Release (:func:`_fail_lost`, uncounted) the RUNNING trials of ``studies`` claimed by the workers
    whose tokens are in ``owners`` (stamped ``tune:owner`` at the claim, :meth:`_Worker._claimed`); the
    number released. Only for workers known to be dead (``tune()`` killed and joined them): a live
    worker's trials would be taken from under it. A retry inherits its predecessor's stamp, so a stamp
    counts only on the trial it names; a trial claimed but not stamped yet is left to the heartbeat."""
    released = 0
    for study in studies.values():
        trials = study.get_trials(deepcopy=False)
        live = _live(trials)
        for ft in trials:
            stamp = ft.system_attrs.get(_OWNER)
            if ft.state == optuna.trial.TrialState.RUNNING and isinstance(stamp, list) and len(stamp) == 2 \
                    and stamp[0] in owners and stamp[1] == ft._trial_id:
                released += _fail_lost(study, ft, live)
    return released


class _Worker:
    """One worker process: claims, trains, holds and finishes trials until every study is finished."""
    def __init__(self, studies: Mapping[tuple[str, int] | None, object], trainable: Trainable, cfg: _Config,
                 workdir: Path, *, heartbeat_interval: float, grace_period: float, poll_interval: float,
                 progress: Progress | None, study_name: str | None = None, owner: str | None = None):
        self.studies = dict(studies)
        # the tune() call's study name (asynchronous mode: the prefix of its per-family/tier studies)
        self.study_name = study_name if study_name is not None else next(iter(self.studies.values())).study_name
        # the in-memory storage keeps no study between calls (and has one worker): its trial directories
        # belong to this call only
        in_memory = isinstance(next(iter(self.studies.values()))._storage, optuna.storages.InMemoryStorage)
        self.session = uuid.uuid4().hex if in_memory else None
        self.trainable, self.cfg, self.workdir = trainable, cfg, Path(workdir)
        self.heartbeat_interval, self.grace_period, self.poll_interval = heartbeat_interval, grace_period, poll_interval
        self.progress = progress
        self.held: dict[int, object] = {}      # trial_id -> optuna.Trial
        self.claimed: dict[int, object] = {}   # trial_id -> study: claimed, not yet held (see _claim)
        self.silent_noted: set[int] = set()    # trials this worker said it is waiting for (one note each)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.current: int | None = None        # the trial being worked on (a crash there is counted on it)
        self.crash: Exception | None = None     # what stopped the worker, when it was no interrupt
        self.owner = owner                      # stamped on each claimed trial (tune()'s spawned workers)

    # -- heartbeats
    def _beat(self, trial) -> None:
        try:
            trial.study._storage.set_trial_system_attr(trial._trial_id, _HEARTBEAT, time.time())
        except (UpdateFinishedTrialError, KeyError):
            pass

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.heartbeat_interval):
            with self.lock:
                trials = list(self.held.values())
            for t in trials:
                try:
                    self._beat(t)
                except Exception:  # noqa: BLE001, S112 - the storage's (a full disk, a dropped connection): next beat
                    continue       # retries; the thread used to die, and the live worker's trials were taken over

    def _sweep_stale(self, study) -> None:
        """Fail RUNNING trials whose worker stopped beating; re-enqueue the ones that stand for a candidate."""
        now = time.time()
        trials = study.get_trials(deepcopy=False)
        live = _live(trials)
        for ft in trials:
            if ft.state != optuna.trial.TrialState.RUNNING or ft._trial_id in self.held:
                continue
            # the last sign of life: the newest heartbeat or the claim (a retry inherits its failed
            # predecessor's old heartbeat, so a just-claimed retry must count from its claim)
            signs = [float(ft.system_attrs[_HEARTBEAT])] if _HEARTBEAT in ft.system_attrs else []
            if ft.datetime_start is not None:
                signs.append(ft.datetime_start.timestamp())
            if not signs or now - max(signs) < self.grace_period:
                silent = now - max(signs) if signs else 0.0
                if silent > 2 * self.heartbeat_interval and ft._trial_id not in self.silent_noted and self.progress:
                    # a rerun after its predecessor was killed waits here; say so rather than stall silently
                    self.silent_noted.add(ft._trial_id)
                    self.progress.note(f"trial {ft.number} ({ft.user_attrs.get('key', '?')}): no heartbeat for "
                                       f"{silent:.0f} s; taken over after {self.grace_period:g} s without one (its "
                                       "worker may have been stopped)")
                continue
            # a worker lost while training the trial counts against its candidate (an OOM kill on every
            # rerun); one that merely held it, or stopped on our own stop (released, never swept), does not
            taken = _fail_taken_over(study, ft, live, self.grace_period) if _training_lost(ft) else \
                _fail_lost(study, ft, live)
            if not taken:
                continue  # another worker failed it first
            if "key" in ft.user_attrs and live.get(ft.user_attrs["key"]) is ft and self.progress \
                    and "error" not in study._storage.get_trial(ft._trial_id).user_attrs:  # (else failed for good)
                self.progress.note(f"trial {ft.number} ({ft.user_attrs['key']}) lost its worker; re-enqueued")
        # a worker that failed a lost trial and died before re-enqueueing it left the candidate without a
        # trial; retry it (should that worker be alive after all, the second retry is dropped as a duplicate)
        for ft in _orphans(study.get_trials(deepcopy=False)):
            _retry_callback()(study, ft)

    def _release(self) -> None:
        """Fail and re-enqueue the trials this worker holds, as another worker's sweep would once their
        heartbeat is ``grace_period`` old: called when the worker stops on an exception, so that a rerun
        (or another worker) takes them over at once. The trials look exactly as after that sweep (the
        retry logic and the pruners see no difference), only without the wait.

        Only this worker's trials, and only while RUNNING: one another worker took over (our heartbeat
        was late) is left to its retry. Interrupted again (a second Ctrl-C), it stops where it is: every
        storage operation is atomic, a trial failed but not re-enqueued is an orphan (re-enqueued by the
        next sweep or resume) and one not reached is taken over after ``grace_period``, as before. Errors
        of the storage are not raised (the exception that stopped the worker is what the caller sees);
        the heartbeat takes those trials over. The in-memory storage keeps nothing: nothing to release.

        ``self.crash``: the worker stopped on that exception (not an interrupt): the trial it was working on
        is counted as having crashed it, and failed for good once it did so too often (:func:`_fail_crashed`);
        the other trials it held are released as for an interrupt, uncounted."""
        if self.session is not None:
            return
        with self.lock:
            mine = {tid: t.study for tid, t in self.held.items()}
            mine.update(self.claimed)
        culprit = self.current if self.crash is not None else None
        by_study: dict[object, set[int]] = defaultdict(set)
        for tid, study in mine.items():
            by_study[study].add(tid)
        for study, tids in by_study.items():
            try:
                trials = study.get_trials(deepcopy=False)
                live = _live(trials)
                for ft in trials:
                    if ft._trial_id in tids and ft.state == optuna.trial.TrialState.RUNNING:
                        if ft._trial_id == culprit:
                            _fail_crashed(study, ft, live, self.crash)
                        else:
                            _fail_lost(study, ft, live)
            except Exception:  # noqa: BLE001, S112 - e.g. a database gone away: the heartbeat covers these trials
                continue
        with self.lock:
            self.held.clear()
            self.claimed.clear()

    def _claimed(self, study):
        """The ``on_claim`` of :func:`_claim` for ``study``: the trial is this worker's from the claim on, and
        is stamped with ``owner`` (if any), so that ``tune()`` can release it at once should it kill us."""
        def note(trial_id: int) -> None:
            with self.lock:
                self.claimed[trial_id] = study
            if self.owner is not None:
                study._storage.set_trial_system_attr(trial_id, _OWNER, [self.owner, trial_id])
        return note

    # -- trial life cycle
    def _start(self, study, trial):
        """Set up a freshly claimed trial; returns its candidate, or None for a duplicate."""
        ft = study._storage.get_trial(trial._trial_id)
        key = ft.user_attrs["key"]
        for other in study.get_trials(deepcopy=False):
            if other.number < ft.number and other.user_attrs.get("key") == key \
                    and "duplicate_of" not in other.user_attrs and not _is_stale_fail(other):
                trial.set_user_attr("duplicate_of", other.number)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self._drop(trial)
                return None
        cand = _candidate(ft)
        trial.suggest_float("lr_scale", cand.scale, cand.scale)
        self._beat(trial)
        with self.lock:
            self.held[trial._trial_id] = trial
            self.claimed.pop(trial._trial_id, None)
        return cand

    def _drop_taken_over(self, by_id) -> None:
        """Forget held trials another worker failed (our heartbeats were late): their retry owns the candidate."""
        with self.lock:
            gone = [tid for tid in self.held if by_id[tid].state != optuna.trial.TrialState.RUNNING]
            for tid in gone:
                del self.held[tid]
        for tid in gone:
            warnings.warn(f"tune: trial {by_id[tid].number} was taken over by another worker (heartbeat older than "
                          f"grace_period={self.grace_period}s); dropping it here")

    def _drop(self, trial) -> None:
        with self.lock:
            self.held.pop(trial._trial_id, None)
            self.claimed.pop(trial._trial_id, None)

    def _finish(self, study, trial, state, value=None, error=None) -> None:
        """Tell Optuna the trial's end and forget it. Interrupted before the tell, the trial stays held
        (RUNNING), so the release on the way out hands it on, as the heartbeat would after a kill."""
        try:
            if error is not None:
                trial.set_user_attr("error", error)
            ft = study._storage.get_trial(trial._trial_id)
            if error is None and ft.intermediate_values:
                steps = sorted(ft.intermediate_values)
                ex = extrapolate_loss(steps, [ft.intermediate_values[s] for s in steps], self.cfg.extrapolate_to)
                trial.set_user_attr("extrapolated_loss", ex.loss if math.isfinite(ex.loss) else None)
                trial.set_user_attr("extrapolation_model", ex.model)
            if state == optuna.trial.TrialState.COMPLETE:
                study.tell(trial, value)
            else:
                study.tell(trial, state=state)
        except UpdateFinishedTrialError:
            warnings.warn(f"trial {trial.number} was finished by another worker (its heartbeat went stale)")
        self._drop(trial)

    def _trial_dir(self, cand: Candidate) -> Path:
        """The candidate's checkpoint directory, ``workdir/trials/<study>/<family>/b<tier>/x<scale>``.

        Per study, so a new study never continues another study's models; ``trial.json`` records the
        study, the rung schedule and the candidate (and, with the in-memory storage, which keeps no
        study between calls, the call), and a directory made under others is refused (``TrialDirMismatch``).
        """
        name = quote(self.study_name, safe=" -_.,+=@")
        if set(name) <= {"."}:
            name = name.replace(".", "%2E")
        wd = self.workdir / "trials" / name / cand.family / f"b{cand.tier}" / f"x{cand.scale:.6g}"
        want = dict(study=self.study_name, rungs=list(self.cfg.rungs), family=cand.family, tier=cand.tier,
                    scale=cand.scale, lrs=dict(cand.lrs), in_memory_call=self.session)
        marker = wd / "trial.json"
        if marker.exists():
            try:
                have = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TrialDirMismatch(f"tune: {marker} cannot be read ({e}); delete {wd} to train the trial "
                                       "from scratch") from None
            diff = [k for k in want if not isinstance(have, dict) or have.get(k) != want[k]]
            if diff == ["in_memory_call"]:
                raise TrialDirMismatch(f"tune: {wd} holds a trial of an earlier call; the in-memory storage does not "
                                       "resume: delete it, or use another study_name (or a journal storage to resume)")
            if diff:
                shown = "not a JSON object" if not isinstance(have, dict) else \
                    ", ".join(f"{k} {have.get(k)!r} vs {want[k]!r}" for k in diff if k != "in_memory_call")
                raise TrialDirMismatch(f"tune: {wd} holds a trial made with other settings ({shown}); delete it or "
                                       "use another study_name")
        else:
            held = list(wd.iterdir()) if wd.is_dir() else []
            # a worker killed while writing the marker leaves only its temporary file: not another study's
            stale = [p for p in held if p.name.startswith(f".{marker.name}.") and p.name.endswith(TMP_SUFFIX)]
            if len(stale) != len(held):
                raise TrialDirMismatch(f"tune: {wd} holds files but no trial.json (not made by this study); "
                                       "delete it or use another study_name")
            for p in stale:
                p.unlink(missing_ok=True)
            wd.mkdir(parents=True, exist_ok=True)
            write_text_atomic(marker, json.dumps(want, indent=1) + "\n")
        return wd

    def _train_rung(self, study, trial, cand: Candidate, k: int) -> bool:
        """Train ``cand`` to rung ``k``; store the rung loss. False if the trial failed (and was finished)."""
        budget = self.cfg.rungs[k]
        reported = set(study._storage.get_trial(trial._trial_id).intermediate_values)
        not_stored: list[Exception] = []   # a report the storage failed to write (not the candidate's failure)

        def report(resource: int, val_loss: float) -> None:
            if isinstance(resource, bool) or not isinstance(resource, numbers.Integral) or resource < 0:
                raise TrialFailed(f"{cand.key}: report(resource={resource!r}, ...): resource must be an int >= 0 "
                                  "(cumulative units consumed)")
            resource, val_loss = int(resource), float(val_loss)
            if not math.isfinite(val_loss):
                raise TrialFailed(f"{cand.key}: validation loss {val_loss} at resource {resource}")
            if resource not in reported:
                try:
                    trial.report(val_loss, resource)
                except UpdateFinishedTrialError:   # taken over by another worker: the trial ends here, as before
                    raise
                except Exception as e:   # the storage's (a full disk, a database gone away): stops the worker
                    not_stored.append(e)
                    raise
                reported.add(resource)

        wd = self._trial_dir(cand)
        try:  # from here to the rung's stored loss, a silent worker counts as a take-over (_training_lost)
            study._storage.set_trial_system_attr(trial._trial_id, _TRAINING, [k, trial._trial_id])
        except UpdateFinishedTrialError:  # failed by another worker's sweep meanwhile: its retry owns the candidate
            self._let_go(trial)
            return False
        if self.progress:
            self.progress.note(f"trial {trial.number} {cand.key}: rung {k} -> {budget}")
        try:
            self.trainable(cand, budget, horizon=self.cfg.rungs[-1], workdir=wd, report=report)
            if not_stored:  # a trainable that went on after a report failed: its reports have a hole
                raise not_stored[0]
            values = study._storage.get_trial(trial._trial_id).intermediate_values
            at = [s for s in values if s <= budget]
            if not at:
                raise TrialFailed(f"{cand.key}: the trainable reported no validation loss at or before the "
                                  f"rung budget {budget} (reports: {sorted(values)})")
            if budget not in values and max(values) > budget:  # overshot the rung without a report at it
                raise TrialFailed(
                    f"{cand.key}: the trainable reported past the rung budget {budget} but not at it (reports: "
                    f"{sorted(values)}): its last step overshoots the rung, and promoting on its last report "
                    f"at or before {budget} ({max(at)}) would rank an earlier point of training; make every "
                    "rung a whole number of steps of every tier")
            loss = float(values[max(at)])
        except TrialDirMismatch:  # the directory's fault (e.g. a checkpoint the trainer refuses): stop, as above
            raise
        except Exception as e:  # a crashing or diverging trial fails alone; the study goes on
            if not_stored:  # ... unless the storage failed its report (however the trainable passed that on):
                raise not_stored[0]   # the worker stops as on any storage error; the trial is released, uncounted
            self._finish(study, trial, optuna.trial.TrialState.FAIL, error=f"{type(e).__name__}: {e}")
            if self.progress:
                self.progress.note(f"trial {trial.number} {cand.key} failed: {type(e).__name__}: {e}")
            return False
        try:
            trial.set_user_attr(f"rung:{k}", loss)
        except UpdateFinishedTrialError:  # failed by another worker's sweep meanwhile: its retry owns the candidate
            self._let_go(trial)
            return False
        return True

    def _let_go(self, trial) -> None:
        """Forget a held trial another worker failed (our heartbeats were late); its retry trains on."""
        self._drop(trial)
        warnings.warn(f"tune: trial {trial.number} was taken over by another worker (heartbeat older than "
                      f"grace_period={self.grace_period}s); dropping it here")

    def _should_prune(self, trial) -> bool:
        """``trial.should_prune()``, with no trial being worked on meanwhile: the pruner decides over every
        trial of the family/tier (the study), so an exception it raises is no crash of this candidate.
        Blamed on it, a fault of the study (another trial's data, a bug of the pruner) failed the
        candidates one after another as each asked, four crashes each."""
        current, self.current = self.current, None   # (left None when it raises: the crash is nobody's)
        try:
            prune = trial.should_prune()
        except UpdateFinishedTrialError:
            raise
        except Exception as e:   # the pruner's own (not the storage's): every rerun stops here too; say so
            if _is_crash(e) and hasattr(e, "add_note"):   # (Python >= 3.11)
                try:
                    ft = trial.study._storage.get_trial(trial._trial_id)
                    what = f"{ft.user_attrs.get('key')}, after rung {len(_rung_losses(ft, len(self.cfg.rungs))) - 1}"
                except Exception:  # noqa: BLE001 - the storage's: the pruner's exception is the one to raise
                    what = "its candidate"
                e.add_note(f"tune: the pruner raised deciding trial {trial.number} ({what}); not counted against "
                           "that candidate (the pruner reads every trial of its family/tier): every rerun stops "
                           "here until its cause is fixed")
            raise
        self.current = current
        return prune

    def _ended_by_pruner(self, study, trial) -> bool:
        """Ask the pruner about the trial's last stored rung (it stores its rung value in the trial); True when
        the trial ends here: pruned, or failed meanwhile by another worker (let go)."""
        try:
            prune = self._should_prune(trial)
        except UpdateFinishedTrialError:
            self._let_go(trial)
            return True
        if prune:
            self._finish(study, trial, optuna.trial.TrialState.PRUNED)
        return prune

    # -- synchronized mode
    def _sync_step(self, study) -> str:
        """One scheduling step; returns "worked", "waiting" or "done"."""
        n = len(self.cfg.rungs)
        trials = study.get_trials(deepcopy=False)
        live = _live(trials)
        by_id = {t._trial_id: t for t in trials}
        groups: dict[tuple[str, int], dict] = defaultdict(dict)
        for key, ft in live.items():
            groups[_group_of(ft)][key] = ft
        states = {g: _group_state(members, n) for g, members in groups.items()}
        self._drop_taken_over(by_id)
        with self.lock:
            held = sorted(self.held.items(), key=lambda kv: by_id[kv[0]].number)
        ready = []
        for tid, trial in held:
            ft = by_id[tid]
            done = len(_rung_losses(ft, n))
            st = states[_group_of(ft)]
            if done == 0 or st.pending is None or st.pending >= done:
                ready.append((done, ft.number, trial, ft))
        for done, _, trial, ft in sorted(ready, key=lambda r: (r[0], r[1])):
            self.current = trial._trial_id
            cand = _candidate(ft)
            if done == n:  # a retry whose worker died after storing the last rung's loss, before finishing it
                self._finish(study, trial, optuna.trial.TrialState.COMPLETE,
                             value=float(ft.user_attrs[f"rung:{n - 1}"]))
                return "worked"
            if done > 0:
                if self._should_prune(trial):
                    self._finish(study, trial, optuna.trial.TrialState.PRUNED)
                    return "worked"
            if self._train_rung(study, trial, cand, done):
                if done + 1 == n:
                    self._finish(study, trial, optuna.trial.TrialState.COMPLETE,
                                 value=float(study._storage.get_trial(trial._trial_id).user_attrs[f"rung:{n - 1}"]))
            return "worked"
        trial = _claim(study, self._claimed(study))
        if trial is not None:
            self.current = trial._trial_id
            self._start(study, trial)
            return "worked"
        self._sweep_stale(study)
        if self.held or any(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
                            for t in study.get_trials(deepcopy=False)):
            return "waiting"
        return "done"

    # -- asynchronous mode
    def _async_step(self) -> str:
        for study in self.studies.values():
            trial = _claim(study, self._claimed(study))
            if trial is None:
                continue
            self.current = trial._trial_id
            cand = self._start(study, trial)
            if cand is None:
                return "worked"
            n = len(self.cfg.rungs)
            ft = study._storage.get_trial(trial._trial_id)
            done = len(_rung_losses(ft, n))
            if 0 < done < n and ft.last_step is not None and ft.last_step <= self.cfg.rungs[done - 1]:
                # a retry whose worker was lost after storing rung done-1's loss, maybe before the pruner
                # decided it (the retry inherits no decision then): ask now; a decided rung answers False
                if self._ended_by_pruner(study, trial):
                    return "worked"
            for k in range(done, n):
                if not self._train_rung(study, trial, cand, k):
                    return "worked"
                if k + 1 < n and self._ended_by_pruner(study, trial):
                    return "worked"
            self._finish(study, trial, optuna.trial.TrialState.COMPLETE,
                         value=float(study._storage.get_trial(trial._trial_id).user_attrs[f"rung:{n - 1}"]))
            return "worked"
        busy = False
        for study in self.studies.values():
            self._sweep_stale(study)
            busy |= any(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
                        for t in study.get_trials(deepcopy=False))
        return "waiting" if busy else "done"

    def run(self) -> None:
        """Work until every study is finished; on an exception, release the held trials (:meth:`_release`)
        before it propagates."""
        beat = threading.Thread(target=self._heartbeat_loop, daemon=True)
        beat.start()
        try:
            while True:
                self.current = None
                if self.cfg.mode == "synchronized":
                    (study,) = self.studies.values()
                    status = self._sync_step(study)
                else:
                    status = self._async_step()
                if self.progress:
                    self.progress.update(self.studies.values())
                if status == "done":
                    return
                if status == "waiting":
                    time.sleep(self.poll_interval)
        except BaseException as e:
            self.stop.set()  # no heartbeat for the trials being released
            # a crash of the worker's own code is counted on the trial it was working on (see _is_crash)
            self.crash = e if _is_crash(e) else None
            self._release()
            raise
        finally:
            self.stop.set()
