"""Run records: the file layout, the metadata (:class:`RunInfo`), one measurement
(:class:`Measurement`) and the summaries stored with it; the JSON helpers the writer uses.

The layout and the durability rules are in :mod:`spectral_lens.records`.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..atomic import write_json_atomic
from .._warnings import InsufficientRowsWarning, SpectralLensWarning, SpectrumFormatError
from ..spectrum import Spectrum
from ..summaries import BandAlphaFitter, RankMe, participation_ratio, stable_rank

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


def _is_number(v: Any) -> bool:
    """A JSON number a float can hold: not a bool, not a string, not an integer beyond the float range
    (``json`` reads ``1`` followed by 400 zeros as an ``int`` that ``float()`` refuses with
    ``OverflowError``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        try:
            float(v)
        except OverflowError:
            return False
    return True


def _is_count(v: Any) -> bool:
    """An integer (``step``, ``tokens``) that is a :func:`_is_number` (not a bool)."""
    return isinstance(v, int) and _is_number(v)


# --------------------------------------------------------------------------------------------------
# metadata

# JSON types of RunInfo fields read from disk (None is always allowed)
_INFO_TYPES = {
    "run_id": (str,), "family": (str,), "primary_spectrum": (str,), "batch_tier": (int, float),
    "tokens_per_step": (int, float), "seed": (int,), "n_layer": (int,), "total_tokens": (int, float),
    "batch_size": (int, float),
}
# RunInfo fields read from disk that must be > 0 (RunInfo refuses the others too; the reader names file and field)
_POSITIVE = ("batch_tier", "tokens_per_step", "total_tokens", "batch_size")
# of those, the ones RunInfo took as 0 before review 24 (write_theorem6_sweep wrote batch_size 0 for a step shorter
# than a sequence): a 0 in run.json reads as unknown, with a RecordWarning, not a refusal of the whole run
_ZERO_UNKNOWN = ("tokens_per_step", "batch_size")


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
        for key in _POSITIVE:  # a bool or a string is written, and the reader refuses it as the wrong type
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"RunInfo.{key} must be a number, got {v!r}")
        for key in ("seed", "n_layer"):  # the reader refuses a float (even 12.0) here; resolve_window int()-ed it
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"RunInfo.{key} must be an integer (Python or NumPy int), got {v!r}")
        for key in ("family", "primary_spectrum"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"RunInfo.{key} must be a string or None, got {v!r}")
        for key in (*_POSITIVE, "seed", "n_layer"):  # the reader refuses an int a float cannot hold (json reads 1e400
            v = getattr(self, key)                    # digits as one); isfinite() raised a bare OverflowError on it
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and not _is_number(int(v)):
                raise ValueError(f"RunInfo.{key} is an integer beyond the float range (about "  # from its bits: str
                                 f"{int(abs(int(v)).bit_length() * 0.30103) + 1} digits), which the run.json reader "
                                 "refuses")  # refused one of over 4,300 digits (its own ValueError, no field named)
        # a NumPy number as the other fields take it (np.int64(8) was "must be a positive number, got np.int64(8)")
        if self.batch_tier is not None and not (isinstance(self.batch_tier, numbers.Real) and self.batch_tier > 0):
            raise ValueError(f"RunInfo.batch_tier must be a positive number, got {self.batch_tier!r}")
        if self.total_tokens is not None and not self.total_tokens > 0:
            raise ValueError(f"RunInfo.total_tokens must be positive, got {self.total_tokens!r}")
        for key in ("batch_tier", "tokens_per_step", "total_tokens", "batch_size"):
            v = getattr(self, key)  # the reader refuses NaN / Infinity in run.json: never write one
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"RunInfo.{key} must be a finite number, got {v!r}")
        for key in ("tokens_per_step", "batch_size"):  # counts per optimizer step: 0 or less is no step at all
            v = getattr(self, key)
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not v > 0:
                raise ValueError(f"RunInfo.{key} must be positive, got {v!r}")
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
            if isinstance(v, int) and not _is_number(v):
                raise RecordFormatError(f"{origin}: run metadata field {key!r} is an integer beyond the float range")
            if isinstance(v, float) and not math.isfinite(v):  # json reads 1e400 as inf, and NaN / Infinity
                raise RecordFormatError(f"{origin}: run metadata field {key!r} must be a finite number, got {v!r}")
            if key in _ZERO_UNKNOWN and v == 0:  # RunInfo took a 0 before: the run stays readable
                warnings.warn(f"{origin}: run metadata field {key!r} is 0: read as unknown (null; a run.json of an "
                              "older version, whose RunInfo took a 0)", RecordWarning, stacklevel=3)
                kwargs[key] = None
                continue
            if key in _POSITIVE and v is not None and not v > 0:  # a hand-written or other tool's run.json
                raise RecordFormatError(f"{origin}: run metadata field {key!r} must be a positive number, got {v!r}")
        if not isinstance(kwargs.get("extras") or {}, dict):
            raise RecordFormatError(f"{origin}: run metadata field 'extras' must be an object")
        unknown = {k: v for k, v in data.items() if k not in known and k not in ("format", "version")}
        if unknown or "extras" in kwargs:  # "extras": null (a hand-written or old run.json) reads as {}
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
            self._cache[name] = self.load(name)
        return self._cache[name]

    def load(self, name: str) -> Spectrum:
        """The spectrum ``name`` without keeping it in this mapping (the kept one if it was loaded), for
        a pass over every measurement of a run that needs each spectrum once."""
        if name in self._cache:
            return self._cache[name]
        if name not in self._files:
            raise KeyError(f"{self._origin}: no spectrum named {name!r}; available: {sorted(self._files)}")
        path = self._root / self._files[name]
        try:
            return Spectrum.load(path)
        except FileNotFoundError:
            raise RecordFormatError(f"{self._origin}: spectrum file {path} is missing") from None
        except SpectrumFormatError as exc:
            raise RecordFormatError(f"{self._origin}: spectrum {name!r}: {exc}") from exc

    def __contains__(self, name: object) -> bool:
        # Mapping's default loads the file (``self[name]``): ``name in m.spectra`` over a run's
        # measurements read every spectrum of the run, and raised for a corrupted file it never needed
        return name in self._files

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
    if isinstance(obj, (np.ndarray, torch.Tensor)):  # a tensor of several values as an array (.item() raised a
        return obj.detach().tolist() if isinstance(obj, torch.Tensor) else obj.tolist()  # bare RuntimeError)
    if hasattr(obj, "item") and callable(obj.item):  # other 0-d scalars
        return obj.item()
    raise TypeError(f"value of type {type(obj).__name__} is not JSON-serializable")


def _write_json_atomic(path: Path, obj: Any, fsync: bool) -> None:
    write_json_atomic(path, obj, fsync=fsync, default=_json_default)


