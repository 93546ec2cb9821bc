"""The status lifecycle of a run's ``run.json`` extras, as pure functions of the extras, the failure
history and tokens: what a ``with RunWriter(...)`` block's failure writes, what a resume withdraws, and
what the writer's close settles. :class:`~spectral_lens.records.RunWriter` reads ``run.json``, calls
these, and writes the result atomically (see ``docs/records.md``, "Failed runs")."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

#: ``run.json`` extras ``status`` a :class:`RunWriter` used as a context manager records when its block
#: ends with an exception (with ``failure``: the exception); ``RunWriter(resume=True)`` sets it to ``"running"``.
FAILED = "failed"

#: Statuses that say the run ended (``spectral_lens.analysis.ENDED_STATUSES``): a failure does not replace them.
_ENDED = ("complete", "diverged")

#: A run whose records reach this share of its token budget (``RunInfo.total_tokens``) counts as complete
#: (``spectral_lens.analysis.COMPLETE_COVERAGE``).
COMPLETE_COVERAGE = 0.95

#: ``run.json`` extras ``status`` of a failed run resumed by ``RunWriter(resume=True)`` while the writer is
#: open (see :meth:`RunWriter._settle`).
RUNNING = "running"

#: ``run.json`` extras key of the failures a resume withdrew: a list of ``{"failure": TEXT, "step": S,
#: "tokens": T, "resumed": TIME}`` (``"after_end": true`` for a ``failure_after_end``; ``"went_on": true`` once the
#: resumed writer went on with the training and settled its ``"running"``; ``"settled": STATUS`` when it closed,
#: without going on, under a status said meanwhile, see :data:`SETTLED`), oldest first, ``step``
#: and ``tokens`` where the record ended at the resume (``null`` when it held no line). The analyses do not
#: read it (a run's status is ``status``); ``spectral-lens inspect`` shows it.
FAILURE_HISTORY = "failure_history"

#: ``failure_history`` entry key: the status (``"complete"``, ``"diverged"``, ...; ``null``: removed) under which the
#: writer that withdrew the entry's failure closed without going on with the training, said by the caller with
#: ``update_info`` (or set by another program). It settled the failure: no later ``"running"`` brings it back
#: (:func:`_stale_running`).
SETTLED = "settled"

#: ``log`` scalars only a training loop records: a ``log.jsonl`` event with one of them is a line of training
#: (see :func:`_went_on`); ``val_loss`` and ``lr`` are also what a script evaluating checkpoints records.
_TRAINING_KEYS = ("train_loss", "tokens_per_s")

#: ``run.json`` extras key of the exception that ended a ``with RunWriter(...)`` block when the record
#: already said the run ended (see :meth:`RunWriter.__exit__`); the run's status is kept.
FAILURE_AFTER_END = "failure_after_end"


def _extras(header: Mapping[str, Any]) -> dict[str, Any]:
    """``run.json``'s ``extras`` (a header from ``RunRecord._read_header``); ``{}`` when absent or ``null``
    (a hand-written or old file), as :meth:`RunInfo.from_dict` reads it."""
    extras = header.get("extras")
    return extras if isinstance(extras, dict) else {}


def _withdraw_marks(extras: Mapping[str, Any], end: tuple[int | None, int | None], now: float
                    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``extras`` of a run being resumed: a ``failure_after_end``, and a ``status: "failed"`` with its ``failure``,
    withdrawn (the status set to ``"running"``) and moved to the end of ``failure_history`` at ``end`` (the
    ``(step, tokens)`` where the record ends); with the entry of the withdrawn ``failure`` (``None`` when the
    run was not failed). A ``failure_history`` that is ``null`` counts as none; one that is not a list (not the
    writer's) becomes the list's first entry, so that neither it nor the failure is lost."""
    out, (step, tokens) = dict(extras), end
    entries = []
    if FAILURE_AFTER_END in out:
        entries.append({"failure": out.pop(FAILURE_AFTER_END), "step": step, "tokens": tokens, "resumed": now,
                        "after_end": True})
    withdrawn = None
    if out.get("status") == FAILED:
        withdrawn = {"failure": out.pop("failure", None), "step": step, "tokens": tokens, "resumed": now}
        out["status"] = RUNNING
        entries.append(withdrawn)
    history = out.get(FAILURE_HISTORY)
    if entries:
        out[FAILURE_HISTORY] = [*(history if isinstance(history, list) else () if history is None else [history]),
                                *entries]
    return out, withdrawn


