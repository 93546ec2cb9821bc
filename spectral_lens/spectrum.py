"""``Spectrum``: the result type every measurement produces, and its pickle-free file format."""

from __future__ import annotations

import json
import math
import operator
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_atomic
from ._warnings import SpectrumFormatError
from .spectra.eigen import trace_normalize

__all__ = ["Spectrum", "KINDS"]

#: What the eigenvalues are eigenvalues of.
KINDS = ("activation_covariance", "gradient", "weight")

_FORMAT = "spectral-lens/spectrum"
_VERSION = 1


def _is_numpy_file(path: Path) -> bool:
    """Whether ``path`` starts like a NumPy file: a zip archive (``.npz``) or an ``.npy`` header.
    Checked before ``np.load``, whose error for anything else (a JSON file given by mistake) says the
    file "contains pickled (object) data" and suggests loading it unsafely with pickle."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    return magic.startswith(b"PK\x03\x04") or magic == b"\x93NUMPY"


def read_npz(path: Path, what: str, error: type[Exception]) -> tuple[Any, dict[str, np.ndarray]]:
    """The parsed JSON ``header`` and the other arrays of a ``.npz`` file this library wrote, read
    without pickle. ``what`` names the expected file with its article ("an accumulator state file");
    a directory, a FIFO or device, another kind of file, a single ``.npy`` array, a damaged archive, a member
    that is not an ``.npy`` array, an array declaring more bytes than the file holds or a header that is not a
    JSON string raises ``error`` naming ``path``. A missing file raises ``FileNotFoundError``; an intact file whose arrays do not fit in memory, a
    ``MemoryError`` naming it (the file is not damaged). A ``path`` without ``.npz`` that does not exist is
    read with ``.npz`` appended, the file ``save(path)`` wrote (``Spectrum.load`` as the accumulator's)."""
    if path.suffix != ".npz" and not path.exists() and path.with_name(path.name + ".npz").exists():
        path = path.with_name(path.name + ".npz")
    if path.is_dir():
        raise error(f"{path}: is a directory, expected {what} (.npz)")
    if path.exists() and not path.is_file():  # opening a FIFO without a writer waited forever
        raise error(f"{path}: not a regular file (a FIFO, socket or device), expected {what} (.npz)")
    try:
        if not _is_numpy_file(path):
            raise error(f"{path}: not a NumPy .npz archive, expected {what} (.npz)")
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise error(f"{path}: a single .npy array, expected {what} (.npz)")
        with data:
            members = {k: data[k] for k in data.files}  # each read (decompressed) afresh
            # numpy returns a member whose bytes are not an .npy array (a foreign zip's, a tampered one's) as bytes
            raw_members = sorted(k for k, v in members.items() if not isinstance(v, np.ndarray))
            if raw_members:
                raise error(f"{path}: member(s) {raw_members} are not NumPy arrays, expected {what} (.npz)")
            if "header" not in members:
                raise error(f"{path}: no 'header' member, expected {what} (.npz)")
            raw = members.pop("header")
            if raw.dtype.kind != "U" or raw.ndim != 0:
                raise error(f"{path}: 'header' must be a JSON string, got dtype {raw.dtype}")
            header = json.loads(str(raw))
            arrays = members
    except (FileNotFoundError, error):
        raise
    except MemoryError as exc:  # numpy allocates an array's declared size before reading it
        if _declares_more_than_it_holds(path):  # a damaged or tampered .npy header (8 TiB in a small file)
            raise error(f"{path}: not readable as {what} (an array declares more bytes than the file holds: {exc})") from exc
        raise MemoryError(f"{path}: its arrays do not fit in memory ({exc})") from exc  # an intact file: not a format error
    # NotImplementedError / RuntimeError (RecursionError included): zipfile's answer to a damaged entry
    # header that names a compression method, zip version or flag it lacks, or encryption
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, OSError, EOFError, NotImplementedError,
            RuntimeError) as exc:
        raise error(f"{path}: not readable as {what} ({exc})") from exc
    return header, arrays


#: The most a deflated zip member expands (deflate's limit is about 1032:1), with room for its header.
_MAX_EXPANSION = 1100


