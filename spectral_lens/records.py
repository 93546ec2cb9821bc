"""Run records: one directory per training run, plain files, no pickle.

Layout of a run directory::

    RUN_DIR/
      run.json            metadata (RunInfo), written once atomically (temp file + rename)
      log.jsonl           append-only scalar events: step, tokens, train/val loss, tokens/s, ...
      measurements.jsonl  one line per spectral measurement: step, tokens, progress, val loss,
                          per-spectrum summaries and the relative file names of the spectra
      spectra/<step>_<name>.npz   one Spectrum per file (Spectrum.save: eigenvalues + JSON header)

Durability and concurrent reading. :class:`RunWriter` writes every spectrum of a measurement to a
temporary name, fsyncs it and renames it into place *before* it appends the JSONL line that refers to
it; each JSONL line is written with one ``write`` call on an ``O_APPEND`` descriptor, then fsynced.
So a reader in another process, while the run is still going, never sees a line whose spectrum
files are missing; at worst it sees a last line that is not yet complete, which it skips.

Reading (:meth:`RunRecord.open`): a last line without its newline (crash mid-write, or a write in
progress) is skipped with a :class:`RecordWarning`; every earlier line is kept. A corrupted line in
the middle, a line that is not a JSON object, or a missing spectrum file raises
:class:`RecordFormatError` naming the file and the 1-based line number; ``errors="skip"`` skips such
lines with a warning instead. A corrupted spectrum file is detected when it is loaded (lazily, on
first access), or at open time with ``verify=True``.

JSON notes: non-finite floats (a diverged run's ``NaN`` loss) are written the way Python's ``json``
writes them (``NaN``, ``Infinity``), which Python and pandas read back but strict JSON parsers reject.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .atomic import TMP_SUFFIX, write_json_atomic
from .atomic import fsync_dir as _fsync_dir
from ._warnings import InsufficientRowsWarning, SpectralLensWarning, SpectrumFormatError
from .spectra.fit import tail_window as _tail_window
from .spectrum import Spectrum
from .summaries import BandAlphaFitter, RankMe, participation_ratio, stable_rank

__all__ = [
    "RunInfo",
    "Measurement",
    "RunRecord",
    "RunWriter",
    "RecordFormatError",
    "RecordWarning",
    "open_runs",
    "runs_table",
    "spectrum_summaries",
]

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
MEASUREMENTS_FILE = "measurements.jsonl"
SPECTRA_DIR = "spectra"
_FORMAT = "spectral-lens/run"
_VERSION = 1
_ERRORS = ("raise", "skip")


class RecordFormatError(SpectrumFormatError):
    """A run directory or one of its files is not a valid spectral-lens run record.

    The message names the file and, for JSONL files, the 1-based line number.
    """


class RecordWarning(SpectralLensWarning):
    """A record file had a truncated last line or a skipped bad line (``errors="skip"``)."""


# --------------------------------------------------------------------------------------------------
# metadata

# JSON types of RunInfo fields read from disk (None is always allowed)
_INFO_TYPES = {
    "run_id": (str,), "family": (str,), "primary_spectrum": (str,), "batch_tier": (int, float),
    "tokens_per_step": (int, float), "seed": (int,), "n_layer": (int,), "total_tokens": (int, float),
    "batch_size": (int, float),
}


@dataclass
class RunInfo:
    """Metadata of one training run (``run.json``).

    Attributes:
        run_id: unique name of the run (used in tables, reports and file names of reports).
        family: model family / architecture variant (runs are compared within a family).
        batch_tier: the batch-size tier of the run (the paper's ``B``: 1, 2, 4, ..., a multiple of a
            reference batch). Any positive number; the predictor orders tiers by it.
        tokens_per_step: training tokens consumed per optimizer step.
        seed: random seed.
        n_layer: number of blocks of the model; selects the paper's tail window
            (:func:`spectral_lens.tail_window`) when no window is given.
        total_tokens: planned training budget in tokens; defines the progress fraction
            ``tokens / total_tokens`` when a measurement does not record one.
        batch_size: samples (sequences) per optimizer step; the unit the gradient-noise-scale
            baseline compares ``noise_scale`` against.
        primary_spectrum: name of the spectrum the analyses use by default (e.g. the deepest
            activation probe).
        extras: free-form JSON-serializable metadata (learning rates, hardware, git hash, ...).
    """

    run_id: str
    family: str | None = None
    batch_tier: float | None = None
    tokens_per_step: int | None = None
    seed: int | None = None
    n_layer: int | None = None
    total_tokens: int | None = None
    batch_size: int | None = None
    primary_spectrum: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"RunInfo.run_id must be a non-empty string, got {self.run_id!r}")
        if self.batch_tier is not None and not (isinstance(self.batch_tier, (int, float)) and self.batch_tier > 0):
            raise ValueError(f"RunInfo.batch_tier must be a positive number, got {self.batch_tier!r}")
        if self.total_tokens is not None and not self.total_tokens > 0:
            raise ValueError(f"RunInfo.total_tokens must be positive, got {self.total_tokens!r}")
        if not isinstance(self.extras, dict):
            raise TypeError(f"RunInfo.extras must be a dict, got {type(self.extras).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the content of ``run.json`` without the format header)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "RunInfo":
        """Rebuild from :meth:`to_dict`; unknown keys are kept in ``extras``."""
        if not isinstance(data, Mapping):
            raise RecordFormatError(f"{origin}: run metadata must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key, kinds in _INFO_TYPES.items():
            v = kwargs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
                raise RecordFormatError(f"{origin}: run metadata field {key!r} has the wrong type ({type(v).__name__})")
        if not isinstance(kwargs.get("extras") or {}, dict):
            raise RecordFormatError(f"{origin}: run metadata field 'extras' must be an object")
        unknown = {k: v for k, v in data.items() if k not in known and k not in ("format", "version")}
        if unknown:
            kwargs["extras"] = {**unknown, **dict(kwargs.get("extras") or {})}
        if "run_id" not in kwargs:
            raise RecordFormatError(f"{origin}: run metadata has no 'run_id'")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RecordFormatError(f"{origin}: invalid run metadata ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# measurements


class _LazySpectra(Mapping):
    """Read-only mapping name -> Spectrum that loads each file on first access and caches it."""

    def __init__(self, root: Path, files: dict[str, str], origin: str):
        self._root = root
        self._files = files
        self._origin = origin
        self._cache: dict[str, Spectrum] = {}

    def __getitem__(self, name: str) -> Spectrum:
        if name not in self._files:
            raise KeyError(f"{self._origin}: no spectrum named {name!r}; available: {sorted(self._files)}")
        if name not in self._cache:
            path = self._root / self._files[name]
            try:
                self._cache[name] = Spectrum.load(path)
            except FileNotFoundError:
                raise RecordFormatError(f"{self._origin}: spectrum file {path} is missing") from None
            except SpectrumFormatError as exc:
                raise RecordFormatError(f"{self._origin}: spectrum {name!r}: {exc}") from exc
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"<spectra {sorted(self._files)} (loaded lazily from {self._root})>"


@dataclass(eq=False)
class Measurement:
    """One spectral measurement of a run at a checkpoint.

    Attributes:
        step: optimizer step of the checkpoint.
        tokens: training tokens consumed before the measurement.
        progress: fraction of the planned training budget, in [0, 1] (``None`` if unknown).
        val_loss: validation loss at the checkpoint (``None`` if not measured).
        spectra: mapping name -> :class:`Spectrum` (activation spectra per layer, gradient spectra per
            parameter, ...). For a measurement read from disk, the files load lazily on first access.
        summaries: per spectrum name, scalar summaries (``alpha_tail``, ``alpha_head``, ``rankme``,
            ``participation_ratio``, ``stable_rank``, ... see :func:`spectrum_summaries`).
        scalars: measurement-level scalars, e.g. ``noise_scale`` (the gradient noise scale
            ``B_simple`` in samples per step from the per-sample gradient probe).
        kinds: per spectrum name, its :data:`~spectral_lens.spectrum.KINDS` entry (known without
            loading the file).
        time: wall-clock time (seconds since the epoch) when the measurement was recorded.
        files: per spectrum name, its file relative to the run directory (empty in memory).
        line: 1-based line number in ``measurements.jsonl`` (``None`` in memory).
    """

    step: int
    tokens: int
    progress: float | None = None
    val_loss: float | None = None
    spectra: Mapping[str, Spectrum] = field(default_factory=dict)
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    time: float | None = None
    files: dict[str, str] = field(default_factory=dict)
    line: int | None = None

    def names(self, kind: str | None = None) -> list[str]:
        """Spectrum names of this measurement, optionally only those of one ``kind``."""
        names = list(self.spectra)
        if kind is None:
            return names
        return [n for n in names if (self.kinds.get(n) or self.spectra[n].kind) == kind]

    def __repr__(self) -> str:
        return (
            f"Measurement(step={self.step}, tokens={self.tokens}, progress={self.progress}, "
            f"val_loss={self.val_loss}, spectra={list(self.spectra)})"
        )


def spectrum_summaries(
    spectrum: Spectrum,
    tail: tuple[int, int] | None = (100, 200),
    head: tuple[int, int] | None = (10, 40),
) -> dict[str, float]:
    """Default scalar summaries of one spectrum, as stored in ``measurements.jsonl``.

    Keys: ``rankme``, ``participation_ratio``, ``stable_rank`` (always, for a nonzero spectrum), and
    ``alpha_tail``, ``alpha_tail_r2``, ``alpha_head``, ``alpha_head_r2`` when the window fits the
    spectrum: inside its length, on nonzero eigenvalues, and within the sample rank (a window the
    row count cannot resolve is left out rather than stored as noise).
    """
    out: dict[str, float] = {}
    if not bool((spectrum.values > 0).any()):
        return out
    out["rankme"] = RankMe()(spectrum)
    out["participation_ratio"] = participation_ratio(spectrum)
    out["stable_rank"] = stable_rank(spectrum)
    for key, window in (("alpha_tail", tail), ("alpha_head", head)):
        if window is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InsufficientRowsWarning)
            try:
                fit = BandAlphaFitter(tuple(window)).fit(spectrum)
            except ValueError:
                continue
        if any(issubclass(w.category, InsufficientRowsWarning) for w in caught):
            continue
        out[key] = fit.alpha
        out[key + "_r2"] = fit.r2
    return out


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "spectrum"
    return safe[:120]


def _json_line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=_json_default) + "\n").encode("utf-8")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # 0-d torch tensors
        return obj.item()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON-serializable")


def _write_json_atomic(path: Path, obj: Any, fsync: bool) -> None:
    write_json_atomic(path, obj, fsync=fsync, default=_json_default)


# --------------------------------------------------------------------------------------------------
# writer


class RunWriter:
    """Appends events and measurements to a run directory (one writer per run).

    Args:
        path: the run directory (created if needed).
        info: the run's metadata. Required for a new run; for ``resume=True`` it may be omitted
            (read from ``run.json``) or must carry the same ``run_id``.
        resume: append to an existing run. Without it, an existing ``run.json`` is an error, so two
            runs never write into one directory by accident. On resume, a truncated last line left by
            a crash is cut off (with a :class:`RecordWarning`) before anything is appended.
        fsync: fsync every file and line (default). ``False`` trades crash safety for speed
            (synthetic data, tests); the write order, and thus safety for concurrent readers, is kept.
        tail_window: window of the stored ``alpha_tail`` summary; default: the scale rule for
            ``info.n_layer`` (:func:`spectral_lens.tail_window`), or the d12 window ``(100, 200)``.
        head_window: window of the stored ``alpha_head`` summary (default ``(10, 40)``).

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
        run_file = self.path / RUN_FILE
        if run_file.exists():
            if not resume:
                raise FileExistsError(
                    f"{run_file} already exists: pass resume=True to append to this run, or choose a new directory"
                )
            stored = RunRecord._read_info(self.path)
            if info is not None and info.run_id != stored.run_id:
                raise ValueError(
                    f"{run_file}: resuming run {stored.run_id!r} with info for run {info.run_id!r}"
                )
            self.info = stored
            windows = RunRecord._read_header(self.path).get("summary_windows", {})
            self.tail_window = tuple(windows["tail"]) if windows.get("tail") else None
            self.head_window = tuple(windows["head"]) if windows.get("head") else None
        else:
            if info is None:
                raise ValueError(f"{self.path}: a new run needs a RunInfo (info=...)")
            if not isinstance(info, RunInfo):
                raise TypeError(f"info must be a RunInfo, got {type(info).__name__}")
            self.info = info
            if tail_window is None:
                tail_window = _tail_window(info.n_layer) if info.n_layer else (100, 200)
            self.tail_window = tuple(tail_window)
            self.head_window = tuple(head_window) if head_window is not None else None
            self.path.mkdir(parents=True, exist_ok=True)
            header = {
                "format": _FORMAT,
                "version": _VERSION,
                **info.to_dict(),
                "summary_windows": {"tail": list(self.tail_window), "head": self.head_window and list(self.head_window)},
                "created": time.time(),
            }
            _write_json_atomic(run_file, header, fsync)
        (self.path / SPECTRA_DIR).mkdir(exist_ok=True)
        if resume:
            self._clean_orphans()
        self._fds: dict[str, int] = {}
        for name in (LOG_FILE, MEASUREMENTS_FILE):
            self._fds[name] = self._open_append(self.path / name)

    def _open_append(self, path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # cut off a partial last line left by a crash, so the next line does not glue onto it
            os.lseek(fd, max(0, size - (1 << 20)), os.SEEK_SET)  # O_APPEND writes still go to the end
            tail = os.read(fd, min(size, 1 << 20))
            if not tail.endswith(b"\n") and _is_record_line(tail[tail.rfind(b"\n") + 1 :]):
                # a complete line that only lacks its newline (e.g. written by another tool): keep it
                os.write(fd, b"\n")
            elif not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else None)
                if keep is None:
                    os.close(fd)
                    raise RecordFormatError(f"{path}: last line longer than 1 MiB without a newline")
                warnings.warn(
                    f"{path}: dropping a truncated last line ({size - keep} bytes) before appending",
                    RecordWarning,
                    stacklevel=3,
                )
                os.ftruncate(fd, keep)
        return fd

    def _clean_orphans(self) -> None:
        """On resume: remove temporary files and spectrum files no measurement line refers to, both
        left by a writer killed mid-measurement (its line was never appended). Nothing is removed when
        ``measurements.jsonl`` has an unreadable line (its references are unknown)."""
        spectra = self.path / SPECTRA_DIR
        tmps = [p for d in (self.path, spectra) if d.is_dir() for p in d.iterdir()
                if p.name.startswith(".") and (p.name.endswith(TMP_SUFFIX) or p.name.endswith(".tmp.npz"))]
        referenced: set[str] = set()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lines = _read_jsonl(self.path / MEASUREMENTS_FILE, "skip")
        if any(issubclass(w.category, RecordWarning) and "truncated last line" not in str(w.message) for w in caught):
            orphans = []
        else:
            for _, obj in lines:
                entries = obj.get("spectra")
                for entry in entries.values() if isinstance(entries, dict) else ():
                    if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                        referenced.add(Path(entry["file"]).name)
            pattern = re.compile(r"\d{8}_[A-Za-z0-9._-]+\.npz")
            orphans = [p for p in spectra.iterdir() if pattern.fullmatch(p.name) and p.name not in referenced] \
                if spectra.is_dir() else []
        for p in tmps + orphans:
            try:
                p.unlink()
            except OSError:
                pass
        if tmps or orphans:
            warnings.warn(
                f"{self.path}: removed {len(tmps)} temporary file(s) and {len(orphans)} spectrum file(s) that no "
                f"measurement refers to, left by an interrupted writer",
                RecordWarning,
                stacklevel=3,
            )

    def _append(self, name: str, obj: Mapping[str, Any]) -> None:
        fd = self._fds.get(name)
        if fd is None:
            raise ValueError(f"RunWriter for {self.path} is closed")
        data = _json_line(obj)
        written = os.write(fd, data)
        while written < len(data):  # regular files write everything at once; be safe anyway
            written += os.write(fd, data[written:])
        if self.fsync:
            os.fsync(fd)

    def log(self, step: int, tokens: int, **scalars: Any) -> None:
        """Append one scalar event to ``log.jsonl``.

        Conventional keys: ``train_loss``, ``val_loss``, ``tokens_per_s`` (throughput), ``lr``. Any
        JSON-serializable value is accepted. ``time`` (wall clock) is added unless given.
        """
        event = {"step": int(step), "tokens": int(tokens)}
        event.update(scalars)
        event.setdefault("time", time.time())
        self._append(LOG_FILE, event)

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

        Returns the :class:`Measurement` as written.
        """
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
        taken: set[str] = set()
        entries: dict[str, dict[str, Any]] = {}
        all_summaries: dict[str, dict[str, float]] = {}
        for name, spec in spectra.items():
            rel = self._spectrum_file(step, name, taken)
            spec.save(self.path / rel, fsync=self.fsync)  # atomic: temp file, fsync, rename
            summ = spectrum_summaries(spec, self.tail_window, self.head_window) if summarize else {}
            if summaries is not None and name in summaries:
                summ.update({k: float(v) for k, v in summaries[name].items()})
            all_summaries[name] = summ
            entries[name] = {"file": rel, "kind": spec.kind, "summaries": summ}
        if spectra and self.fsync:
            _fsync_dir(self.path / SPECTRA_DIR)
        now = time.time()
        line = {
            "step": int(step),
            "tokens": int(tokens),
            "progress": None if progress is None else float(progress),
            "val_loss": None if val_loss is None else float(val_loss),
            "time": now,
            "spectra": entries,
            "scalars": {k: float(v) for k, v in (scalars or {}).items()},
        }
        self._append(MEASUREMENTS_FILE, line)
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

    def update_info(self, **extras: Any) -> None:
        """Merge ``extras`` into ``run.json``'s ``extras`` (rewritten atomically), e.g. a final status."""
        header = RunRecord._read_header(self.path)
        header.setdefault("extras", {}).update(extras)
        self.info.extras.update(extras)
        _write_json_atomic(self.path / RUN_FILE, header, self.fsync)

    def close(self) -> None:
        """Close the files (idempotent)."""
        while self._fds:
            _, fd = self._fds.popitem()
            os.close(fd)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# reader