def _settled(extras: Mapping[str, Any], withdrawn: Mapping[str, Any], went_on: bool) -> dict[str, Any]:
    """``extras`` of a resumed failed run (status ``"running"``) when its writer closes (see
    :meth:`RunWriter._settle`): without ``status`` when the writer ``went_on`` with the training, else with
    the ``withdrawn`` failure restored and its entry (the last) taken off ``failure_history`` (the key
    removed when that leaves it empty), as before the resume."""
    out = dict(extras)
    if out.get("status") != RUNNING:
        return out
    history = out.get(FAILURE_HISTORY)
    if went_on:
        del out["status"]
        return _marked_went_on(out, withdrawn)
    out["status"] = FAILED
    if withdrawn.get("failure") is not None:  # a stale "running"'s entry may lack it (see _stale_running)
        out["failure"] = withdrawn["failure"]
    if isinstance(history, list) and history and _same_entry(history[-1], withdrawn):
        if len(history) == 1:
            del out[FAILURE_HISTORY]
        else:
            out[FAILURE_HISTORY] = history[:-1]
    return out


def _marked_went_on(extras: Mapping[str, Any], withdrawn: Mapping[str, Any]) -> dict[str, Any]:
    """``extras`` with the ``withdrawn`` failure's entry (the last of ``failure_history``) marked ``"went_on":
    true``: the writer that resumed the run went on with the training (see :func:`_settled`; also where the
    status is the caller's, said with ``update_info``). A later ``"running"`` is then no gone writer's mark
    (:func:`_stale_running`), so no resume brings back the failure the run moved past."""
    return _marked(extras, withdrawn, {"went_on": True})


def _marked(extras: Mapping[str, Any], withdrawn: Mapping[str, Any], mark: Mapping[str, Any]) -> dict[str, Any]:
    """``extras`` with ``mark`` merged into the ``withdrawn`` failure's entry when it is the last of
    ``failure_history`` (else, e.g. another program rewrote the history, unchanged)."""
    out = dict(extras)
    history = out.get(FAILURE_HISTORY)
    if isinstance(history, list) and history and _same_entry(history[-1], withdrawn):
        out[FAILURE_HISTORY] = [*history[:-1], {**history[-1], **mark}]
    return out


def _closed(extras: Mapping[str, Any], withdrawn: Mapping[str, Any] | None, went_on: bool, said: bool
            ) -> dict[str, Any] | None:
    """``extras`` when a resumed writer closes (see ``RunWriter._settle``), ``None`` when nothing changes.
    ``withdrawn``: the failure's entry it withdrew (or took over from a killed writer); ``None``: it found a
    ``"running"`` with nothing to restore (after an ``after_end``, ``went_on`` or ``settled`` entry, or none).
    ``said``: the caller said a status with ``update_info`` (or a new failure was marked).

    * its own ``"running"`` (not said): settled by :func:`_settled` (removed if it ``went_on``, else the
      failure restored);
    * a ``"running"`` with nothing to restore, not said: removed (the writer holds the lock: no other
      writer is running; the analyses read ``"running"`` as no status);
    * a status said: kept; the entry marked ``went_on`` when it went on, else ``settled`` with the status, as
      the caller settled the failure (so that no later ``"running"`` brings it back), except a ``"failed"``
      (failed again: the next resume's entry follows) and the caller's ``"running"`` without going on (the
      resume's own mark: the next resume that does not go on restores the failure)."""
    status = extras.get("status")
    if withdrawn is None:
        if status != RUNNING or said:
            return None
        return {k: v for k, v in extras.items() if k != "status"}
    if status == RUNNING and not said:
        return _settled(extras, withdrawn, went_on)
    if status == FAILED or (status == RUNNING and not went_on):
        return None
    out = _marked(extras, withdrawn, {"went_on": True} if went_on else {SETTLED: status})
    return None if out.get(FAILURE_HISTORY) is extras.get(FAILURE_HISTORY) else out


def _same_entry(a: Any, b: Any) -> bool:
    """Whether two ``failure_history`` entries are the same, as their JSON text (a NaN ``failure`` of a
    hand-written ``run.json`` equals itself only as one object: ``==`` tells two reads of it apart)."""
    try:
        return a == b or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return False


def failure_history_lines(extras: Mapping[str, Any]) -> list[str]:
    """One line per entry of ``extras["failure_history"]`` (see :data:`FAILURE_HISTORY`), for
    ``spectral-lens inspect``: ``"failed (RuntimeError: preempted) at step 800, 419430400 tokens; resumed"``.
    An entry that is not an object is shown as it is."""
    history = extras.get(FAILURE_HISTORY) if isinstance(extras, Mapping) else None
    out = []
    for e in history if isinstance(history, list) else ():
        if not isinstance(e, Mapping):
            out.append(repr(e)[:200])
            continue
        why = " ".join(str(e.get("failure") or "").split())[:200]  # one line, as the failure marks are
        text = ("failed after the run ended" if e.get("after_end") else "failed") + (f" ({why})" if why else "")
        if e.get("step") is not None or e.get("tokens") is not None:
            text += f" at step {e.get('step')}, {e.get('tokens')} tokens"
        if e.get("went_on"):
            text += "; resumed, and the training went on"
        elif SETTLED in e:
            settled = e[SETTLED]
            text += (f"; resumed, then marked {' '.join(str(settled).split())[:40]}" if settled is not None
                     else "; resumed, then its status was removed")
        else:
            text += "; resumed"
        out.append(text)
    return out


