"""Run records: :class:`RunWriter`, the one writer of a run directory (see :mod:`spectral_lens.records`)."""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
import stat
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import _locks as locks
from .._args import as_integer
from ..atomic import TMP_SUFFIX, is_tmp_name, named_os_error, write_atomic
from ..atomic import fsync_dir as _fsync_dir
from ..spectra.fit import tail_window as _tail_window
from ..spectrum import Spectrum
from ._status import (  # the status lifecycle (see _status)
    COMPLETE_COVERAGE,
    RUNNING,
    _closed,
    _extras,
    _failure_mark,
    _failure_text,
    _is_failure,
    _is_marked,
    _is_training,
    _stale_running,
    _trains_again,
    _went_on,
    _withdraw_marks,
)
# imported from here by the analyses, the CLI and tests:
from ._status import _ENDED, FAILED, FAILURE_AFTER_END, FAILURE_HISTORY, failure_history_lines  # noqa: F401
from ._scan import _int_step, _is_val_loss, _json_object, _Scan, _scan_file  # the incremental reader
from .reader import RunRecord, _check_regular, _event_problem, _is_record_line
from .schema import (
    LOG_FILE,
    MEASUREMENTS_FILE,
    RUN_FILE,
    SPECTRA_DIR,
    _FORMAT,
    _VERSION,
    Measurement,
    RecordFormatError,
    RecordWarning,
    RunInfo,
    _is_count,
    _is_number,
    _json_default,
    _json_line,
    _safe_name,
    _write_json_atomic,
    spectrum_summaries,
)