def _read_jsonl(path: Path, errors: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every complete, valid line; see the module docstring for the rules."""
    if not path.exists():
        return []
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
                raise RecordFormatError(msg + "; open with errors='skip' to skip it") from None
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
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what}[{k!r}] must be a number, got {type(v).__name__}")
        out[k] = float(v)
    return out


def _opt_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number or null, got {value!r}")
    return float(value)


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
        except (ValueError, UnicodeDecodeError, OSError) as exc:
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
                at open time instead of on first access.
        """
        if errors not in _ERRORS:
            raise ValueError(f"errors must be one of {_ERRORS}, got {errors!r}")
        path = Path(path)
        header = cls._read_header(path)
        info = cls._read_info(path)
        windows = {k: tuple(v) if v else None for k, v in (header.get("summary_windows") or {}).items()}
        events = []
        for lineno, obj in _read_jsonl(path / LOG_FILE, errors):
            bad = [k for k in ("val_loss", "train_loss", "tokens_per_s") if obj.get(k) is not None
                   and (isinstance(obj[k], bool) or not isinstance(obj[k], (int, float)))]
            if not isinstance(obj.get("step"), int) or not isinstance(obj.get("tokens"), int) or bad:
                what = f"{bad} must be numbers" if bad else "event needs integer 'step' and 'tokens'"
                msg = f"{path / LOG_FILE}, line {lineno}: {what}"
                if errors == "raise":
                    raise RecordFormatError(msg)
                warnings.warn(msg + "; skipped", RecordWarning, stacklevel=2)
                continue
            events.append(obj)
        measurements = []
        mfile = path / MEASUREMENTS_FILE
        for lineno, obj in _read_jsonl(mfile, errors):
            origin = f"{mfile}, line {lineno}"
            try:
                m = cls._parse_measurement(path, obj, origin, lineno)
                if verify:
                    for name in m.spectra:
                        m.spectra[name]
            except (RecordFormatError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                msg = str(exc) if isinstance(exc, RecordFormatError) else f"{origin}: invalid measurement ({exc})"
                if errors == "raise":
                    raise RecordFormatError(msg + "; open with errors='skip' to skip it") from None
                warnings.warn(msg + "; measurement skipped", RecordWarning, stacklevel=2)
                continue
            measurements.append(m)
        return cls(path, info, events, measurements, windows)

    @staticmethod
    def _parse_measurement(root: Path, obj: dict[str, Any], origin: str, lineno: int) -> Measurement:
        step, tokens = obj.get("step"), obj.get("tokens")
        if not isinstance(step, int) or not isinstance(tokens, int):
            raise ValueError("needs integer 'step' and 'tokens'")
        entries = obj.get("spectra") or {}
        if not isinstance(entries, dict):
            raise ValueError("'spectra' must be an object")
        files, kinds, summaries = {}, {}, {}
        for name, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ValueError(f"spectrum {name!r} has no 'file'")
            rel = entry["file"]
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"spectrum {name!r}: file {rel!r} must be relative to the run directory")
            if not (root / rel).is_file():
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
        when nothing was logged.
        """
        if "throughput" in self.info.extras:
            return float(self.info.extras["throughput"])
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