def _is_failure(exc: BaseException | None) -> bool:
    """Whether an exception ending a ``with RunWriter(...)`` block is a failure of the run: anything but
    ``GeneratorExit`` and ``SystemExit`` with status 0 (``sys.exit()``)."""
    if isinstance(exc, GeneratorExit):
        return False
    return not (isinstance(exc, SystemExit) and exc.code in (0, None))


def _failure_text(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters); a type outside the builtins named
    with its module (``torch.OutOfMemoryError``); the type alone when ``str(exc)`` raises (a broken
    ``__str__``: the block's exception is still the one raised)."""
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    try:
        message = next(iter(str(exc).splitlines()), "").strip()
    except Exception:
        message = ""
    return f"{name}: {message}"[:200] if message else name


def _is_marked(extras: Mapping[str, Any]) -> bool:
    """Whether a resume has marks to withdraw (see :func:`_withdraw_marks`): ``status: "failed"`` or a
    ``failure_after_end``."""
    return extras.get("status") == FAILED or FAILURE_AFTER_END in extras


def _failure_mark(extras: Mapping[str, Any], text: str, *, resumed: bool,
                  ended_before: Callable[[], bool]) -> dict[str, Any]:
    """The extras keys a ``with RunWriter(...)`` block's failure ``text`` writes (merged into ``extras``):
    ``failure_after_end`` when the record already says the run ended (an ended status, or ``ended_before()``:
    the lines recorded before the writer opened reach :data:`COMPLETE_COVERAGE`; asked only when needed, as it
    reads the files), else ``status: "failed"`` and ``failure``. A failed run the writer ``resumed`` (its
    ``"running"``) is still failed, not ended by its lines."""
    status = extras.get("status")
    failed = status == FAILED or (status == RUNNING and resumed)
    if status in _ENDED or (not failed and ended_before()):
        return {FAILURE_AFTER_END: text}
    return {"status": FAILED, "failure": text}


def _is_training(scalars: Mapping[str, Any]) -> bool:
    """Whether a ``log`` event's ``scalars`` make it a line of training: a ``train_loss`` or ``tokens_per_s``
    that is not ``None`` (see :data:`_TRAINING_KEYS`)."""
    return any(scalars.get(k) is not None for k in _TRAINING_KEYS)


def _trains_again(scalars: Mapping[str, Any], step: int, held: Mapping[int, bool]) -> bool:
    """Whether a line of training (:func:`_is_training`) with ``scalars`` at ``step`` trains that step again, given
    ``held``: the steps of the record's training lines before, each with whether one of them had a
    ``train_loss``. A ``tokens_per_s`` (measured only while training) where the record held a training line; a
    ``train_loss`` only where it held a ``train_loss``: ``trainer_state.log_history`` backfills the losses the
    record lacks (a loop that logged only its throughput), never one where it holds one, and no throughput."""
    if step not in held:
        return False
    return scalars.get("tokens_per_s") is not None or (scalars.get("train_loss") is not None and held[step])


def _went_on(resumed_at: int | None, max_tokens: int | None, dropped: bool, *, trained: bool = False) -> bool:
    """Whether a writer that resumed a failed run went on with the training (see :func:`_settled`): it ran
    ``drop_after`` (``dropped``), trained a step again (``trained``: logged a line of training,
    :func:`_is_training`, at a step where the record held one, as a restart from an earlier checkpoint without
    ``drop_after`` does before where the record ended; see ``RunWriter._retrained``), or appended a line (the
    largest tokens: ``max_tokens``) past ``resumed_at``, the tokens where the record ended when it opened (any
    line when the record held none). Other lines up to there are no training: a script measuring or
    evaluating the failed run's checkpoints, or backfilling their curves, records them."""
    return dropped or trained or (max_tokens is not None and (resumed_at is None or max_tokens > resumed_at))


def _stale_running(extras: Mapping[str, Any]) -> dict[str, Any] | None:
    """The entry a resume withdrew, when ``extras`` hold the ``"running"`` of a writer that resumed a failed
    run and never closed (killed): status ``"running"`` and a last ``failure_history`` entry a resume wrote
    (an object with ``resumed``, no ``after_end``, not marked ``went_on`` or ``settled`` by a writer that
    closed); else
    ``None``. Read by a writer opening the run, which holds its lock: the earlier writer is gone, and its
    mark is settled as the new writer's own (a ``"running"`` set by ``update_info`` on such a run reads the
    same: the analyses treat it as no status)."""
    history = extras.get(FAILURE_HISTORY)
    if extras.get("status") != RUNNING or not isinstance(history, list) or not history:
        return None
    last = history[-1]
    return (last if isinstance(last, dict) and "resumed" in last and not last.get("after_end")
            and not last.get("went_on") and SETTLED not in last else None)
