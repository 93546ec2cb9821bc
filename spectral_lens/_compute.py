"""What ``compute`` does with an accumulator's sums, as pure functions: the finiteness, range and
row-count checks and the float64 eigen-solve (:func:`_spectrum_of`), of a :class:`_Sums` snapshot and a
:class:`_Setup`; shared by ``compute`` (live state) and ``compute_async`` (host copies, :func:`_host_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ._warnings import NonFiniteError, NonFiniteRowsWarning
from .spectra.eigen import all_finite, eigenvalues_descending
from .spectra.moments import covariance_from_moments
from .spectrum import Spectrum

#: The largest variance below which products formed in float32 (or bf16 on CUDA) are refused at
#: ``compute``: there, the products of directions ~1e-8 below the largest reach float32's subnormal
#: range (2^-126), where they lose precision or, on GPUs, flush to zero.
_LOW_PRODUCT_FLOOR = 2.0 ** -100
#: The same floor for float64 products: directions 2^-53 (float64's resolution) below the largest
#: stay above float64's subnormal range (2^-1022). Float64 rows of ~1e-160 gave eigenvalues off by
#: 3e-4 of the largest, and rows of ~1e-170 an all-zero spectrum, without a word.
_FLOAT64_PRODUCT_FLOOR = 2.0 ** -960


@dataclass(frozen=True)
class _Sums:
    """What a spectrum needs of an initialized state, all on one device: the live tensors or a
    snapshot. ``s`` is the full symmetric (d, d) float64 ``S``."""

    n: torch.Tensor
    m: torch.Tensor
    s: torch.Tensor
    bad_rows: torch.Tensor
    first_bad: torch.Tensor


@dataclass(frozen=True)
class _Setup:
    """The accumulator's configuration at the time of a (possibly deferred) ``compute``."""

    label: str
    name: str | None
    dim: int | None
    precision: str
    nonfinite: str
    updates: int
    low_products: bool  # some update formed its products below float64
    # some update's rows were not all equal to its shift, yet every product and column sum was exactly 0
    underflowed: bool = False
    # after a sync: (global rank, first update there with NaN/Inf rows) per rank that had such rows
    bad_ranks: tuple = ()


def _where_bad(first: int, setup: _Setup) -> str:
    """Where the first NaN/Inf rows came from: an update of this process, or, after a sync, each
    rank's own update (the others' update counts mean nothing on this rank)."""
    if setup.bad_ranks:
        return ", ".join(f"global rank {r}'s update #{i}" for r, i in setup.bad_ranks)
    return f"update #{first}"


def _refuse_meta(n: torch.Tensor | None, label: str) -> None:
    if n is not None and n.device.type == "meta":
        raise ValueError(
            f"{label}: its rows were on the meta device (shapes without data, nothing to measure): the "
            "model's weights were never materialized; load them (e.g. model.to_empty(device=...) and "
            "load_state_dict) before measuring"
        )


def _row_count(n: torch.Tensor | None, label: str, k: int, updates: int = 0) -> int:
    """Rows in the state (``None``: uninitialized); raises ``ValueError`` naming ``label`` below ``k``.
    ``updates``: the updates it had, so that no rows from updates that came (every row masked out) is not
    blamed on a module that did not run."""
    _refuse_meta(n, label)
    rows = int(n) if n is not None else 0
    if rows < k:
        stance = (" or under torch.compiler.set_stance('force_eager')"  # torch >= 2.6; older ones have no stances
                  if hasattr(torch.compiler, "set_stance") else "")
        hint = ("" if rows else f" ({updates} update(s) reached it, every row masked out: the mask (a padded "
                "batch's attention_mask, SpectralLens's mask_fn) excluded every position, or the batches had "
                "none)" if updates else " (no update reached it: the module did not run, e.g. the model took another "
                "path around it such as a fused or fallback kernel, or it ran inside a torch.compile'd graph "
                "compiled before the hook was attached, which skipped the hook; run the forwards through the "
                f"uncompiled module{stance})")
        raise ValueError(f"{label}: need at least {k} rows, have {rows}{hint}")
    return rows


