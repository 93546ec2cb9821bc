"""``Spectrum``: the result type every measurement produces, and its pickle-free file format."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._warnings import SpectrumFormatError
from .spectra.eigen import trace_normalize

__all__ = ["Spectrum", "KINDS"]

#: What the eigenvalues are eigenvalues of.
KINDS = ("activation_covariance", "gradient", "weight")

_FORMAT = "spectral-lens/spectrum"
_VERSION = 1


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
        v = torch.as_tensor(self.values).detach().to("cpu", torch.float64)
        if v.ndim != 1:
            raise ValueError(f"Spectrum.values must be 1-D, got shape {tuple(v.shape)}")
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError("Spectrum.values contains NaN or Inf")
        if v.numel() > 1 and bool((v[1:] > v[:-1]).any()):
            raise ValueError("Spectrum.values must be sorted descending")
        object.__setattr__(self, "values", v)

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

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (no pickle): the eigenvalues plus a JSON header."""
        path = Path(path)
        header = json.dumps(self.to_dict())
        np.savez(path, values=self.values.numpy(), header=np.array(header))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "Spectrum":
        """Read a file written by :meth:`save`; a corrupted or foreign file raises ``SpectrumFormatError``."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                values = data["values"]
                header = json.loads(str(data["header"]))
        except FileNotFoundError:
            raise
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
            raise SpectrumFormatError(f"{path}: not a readable spectral-lens spectrum file ({exc})") from exc
        return cls.from_dict(header, values, origin=str(path))

    @classmethod
    def from_dict(cls, header: dict[str, Any], values, origin: str = "<dict>") -> "Spectrum":
        """Rebuild from :meth:`to_dict` output and the eigenvalue array."""
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise SpectrumFormatError(f"{origin}: header is not a spectral-lens spectrum header")
        if header.get("version") != _VERSION:
            raise SpectrumFormatError(f"{origin}: unsupported spectrum version {header.get('version')!r}")
        try:
            return cls(
                values=torch.from_numpy(np.asarray(values, dtype=np.float64).copy()),
                n_rows=int(header["n_rows"]),
                dim=int(header["dim"]),
                kind=header["kind"],
                source=header.get("source"),
                metadata=dict(header.get("metadata") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpectrumFormatError(f"{origin}: invalid spectrum content ({exc})") from exc

    def __repr__(self) -> str:
        top = ", ".join(f"{v:.3g}" for v in self.values[:3].tolist())
        return (
            f"Spectrum(kind={self.kind!r}, source={self.source!r}, dim={self.dim}, "
            f"n_rows={self.n_rows}, values=[{top}, ...])"
        )