def _declares_more_than_it_holds(path: Path) -> bool:
    """Whether an array of the ``.npz`` at ``path`` declares (shape times item size) more bytes than its
    member holds, or than the file could expand to, or has a header that cannot be read: a damaged or
    tampered file, whose ``MemoryError`` is a format error; else the arrays are real and memory is short."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:  # version 3 (utf-8 field names): never written here
                        return True
                    shape, _, dtype = read(fh)
                declared = math.prod(shape) * dtype.itemsize
                if declared > min(info.file_size, _MAX_EXPANSION * min(info.compress_size, size) + 4096):
                    return True
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError, RuntimeError,
            TypeError):
        return True
    return False


def _json_ok(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Eigenvalues of a PSD operator, sorted descending, float64, on the CPU.

    Attributes:
        values: (dim,) float64 eigenvalues, descending. For ``kind="activation_covariance"`` they are
            eigenvalues of the centered covariance ``1/(N-1) sum (h - mean)(h - mean)^T``; for
            ``"gradient"`` and ``"weight"`` they are squared singular values ``s_j^2`` of the stacked
            per-sample gradients ``G`` (M x P) or of the weight matrix, so that ranks, trace
            normalization and alpha mean the same thing for every kind (alpha of ``s`` is half the
            alpha of ``s^2``).
        n_rows: number of rows (token positions, samples) that produced it.
        dim: dimension of the operator (``d`` for covariances, ``min(M, P)`` for gradients).
        kind: one of :data:`KINDS`.
        source: where it was measured (module or parameter name), or ``None``.
        metadata: JSON-serializable extras (step, tokens, precision, skipped rows, ...).

    Construction raises ``ValueError`` for values that are not 1-D, finite, descending and ``>= 0``,
    for ``n_rows`` or ``dim`` that are not non-negative integers, and for ``dim`` other than the
    number of values: what :meth:`load` refuses cannot be built. The library's eigensolvers clamp
    round-off negatives to 0; do the same (``values.clamp_min(0)``) for eigenvalues of your own.
    """

    values: torch.Tensor
    n_rows: int
    dim: int
    kind: str = "activation_covariance"
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Spectrum.kind must be one of {KINDS}, got {self.kind!r}")
        # never via the default device; a normal tensor also when made inside torch.inference_mode() (a spectrum
        # measured in an evaluation loop is kept: its values must take in-place ops and autograd later)
        raw = self.values
        if isinstance(raw, np.ndarray) and (any(st < 0 for st in raw.strides) or not raw.flags.writeable):
            # a reversed view (``np.sort(x)[::-1]``: negative strides) or a read-only array: torch refuses the
            # first with a stride error and warns on the second; a copy is the same eigenvalues
            raw = np.array(raw)
        with torch.inference_mode(False):
            v = torch.as_tensor(raw, device="cpu").detach().to(torch.float64)
            v = v.clone() if v.is_inference() else v
        if v.ndim != 1:
            raise ValueError(f"Spectrum.values must be 1-D, got shape {tuple(v.shape)}")
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError("Spectrum.values contains NaN or Inf")
        if v.numel() > 1 and bool((v[1:] > v[:-1]).any()):
            raise ValueError("Spectrum.values must be sorted descending")
        if v.numel() and float(v[-1]) < 0:
            raise ValueError(
                f"Spectrum.values has a negative eigenvalue {float(v[-1]):.6g} (eigenvalues of a PSD operator "
                "must be >= 0; clamp round-off negatives from an eigensolver with values.clamp_min(0))"
            )
        counts = {}
        for key in ("n_rows", "dim"):
            raw = getattr(self, key)
            try:
                n = operator.index(raw) if not isinstance(raw, bool) else -1
            except TypeError:
                n = -1
            if n < 0:
                raise ValueError(f"Spectrum.{key} must be a non-negative integer, got {raw!r}")
            counts[key] = n
        if counts["dim"] != v.numel():
            raise ValueError(
                f"Spectrum.dim is {counts['dim']} but values has {v.numel()} entries (dim must be the number of "
                "eigenvalues)"
            )
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "n_rows", counts["n_rows"])
        object.__setattr__(self, "dim", counts["dim"])

    @property
    def normalized(self) -> torch.Tensor:
        """Trace-normalized eigenvalues ``p_j = lambda_j / sum_k lambda_k``."""
        return trace_normalize(self.values)

    @property
    def singular_values(self) -> torch.Tensor:
        """``sqrt(values)``: singular values for gradient and weight spectra."""
        return self.values.clamp_min(0).sqrt()

    @property
    def n_nonzero(self) -> int:
        """Number of strictly positive eigenvalues."""
        return int((self.values > 0).sum())

    def __len__(self) -> int:
        return self.values.numel()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (everything but the eigenvalue array)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "n_rows": int(self.n_rows),
            "dim": int(self.dim),
            "kind": self.kind,
            "source": self.source,
            "metadata": self.metadata,
        }

    def save(self, path: str | Path, *, fsync: bool = True, sync_dir: bool = True) -> Path:
        """Write an ``.npz`` (no pickle): the eigenvalues plus a JSON header.

        ``.npz`` is appended to a path without it. The write is atomic (temporary file in the same
        directory, fsync, rename): a failed save leaves a previous file at ``path`` intact.
        ``sync_dir=False`` leaves the directory's fsync (which makes the rename durable) to a caller
        saving many files into one directory, once after the last (``RunWriter.log_measurement``). A spectrum
        that :meth:`load` would refuse (negative ``n_rows`` or eigenvalues, ``dim`` not the number of
        values) raises ``SpectrumFormatError`` instead of being written.
        """
        path = Path(path)
        path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        try:
            header = json.dumps(self.to_dict())
        except (TypeError, ValueError) as exc:  # e.g. a tensor in metadata: name the key, not just the type
            bad = [k for k, v in self.metadata.items() if not _json_ok(v)] if isinstance(self.metadata, dict) else []
            raise TypeError(
                f"Spectrum.save({path}): metadata{'[' + repr(bad[0]) + ']' if bad else ''} is not JSON-serializable "
                f"({exc}); use numbers, strings, None, lists and dicts (e.g. float(t) for a tensor)"
            ) from None
        values = self.values.numpy()
        self.from_dict(self.to_dict(), values, origin=f"Spectrum.save({path})")  # what load will check
        write_atomic(path, lambda fh: np.savez(fh, values=values, header=np.array(header)), fsync=fsync,
                     sync_dir=sync_dir)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Spectrum":
        """Read a file written by :meth:`save`; a corrupted or foreign file raises ``SpectrumFormatError``."""
        path = Path(path)
        header, arrays = read_npz(path, "a spectral-lens spectrum file", SpectrumFormatError)
        if "values" not in arrays:
            raise SpectrumFormatError(f"{path}: no 'values' array, expected a spectral-lens spectrum file (.npz)")
        values = arrays["values"]
        return cls.from_dict(header, values, origin=str(path))

    @classmethod
    def from_dict(cls, header: dict[str, Any], values, origin: str = "<dict>") -> "Spectrum":
        """Rebuild from :meth:`to_dict` output and the eigenvalue array."""
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise SpectrumFormatError(f"{origin}: header is not a spectral-lens spectrum header")
        if header.get("version") != _VERSION:
            raise SpectrumFormatError(f"{origin}: unsupported spectrum version {header.get('version')!r}")
        def bad(why: str) -> SpectrumFormatError:
            return SpectrumFormatError(f"{origin}: invalid spectrum content: {why}")

        arr = np.asarray(values)
        if arr.dtype.kind not in "fiu" or arr.ndim != 1:
            raise bad(f"'values' must be a 1-D real array, got dtype {arr.dtype} and shape {arr.shape}")
        n_rows, dim = header.get("n_rows"), header.get("dim")
        for key, v in (("n_rows", n_rows), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(f"{key!r} must be a non-negative integer, got {v!r}")
        if dim != arr.shape[0]:
            raise bad(f"'dim' is {dim} but 'values' has {arr.shape[0]} entries")
        if not isinstance(header.get("source"), (str, type(None))):
            raise bad(f"'source' must be a string or null, got {header.get('source')!r}")
        metadata = header.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad(f"'metadata' must be an object, got {type(metadata).__name__}")
        v64 = arr.astype(np.float64)
        if v64.size and v64.min() < 0:  # every writer clamps round-off negatives to 0: this is damage
            raise bad(f"negative eigenvalue {v64.min():.6g} (eigenvalues of a PSD operator must be >= 0)")
        try:
            return cls(
                values=torch.from_numpy(v64.copy()),
                n_rows=n_rows,
                dim=dim,
                kind=header.get("kind"),
                source=header.get("source"),
                metadata=dict(metadata),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(str(exc)) from exc

    def __repr__(self) -> str:
        top = ", ".join(f"{v:.3g}" for v in self.values[:3].tolist())
        return (
            f"Spectrum(kind={self.kind!r}, source={self.source!r}, dim={self.dim}, "
            f"n_rows={self.n_rows}, values=[{top}, ...])"
        )