class RunWriter:
    """Appends events and measurements to a run directory (one writer per run).

    One writer per run directory is enforced: the writer holds an exclusive ``flock`` on
    ``path/.writer.lock`` until :meth:`close` (released by the kernel if its process dies), and a
    second ``RunWriter`` on the same directory, in any process, raises ``RuntimeError`` naming it.

    Args:
        path: the run directory (created if needed).
        info: the run's metadata. Required for a new run; for ``resume=True`` it may be omitted
            (read from ``run.json``) or must carry the same ``run_id``, and no field other than the record's:
            a field the record left ``None`` is filled in, any other difference is a ``ValueError`` naming
            each field (``total_tokens`` is written while nothing was measured), differing ``extras`` a
            :class:`RecordWarning` (use :meth:`update_info`); see :func:`_resumed_fields`.
        resume: append to an existing run. Without it, an existing ``run.json`` is an error, and so
            is a directory without ``run.json`` that holds another run's ``log.jsonl``,
            ``measurements.jsonl`` or files in ``spectra/`` (its ``run.json`` lost or deleted), so two
            runs never write into one directory by accident. With it, a directory without
            ``run.json`` is started from ``info`` and whatever record files it holds are appended to.
            On resume, a truncated last line left by a crash is cut off (with a
            :class:`RecordWarning`) before anything is appended. A run resumed from a training
            checkpoint trains the steps after it again: call :meth:`drop_after` with the
            checkpoint's step so they are recorded once (the framework callbacks do). A run marked
            ``status: "failed"`` (below) is marked ``"running"`` while the writer is open, and its
            ``failure`` (and a ``failure_after_end``) moves to extras ``failure_history``; on close the
            status is removed if the writer went on with the training, else the failure is restored
            (see :meth:`_settle`). A ``"running"`` left by such a writer that was killed is settled by the
            next resumed writer as its own; any other ``"running"`` it finds (no writer holds it) is
            removed when it closes, unless it said a status itself.
        fsync: fsync every file and line (default). ``False`` trades crash safety for speed
            (synthetic data, tests); the write order, and thus safety for concurrent readers, is kept.
        tail_window: window of the stored ``alpha_tail`` summary; default: the scale rule for
            ``info.n_layer`` (:func:`spectral_lens.tail_window`), or the d12 window ``(100, 200)``.
            On resume the run's recorded windows are kept; a ``tail_window`` given that differs from
            the recorded one is a ``ValueError`` (one run's summaries use one window).
        head_window: window of the stored ``alpha_head`` summary (default ``(10, 40)``).

    Used as a context manager (``with RunWriter(...) as w:``), a block that ends with an exception
    leaves ``run.json`` extras ``status: "failed"`` and ``failure``, or ``failure_after_end`` when the
    record already said the run ended (see :meth:`__exit__`); a clean exit leaves no mark
    (``update_info(status="complete")`` says the run is done).

    Example::

        with RunWriter("runs/flexwin-b8", RunInfo("flexwin-b8", family="FlexWin", batch_tier=8,
                       total_tokens=2_000_000_000, n_layer=12)) as w:
            w.log(step, tokens, train_loss=loss, tokens_per_s=tps)
            w.log_measurement(step, tokens, {"act:blocks.11": spec}, val_loss=vl,
                              scalars={"noise_scale": b_simple})
    """

    def __init__(
        self,
        path: str | os.PathLike,
        info: RunInfo | None = None,
        *,
        resume: bool = False,
        fsync: bool = True,
        tail_window: tuple[int, int] | None = None,
        head_window: tuple[int, int] | None = (10, 40),
    ):
        self.path = Path(path)
        self.fsync = fsync
        self._fds: dict[str, int] = {}
        self._ends: dict[str, int] = {}  # each JSONL file's size after this writer's last line (see _append)
        self._before: dict[str, int] = {}  # each JSONL file's size when opened (or after drop_after): see _ended_before
        self._lock_fd: int | None = None
        self._scans: dict[str, _Scan] = {}  # each JSONL file's lines read so far (see _scan)
        self._withdrawn: dict[str, Any] | None = None  # the failure this writer withdrew on resume (see _settle)
        self._found_running = False  # it found a "running" with nothing to restore: removed at the close (_settle)
        self._said = False  # update_info said a status (or a new failure): the status is no longer the resume's
        self._resumed_at: int | None = None  # the tokens where the record ended when it withdrew it
        self._max_tokens: int | None = None  # the largest tokens of a line this writer appended
        self._dropped = False  # drop_after ran: the training resumed from a checkpoint
        self._trained = False  # it trained a step again (see _retrained, _status._went_on)
        self._trained_before: dict[int, bool] | None = None  # steps of the record's training lines before (_retrained)
        run_file = self.path / RUN_FILE
        if not _holds_run_file(run_file):  # a new run: check the arguments before creating its directory
            if info is None:
                raise _needs_info(self.path)
            if not isinstance(info, RunInfo):
                raise TypeError(f"info must be a RunInfo, got {type(info).__name__}")
            for window, what in ((tail_window, "tail_window"), (head_window, "head_window")):
                if window is not None:
                    _checked_window(window, what)
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_run_dir(self.path)  # before anything is read or written: one writer per run
        self._lock_pid = os.getpid()
        try:
            self._open(run_file, info, resume, tail_window, head_window)
        except BaseException:
            self._close()
            raise

    def _open(self, run_file: Path, info: RunInfo | None, resume: bool, tail_window, head_window) -> None:
        fsync = self.fsync
        marked = False  # a resumed run marked failed, or failure_after_end (by __exit__)
        stale = None  # the entry of an earlier writer's "running" it never settled (killed)
        existing = _holds_run_file(run_file)  # resumed: a "running" there is no writer's (see below)
        if resume:  # read below (a FIFO waited for good): refused before anything is written
            for name in (LOG_FILE, MEASUREMENTS_FILE):
                _check_regular(self.path / name)
        if existing:
            if not resume:
                raise FileExistsError(
                    f"{run_file} already exists: pass resume=True to append to this run, or choose a new directory"
                )
            stored = RunRecord._read_info(self.path)
            if info is not None and not isinstance(info, RunInfo):
                raise TypeError(f"info must be a RunInfo, got {type(info).__name__}")
            if info is not None and info.run_id != stored.run_id:
                raise ValueError(
                    f"{run_file}: resuming run {stored.run_id!r} with info for run {info.run_id!r}"
                )
            self.info = stored
            header = RunRecord._read_header(self.path)
            windows = header.get("summary_windows", {})
            self.tail_window = tuple(windows["tail"]) if windows.get("tail") else None
            self.head_window = tuple(windows["head"]) if windows.get("head") else None
            if tail_window is not None and _checked_window(tail_window, "tail_window") != self.tail_window:
                raise ValueError(
                    f"{run_file}: resuming a run recorded with tail_window={self.tail_window} with "
                    f"tail_window={tuple(tail_window)}; one run's summaries use one window (omit tail_window to keep it)"
                )
            # before, every other field given was dropped without a word (a budget extended, another batch size)
            filled, budget_said = ({}, None) if info is None else _resumed_fields(run_file, stored, info,
                                                                                   self.path / MEASUREMENTS_FILE)
            marked = _is_marked(_extras(header))  # withdrawn below
            # held by this writer, the lock says the writer that set a "running" is gone (without locks: unknown)
            stale = None if marked or self._lock_fd is None else _stale_running(_extras(header))
        else:
            if info is None:
                raise _needs_info(self.path)
            if not isinstance(info, RunInfo):
                raise TypeError(f"info must be a RunInfo, got {type(info).__name__}")
            leftovers = [] if resume else self._leftovers()
            if leftovers:
                raise FileExistsError(
                    f"{self.path} holds another run's files ({', '.join(leftovers)}) but no {RUN_FILE}: choose a "
                    f"new directory, remove them, or pass resume=True to append to them"
                )
            self.info = info
            if tail_window is None:
                tail_window = _tail_window(info.n_layer) if info.n_layer else (100, 200)
            self.tail_window = _checked_window(tail_window, "tail_window")
            self.head_window = None if head_window is None else _checked_window(head_window, "head_window")
            self.path.mkdir(parents=True, exist_ok=True)
            header = {
                "format": _FORMAT,
                "version": _VERSION,
                **info.to_dict(),
                "summary_windows": {"tail": list(self.tail_window), "head": self.head_window and list(self.head_window)},
                "created": time.time(),
            }
            if _is_empty_file(run_file):  # nothing in it is lost; but the windows the summaries recorded were
                measured = resume and not _holds_no_line(self.path / MEASUREMENTS_FILE)  # computed with may be
                warnings.warn(f"{run_file} is empty (a crash while it was created): written again from the RunInfo "
                              "given" + (f"; {MEASUREMENTS_FILE} holds measurements whose stored summaries used the "
                                         "windows of the writer that recorded them, now recorded as tail_window="
                                         f"{self.tail_window}, head_window={self.head_window}: pass that writer's "
                                         "tail_window= / head_window= if they differ" if measured else ""),
                              RecordWarning, stacklevel=3)  # the user's RunWriter(...): _open < __init__
            _write_json_atomic(run_file, header, fsync)
        (self.path / SPECTRA_DIR).mkdir(exist_ok=True)
        if resume:
            self._clean_orphans()
        for name in (LOG_FILE, MEASUREMENTS_FILE):
            self._fds[name] = self._open_append(self.path / name)
            self._before[name] = self._ends[name] = os.fstat(self._fds[name]).st_size  # ends with a newline
        if fsync:  # the entries just created (the JSONL files, spectra/, the run directory) must be durable
            _fsync_dir(self.path)  # too, not only what is fsynced into them
            _fsync_dir(self.path.parent)
        if existing and filled:  # fields the record lacked (or a budget no measurement used yet): only now, so that
            header.update(filled)  # a resume refused above leaves run.json as it was
            if budget_said is not None:
                warnings.warn(budget_said, RecordWarning, stacklevel=3)  # the user's RunWriter(...): _open < __init__
            _write_json_atomic(run_file, header, fsync)
            for key, value in filled.items():
                setattr(self.info, key, value)
        if marked:  # resumed, the run (or the work on it) goes on: the writer's own marks (see __exit__)
            end, now = self._record_end(), time.time()  # are withdrawn into the history; only now, so that a
            header["extras"], withdrawn = _withdraw_marks(header["extras"], end, now)  # resume refused above
            _write_json_atomic(run_file, header, fsync)  # (a bad last line) leaves them as they were
            self.info.extras = _withdraw_marks(self.info.extras, end, now)[0]
            self._withdrawn, self._resumed_at = withdrawn, end[1]  # settled when the writer closes (see _settle)
        elif stale is not None:  # this writer holds the lock: the one that set the "running" is gone; its
            self._withdrawn, self._resumed_at = stale, self._record_end()[1]  # lines count as recorded before
        # any other "running" is no writer's either (this one holds the lock), with nothing to restore: settled
        self._found_running = (existing and self._withdrawn is None and self._lock_fd is not None  # at the close
                               and _extras(header).get("status") == RUNNING)  # (see _settle)

    def _leftovers(self) -> list[str]:
        """The record files of another run in this directory: ``log.jsonl``, ``measurements.jsonl``,
        ``spectra/`` with files in it."""
        out = [name for name in (LOG_FILE, MEASUREMENTS_FILE)  # an empty one (a crash right after creating it)
               if os.path.lexists(self.path / name) and not _is_empty_file(self.path / name)]  # holds no run
        n = sum(1 for _ in (self.path / SPECTRA_DIR).iterdir()) if (self.path / SPECTRA_DIR).is_dir() else 0
        if n:
            out.append(f"{SPECTRA_DIR}/ ({n} file{'' if n == 1 else 's'})")
        return out

    def _open_append(self, path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _BINARY, 0o644)
        try:
            self._fix_last_line(path, fd)
        except BaseException as exc:  # an I/O error, or the warning raised as an error: no descriptor left open
            os.close(fd)
            if isinstance(exc, OSError):  # the read, cut or newline failing (EIO) named no file
                named = named_os_error(exc, path)
                if named is not exc:
                    raise named from exc
            raise
        return fd

    @staticmethod
    def _fix_last_line(path: Path, fd: int) -> None:
        """End the last line of the JSONL file open on ``fd``: a complete line that only lacks its newline
        (another tool's) gets it; a partial one (a crash mid-write) is cut off with a :class:`RecordWarning`,
        so that the next line does not glue onto it. The last newline is searched backwards a MiB at a time,
        so a line of any length is handled (before, one longer than 1 MiB refused the resume with a
        ``RecordFormatError``: a crash while a writer appended its own long line left a run no writer could
        resume); the line is read whole only when it ends with ``}`` (it may be complete)."""
        size = os.fstat(fd).st_size
        if not size or _read_at(fd, 1, size - 1) == b"\n":
            return
        start = _last_line_start(fd, size)
        tail = _read_at(fd, min(size - start, _CHUNK), size - min(size - start, _CHUNK))
        if tail.rstrip().endswith(b"}") and _is_record_line(_read_at(fd, size - start, start)):
            os.write(fd, b"\n")  # a complete line that only lacks its newline (e.g. written by another tool): kept
            return
        warnings.warn(
            f"{path}: dropping a truncated last line ({size - start} bytes) before appending",
            RecordWarning,
            stacklevel=5,  # the user's RunWriter(...) call: _fix_last_line < _open_append < _open < __init__
        )
        os.ftruncate(fd, start)

    def _clean_orphans(self) -> None:
        """On resume: remove temporary files and spectrum files no measurement line refers to, both
        left by a writer killed mid-measurement (its line was never appended). Nothing is removed when
        ``measurements.jsonl`` has an unreadable line (its references are unknown)."""
        spectra = self.path / SPECTRA_DIR
        tmps = [p for d in (self.path, spectra) if d.is_dir() for p in d.iterdir()
                if p.name.startswith(".") and (p.name.endswith(TMP_SUFFIX) or p.name.endswith(".tmp.npz"))]
        tmps += self._linked_tmps()
        referenced: set[str] = set()
        unknown = [False]

        def visit(raw: bytes, obj: dict[str, Any] | None) -> None:
            if obj is None:
                unknown[0] = unknown[0] or bool(raw.strip())
            else:
                referenced.update(_spectrum_files(obj))

        # the one read of the file before the writer opens it: it also counts the steps (see _scan)
        last = self._scan(MEASUREMENTS_FILE, visit, fresh=True)[1] if (self.path / MEASUREMENTS_FILE).exists() else b""
        if _is_record_line(last):  # a complete line that only lacks its newline: kept (see _fix_last_line)
            referenced |= _spectrum_files(_json_object(last) or {})
        if unknown[0]:
            orphans = []
        else:
            orphans = [p for p in spectra.iterdir() if _SPECTRUM_FILE.fullmatch(p.name) and p.name not in referenced] \
                if spectra.is_dir() else []
        removed, failed = [0, 0], []  # temporary, spectrum files; one it could not remove (EACCES: another user's
        for kind, files in enumerate((tmps, orphans)):  # in a sticky directory) was counted removed all the same
            for p in files:
                try:
                    p.unlink()
                except FileNotFoundError:  # gone meanwhile
                    pass
                except OSError as exc:
                    failed.append(f"{p} ({exc.strerror or exc})")
                    continue
                removed[kind] += 1
        if tmps or orphans:
            warnings.warn(
                f"{self.path}: removed {removed[0]} temporary file(s) and {removed[1]} spectrum file(s) that no "
                f"measurement refers to, left by an interrupted writer"
                + (f"; could not remove {len(failed)}: {'; '.join(failed[:3])}{'; ...' if len(failed) > 3 else ''}"
                   if failed else ""),
                RecordWarning,
                stacklevel=4,  # the user's RunWriter(...) call: _clean_orphans < _open < __init__
            )

    def _linked_tmps(self) -> list[Path]:
        """The temporary files a killed atomic write through a symlinked ``run.json``, ``log.jsonl`` or
        ``measurements.jsonl`` left beside the link's target (``write_atomic`` writes the target, in its folder),
        outside this directory: only names that write gives for that target (:func:`~spectral_lens.atomic.is_tmp_name`),
        regular files. Before, the resume's cleanup scanned only the run directory and ``spectra/``."""
        out: list[Path] = []
        scanned = {os.path.realpath(self.path), os.path.realpath(self.path / SPECTRA_DIR)}  # by _clean_orphans
        for name in (RUN_FILE, LOG_FILE, MEASUREMENTS_FILE):
            link = self.path / name
            if not link.is_symlink():
                continue
            target = Path(os.path.realpath(link))
            if str(target.parent) in scanned:  # counted there
                continue
            try:
                entries = list(os.scandir(target.parent))
            except OSError:  # a dangling link's folder that does not exist, or one not readable
                continue
            out += [Path(e.path) for e in entries if is_tmp_name(e.name, target) and e.is_file(follow_symlinks=False)
                    and Path(e.path) not in out]  # two links to one file
        return out

    def _append(self, name: str, obj: Mapping[str, Any]) -> None:
        fd = self._fds.get(name)
        if fd is None:
            raise ValueError(f"RunWriter for {self.path} is closed")
        data = _json_line(obj)
        start = os.fstat(fd).st_size
        try:
            # the line starts on a fresh line: where the file is not as this writer's last line left it
            # (another program appended, or a failed write's cut failed too), its last byte is read, and a
            # line left without its newline is ended first, so the two lines are not glued (losing both)
            if start and start != self._ends.get(name) and _read_at(fd, 1, start - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
            while written < len(data):  # a short write (disk filling up): write the rest, or fail below
                written += os.write(fd, data[written:])
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:  # ENOSPC, EIO, file-size limit: name the file, and leave no partial line
            try:  # that the next line would be glued onto (costing both lines)
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise named_os_error(exc, self.path / name) from exc
        self._ends[name] = start + len(data)

    def log(self, step: int, tokens: int, **scalars: Any) -> None:
        """Append one scalar event to ``log.jsonl``.

        Conventional keys: ``train_loss``, ``val_loss``, ``tokens_per_s`` (throughput), ``lr``. Any
        JSON-serializable value is accepted, except that ``train_loss``, ``val_loss`` and
        ``tokens_per_s`` must be numbers (or ``None``): the reader refuses a line where they are not, so
        such a value raises ``TypeError`` here instead of being written. ``time`` (wall clock) is added
        unless given.
        """
        for key in _NUMERIC_EVENT_KEYS:
            v = scalars.get(key)
            if v is None or type(v) is float:  # the common cases, first (the hot path: ABC checks cost 0.7 us a log)
                continue
            number = isinstance(v, numbers.Real) or (
                isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool and not v.is_complex())
            if v is not None and (isinstance(v, bool) or not number):
                raise TypeError(f"RunWriter.log: {key} must be a number or None, got {v!r}")
            if isinstance(v, numbers.Integral) and not _is_number(int(v)):  # written, the reader refused the line
                raise ValueError(f"RunWriter.log: {key} is an integer beyond the float range ({_digits(v)} digits), "
                                 "which the reader refuses")
        event = {"step": _count_arg(step, "log", "step"), "tokens": _count_arg(tokens, "log", "tokens")}
        event.update(scalars)
        event.setdefault("time", time.time())
        self._append(LOG_FILE, event)
        self._appended(event["tokens"])
        if (self._withdrawn is not None and not self._trained and _is_training(scalars)  # read only while it
                and not _went_on(self._resumed_at, self._max_tokens, self._dropped)):  # tells (see _retrained)
            self._trained = self._retrained(event["step"], scalars)

    def _appended(self, tokens: int) -> None:
        """Note a line this writer appended at ``tokens`` (see :meth:`_settle`)."""
        self._max_tokens = tokens if self._max_tokens is None else max(self._max_tokens, tokens)

    def _retrained(self, step: int, scalars: Mapping[str, Any]) -> bool:
        """Whether the line of training (``_status._is_training``) with ``scalars`` at ``step`` trains that step
        again (``_status._trains_again``: a training line the record held there when this writer opened, or in
        what its :meth:`drop_after` kept): a writer that resumed a failed run does so when it restarts from an
        earlier checkpoint without ``drop_after``, so it went on with the training, wherever the record ended
        (see :meth:`_settle`). A training line at a step the record lacks, before its end, is not:
        ``trainer_state.log_history`` backfills a checkpoint's curves so, writing only what the record lacks.
        Only the lines :meth:`RunRecord.open` keeps count (``log_history`` reads the record with it: a line it
        refuses, another tool's, is no loss held there, and the backfill writes one). The steps are read once,
        line by line, within the bytes ``log.jsonl`` held then (a file that cannot be read holds none)."""
        if self._trained_before is None:
            held: dict[int, bool] = {}
            size = self._before.get(LOG_FILE, 0)
            try:
                for raw in _lines_held(self.path / LOG_FILE, size):
                    obj = _json_object(raw)
                    if obj is not None and _is_training(obj) and _event_problem(obj) is None:
                        held[obj["step"]] = held.get(obj["step"], False) or obj.get("train_loss") is not None
            except OSError:
                pass
            self._trained_before = held
        return _trains_again(scalars, step, self._trained_before)

    def _spectrum_file(self, step: int, name: str, taken: set[str]) -> str:
        base = f"{int(step):08d}_{_safe_name(name)}"
        candidate, n = base, 1
        while candidate in taken or (self.path / SPECTRA_DIR / f"{candidate}.npz").exists():
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate)
        return f"{SPECTRA_DIR}/{candidate}.npz"

    def log_measurement(
        self,
        step: int,
        tokens: int,
        spectra: Mapping[str, Spectrum] | None = None,
        *,
        val_loss: float | None = None,
        progress: float | None = None,
        scalars: Mapping[str, float] | None = None,
        summaries: Mapping[str, Mapping[str, float]] | None = None,
        summarize: bool = True,
    ) -> Measurement:
        """Write the spectra of one checkpoint, then append its line to ``measurements.jsonl``.

        Args:
            step, tokens: checkpoint position.
            spectra: mapping name -> :class:`Spectrum` (names are free text; file names are derived
                from them and never need to be inverted).
            val_loss: validation loss at the checkpoint.
            progress: fraction of the training budget; default ``tokens / info.total_tokens`` when
                the budget is known.
            scalars: measurement-level scalars (``noise_scale``: gradient noise scale ``B_simple`` in
                samples per step, by convention).
            summaries: per-spectrum scalar summaries to store; merged over (and overriding) the
                defaults of :func:`spectrum_summaries` unless ``summarize=False``.
            summarize: compute the default :func:`spectrum_summaries` of every spectrum (``False``:
                store only ``summaries``).

        Every number is converted first: a value that is not one raises ``TypeError`` / ``ValueError``
        naming the argument, before anything is written; a failure while saving the spectra, or of
        the append of the line (a full disk), removes the spectra already saved, so a refused or
        failed call leaves no files behind. A closed writer raises ``ValueError`` before writing.

        Returns the :class:`Measurement` as written.
        """
        mfd = self._fds.get(MEASUREMENTS_FILE)
        if mfd is None:  # checked first: a closed writer (its lock released) writes no spectrum file either
            raise ValueError(f"RunWriter for {self.path} is closed")
        step, tokens = _count_arg(step, "log_measurement", "step"), _count_arg(tokens, "log_measurement", "tokens")
        spectra = dict(spectra or {})
        for name, spec in spectra.items():
            if not isinstance(spec, Spectrum):
                raise TypeError(f"log_measurement: spectra[{name!r}] is a {type(spec).__name__}, expected a Spectrum")
        if summaries is not None:
            extra = set(summaries) - set(spectra)
            if extra:
                raise ValueError(f"log_measurement: summaries given for unknown spectra {sorted(extra)}")
        if progress is None and self.info.total_tokens:
            progress = tokens / self.info.total_tokens
        # every number is checked before anything is written: a bad one leaves no spectrum file behind
        progress = None if progress is None else _float_arg(progress, "progress")
        val_loss = None if val_loss is None else _float_arg(val_loss, "val_loss")
        scalars = {k: _float_arg(v, f"scalars[{k!r}]") for k, v in (scalars or {}).items()}
        user_summaries = {n: {k: _float_arg(v, f"summaries[{n!r}][{k!r}]") for k, v in summaries[n].items()}
                          for n in (summaries or {})}
        taken: set[str] = set()
        entries: dict[str, dict[str, Any]] = {}
        all_summaries: dict[str, dict[str, float]] = {}
        try:
            for name, spec in spectra.items():
                rel = self._spectrum_file(step, name, taken)
                # atomic: temp file, fsync, rename; the directory is fsynced once, after the last (below), before
                spec.save(self.path / rel, fsync=self.fsync, sync_dir=False)  # the line refers to any of them
                entries[name] = {"file": rel, "kind": spec.kind}
                summ = spectrum_summaries(spec, self.tail_window, self.head_window) if summarize else {}
                summ.update(user_summaries.get(name, {}))
                all_summaries[name] = summ
                entries[name]["summaries"] = summ
            if spectra and self.fsync:  # inside: a failure (EIO) leaves no files either (before, they stayed)
                _fsync_dir(self.path / SPECTRA_DIR)
        except BaseException:  # e.g. a later spectrum refused or the disk full: no line will refer to the
            for entry in entries.values():  # files already saved, so do not leave them behind
                (self.path / entry["file"]).unlink(missing_ok=True)
            raise
        now = time.time()
        line = {
            "step": int(step),
            "tokens": int(tokens),
            "progress": progress,
            "val_loss": val_loss,
            "time": now,
            "spectra": entries,
            "scalars": scalars,
        }
        size = os.fstat(mfd).st_size
        try:
            self._append(MEASUREMENTS_FILE, line)
        except BaseException:  # a full disk: the line was cut off again, so no line refers to the spectra
            try:  # just saved; remove them (unless the line may still be there)
                cut = os.fstat(mfd).st_size == size
            except OSError:
                cut = False
            for entry in entries.values() if cut else ():
                (self.path / entry["file"]).unlink(missing_ok=True)
            raise
        self._appended(int(tokens))
        return Measurement(
            step=int(step),
            tokens=int(tokens),
            progress=line["progress"],
            val_loss=line["val_loss"],
            spectra=spectra,
            summaries=all_summaries,
            scalars=dict(line["scalars"]),
            kinds={n: s.kind for n, s in spectra.items()},
            time=now,
            files={n: e["file"] for n, e in entries.items()},
        )

    def drop_after(self, step: int) -> int:
        """Remove the records of every step after ``step``: the lines of ``log.jsonl`` and
        ``measurements.jsonl`` with a larger ``step``, and the spectrum files those measurements
        refer to. Returns the number of measurements removed.

        Call it when training resumes from a checkpoint taken at ``step``: the steps after it are
        trained, logged and measured again, and would otherwise be recorded twice.

        Each JSONL file is rewritten atomically (temporary file, fsync, rename), and the spectrum
        files are removed only after ``measurements.jsonl`` no longer refers to them, so a crash at
        any point leaves a readable record; calling ``drop_after`` again completes the job (spectrum
        files left behind are also removed by the next ``RunWriter(resume=True)``). A spectrum file that cannot be
        removed (``EACCES``) is a :class:`RecordWarning` naming it, and the others are still removed. Lines without a
        numeric ``step`` are kept; while ``measurements.jsonl`` has a line that is not a JSON object,
        no spectrum file is removed (that line's references are unknown). A partial last line (another
        program's, mid-write) of a file rewritten is cut off with a :class:`RecordWarning`, as on resume;
        cut, it keeps no spectrum file (blanks after the last newline are no line: dropped without a word).
        """
        if not self._fds:
            raise ValueError(f"RunWriter for {self.path} is closed")
        try:  # int() truncated: drop_after(2.7) kept step 2's lines and dropped the rest
            step = as_integer(step)
        except TypeError as exc:
            raise TypeError(f"RunWriter.drop_after: step must be an integer (the checkpoint's step): {exc}") from None
        self._dropped = True  # the training resumed from a checkpoint (see _settle)
        dropped_files: set[str] = set()
        kept_files: set[str] = set()
        unknown = False
        n_dropped = 0
        for name in (LOG_FILE, MEASUREMENTS_FILE):
            path = self.path / name
            keep: list[bytes] = []
            scan = _Scan(measurements=name == MEASUREMENTS_FILE)  # of the file as rewritten (see _scan)
            n = 0
            data = path.read_bytes()  # lines end at b"\n" only, as RunRecord.open reads them: a b"\r" inside
            lines = [raw + b"\n" for raw in data.split(b"\n")]  # a line is no line break (splitlines split it)
            lines[-1] = lines[-1][:-1]  # what follows the last newline: a last line without it, or nothing
            partial = lines.pop()
            if partial and _is_record_line(partial):  # a complete line that only lacks its newline: a line
                lines.append(partial)
                partial = b""
            for raw in lines:
                obj = _json_object(raw)
                if obj is None:  # kept as it is
                    keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
                    unknown = unknown or (name == MEASUREMENTS_FILE and bool(raw.strip()))
                    continue
                row_step = obj.get("step")
                files = _spectrum_files(obj) if name == MEASUREMENTS_FILE else set()
                if not isinstance(row_step, bool) and isinstance(row_step, (int, float)) and row_step > step:
                    n += 1
                    dropped_files |= files
                else:
                    keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
                    kept_files |= files
                    scan.add(obj)
            if not n:
                continue
            if partial.strip():  # a line being written (another program's): the file is replaced, so the rest
                warnings.warn(  # of it goes to the old one; kept, ended with a newline, it would be a broken line
                    f"{path}: dropping a partial last line ({len(partial)} bytes, no newline) while removing the "
                    f"steps after {step}", RecordWarning, stacklevel=2)  # mid-file (the reader refuses the record).
                # Cut, it is no line of the file: its references protect no spectrum file (only kept lines do)
            write_atomic(path, lambda fh: fh.writelines(keep), fsync=self.fsync)
            # the append descriptor still points at the replaced file: reopen it on the new one
            os.close(self._fds.pop(name))
            self._fds[name] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _BINARY, 0o644)
            self._ends.pop(name, None)
            st = os.fstat(self._fds[name])  # the lines just written are the file's, all of them whole
            scan.ident, scan.offset, scan.before = (st.st_dev, st.st_ino), sum(map(len, keep)), b"".join(keep[-256:])[-256:]
            self._scans[name] = scan if st.st_size == scan.offset else _Scan(measurements=scan.measurements)
            if name == MEASUREMENTS_FILE:
                n_dropped = n
        for name in (LOG_FILE, MEASUREMENTS_FILE):  # what is kept counts as recorded before (see _ended_before)
            self._before[name] = os.fstat(self._fds[name]).st_size
        if not unknown:
            spectra = self.path / SPECTRA_DIR
            failed = []
            for file_name in sorted(dropped_files - kept_files):
                try:
                    (spectra / file_name).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:  # the lines are rewritten: a leftover the next resume removes, not an
                    failed.append(f"{spectra / file_name} ({exc.strerror or exc})")  # error (it lost the rest)
            if failed:
                warnings.warn(f"{self.path}: drop_after({step}) could not remove {len(failed)} spectrum file(s) no "
                              f"line refers to any more: {'; '.join(failed[:3])}{'; ...' if len(failed) > 3 else ''}; "
                              "the next RunWriter(resume=True) removes them", RecordWarning, stacklevel=2)
            if dropped_files and self.fsync:
                _fsync_dir(spectra)
        return n_dropped

    def update_info(self, **extras: Any) -> None:
        """Merge ``extras`` into ``run.json``'s ``extras`` (rewritten atomically), e.g. a final status.

        ``throughput`` (tokens/s, read by :meth:`RunRecord.throughput`) must be a number, else
        ``TypeError``. A refused or failed write changes neither ``run.json`` nor ``self.info``. A closed
        writer raises ``ValueError`` (it no longer holds the run directory's lock: another writer may be
        rewriting ``run.json``, and this write would undo that one's).
        """
        self._check_open("update_info")
        q = extras.get("throughput", 0.0)
        if isinstance(q, bool) or not (isinstance(q, numbers.Real) or (
                isinstance(q, torch.Tensor) and q.numel() == 1 and q.dtype != torch.bool and not q.is_complex())):
            raise TypeError(f"RunWriter.update_info: throughput must be a number (tokens/s), got {q!r}")
        self._rewrite_header("extras", {**_extras(RunRecord._read_header(self.path)), **extras})
        self.info.extras.update(extras)
        if "status" in extras:  # a status said by the caller (or a new failure) is not the resume's to settle;
            self._said = True  # the writer still resumed a failed run (see _settle, _mark_failed)

    def fill_tokens_per_step(self, tokens_per_step: int) -> None:
        """Record ``RunInfo.tokens_per_step`` in ``run.json`` (rewritten atomically) when the ``RunInfo`` left it
        out (``None``), e.g. by a training callback that was given it; a recorded value is kept (compare
        ``self.info.tokens_per_step``). A positive ``int`` (not a bool), else ``ValueError``; a closed writer raises
        ``ValueError``, as :meth:`update_info`."""
        self._check_open("fill_tokens_per_step")
        n = _count_arg(tokens_per_step, "fill_tokens_per_step", "tokens_per_step")
        if n < 1:
            raise ValueError(f"RunWriter.fill_tokens_per_step: tokens_per_step must be >= 1, got {tokens_per_step!r}")
        if self.info.tokens_per_step is None:
            self._rewrite_header("tokens_per_step", n)
            self.info.tokens_per_step = n

    def _check_open(self, method: str) -> None:
        if self.closed:
            raise ValueError(f"RunWriter.{method}: the writer for {self.path} is closed (it no longer holds the run "
                             f"directory's lock); call {method} before close(), inside the with block, or reopen "
                             "the run with RunWriter(..., resume=True)")

    def _rewrite_header(self, key: str, value: Any) -> None:
        """``run.json`` read again (another change since this writer opened is kept) with ``key`` set to
        ``value``, rewritten atomically; a failed write leaves the file as it was."""
        header = RunRecord._read_header(self.path)
        header[key] = value
        _write_json_atomic(self.path / RUN_FILE, header, self.fsync)

    def measured_steps(self) -> set[int]:
        """The steps of the lines in ``measurements.jsonl`` (a line that is not a JSON object with an
        integer ``step`` is passed over), e.g. whether a checkpoint's step was measured before a resume.

        Lines appended before this writer opened, by it, or by another program since are all counted;
        the file is parsed once, then only the bytes appended since the previous call (see
        :meth:`has_measurement`). A new set each call."""
        steps, extra = self._read_steps()
        return steps | {extra} if extra is not None else set(steps)

    def has_measurement(self, step: int) -> bool:
        """Whether ``measurements.jsonl`` holds a line at ``step`` (as :meth:`measured_steps`), e.g. to
        skip a checkpoint measured before. :class:`~spectral_lens.SpectralLens` asks it before each
        measurement, and warns (the writer itself appends a second line at a step without a word).

        Cheap on a long record: the file is parsed on the first call, then only the lines appended
        since the previous call are (one line per measurement); a file replaced (:meth:`drop_after`,
        another program) or rewritten in place is read again from its start, as far as its identity and
        the 256 bytes before the offset read to tell (a rewrite in place that keeps those is not seen)."""
        steps, extra = self._read_steps()
        return step in steps or step == extra

    def _read_steps(self) -> tuple[set[int], int | None]:
        """The steps of ``measurements.jsonl``'s whole lines (see :meth:`_scan`), with the step of a last
        line that is a complete JSON object without its newline (another program's, read again next time
        as it may be mid-write), else ``None``."""
        scan, last = self._scan(MEASUREMENTS_FILE)
        obj = _json_object(last) if last.strip() else None
        return scan.steps, None if obj is None else _int_step(obj)

    def _scan(self, name: str, visit=None, *, fresh: bool = False) -> tuple[_Scan, bytes]:
        """Bring the read of the JSONL file ``name`` up to date, and return it (:class:`_Scan`: the steps
        and validation-loss steps of its whole lines) with the bytes after its last newline. The file is
        parsed on the first call, then only from the offset read to, when it is the same file (its
        identity) and the 256 bytes before that offset are unchanged (it was only appended to); else, or
        with ``fresh``, from its start. ``visit(raw, obj)`` sees each whole line read (``obj``: its JSON
        object, or ``None``). A file that does not exist reads as empty (see :func:`_scan_file`)."""
        scan, last = _scan_file(self.path / name, None if fresh else self._scans.get(name),
                                measurements=name == MEASUREMENTS_FILE, visit=visit)
        if scan.ident is None:  # no such file
            self._scans.pop(name, None)
        else:
            self._scans[name] = scan
        return scan, last

    def val_loss_steps(self) -> set[int]:
        """The steps at which the record holds a validation loss: a numeric ``val_loss`` in a line of
        ``measurements.jsonl`` or an event of ``log.jsonl`` (other lines are passed over), e.g. whether
        an evaluation at a resumed checkpoint's step was recorded before the resume. Each file is parsed
        once, then only what was appended since (as :meth:`has_measurement`). A new set each call."""
        out: set[int] = set()
        for name in (MEASUREMENTS_FILE, LOG_FILE):
            scan, last = self._scan(name)
            out |= scan.val_steps
            obj = _json_object(last) if last.strip() else None
            if obj is not None and _int_step(obj) is not None and _is_val_loss(obj):
                out.add(obj["step"])
        return out

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (a closed writer refuses every write)."""
        return not getattr(self, "_fds", None)

    def close(self) -> None:
        """Close the files and release the run directory's lock (idempotent). A failed run this writer
        marked ``"running"`` on resume is first marked as what it is now (see :meth:`_settle`)."""
        self._settle()
        self._close()

    def _settle(self) -> None:
        """When this writer resumed a failed run (marked it ``"running"``, its failure moved to
        ``failure_history``), the run is no longer running once it closes: if the writer went on with the
        training (appended a line past the tokens where the record ended at the resume; trained a step again,
        see :meth:`_retrained`; or ran :meth:`drop_after`), the status is
        removed, as a run that never failed has none (a clean exit is no completion:
        ``update_info(status="complete")`` says that); if it did not (a script that only measured or evaluated
        the failed run's checkpoints, or recorded nothing), the failure is restored: ``status: "failed"``, its
        ``failure``, and its entry leaves the history. A status :meth:`update_info` said (the caller's, or a new
        failure's), or another program's, is kept: the entry is marked ``went_on`` if the writer went on, else
        ``settled`` with that status (unless the run is failed again, or the status is the caller's
        ``"running"``), so that a later ``"running"`` is no gone writer's mark (see ``_status._closed``,
        ``_status._stale_running``). A ``"running"`` an earlier writer set and never settled (killed) is
        settled as this writer's own, going on judged from where the record ended when this writer opened;
        any other ``"running"`` it found (nothing to restore: no writer holds it, as this one holds the lock)
        is removed unless the caller said a status. Nothing is changed in another process than the one that
        opened the writer, or after a failure mark that could not be written; a write that fails is a
        :class:`RecordWarning`."""
        withdrawn, self._withdrawn = getattr(self, "_withdrawn", None), None
        found, self._found_running = getattr(self, "_found_running", False), False
        if (withdrawn is None and not found) or self.closed or os.getpid() != self._lock_pid:
            return
        went_on = _went_on(self._resumed_at, self._max_tokens, self._dropped, trained=self._trained)
        try:
            header = RunRecord._read_header(self.path)
            extras = _closed(_extras(header), withdrawn, went_on, self._said)
            if extras is None:
                return
            header["extras"] = extras
            _write_json_atomic(self.path / RUN_FILE, header, self.fsync)
            info_extras = _closed(self.info.extras, withdrawn, went_on, self._said)
            if info_extras is not None:
                self.info.extras = info_extras
        except Exception as err:
            warnings.warn(f"{self.path}: could not record in {RUN_FILE} that the resumed run stopped (its status "
                          f"stays {RUNNING!r}): {_failure_text(err)}", RecordWarning, stacklevel=3)

    def _close(self) -> None:
        """Close the files and release the lock, writing nothing (the constructor's cleanup, ``__del__``)."""
        while getattr(self, "_fds", None):
            _, fd = self._fds.popitem()
            os.close(fd)
        lock, self._lock_fd = getattr(self, "_lock_fd", None), None
        if lock is not None:  # unlocked explicitly (a process forked meanwhile shares the descriptor), but
            locks.release(lock, self._lock_pid)  # only by this process, not by a forked child's close

    def __reduce_ex__(self, protocol):
        # its open files are raw descriptors: in another process (a pickle sent by multiprocessing or a
        # spawning launcher) the same numbers name unrelated files, and a copy would append beside this one
        raise TypeError(f"RunWriter ({self.path}) cannot be pickled or copied: its files are open in this "
                        "process. In another process open the run again with RunWriter(path, resume=True), "
                        "after this one is closed (one writer per run directory).")

    def __repr__(self) -> str:
        return f"RunWriter({str(self.path)!r}, run_id={self.info.run_id!r}, closed={self.closed})"

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; when the block ends with an exception, first record that in ``run.json``'s extras:
        ``status: "failed"`` and ``failure``: the exception's type and the first line of its message.
        When the record already says the run ended (status ``"complete"`` or ``"diverged"``, or the lines
        recorded before this writer opened reach :data:`COMPLETE_COVERAGE` of ``total_tokens``: a script
        measuring a finished run's checkpoints), the status is kept and the exception is recorded as
        ``failure_after_end`` instead: the training did not fail. A failed run this writer resumed (its
        ``"running"``) is not ended by its lines: it is marked failed again, with the new exception. A clean exit records nothing: leaving
        the block (after a ``break``, an early stop) is not completion; ``update_info(status="complete")``
        says that (a resumed failed run is settled as :meth:`close` does). ``SystemExit(0)`` and
        ``GeneratorExit`` are no failure."""
        try:
            if exc_type is not None and not self.closed and _is_failure(exc) and not self._mark_failed(exc):
                self._withdrawn, self._found_running = None, False  # not recorded: run.json is left as it is
        finally:
            self.close()

    def _mark_failed(self, exc: BaseException) -> bool:
        """``run.json`` extras ``status: "failed"`` and ``failure``, or, when the record already says the
        run ended, ``failure_after_end`` (see :meth:`__exit__`); a write that fails (the disk the error was
        about) is a :class:`RecordWarning`, so the block's own exception is the one raised."""
        try:
            header = RunRecord._read_header(self.path)
            self.update_info(**_failure_mark(_extras(header), _failure_text(exc), resumed=self._withdrawn is not None,
                                             ended_before=lambda: self._ended_before(header)))
        except Exception as err:
            warnings.warn(f"{self.path}: could not record the run's failure ({_failure_text(exc)}) in {RUN_FILE}: "
                          f"{_failure_text(err)}", RecordWarning, stacklevel=3)
            return False
        return True

    def _record_end(self) -> tuple[int | None, int | None]:
        """``(step, tokens)`` of the record's last line with integer ``step`` and ``tokens`` in
        ``log.jsonl`` or ``measurements.jsonl`` (the one with more tokens), ``(None, None)`` when neither has
        one: where a failed run stopped, read on resume. Each file's lines are read backwards, each whole,
        until one has them or a MiB of lines was passed over (before, only the last MiB was read, and a line
        it cut was skipped: a last line over 1 MiB read as no end)."""
        best: tuple[int | None, int | None] = (None, None)
        for name in (LOG_FILE, MEASUREMENTS_FILE):
            try:
                fd = os.open(self.path / name, os.O_RDONLY | _BINARY)
            except OSError:
                continue
            try:
                passed = 0
                for raw in _lines_backward(fd, os.fstat(fd).st_size):
                    obj = _json_object(raw)
                    if obj is not None and _is_count(obj.get("step")) and _is_count(obj.get("tokens")):
                        if best[1] is None or obj["tokens"] > best[1]:
                            best = (obj["step"], obj["tokens"])
                        break
                    passed += len(raw) + 1
                    if passed > _CHUNK:
                        break
            except OSError:
                pass
            finally:
                os.close(fd)
        return best

    def _ended_before(self, header: Mapping[str, Any]) -> bool:
        """Whether the lines recorded before this writer opened (or kept by its last :meth:`drop_after`)
        reach :data:`COMPLETE_COVERAGE` of ``header``'s ``total_tokens``: the training had ended, and
        this writer's work (a script measuring its checkpoints) is not the run's. Read only when a block
        fails; a file that cannot be read counts as not ended.

        Only the lines :meth:`RunRecord.open` keeps count (an event it refuses, a measurement whose spectrum
        file is missing: not), so the status is kept only where the analyses see the run ended (else they
        would see neither an end nor the failure). Read line by line (bounded memory), only within the
        bytes the files held then."""
        total = header.get("total_tokens")
        if isinstance(total, bool) or not isinstance(total, numbers.Real) or not 0 < total < math.inf:
            return False
        for name, size in self._before.items():
            try:
                for raw in _lines_held(self.path / name, size):
                    if b'"tokens"' in raw and self._counts(name, raw, total):
                        return True
            except OSError:
                continue
        return False

    def _counts(self, name: str, raw: bytes, total: float) -> bool:
        """Whether the line ``raw`` of the JSONL file ``name`` is one :meth:`RunRecord.open` keeps, at
        :data:`COMPLETE_COVERAGE` of ``total`` tokens or further (as ``analysis.coverage`` divides)."""
        obj = _json_object(raw)
        if obj is None or not _is_count(obj.get("tokens")) or not _is_count(obj.get("step")):
            return False
        try:
            if not obj["tokens"] / total >= COMPLETE_COVERAGE:
                return False
        except OverflowError:
            return False
        if name == LOG_FILE:
            return _event_problem(obj) is None
        try:
            RunRecord._parse_measurement(self.path, obj, f"{self.path / name}", 0)
        except (RecordFormatError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return False
        return True

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._close()
        except Exception:
            pass


#: The :class:`RunInfo` fields a resume compares with the record (``run_id`` must match; ``extras`` see
#: :func:`_resumed_fields`).
_INFO_FIELDS = ("family", "batch_tier", "tokens_per_step", "seed", "n_layer", "total_tokens", "batch_size",
                "primary_spectrum")


def _resumed_fields(run_file: Path, stored: RunInfo, given: RunInfo,
                    measurements: Path) -> tuple[dict[str, Any], str | None]:
    """The fields of ``given`` (the ``RunInfo`` passed to a resume) to write into ``run_file``: those the record
    left ``None``, and a changed ``total_tokens`` while ``measurements`` holds no line (nothing was measured as a
    fraction of the old budget), with the text of the :class:`RecordWarning` that the caller says when it writes
    it (said here, it came before another field's refusal, for a budget never written). Any other field given that differs from the
    record (``None`` given: the record's) is a ``ValueError`` naming each field, recorded and given, before
    anything is written: the analyses group runs by family and batch tier, read the budget's fractions that each
    measurement stored, compare the noise scale against the batch size. ``extras`` given that differ from the
    record's are a :class:`RecordWarning` pointing to :meth:`RunWriter.update_info` (kept as recorded)."""
    filled: dict[str, Any] = {}
    differ: list[str] = []
    budget_said = None
    for key in _INFO_FIELDS:
        old, new = getattr(stored, key), getattr(given, key)
        if new is None or old == new:
            continue
        if old is None:
            filled[key] = new
        elif key == "total_tokens" and _holds_no_line(measurements):
            filled[key] = new
            budget_said = (f"{run_file}: total_tokens changed from the recorded {old!r} to {new!r} (no measurement "
                           "was recorded yet)")  # said by _open when it writes it
        else:
            differ.append(f"{key}: recorded {old!r}, given {new!r}")
    if differ:
        budget = any(d.startswith("total_tokens") for d in differ)
        raise ValueError(
            f"{run_file}: resuming run {stored.run_id!r} with a RunInfo that differs from the record's ("
            + "; ".join(differ) + "). Omit info (RunWriter(path, resume=True)) to resume with the recorded RunInfo, "
            "or give the recorded values"
            + ("; the measurements recorded store their progress as fractions of the recorded total_tokens (the "
               "early prediction reads them): a new budget would mix two budgets' fractions in one run, so record "
               "an extended run in a new directory" if budget else "")
            + ". Free-form metadata (RunInfo.extras) can be changed with writer.update_info(**extras)")
    extras = [f"{k}: recorded {stored.extras.get(k, '(none)')!r}, given {v!r}"
              for k, v in map(_as_recorded, given.extras.items())  # compared as run.json holds them
              if k not in stored.extras or not _same(stored.extras[k], v)]
    if extras:
        warnings.warn(f"{run_file}: RunInfo.extras given to the resume differ from the record's ({'; '.join(extras)});"
                      " kept as recorded: change them with writer.update_info(**extras)", RecordWarning,
                      stacklevel=4)  # the user's RunWriter(...) call: _resumed_fields < _open < __init__
    return filled, budget_said


def _as_recorded(item: tuple[Any, Any]) -> tuple[Any, Any]:
    """An extras ``(key, value)`` given as ``run.json`` would hold it (a JSON round trip: a tuple is a list, a NumPy
    value a number or list, a key a string), so that a resume with the ``RunInfo`` the run was created with finds
    no difference; as given when JSON cannot hold it (it differs from anything recorded)."""
    try:
        return next(iter(json.loads(json.dumps(dict([item]), default=_json_default)).items()))
    except (TypeError, ValueError, RecursionError):
        return item


def _same(recorded: Any, given: Any) -> bool:
    """Whether an extras value given (:func:`_as_recorded`) is the recorded one: their JSON texts, keys sorted, are
    equal (before, ``==``: a NaN recorded differed from itself; a comparison that fails, of an array, is no)."""
    try:
        return json.dumps(recorded, sort_keys=True) == json.dumps(given, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return False


def _holds_no_line(path: Path) -> bool:
    """Whether the JSONL file ``path`` is missing or holds only blanks (read only when it is small)."""
    try:
        st = os.stat(path)
        return st.st_size == 0 or (st.st_size <= 4096 and not path.read_bytes().strip())
    except OSError:
        return not os.path.lexists(path)


def _needs_info(path: Path) -> ValueError:
    """The error of a new run (no ``run.json``, or an empty one) opened without a :class:`RunInfo`."""
    empty = _is_empty_file(path / RUN_FILE)
    return ValueError(f"{path}: a new run needs a RunInfo (info=...)" + (
        f"; its {RUN_FILE} is empty (a crash while it was created): pass the run's RunInfo to write it again"
        if empty else ""))


def _is_empty_file(path: Path) -> bool:
    """Whether ``path`` is an empty regular file (links followed): a record file created by a writer that was killed
    before it wrote anything into it."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _holds_run_file(run_file: Path) -> bool:
    """Whether ``run_file`` holds a run's metadata: it exists and is not empty. An empty ``run.json`` (a crash while
    the writer created it, before its content was durable) counts as none: a new run, or a resume with a
    :class:`RunInfo`, writes it again (before, it was a ``RecordFormatError`` on resume and a ``FileExistsError``
    without, so no writer could open the directory)."""
    return run_file.exists() and not _is_empty_file(run_file)


#: The lock file :class:`RunWriter` holds an exclusive ``flock`` on while it is open (never removed).
LOCK_FILE = ".writer.lock"


def _lock_run_dir(path: Path) -> int | None:
    """The run directory's lock (:func:`spectral_lens._locks.acquire` on ``path/LOCK_FILE``); its descriptor,
    ``None`` where the file system has no locks (with a warning). Held by another writer (another process,
    or another object in this one): ``RuntimeError`` naming the directory."""
    lock_file = path / LOCK_FILE
    try:
        fd = locks.acquire(lock_file)
    except BlockingIOError:
        raise RuntimeError(
            f"{path}: another RunWriter has this run directory open (it holds the lock on {lock_file}); "
            "one writer per run directory: close the other writer first (a killed writer's lock is released "
            "when its process exits); under torch.distributed, create the writer on rank 0 only"
        ) from None
    if fd is None and locks.SUPPORTED:
        warnings.warn(f"{path}: the file system does not support locks; a second RunWriter on this directory "
                      "would not be refused", RecordWarning, stacklevel=3)  # the user's RunWriter(...)
    return fd


#: Event keys the reader requires to be numbers (see ``RunRecord.open``).
_NUMERIC_EVENT_KEYS = ("val_loss", "train_loss", "tokens_per_s")


#: ``O_BINARY`` where there is one (Windows): without it ``os.open`` gives a text-mode descriptor, whose writes turn
#: ``\n`` into ``\r\n`` and whose reads stop at a Ctrl-Z and shift the offsets the line searches compute.
_BINARY = getattr(os, "O_BINARY", 0)

#: The bytes :func:`_last_line_start` and :func:`_lines_backward` read at a time; also how many bytes of lines
#: :meth:`RunWriter._record_end` passes over at most.
_CHUNK = 1 << 20


def _last_line_start(fd: int, size: int) -> int:
    """The offset just after the last newline within the first ``size`` bytes of the file open on ``fd`` (0:
    none), searched backwards :data:`_CHUNK` bytes at a time (bounded memory for a line of any length)."""
    end = size
    while end > 0:
        begin = max(0, end - _CHUNK)
        i = _read_at(fd, end - begin, begin).rfind(b"\n")
        if i >= 0:
            return begin + i + 1
        end = begin
    return 0


def _lines_backward(fd: int, size: int) -> Iterator[bytes]:
    """The lines (without newline) within the first ``size`` bytes of the file open on ``fd``, last first: what
    follows the last newline (``b""`` when the file ends with one), then each line before it. Read
    :data:`_CHUNK` bytes at a time; a line is held whole, however long (one longer than a chunk too)."""
    end, pending = size, []  # the pieces (last first) of the line that may go on before the chunk read next
    while end > 0:  # joined once, when its start is found: before, each chunk was prepended to the line read so
        begin = max(0, end - _CHUNK)  # far (time quadratic in its length: 7.3 s of CPU for a 128 MiB line, now 0.2 s)
        parts = _read_at(fd, end - begin, begin).split(b"\n")
        end = begin
        pending.append(parts[-1])
        if len(parts) > 1:
            yield b"".join(reversed(pending))
            yield from reversed(parts[1:-1])
            pending = [parts[0]]
    yield b"".join(reversed(pending))


def _read_at(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` of the file open on ``fd`` (fewer at its end), read until done: ``pread`` (it
    leaves the descriptor's offset alone, so two threads appending through one writer cannot move each other's),
    else, where there is none (Windows), ``lseek`` and ``read``; the writes of an ``O_APPEND`` descriptor still
    go to the end."""
    pread = getattr(os, "pread", None)
    if pread is None:
        os.lseek(fd, offset, os.SEEK_SET)
    parts, read = [], 0
    while read < n:
        part = os.read(fd, n - read) if pread is None else pread(fd, n - read, offset + read)
        if not part:
            break
        parts.append(part)
        read += len(part)
    return b"".join(parts)


def _lines_held(file: Path, size: int) -> Iterator[bytes]:
    """The lines of ``file`` (newline kept) within its first ``size`` bytes, read one at a time (bounded
    memory): what it held when the writer opened it (``RunWriter._before``), not the lines appended since.
    An ``OSError`` (a file that cannot be opened or read) is the caller's."""
    with open(file, "rb") as fh:
        read = 0
        for raw in fh:
            read += len(raw)
            if read > size:  # past what the file held when the writer opened: its own lines
                return
            yield raw


def _count_arg(value: Any, method: str, what: str) -> int:
    """``value`` as a Python int: an integer (Python, NumPy, a 0-d integer tensor) or a whole float;
    anything else raises naming the argument. A float or a float32 tensor was truncated by ``int``
    while the progress was computed from the unconverted value (in float32 for a tensor)."""
    if type(value) is int and -_FLOAT_SAFE < value < _FLOAT_SAFE:  # the common case, first (the hot path)
        return value
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"RunWriter.{method}: {what} must be an integer, got {repr(value)[:80]}")
    try:
        n = operator.index(value)
    except TypeError:
        pass
    else:  # the reader refuses an integer a float cannot hold (it refused the whole record by default)
        if not _is_number(n):
            raise ValueError(f"RunWriter.{method}: {what} is an integer beyond the float range ({_digits(n)} "
                             "digits), which the reader refuses")
        return n
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"RunWriter.{method}: {what} must be an integer, got {repr(value)[:80]}") from None
    if not number.is_integer():
        raise ValueError(f"RunWriter.{method}: {what} must be a whole number, got {repr(value)[:80]}")
    return int(number)


#: Every integer of smaller magnitude converts to a float (the largest float is just below ``2**1024``).
_FLOAT_SAFE = 1 << 1023


def _digits(n: Any) -> str:
    """About how many decimal digits the integer ``n`` has, from its bits (``str`` refuses one of more than
    4,300 digits)."""
    return f"about {int(abs(int(n)).bit_length() * 0.30103) + 1}"


def _float_arg(value: Any, what: str) -> float:
    """``float(value)`` (numbers, 0-d tensors, NumPy scalars); a value it refuses raises the same
    exception type (``OverflowError`` as ``ValueError``) naming the argument of ``log_measurement``."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        kind = TypeError if isinstance(exc, TypeError) else ValueError
        got = "an integer beyond the float range" if isinstance(exc, OverflowError) else repr(value)[:80]
        raise kind(f"RunWriter.log_measurement: {what} must be a number, got {got}") from None


def _checked_window(window: Any, what: str) -> tuple[int, int]:
    """``window`` as a pair of Python ints ``1 <= lo < hi``; anything else raises ``ValueError`` naming
    ``what`` before ``run.json`` is written (the reader refuses non-integer windows, and an empty one
    would silently leave every measurement without that summary)."""
    try:
        lo, hi = window
    except (TypeError, ValueError):
        lo = hi = None
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in (lo, hi)) or not 1 <= lo < hi:
        raise ValueError(f"RunWriter: {what} must be a pair of integer ranks (lo, hi) with 1 <= lo < hi, got {window!r}")
    return int(lo), int(hi)


def _spectrum_files(line: Mapping[str, Any]) -> set[str]:
    """Names (in ``spectra/``) of the spectrum files a measurement line refers to."""
    entries = line.get("spectra")
    out = set()
    for entry in entries.values() if isinstance(entries, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            name = Path(entry["file"]).name
            if _SPECTRUM_FILE.fullmatch(name):
                out.add(name)
    return out


#: The names :meth:`RunWriter._spectrum_file` gives: ``f"{step:08d}_"``, so 9 digits and more from step 10**8 on,
#: and ``-`` with 7 or more for a negative step (before, ``\d{8}_`` only: those files were never removed). Only
#: these: ASCII digits (``\d`` took any Unicode digit), no leading 0 beyond 8 digits (``000000001_x.npz``) or 7
#: after ``-``: a name the writer cannot give is not its file, and a resume or ``drop_after`` keeps it.
_SPECTRUM_FILE = re.compile(r"(?:[0-9]{8}|[1-9][0-9]{8,}|-[0-9]{7}|-[1-9][0-9]{7,})_[A-Za-z0-9._-]+\.npz")
