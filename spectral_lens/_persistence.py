"""An accumulator's state outside it: the ``state_dict`` format and its validation
(:func:`_validated`), and the ``.npz`` file (JSON header, no pickle) that ``save`` writes and ``load`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._warnings import StateFormatError
from .atomic import write_atomic
from .spectra.moments import PRECISIONS
from .spectrum import read_npz

_STATE_FORMAT = "spectral-lens/covariance-state"
_NONFINITE = ("raise", "skip")
_HEADER_KEYS = ("format", "dim", "precision", "nonfinite", "updates", "synced", "initialized", "low_precision_products",
                "products_underflowed")
#: The largest row or update count a state may hold: float64 holds every count up to it exactly (the covariance
#: divides by ``n``) and no pool comes near it; counts near 2**63 would wrap the next int64 sum (a tampered file).
_MAX_COUNT = 2**53


def _unknown_why() -> str:
    """Why a state may hold a field this version does not know, and what to do. Refused, not ignored: a newer
    field may change what the sums mean (``products_underflowed`` did). Imports the version at the call: the
    package defines it after importing this module."""
    from . import __version__

    return (f"a misspelled field, or a state written by a newer spectral-lens than this one ({__version__}), whose "
            "fields this version cannot honour; load it with the version that wrote it or a newer one")


# arrays of an initialized state: (shape in terms of d, dtype)
_ARRAYS = {
    "shift": ("d", torch.float64),
    "n": ((), torch.int64),
    "m": ("d", torch.float64),
    "s": ("dd", torch.float64),
    "bad_rows": ((), torch.int64),
    "first_bad": ((), torch.int64),
}


def _validated(state: Any, origin: str, label: str, precision: str, nonfinite: str,
               given_dim: int | None) -> dict[str, Any]:
    """Check every field of a state against the format and an accumulator's configuration (``label``
    names it in errors; ``given_dim`` is the ``dim`` it was built with); returns the new attribute values
    (cloned tensors) without touching the accumulator. The state replaces the rows, so a width inferred from
    them goes with them, as on ``reset``: a state of any width loads, unless ``dim`` was given (then it must
    match), and a state without a width leaves ``dim`` at ``given_dim``."""
    def fail(why: str) -> None:
        raise StateFormatError(f"{label}: cannot load {origin}: {why}")

    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        fail("not an ActivationCovarianceAccumulator state")
    unknown = sorted(map(str, set(state) - set(_HEADER_KEYS) - set(_ARRAYS)))  # as a file's are (_read_state)
    if unknown:
        fail(f"unknown field(s) {unknown}: {_unknown_why()}")
    if state.get("precision") != precision:
        fail(f"precision {state.get('precision')!r} differs from this accumulator's {precision!r}")
    if state.get("nonfinite", nonfinite) != nonfinite:
        fail(f"nonfinite {state.get('nonfinite')!r} differs from this accumulator's {nonfinite!r}")
    dim, updates, synced = state.get("dim"), state.get("updates", 0), state.get("synced", False)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        fail(f"dim must be a positive int or null, got {dim!r}")
    if given_dim is not None and dim is not None and dim != given_dim:
        fail(f"dim {dim} differs from this accumulator's {given_dim}")
    if isinstance(updates, bool) or not isinstance(updates, int) or not 0 <= updates <= _MAX_COUNT:
        fail(f"updates must be a non-negative int (at most 2**53), got {updates!r}")
    if not isinstance(synced, bool):
        fail(f"synced must be true or false, got {synced!r}")
    present = [k for k in _ARRAYS if k in state]
    initialized = state.get("initialized", bool(present))
    if not isinstance(initialized, bool):
        fail(f"initialized must be true or false, got {initialized!r}")
    # absent in files written before the field existed: unknown, so not checked (as those versions did)
    low = state.get("low_precision_products", False)
    if not isinstance(low, bool):
        fail(f"low_precision_products must be true or false, got {low!r}")
    # absent in files written before the field existed: not known to have underflowed (as those versions assumed)
    underflowed = state.get("products_underflowed", False)
    if not isinstance(underflowed, bool):
        fail(f"products_underflowed must be true or false, got {underflowed!r}")
    out: dict[str, Any] = {"dim": dim if dim is not None else given_dim, "_updates": updates,
                           "_synced": synced, "_low_products": low, "_underflowed": underflowed}
    if not initialized:
        if present:
            fail(f"state without rows carries arrays {present}")
        return out
    missing = [k for k in _ARRAYS if k not in state]
    if missing:
        fail(f"array(s) {missing} missing")
    if dim is None:
        fail("a state with rows needs an integer dim")
    dev = state["s"].device if isinstance(state["s"], torch.Tensor) else torch.device("cpu")
    for key, (shape, dtype) in _ARRAYS.items():
        t = state[key]
        want = {"d": (dim,), "dd": (dim, dim)}.get(shape, shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            fail(f"{key!r} must be a tensor of shape {want} and dtype {dtype}, got {got}")
        if t.device != dev:
            fail(f"{key!r} is on {t.device}, 's' on {dev}")
        if t.layout != torch.strided or t.device.type == "meta":  # later updates would fail (or read nothing)
            fail(f"{key!r} must be a dense tensor holding values, got a {t.layout} tensor on {t.device}"
                 + (" (loaded with map_location='meta'?)" if t.device.type == "meta" else ""))
        out["_" + key] = t.detach().clone()  # the state's own tensors, outside any autograd graph
    n, bad_rows, first_bad = int(out["_n"]), int(out["_bad_rows"]), int(out["_first_bad"])
    if not (0 <= n <= _MAX_COUNT and 0 <= bad_rows <= _MAX_COUNT and -1 <= first_bad <= _MAX_COUNT):
        fail(f"counts out of range (n={n}, bad_rows={bad_rows}, first_bad={first_bad}; each at most 2**53, "
             "n and bad_rows >= 0, first_bad >= -1)")
    # NaN/Inf rows summed under "raise" (first_bad >= 0) may be in the shift too, a mean of rows: such a state is
    # what the live accumulator holds (its compute names the update), so it moves (to) and loads as it was saved
    if not bool(torch.isfinite(out["_shift"]).all()) and not (nonfinite == "raise" and first_bad >= 0):
        fail("shift is not finite (and the state records no NaN/Inf rows that could have made it so)")
    if n == 0 and (bool(out["_m"].ne(0).any()) or bool(out["_s"].ne(0).any())):  # no rows sum to exact zeros
        fail("n is 0 but the sums m and S are not zero: the row count does not belong to these sums")
    out["_has_rows"] = n > 0
    return out


def _npz_path(path: Path) -> Path:
    """The file :func:`_write_state` writes for ``path``: ``path`` itself when it ends in ``.npz``, else with it appended."""
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _state_path(path: Path) -> Path:
    """The file a load of ``path`` reads: ``path`` when it exists, else the file a save to ``path`` wrote
    (``.npz`` appended) when that one exists, so ``load(p)`` reads what ``save(p)`` wrote; else ``path``
    (whose load then raises ``FileNotFoundError`` naming it)."""
    if path.exists() or path.suffix == ".npz":
        return path
    saved = _npz_path(path)
    return saved if saved.exists() else path


def _write_state(sd: dict[str, Any], path: str | Path, fsync: bool) -> Path:
    """Write a ``state_dict`` ``sd`` as ``.npz`` (appended to a ``path`` without it), atomically; returns the path."""
    header = {k: sd[k] for k in _HEADER_KEYS}
    arrays = {k: v.detach().cpu().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    path = _npz_path(Path(path))
    blob = np.array(json.dumps(header))
    write_atomic(path, lambda fh: np.savez(fh, header=blob, **arrays), fsync=fsync)
    return path


def _read_state(path: Path, device: str | torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and the arrays (as tensors on ``device``) of a state file written by :func:`_write_state`;
    raises :class:`StateFormatError` naming ``path`` for a file that is not one (the arrays and the header's
    other fields are checked by :func:`_validated`)."""
    header, raw = read_npz(path, "an accumulator state file", StateFormatError)
    try:
        arrays = {k: torch.from_numpy(v).to(device) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:  # a dtype or byte order torch has no tensors of
        raise StateFormatError(f"{path}: not readable as an accumulator state file ({exc})") from exc
    if not isinstance(header, dict) or header.get("precision") not in PRECISIONS:
        raise StateFormatError(f"{path}: header is not an accumulator state header")
    if header.get("nonfinite", "raise") not in _NONFINITE:
        raise StateFormatError(f"{path}: header field nonfinite={header.get('nonfinite')!r} is not one of {_NONFINITE}")
    unknown = sorted(set(header) - set(_HEADER_KEYS)) + sorted(set(arrays) - set(_ARRAYS))
    if unknown:
        raise StateFormatError(f"{path}: unknown field(s) {unknown} in an accumulator state file: {_unknown_why()}")
    dim = header.get("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise StateFormatError(f"{path}: header field dim={dim!r} is not a positive int or null")
    return header, arrays
