"""Run records: :class:`RunRecord` and :func:`open_runs`, the readers of run directories (see
:mod:`spectral_lens.records` for what is skipped and what raises)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .schema import (
    LOG_FILE,
    MEASUREMENTS_FILE,
    RUN_FILE,
    SPECTRA_DIR,
    _ERRORS,
    _FORMAT,
    _VERSION,
    Measurement,
    RecordFormatError,
    RecordWarning,
    RunInfo,
    _LazySpectra,
    _is_count,
    _is_number,
)

#: How a RecordFormatError for a malformed line says to skip it (the CLI names its own option instead).
SKIP_HINT = "open with errors='skip' to skip it"


def _check_regular(path: Path) -> None:
    """``RecordFormatError`` naming ``path`` when it exists (symbolic links followed) and is not a regular file:
    reading a FIFO waited for good for a writer, a device (a link to ``/dev/zero``) was read without end."""
    if path.exists() and not path.is_file():
        raise RecordFormatError(f"{path}: not a regular file (a directory, FIFO, socket or device), expected a "
                                "JSON Lines file of the run record")


def _read_jsonl(path: Path, errors: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every complete, valid line; see the module docstring for the rules."""
    if not path.exists():
        return []
    _check_regular(path)
    data = path.read_bytes()
    if not data:
        return []
    lines = data.split(b"\n")
    complete, partial = lines[:-1], lines[-1]
    out = []
    for i, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            msg = f"{path}, line {i}: corrupted record line ({why}): {raw[:80]!r}"
            if errors == "raise":
                raise RecordFormatError(msg + "; " + SKIP_HINT) from None
            warnings.warn(msg + "; skipped", RecordWarning, stacklevel=4)
            continue
        out.append((i, obj))
    if _is_record_line(partial):  # complete, only the newline is missing: nothing to skip
        out.append((len(complete) + 1, json.loads(partial.decode("utf-8"))))
    elif partial.strip():
        warnings.warn(
            f"{path}, line {len(complete) + 1}: truncated last line ({len(partial)} bytes, no newline) skipped; "
            "a crash mid-write or a write still in progress",
            RecordWarning,
            stacklevel=4,
        )
    return out


def _event_problem(obj: dict[str, Any]) -> str | None:
    """Why :meth:`RunRecord.open` refuses the ``log.jsonl`` line ``obj`` (a JSON object), or ``None``: it
    needs integer ``step`` and ``tokens``, and numbers (or null) in ``val_loss``, ``train_loss``,
    ``tokens_per_s``. The writer's check of a failing block counts the same lines (see ``RunWriter.__exit__``)."""
    bad = [k for k in ("val_loss", "train_loss", "tokens_per_s") if obj.get(k) is not None and not _is_number(obj[k])]
    if bad:
        return f"{bad} must be numbers within the float range"
    if not _is_count(obj.get("step")) or not _is_count(obj.get("tokens")):
        return "event needs integer 'step' and 'tokens' within the float range"
    return None


def _spectrum_listing(root: Path) -> frozenset[str]:
    """``"spectra/NAME"`` of every regular file in ``root/spectra`` (a symbolic link to one included), from
    one directory listing; empty when there is no such directory or it cannot be read. These are the names
    the writer gives; a measurement naming another file is checked on its own (``os.path.isfile``)."""
    try:
        with os.scandir(root / SPECTRA_DIR) as it:
            return frozenset(f"{SPECTRA_DIR}/{e.name}" for e in it if e.is_file())
    except OSError:
        return frozenset()