def _finite_check(sums: _Sums | None, setup: _Setup, notes: list) -> int:
    """Raise :class:`NonFiniteError` for NaN/Inf rows (``nonfinite="raise"``), overflowed products, or
    rows too small for float32 products (largest variance below :data:`_LOW_PRODUCT_FLOOR`);
    append the skipped-rows warning to ``notes`` as ``(message, category)``; return the skipped count."""
    first = int(sums.first_bad) if sums is not None else -1
    if setup.nonfinite == "raise" and first >= 0:
        raise NonFiniteError(
            f"{setup.label}: non-finite values (NaN/Inf) in the rows of {_where_bad(first, setup)} "
            "(0-based); fix the model or pass nonfinite='skip' to drop and count such rows"
            + ("" if not setup.low_products else " (finite float32 rows beyond ~1e35 overflow float32 sums "
               "too: for those, use precision='float64')")
        )
    if sums is not None and first < 0 and not all_finite(sums.s):
        raise NonFiniteError(
            f"{setup.label}: the second moments overflowed to Inf in one of updates #0..#{setup.updates - 1} "
            f"although every row is finite: products of rows exceed the range of the "
            f"{'float32' if setup.low_products else 'float64'} products (|x| too large); rescale "
            "the rows" + (" or use precision='float64'" if setup.low_products else "")
        )
    if sums is not None:  # (NaN/Inf rows under "raise" have raised above)
        _range_check(sums, setup)
    skipped = int(sums.bad_rows) if sums is not None else 0
    if skipped:
        notes.append((f"{setup.label}: skipped {skipped} rows containing NaN/Inf (first in {_where_bad(first, setup)})",
                      NonFiniteRowsWarning))
    return skipped


def _range_check(sums: _Sums, setup: _Setup) -> None:
    """Raise :class:`NonFiniteError` for rows too small for their products: the largest spread
    ``sqrt(max(S_jj / n, (m_j / n)^2))`` below the square root of :data:`_LOW_PRODUCT_FLOOR` (float32
    products) or :data:`_FLOAT64_PRODUCT_FLOOR` (float64 only), or exactly 0 although some update's rows
    were not constant (their products and column sums all underflowed or cancelled to 0). Compared as
    spreads, not variances, so that a variance below float64's range cannot hide as 0."""
    n = float(sums.n)
    if not n:
        return
    var = float((sums.s.diagonal() / n).max())
    spread = max(var, 0.0) ** 0.5
    spread = max(spread, float((sums.m / n).abs().max()))
    floor = _LOW_PRODUCT_FLOOR if setup.low_products else _FLOAT64_PRODUCT_FLOOR
    if spread >= floor ** 0.5 or not (spread > 0 or setup.underflowed):
        return
    kind = "float32" if setup.low_products else "float64"
    if spread == 0:
        where = "their products and column sums were all exactly 0 although the rows were not constant (underflow)"
    elif spread * spread > 0:
        where = f"their largest variance is about {spread * spread:.1e}"
    else:
        where = f"their largest standard deviation is about {spread:.1e}"
    raise NonFiniteError(
        f"{setup.label}: the rows are too small for {kind} products: {where}, below "
        f"2^{round(np.log2(floor))} ({floor:.1e}), where products of the smaller directions underflow {kind} and "
        "the spectrum would be wrong; rescale the rows (spectra are compared after trace normalization)"
        + (" or use precision='float64'" if setup.low_products else "")
    )


def _spectrum_of(sums: _Sums | None, setup: _Setup, notes: list) -> Spectrum:
    """The checks and the float64 eigen-solve of ``compute``, on whatever device ``sums`` lives on.

    Warnings are appended to ``notes`` (the caller emits them on its own thread)."""
    _refuse_meta(None if sums is None else sums.n, setup.label)
    skipped = _finite_check(sums, setup, notes)
    n = _row_count(None if sums is None else sums.n, setup.label, 2, setup.updates)
    values = eigenvalues_descending(covariance_from_moments(sums.n, sums.m, sums.s))
    meta: dict[str, Any] = {"precision": setup.precision, "skipped_rows": skipped}
    return Spectrum(values.cpu(), n_rows=n, dim=setup.dim, kind="activation_covariance", source=setup.name,
                    metadata=meta)


def _host_copies(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Callable[[], None]]:
    """Host copies of ``tensors`` (all on one device) without a host sync, and a ``wait()`` that
    returns once they are valid.

    CUDA: pinned buffers filled by ``non_blocking`` copies on the current stream, then an event; the
    sources are kept alive until ``wait()`` sees the event. CPU: clones (valid at once). Other
    devices: blocking copies.
    """
    dev = tensors[0].device
    if dev.type == "cpu":
        return tuple(t.clone() for t in tensors), lambda: None
    if dev.type != "cuda":
        return tuple(t.to("cpu") for t in tensors), lambda: None
    with torch.cuda.device(dev):
        host = tuple(torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True).copy_(t, non_blocking=True)
                     for t in tensors)
        event = torch.cuda.Event()
        event.record()
    keep = [tensors]

    def wait() -> None:
        event.synchronize()
        keep.clear()

    return host, wait