def _is_record_line(raw: bytes) -> bool:
    """Whether ``raw`` (without newline) is a complete record line: a JSON object."""
    if not raw.strip():
        return False
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def _number_map(value: Any, what: str) -> dict[str, float]:
    """A JSON object of numbers (nulls dropped), as floats; anything else raises ValueError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of numbers, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if v is None:
            continue
        if not _is_number(v):
            raise ValueError(f"{what}[{k!r}] must be a number within the float range, got {_kind(v)}")
        out[k] = float(v)
    return out


def _opt_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{what} must be a number or null, got {_kind(value)}")
    return float(value)


def _kind(value: Any) -> str:
    """``repr`` of a short value; the type and digit count of an integer too long to print."""
    if isinstance(value, int) and not isinstance(value, bool) and not _is_number(value):
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class RunRecord:
    """A run directory read back: metadata, scalar events and measurements.

    Use :meth:`open`. Attributes:

    * ``path``: the run directory.
    * ``info``: :class:`RunInfo`.
    * ``summary_windows``: ``{"tail": (lo, hi), "head": (lo, hi)}`` of the stored summaries.
    * ``events``: list of dicts from ``log.jsonl`` (each has ``step`` and ``tokens``).
    * ``measurements``: list of :class:`Measurement` in file order (spectra load lazily).
    """

    def __init__(self, path: Path, info: RunInfo, events: list[dict], measurements: list[Measurement], windows: dict):
        self.path = path
        self.info = info
        self.events = events
        self.measurements = measurements
        self.summary_windows = windows

    @property
    def run_id(self) -> str:
        """Shortcut for ``info.run_id``."""
        return self.info.run_id

    @staticmethod
    def _read_header(path: Path) -> dict[str, Any]:
        run_file = Path(path) / RUN_FILE
        if not run_file.exists():
            raise RecordFormatError(f"{path}: not a spectral-lens run directory (no {RUN_FILE})")
        if not run_file.is_file():
            raise RecordFormatError(f"{run_file}: is not a regular file")
        try:
            header = json.loads(run_file.read_text(encoding="utf-8"))
        except RecursionError:
            raise RecordFormatError(f"{run_file}: corrupted run metadata (JSON nested too deeply)") from None
        except OSError as exc:  # unreadable (permissions, I/O error), not corrupted
            raise RecordFormatError(f"{run_file}: cannot read run metadata ({exc.strerror or exc})") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordFormatError(f"{run_file}: corrupted run metadata ({exc})") from exc
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise RecordFormatError(f"{run_file}: not a spectral-lens run file (format {header.get('format')!r})"
                                    if isinstance(header, dict) else f"{run_file}: not a JSON object")
        if header.get("version") != _VERSION:
            raise RecordFormatError(f"{run_file}: unsupported run record version {header.get('version')!r}")
        windows = header.get("summary_windows") or {}
        ok = isinstance(windows, dict) and all(
            w is None or (isinstance(w, list) and len(w) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in w))
            for w in windows.values()
        )
        if not ok:
            raise RecordFormatError(f"{run_file}: 'summary_windows' must map names to [lo, hi] integer pairs or null")
        return header

    @classmethod
    def _read_info(cls, path: Path) -> RunInfo:
        header = dict(cls._read_header(path))
        for key in ("summary_windows", "created"):
            header.pop(key, None)
        return RunInfo.from_dict(header, origin=str(Path(path) / RUN_FILE))

    @classmethod
    def open(cls, path: str | os.PathLike, *, errors: str = "raise", verify: bool = False) -> "RunRecord":
        """Read a run directory (also while its writer is still appending).

        Args:
            path: the run directory.
            errors: ``"raise"`` (default): a corrupted line or a missing spectrum file raises
                :class:`RecordFormatError` naming file and line. ``"skip"``: such a measurement or
                event is skipped with a :class:`RecordWarning`. A truncated *last* line is always
                skipped with a warning (nothing before it is lost).
            verify: load every spectrum now, so corrupted spectrum files are reported (or skipped)
                at open time instead of on first access. Each is checked and let go (loaded again on
                first access), so a verified record holds no more memory than a lazy one.
        """
        if errors not in _ERRORS:
            raise ValueError(f"errors must be one of {_ERRORS}, got {errors!r}")
        path = Path(path)
        header = cls._read_header(path)
        info = cls._read_info(path)
        windows = {k: tuple(v) if v else None for k, v in (header.get("summary_windows") or {}).items()}
        events = []
        for lineno, obj in _read_jsonl(path / LOG_FILE, errors):
            what = _event_problem(obj)
            if what is not None:
                msg = f"{path / LOG_FILE}, line {lineno}: {what}"
                if errors == "raise":
                    raise RecordFormatError(msg + "; " + SKIP_HINT)
                warnings.warn(msg + "; skipped", RecordWarning, stacklevel=2)
                continue
            events.append(obj)
        measurements = []
        mfile = path / MEASUREMENTS_FILE
        present = _spectrum_listing(path)  # listed before the lines are read: every file they name was written
        for lineno, obj in _read_jsonl(mfile, errors):  # before its line, so a file absent from it is rechecked
            origin = f"{mfile}, line {lineno}"
            try:
                m = cls._parse_measurement(path, obj, origin, lineno, present)
                if verify:  # load and check each file, keep none: a report over many runs held them all
                    for name in m.spectra:
                        m.spectra.load(name)
            except (RecordFormatError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                msg = str(exc) if isinstance(exc, RecordFormatError) else f"{origin}: invalid measurement ({exc})"
                if errors == "raise":
                    raise RecordFormatError(msg + "; " + SKIP_HINT) from None
                warnings.warn(msg + "; measurement skipped", RecordWarning, stacklevel=2)
                continue
            measurements.append(m)
        return cls(path, info, events, measurements, windows)

    @staticmethod
    def _parse_measurement(root: Path, obj: dict[str, Any], origin: str, lineno: int,
                           present: frozenset[str] = frozenset()) -> Measurement:
        step, tokens = obj.get("step"), obj.get("tokens")
        if not _is_count(step) or not _is_count(tokens):
            raise ValueError(f"needs integer 'step' and 'tokens' within the float range, got {_kind(step)} and {_kind(tokens)}")
        entries = obj.get("spectra") or {}
        if not isinstance(entries, dict):
            raise ValueError("'spectra' must be an object")
        files, kinds, summaries = {}, {}, {}
        for name, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ValueError(f"spectrum {name!r} has no 'file'")
            rel = entry["file"]
            # string checks and one listing of spectra/ per run, not a Path and a stat per spectrum: they were
            # most of the time to open a run (12,000 spectra: 0.8 s of 1.3 s on the project's 2-core machine)
            if os.path.isabs(rel) or ".." in rel.replace(os.sep, "/").split("/"):
                raise ValueError(f"spectrum {name!r}: file {rel!r} must be relative to the run directory")
            if rel not in present and not os.path.isfile(os.path.join(root, rel)):
                raise RecordFormatError(f"{origin}: spectrum file {root / rel} (spectrum {name!r}) is missing")
            files[name] = rel
            kind = entry.get("kind")
            if kind is not None and not isinstance(kind, str):
                raise ValueError(f"spectrum {name!r}: 'kind' must be a string, got {type(kind).__name__}")
            kinds[name] = kind
            summaries[name] = _number_map(entry.get("summaries"), f"spectrum {name!r} summaries")
        scalars = _number_map(obj.get("scalars"), "'scalars'")
        return Measurement(
            step=step,
            tokens=tokens,
            progress=_opt_float(obj.get("progress"), "progress"),
            val_loss=_opt_float(obj.get("val_loss"), "val_loss"),
            spectra=_LazySpectra(root, files, origin),
            summaries=summaries,
            scalars=scalars,
            kinds=kinds,
            time=_opt_float(obj.get("time"), "time"),
            files=files,
            line=lineno,
        )

    def refresh(self, **kwargs) -> "RunRecord":
        """Read the directory again (a run still in progress has new lines); returns a new record."""
        return type(self).open(self.path, **kwargs)

    # ---- derived views -------------------------------------------------------------------------

    def progress(self, m: Measurement) -> float | None:
        """Progress fraction of a measurement: its stored value, else ``tokens / info.total_tokens``."""
        if m.progress is not None:
            return m.progress
        if self.info.total_tokens:
            return m.tokens / self.info.total_tokens
        return None

    def spectrum_names(self, kind: str | None = None) -> list[str]:
        """Every spectrum name that appears in any measurement (first-seen order), optionally of one kind."""
        seen: dict[str, None] = {}
        for m in self.measurements:
            for n in m.names(kind):
                seen.setdefault(n)
        return list(seen)

    def val_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Validation loss against tokens: ``(tokens, val_loss)`` float arrays sorted by tokens.

        Merges ``val_loss`` from ``log.jsonl`` events and from measurements. Sorting is stable, so
        entries at equal token counts keep file order (events before measurements); an entry
        repeated at the same token count with the same loss is kept once.
        """
        pts = [(e["tokens"], float(e["val_loss"])) for e in self.events if e.get("val_loss") is not None]
        pts += [(m.tokens, m.val_loss) for m in self.measurements if m.val_loss is not None]
        pts = list(dict.fromkeys(pts))
        pts.sort(key=lambda p: p[0])
        tokens = np.array([p[0] for p in pts], dtype=np.float64)
        losses = np.array([p[1] for p in pts], dtype=np.float64)
        return tokens, losses

    def throughput(self, warmup: float = 0.1) -> float | None:
        """Run throughput ``Q`` in tokens/s: the median of logged ``tokens_per_s``.

        The first ``warmup`` fraction of the events that carry ``tokens_per_s`` is dropped (compile
        and warm-up steps). ``info.extras["throughput"]``, when present, takes precedence. ``None``
        when nothing was logged. An ``extras["throughput"]`` that is not a number raises
        :class:`RecordFormatError` naming ``run.json``.
        """
        if "throughput" in self.info.extras:
            value = self.info.extras["throughput"]
            try:
                return float(value)
            except (TypeError, ValueError, OverflowError):
                raise RecordFormatError(
                    f"{self.path / RUN_FILE}: extras['throughput'] must be a number (tokens/s), got {_kind(value)}"
                ) from None
        values = [float(e["tokens_per_s"]) for e in self.events if e.get("tokens_per_s") is not None]
        if not values:
            return None
        skip = int(math.floor(warmup * len(values)))
        return float(np.median(values[skip:] if skip < len(values) else values))

    def table(self) -> list[dict[str, Any]]:
        """Long table: one row per (measurement, spectrum) with run metadata, position and summaries.

        Columns: ``run_id, family, batch_tier, step, tokens, progress, val_loss, spectrum, kind``,
        the spectrum's summaries, and the measurement's scalars (prefixed ``scalar.``). A measurement
        without spectra gives one row with ``spectrum=None``.
        """
        rows = []
        base = {"run_id": self.info.run_id, "family": self.info.family, "batch_tier": self.info.batch_tier}
        for m in self.measurements:
            pos = dict(base, step=m.step, tokens=m.tokens, progress=self.progress(m), val_loss=m.val_loss)
            pos.update({f"scalar.{k}": v for k, v in m.scalars.items()})
            names = list(m.spectra) or [None]
            for n in names:
                row = dict(pos, spectrum=n, kind=m.kinds.get(n) if n else None)
                row.update(m.summaries.get(n, {}) if n else {})
                rows.append(row)
        return rows

    def to_dataframe(self):
        """:meth:`table` as a pandas DataFrame (pandas is optional: ``pip install pandas``)."""
        return _dataframe(self.table())

    def __repr__(self) -> str:
        return (
            f"RunRecord({self.info.run_id!r}, family={self.info.family!r}, tier={self.info.batch_tier}, "
            f"{len(self.measurements)} measurements, {len(self.events)} events)"
        )


def _dataframe(rows: list[dict[str, Any]]):
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("to_dataframe needs pandas, which spectral-lens does not install: pip install pandas") from None
    return pd.DataFrame(rows)


def open_runs(paths: Iterable[str | os.PathLike | RunRecord], **kwargs) -> list[RunRecord]:
    """Open several run directories (records already open are passed through).

    A directory that contains no ``run.json`` but whose immediate subdirectories do is expanded into
    those runs (sorted by name), so a sweep root can be given directly.
    """
    if isinstance(paths, (str, os.PathLike, RunRecord)):
        raise TypeError(
            f"open_runs takes a list of run directories (or a sweep root) and got one {type(paths).__name__}, "
            f"{str(getattr(paths, 'path', paths))!r}: pass [path]"
        )
    out = []
    for p in paths:
        if isinstance(p, RunRecord):
            out.append(p)
            continue
        p = Path(p)
        if not (p / RUN_FILE).exists() and p.is_dir():
            subs = sorted(s for s in p.iterdir() if (s / RUN_FILE).exists())
            if subs:
                out.extend(RunRecord.open(s, **kwargs) for s in subs)
                continue
        out.append(RunRecord.open(p, **kwargs))
    ids = [r.run_id for r in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"run ids must be unique across the runs given; repeated: {dup}")
    return out


def runs_table(runs: Iterable[RunRecord], as_dataframe: bool = False):
    """The concatenated :meth:`RunRecord.table` of several runs (a DataFrame if ``as_dataframe``)."""
    rows = [row for r in runs for row in r.table()]
    return _dataframe(rows) if as_dataframe else rows
