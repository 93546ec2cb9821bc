"""``ActivationCovarianceAccumulator``: streaming, mergeable, checkpointable centered covariance.

State is the float64 shifted sums of :mod:`spectral_lens.spectra.moments` around a shift ``s``:
``n``, ``m = sum (x - s)``, ``S = sum (x - s)(x - s)^T``. Each chunk is centered on its own shift (the
mean of up to 1024 evenly spaced valid rows) before any product, and its sums are re-shifted into the
state exactly in float64, so pools whose mean drifts from chunk to chunk lose no precision. ``update`` never
synchronizes with the host; ``compute`` solves the eigenproblem once; ``compute_async`` snapshots the
state without a host sync and solves on the CPU in the background (:mod:`spectral_lens.background`).

The checks and the solve are pure functions of a :class:`_Sums` snapshot and a :class:`_Setup`
(:func:`_spectrum_of`), shared by ``compute`` (live state) and ``compute_async`` (host copy).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from .atomic import write_atomic
from .background import SolveFuture, emit, submit
from ._warnings import NonFiniteError, NonFiniteRowsWarning, StateFormatError
from .capture import Target, check_dense_rows
from .spectra import moments
from .spectra.eigen import eigenvalues_descending
from .spectra.moments import (
    PRECISIONS,
    add_promoted,
    mirror_lower,
    accumulate_shifted,
    chunk_moments,
    covariance_from_moments,
    lower_panels,
    matmul_precision,
    product_dtype,
    representable_shift,
    reshift,
    shift_dtype,
    symmetric_product,
)
from .spectrum import Spectrum, read_npz

if TYPE_CHECKING:
    from .activation_capture import ActivationCapture

__all__ = ["ActivationCovarianceAccumulator"]

_STATE_FORMAT = "spectral-lens/covariance-state"
_NONFINITE = ("raise", "skip")
_HEADER_KEYS = ("format", "dim", "precision", "nonfinite", "updates", "synced", "initialized", "low_precision_products",
                "products_underflowed")
#: The largest variance below which products formed in float32 (or bf16 on CUDA) are refused at
#: ``compute``: there, the products of directions ~1e-8 below the largest reach float32's subnormal
#: range (2^-126), where they lose precision or, on GPUs, flush to zero.
_LOW_PRODUCT_FLOOR = 2.0 ** -100
#: The same floor for float64 products: directions 2^-53 (float64's resolution) below the largest
#: stay above float64's subnormal range (2^-1022). Float64 rows of ~1e-160 gave eigenvalues off by
#: 3e-4 of the largest, and rows of ~1e-170 an all-zero spectrum, without a word.
_FLOAT64_PRODUCT_FLOOR = 2.0 ** -960
# arrays of an initialized state: (shape in terms of d, dtype)
_ARRAYS = {
    "shift": ("d", torch.float64),
    "n": ((), torch.int64),
    "m": ("d", torch.float64),
    "s": ("dd", torch.float64),
    "bad_rows": ((), torch.int64),
    "first_bad": ((), torch.int64),
}
_SHIFT_ROWS = 1024  # rows sampled (evenly spaced) from each chunk; their mean is the chunk's shift
_CPU_DTYPES = (torch.float32, torch.float64)  # CPU rows that take the NumPy-driven one-chunk path
_CPU_HALF = (torch.bfloat16, torch.float16)  # CPU rows converted exactly into that path's scratch
_PENDING = 32  # CPU: rank-2 re-shift terms deferred, then applied as one rank-64 GEMM (or on read)
_LOWER_BLOCK = 256  # CPU: row-block height of the lower-triangle float64 add
_SCRATCH = threading.local()  # CPU: per thread, recycled chunk buffers (see _chunk_scratch)
_SCRATCH_SHAPES = 4  # chunk shapes kept per thread
_SCRATCH_MAX_BYTES = 16 << 20  # a chunk whose buffers are larger gets fresh ones each time


def _sample_mean(rows: torch.Tensor, valid: torch.Tensor | None, wide: bool = False) -> torch.Tensor:
    """Mean of up to 1024 evenly spaced valid rows of a chunk (its shift; need not be exact); 0 if
    no row is valid.

    Summed in float64 if ``wide`` (the shift is float64: float64 precision or float64 rows), so
    finite rows near float32's limit (|x| > ~1e35) cannot give an infinite shift; else in the rows'
    precision (fp32 for half types; float32 products of such rows overflow anyway), where a float64
    sum would cost one more conversion kernel per update.

    With a mask the rows are spaced evenly among the valid ones, found on the device (no host
    read): the ``j``-th is the first row whose running count of valid rows exceeds
    ``j * count // k``. Evenly spaced rows of the chunk could all be masked (a mask that keeps
    the last token of each sequence never meets a stride dividing the sequence length): the shift
    was then 0, and rows far from 0 lost their tail in the float32 products.
    """
    dtype = torch.float64 if wide else (None if rows.dtype == torch.float32 else torch.float32)
    if valid is None:  # one kernel: the sample is read and averaged in the accumulation dtype directly
        step = max(1, rows.shape[0] // _SHIFT_ROWS)
        return (rows[::step] if step > 1 else rows).mean(0, dtype=dtype)
    rank = valid.cumsum(0)
    k = min(_SHIFT_ROWS, rows.shape[0])
    targets = torch.arange(k, device=rows.device).mul_(rank[-1]).div_(k, rounding_mode="floor")
    # searched in rank[:-1]: at most the last row, so no index is out of range when no row is valid
    head = rows.index_select(0, torch.searchsorted(rank[:-1], targets, right=True))
    # no valid row: the row read may hold anything (NaN, Inf); then a finite shift, whatever it is
    return head.mean(0, dtype=dtype).nan_to_num_(0.0, 0.0, 0.0)


def _zero_state(dim: int, device: torch.device, shift: torch.Tensor, precision: str) -> tuple[torch.Tensor, ...]:
    """``(n, m, S, shift, bad_rows, first_bad)`` of an accumulator that has seen no rows, around ``shift``."""
    f64 = dict(dtype=torch.float64, device=device)
    return (torch.zeros((), dtype=torch.int64, device=device), torch.zeros(dim, **f64), torch.zeros(dim, dim, **f64),
            representable_shift(shift.to(device), precision), torch.zeros((), dtype=torch.int64, device=device),
            torch.full((), -1, dtype=torch.int64, device=device))


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


def _row_count(n: torch.Tensor | None, label: str, k: int) -> int:
    """Rows in the state (``None``: uninitialized); raises ``ValueError`` naming ``label`` below ``k``."""
    _refuse_meta(n, label)
    rows = int(n) if n is not None else 0
    if rows < k:
        stance = (" or under torch.compiler.set_stance('force_eager')"  # torch >= 2.6; older ones have no stances
                  if hasattr(torch.compiler, "set_stance") else "")
        hint = ("" if rows else " (no update reached it: if its module ran inside a torch.compile'd graph "
                "compiled before the hook was attached, the graph skipped the hook; run the forwards through the "
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
    if sums is not None and first < 0 and not bool(torch.isfinite(sums.s).all()):
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


def _rows_underflowed(y: torch.Tensor, m: np.ndarray, s: torch.Tensor) -> bool:
    """Whether a CPU chunk's centred valid rows ``y`` (masked ones compacted away) are not all 0 although its column
    sums ``m`` and the diagonal of its product ``s`` are all exactly 0: rows so small that every product
    underflowed, with column sums that cancel exactly. Host reads of CPU tensors; ``y`` is read only when
    ``m`` and the diagonal are all 0 (constant rows, or this). Not checked on the generic path (CUDA,
    or CPU calls longer than ``max_chunk_rows``), which reads nothing on the host."""
    if m.any() or s.diagonal().numpy().any():  # (a NaN counts as nonzero)
        return False
    return bool(y.numpy().any())


def _spectrum_of(sums: _Sums | None, setup: _Setup, notes: list) -> Spectrum:
    """The checks and the float64 eigen-solve of ``compute``, on whatever device ``sums`` lives on.

    Warnings are appended to ``notes`` (the caller emits them on its own thread)."""
    _refuse_meta(None if sums is None else sums.n, setup.label)
    skipped = _finite_check(sums, setup, notes)
    n = _row_count(None if sums is None else sums.n, setup.label, 2)
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
        host = tuple(torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True).copy_(t, non_blocking=True) for t in tensors)
        event = torch.cuda.Event()
        event.record()
    keep = [tensors]

    def wait() -> None:
        event.synchronize()
        keep.clear()

    return host, wait
def _recycled(key: tuple, make: Callable[[], Any], nbytes: int) -> Any:
    """``make()``'s scratch for ``key``, kept per thread for the last :data:`_SCRATCH_SHAPES` keys when it
    takes at most ``_SCRATCH_MAX_BYTES`` (at most ``_SCRATCH_SHAPES * _SCRATCH_MAX_BYTES`` per thread).
    Scratch only: nothing of it becomes state, so an interrupted update leaves no trace that matters,
    and accumulators in different threads never share it."""
    cache = getattr(_SCRATCH, "chunks", None)
    if cache is None:
        cache = _SCRATCH.chunks = {}
    entry = cache.get(key)
    if entry is None:
        entry = make()
        if nbytes <= _SCRATCH_MAX_BYTES:
            if len(cache) >= _SCRATCH_SHAPES:
                del cache[next(iter(cache))]  # the oldest key
            cache[key] = entry
    return entry


def _chunk_scratch(n: int, d: int, dtype: torch.dtype):
    """``(y, out, panels)`` for an n x d CPU chunk: the centered rows, their product's buffer and the
    product's GEMM views (:func:`~spectral_lens.spectra.moments.lower_panels`), :func:`_recycled`."""
    def make():
        y, out = torch.empty(n, d, dtype=dtype, device="cpu"), torch.empty(d, d, dtype=dtype, device="cpu")
        return y, out, lower_panels(y, out)

    return _recycled((n, d, dtype), make, (n + d) * d * dtype.itemsize)


def _gather_scratch(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """An n x d buffer of ``dtype`` for :meth:`ActivationCovarianceAccumulator._cpu_compacted`'s gather
    of half-precision (or fp32 rows into float64 products) valid rows, :func:`_recycled` like
    :func:`_chunk_scratch`'s buffers."""
    return _recycled(("gather", n, d, dtype), lambda: torch.empty(n, d, dtype=dtype, device="cpu"), n * d * dtype.itemsize)


def _pending_factors(pend: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V = sum_j u_j c_j^T + c_j u_j^T`` over the first ``k`` deferred re-shift
    terms (``pend[0, j] = u_j``, ``pend[1, j] = c_j``; see :func:`spectral_lens.spectra.moments.reshift`)."""
    uc = pend[:, :k].reshape(2 * k, -1)  # rows u_1..u_k, c_1..c_k
    cu = np.concatenate((pend[1, :k], pend[0, :k]))  # rows c_1..c_k, u_1..u_k
    return torch.from_numpy(uc).t(), torch.from_numpy(cu)


def _symmetric_s(lower: torch.Tensor, pend: np.ndarray | None) -> torch.Tensor:
    """The symmetric float64 ``S`` from a stored ``S`` valid in its lower triangle and the deferred
    re-shift terms ``pend`` (``(2, k, d)``, or ``None``): the terms added, then the lower triangle
    mirrored. Shared by the ``_s`` property and ``compute_async``'s snapshot, so both give the same bits."""
    if pend is not None:
        lower = torch.addmm(lower, *_pending_factors(pend, pend.shape[1]))
    return mirror_lower(lower)


def _add_lower(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a + b`` (``b`` promoted to ``out``'s dtype) on the lower triangle, by row blocks of
    :data:`_LOWER_BLOCK`; outside the lower triangle ``out`` is unspecified (garbage there, NaN
    included, is harmless). Each block is a promoting copy of ``b`` then an add of ``a``: two torch
    passes, both parallel, which beat NumPy's single-threaded casting add (2 threads, d = 768, on the
    project's 2-core machine: 0.27 ms vs 0.56 ms; one thread: equal, and 2x faster at d = 256)."""
    d = a.shape[0]
    if d <= _LOWER_BLOCK:  # one block: no slicing
        out.copy_(b)
        out.add_(a)
        return
    for r0 in range(0, d, _LOWER_BLOCK):
        r1 = min(d, r0 + _LOWER_BLOCK)
        block = out[r0:r1, :r1]
        block.copy_(b[r0:r1, :r1])
        block.add_(a[r0:r1, :r1])


def _adopt_shift(state_n: torch.Tensor, state_shift: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The shift to merge sums around: ``state_shift`` (float64), or ``shift`` (promoted to float64)
    while the state holds no rows; two kernels, no host read. A state without rows has ``m = 0`` and
    ``S = 0`` around any shift, but the shift it got from a chunk whose rows were all masked or skipped
    is an arbitrary 0: sums of rows far from it (a mean of 1e8, spread 1) would lose every digit when
    re-shifted there."""
    return torch.where(state_n > 0, state_shift, shift)


class ActivationCovarianceAccumulator:
    """Streaming centered covariance of d-dimensional rows and its eigen-spectrum.

    Args:
        dim: row width ``d``; inferred from the first ``update`` when ``None``.
        precision: ``"exact"`` (default; fp32 products with TF32 off, fp64 for fp64 input),
            ``"fast"`` (bf16 products with fp32 accumulation on CUDA tensor cores; same as
            ``"exact"`` on other devices) or ``"float64"`` (fp64 products). Chunk sums are always
            merged in float64 around a shift, never as raw second moments.
        nonfinite: ``"raise"`` (default): a NaN/Inf anywhere makes ``compute`` raise
            :class:`NonFiniteError` naming the module and the first offending update (checked
            without a host sync); ``"skip"``: rows with a NaN/Inf are dropped and counted
            (``Spectrum.metadata["skipped_rows"]``) and ``compute`` warns.
        max_chunk_rows: rows per product; bounds fp32 accumulation length and scratch memory.
        name: label used in errors and as ``Spectrum.source`` (``attach`` sets the module name).

    Methods follow torchmetrics: ``update``, ``compute``, ``reset``, ``merge``, ``state_dict`` /
    ``load_state_dict``, plus ``compute_async`` (the solve off the caller's thread), ``save``/``load``
    (``.npz``, no pickle) and ``sync`` across ranks.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        precision: str = "exact",
        nonfinite: str = "raise",
        max_chunk_rows: int = 131072,
        name: str | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        if isinstance(max_chunk_rows, bool) or not isinstance(max_chunk_rows, numbers.Integral) or max_chunk_rows < 1:
            raise ValueError(f"max_chunk_rows must be an int >= 1, got {max_chunk_rows!r}")
        self.dim = dim
        self._dim_given = dim  # reset() returns to it: a width inferred from rows is forgotten with them
        self.precision = precision
        self.nonfinite = nonfinite
        self.max_chunk_rows = int(max_chunk_rows)
        self.name = name
        self._lock = threading.Lock()  # see update(): hooks may call it from several threads at once
        self.reset()

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy: a lock cannot be copied; the copy gets its own
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every row (keeps the configuration, including an explicit ``dim``; a width inferred
        from the rows is forgotten with them, so a reset accumulator takes rows of any width again)."""
        self.dim = getattr(self, "_dim_given", self.dim)
        self._shift: torch.Tensor | None = None
        self._s_lower: torch.Tensor | None = None
        self._s_spare: torch.Tensor | None = None
        self._s_stale = False
        self._s_escaped = True
        self._pend: np.ndarray | None = None
        self._pend_k = 0
        self._rank2: tuple[torch.Tensor, ...] | None = None  # scratch of _commit (see _rank2_scratch)
        self._n = self._m = self._s = None
        self._bad_rows = self._first_bad = None
        self._updates = 0
        self._synced = False
        self._bad_ranks: tuple = ()  # set by sync: which ranks had NaN/Inf rows, for the messages
        self._low_products = False  # whether any update formed its products below float64
        self._underflowed = False  # whether some update's rows underflowed to all-zero sums (see _rows_underflowed)
        # whether the state surely holds rows; until then (masked or skipped rows only) its shift may be
        # an empty chunk's arbitrary 0, which the first rows replace by their own (see _adopt_shift)
        self._has_rows = False

    def _label(self) -> str:
        return self.name or "ActivationCovarianceAccumulator"

    def _init_state(self, dim: int, device: torch.device, shift: torch.Tensor) -> None:
        self.dim = dim
        self._n, self._m, self._s, self._shift, self._bad_rows, self._first_bad = _zero_state(
            dim, device, shift, self.precision)

    @property
    def _s(self) -> torch.Tensor | None:
        """Float64 ``S`` (d, d), symmetric.

        ``update`` adds only lower triangles (a BLAS ``syrk`` forms one) and marks the upper one
        stale; the first read mirrors it, once. ``update`` writes its result into a spare buffer and
        swaps it in (no d x d allocation per call, and the state is never half-updated); a tensor
        read through this property may have escaped, so it is never recycled as the spare. CPU
        updates may also leave up to :data:`_PENDING` rank-2 re-shift terms deferred (``_pend``, see
        :meth:`_cpu_update`): the first read adds them, in float64, before mirroring.
        """
        if self._s_stale or self._pend_k:
            pend = self._pend[:, : self._pend_k] if self._pend_k else None
            self._s_lower, self._s_stale, self._pend_k = _symmetric_s(self._s_lower, pend), False, 0
        self._s_spare = None
        self._s_escaped = True
        return self._s_lower

    @_s.setter
    def _s(self, value: torch.Tensor | None) -> None:
        self._s_lower, self._s_stale, self._s_spare, self._s_escaped = value, False, None, True
        self._pend_k = 0

    @property
    def initialized(self) -> bool:
        """Whether any state (rows or a loaded state) exists."""
        return self._shift is not None

    @property
    def n_rows(self) -> int:
        """Rows accumulated so far (a host sync; not for hot loops)."""
        return int(self._n) if self.initialized else 0

    @property
    def mean(self) -> torch.Tensor:
        """Float64 mean of the rows seen so far."""
        self._require_rows(1)
        return self._shift + self._m / self._n.to(torch.float64)

    # ----------------------------------------------------------------- update
    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        where = self._label()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: update expects a tensor, got {type(x).__name__}")
        check_dense_rows(x, where, hook=False)
        if not x.is_floating_point():
            raise TypeError(f"{where}: rows must be floating point, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.ndim < 1 or x.shape[-1] == 0:
            raise ValueError(f"{where}: expected rows of shape (..., d), got {tuple(x.shape)}")
        if self.dim is not None and x.shape[-1] != self.dim:
            raise ValueError(f"{where}: expected last dim d={self.dim}, got input of shape {tuple(x.shape)}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"{where}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if mask.is_nested:  # its shape cannot be read (torch: "Internal error: ... doesn't support sizes")
                raise TypeError(f"{where}: mask is a nested tensor ({mask.layout}); pass a dense bool tensor of the "
                                f"input's leading shape {tuple(x.shape[:-1])}")
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"{where}: mask shape {tuple(mask.shape)} must equal the input's leading shape {tuple(x.shape[:-1])}"
                )
        if self._synced:
            raise RuntimeError(f"{where}: state was synced across ranks; call reset() before new updates")
        if self.initialized and x.device != self._shift.device:
            raise ValueError(
                f"{where}: input on {x.device}, accumulator state on {self._shift.device}; after moving the model, "
                f"move the state too (acc.to({str(x.device)!r}), or capture.to(...) for every accumulator of an attach)"
            )

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows: ``x`` of shape (..., d), leading dims flattened; ``mask`` (...,) bool marks valid rows.

        All or nothing: the call's chunks are summed into locals and committed at the end, so an
        exception or a ``KeyboardInterrupt`` part-way leaves the state exactly as before the call.
        No host synchronization; the eigen-solve waits for :meth:`compute`. Runs under
        ``torch.no_grad()``; inside ``torch.inference_mode()`` too, but with inference mode off, so
        the state and the recycled buffers it writes in place stay normal tensors, usable later
        outside inference mode (rows that are inference tensors are only read).

        Thread-safe: concurrent calls (a hooked module run from several threads, as
        ``nn.DataParallel`` runs its replicas) are serialized by a lock, so no row is lost or
        mixed; ``merge``, ``compute``, ``covariance``, ``compute_async`` and ``state_dict`` take
        the same lock. (Uncontended, it costs well under a microsecond per call.)
        """
        with self._lock:
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) turns grad on again
                    self._update(x, mask)
            elif torch.is_grad_enabled():  # entering no_grad costs ~3 us a call: only where it changes the mode
                with torch.no_grad():
                    self._update(x, mask)
            else:
                self._update(x, mask)

    def _update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        self._check_input(x, mask)
        rows = x.detach()
        if rows.ndim != 2:
            rows = rows.reshape(-1, x.shape[-1])
        # a mask on another device (a CPU attention mask for CUDA rows): a non_blocking copy, since a
        # blocking host-to-device copy synchronizes the host. Not towards the CPU: the host reads the
        # mask right away, so a device-to-host copy must have finished.
        valid = None if mask is None else mask.reshape(-1).to(rows.device, non_blocking=rows.device.type != "cpu")
        if rows.device.type == "cpu" and 0 < rows.shape[0] <= self.max_chunk_rows:
            if rows.dtype in _CPU_DTYPES or rows.dtype in _CPU_HALF:  # half rows: converted in _cpu_centered
                self._underflowed |= self._cpu_update(rows, valid)
                self._low_products |= product_dtype(rows, self.precision) != torch.float64
                return
        checked = None  # nonfinite="skip": the rows before non-finite ones are dropped
        if self.nonfinite == "skip":
            checked = rows.shape[0] if valid is None else valid.sum()
            # a row is finite iff the sum of its entries times 0 is 0 (NaN/Inf make it NaN; finite
            # entries give exact zeros, so the sum cannot overflow): 3 kernels, isfinite + all take 5
            finite = rows.mul(0).sum(-1) == 0
            valid = finite if valid is None else valid & finite
        n, m, s, shift, broken = self._call_sums(rows, valid)
        if s is None:  # no rows: nothing to add, but the call still counts (errors name updates by index)
            if self.dim is None:  # the width is known now: later updates (and sync) are checked against it
                self.dim = rows.shape[-1]
            self._updates += 1
            return
        self._commit(n, m, s, shift, broken, None if checked is None else checked - n)
        self._low_products |= product_dtype(rows, self.precision) != torch.float64

    def _cpu_centered(self, rows: torch.Tensor, keep: np.ndarray | None):
        """``(n, m, shift, (y, out, panels))`` of one chunk of CPU rows (fp32/fp64, or bf16/fp16 converted
        exactly into the scratch first), valid rows ``keep`` (NumPy bool or ``None``): the row count (an
        int), the column sums and the shift of the centred rows (NumPy d-vectors; ``shift`` fp32, fp64
        where the products are float64: the values subtracted), and the centred valid rows ``y`` with
        the product's buffer ``out`` and GEMM views ``panels`` (:func:`_chunk_scratch`'s; ``y`` and
        ``panels`` cover only the first ``n`` rows of its buffer when some row is masked: see
        :meth:`_cpu_compacted`). Call inside ``np.errstate(all="ignore")``."""
        n_rows, d = rows.shape
        work = product_dtype(rows, self.precision)  # fp32 or fp64 on the CPU
        scratch = _chunk_scratch(n_rows, d, work)
        if keep is not None:
            kept = np.flatnonzero(keep)
            if kept.size < n_rows:
                return self._cpu_compacted(rows, kept, scratch)
        y = scratch[0]
        half = rows.dtype in _CPU_HALF
        if half:  # one exact conversion into the scratch, centred there in place: no fresh fp32 copy
            y.copy_(rows)  # (page faults), no slow mixed-dtype kernel
            rows = y
        step = max(1, n_rows // _SHIFT_ROWS)
        head = rows[::step] if step > 1 else rows
        if half and work == torch.float64:  # float64 precision: the shift from fp32 values, as for fp32 rows
            head = head.float()
        mean = head.sum(0).numpy() / head.shape[0]  # torch's mean bit for bit, one torch call instead of two
        if not np.isfinite(mean).all():  # an fp32 sum overflowed (|x| > ~1e35), or NaN/Inf rows (stay so)
            mean = np.add.reduce(head.numpy(), 0, dtype=np.float64) / head.shape[0]
        shift = self._shift_values(mean, work)
        torch.sub(rows, torch.from_numpy(shift), out=y)
        return n_rows, y.sum(0).numpy(), shift, scratch

    @staticmethod
    def _shift_values(mean: np.ndarray, work: torch.dtype) -> np.ndarray:
        """The shift actually subtracted: fp32-representable unless the products are float64 (as
        :func:`representable_shift`)."""
        return mean.astype(np.float64 if work == torch.float64 else np.float32, copy=False)

    def _cpu_compacted(self, rows: torch.Tensor, kept: np.ndarray, scratch):
        """:meth:`_cpu_centered` for a chunk with masked rows (``kept``: the indices of the ``n < len(rows)``
        valid ones):
        only the valid rows are gathered into the first ``n`` rows of the scratch (converted to its
        dtype), centred there and multiplied, so masked rows cost neither a pass nor a product (a mask
        keeping 1 position in 64 made the product 64x the kept rows' one). The shift is the mean of
        the same sample rows as without compaction (the valid ones among every ``step``-th row of the
        chunk, else evenly spaced valid rows: see :func:`_sample_mean`), summed in the same dtype.
        Masked rows are never read, whatever they hold. CPU only: on CUDA, where the row count would
        need a host sync, masked rows are zeroed and multiplied (:func:`chunk_moments`)."""
        n_rows, d = rows.shape
        y_all, out, _ = scratch
        n = kept.size
        y = y_all[:n]
        index = torch.from_numpy(kept)
        if rows.dtype == y.dtype:
            torch.index_select(rows, 0, index, out=y)
        else:  # gathered in the rows' dtype into a recycled buffer, then one exact conversion
            y.copy_(torch.index_select(rows, 0, index, out=_gather_scratch(n_rows, d, rows.dtype)[:n]))
        # the shift's sample, as on the uncompacted rows: valid rows among rows[::step], summed in the
        # rows' dtype (fp32 for half rows, which are exact in it)
        step = max(1, n_rows // _SHIFT_ROWS)
        sdt = np.float64 if rows.dtype == torch.float64 else np.float32
        values = y.numpy()
        sample = values[kept % step == 0] if step > 1 else values
        if n and not sample.shape[0]:  # every sampled row masked (see _sample_mean): valid rows instead
            sample = values[:: max(1, n // _SHIFT_ROWS)]
        sample = sample.astype(sdt, copy=False)
        mean = np.add.reduce(sample, 0) / max(1, sample.shape[0])
        if not np.isfinite(mean).all():  # an fp32 sum overflowed (|x| > ~1e35), or NaN/Inf rows (stay so)
            mean = np.add.reduce(sample, 0, dtype=np.float64) / max(1, sample.shape[0])
        shift = self._shift_values(mean, y.dtype)
        y.sub_(torch.from_numpy(shift))
        return n, y.sum(0).numpy(), shift, (y, out, lower_panels(y, out))

    def _cpu_update(self, rows: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """``update`` of one chunk of CPU rows (fp32/fp64, bf16/fp16): the same sums as :meth:`_call_sums` and
        :meth:`_commit`, with the d-vector work and the row masks in NumPy (far less per-call
        overhead than torch's dispatch), the float64 add on the lower triangle only and the rank-2
        re-shift deferred.

        Each update's re-shift term ``u c^T + c u^T`` (see :func:`reshift`) is kept as its two
        d-vectors; every :data:`_PENDING` updates they are applied as one rank-64 float64 GEMM, and a
        read of the state applies the rest. Same all-or-nothing commit: the new ``S`` goes into the
        spare buffer, a deferred term into a slot past the committed count ``_pend_k``.

        Rows are not checked for NaN/Inf up front: a non-finite entry in a valid row makes its
        column's sum in ``m`` non-finite (no finite sum cancels an Inf or a NaN), so finite column
        sums clear the whole chunk. Otherwise ``nonfinite="raise"`` flags the update, and "skip"
        drops the non-finite rows and centres the chunk again, before the product.

        Returns whether the rows underflowed to all-zero sums (:func:`_rows_underflowed`)."""
        # NumPy would warn where torch is silent (non-finite rows, an fp64 shift beyond fp32 range);
        # such rows are reported by compute() (NonFiniteError), as on every other path.
        with np.errstate(all="ignore"):
            keep = None if valid is None else valid.numpy()
            n, m, shift, (y, s, panels) = self._cpu_centered(rows, keep)
            broken, bad = False, 0
            if not np.isfinite(m).all():  # non-finite rows (or finite ones whose fp32 column sums overflowed)
                if self.nonfinite == "raise":
                    broken = True
                else:  # centre again without the non-finite rows (their NaN may be in the shift too)
                    finite = rows.isfinite().all(-1).numpy()  # torch: bf16 rows have no NumPy view
                    checked = n
                    n, m, shift, (y, s, panels) = self._cpu_centered(rows, finite if keep is None else keep & finite)
                    bad = checked - n
            with matmul_precision(self.precision, "cpu"):
                if y.shape[0] >= moments.SYRK_MIN_ROWS:
                    s = symmetric_product(y, lower_only=True)  # BLAS syrk
                else:
                    for a, b, o in panels:
                        torch.mm(a, b, out=o)
            shift64 = shift.astype(np.float64)  # a fresh array: it becomes state
            underflowed = _rows_underflowed(y, m, s)
            if not self.initialized:
                self._commit(n, torch.from_numpy(m), s, torch.from_numpy(shift64),
                             torch.tensor(broken, device="cpu") if broken else None,
                             torch.tensor(bad, device="cpu") if bad else None)
                return underflowed
            index = self._updates
            state_s = self._s_lower
            d = state_s.shape[0]
            state_shift, has_rows = self._shift, self._has_rows
            if not has_rows:  # masked or skipped rows only so far (m = S = 0): the first rows give the shift
                if int(self._n) == 0:  # a CPU count: read on the host, once rows are known never again
                    state_shift = torch.from_numpy(shift64)
                has_rows = n > 0 or state_shift is self._shift
            c = shift64 - state_shift.numpy()
            m64 = m.astype(np.float64)
            new_m = torch.from_numpy(self._m.numpy() + (m64 + n * c))
            new_s = self._s_spare if self._s_spare is not None else torch.empty_like(state_s)
            _add_lower(state_s, s, new_s)
            pend, k = self._pend, self._pend_k
            if pend is None:
                pend = np.empty((2, _PENDING, d))
            np.multiply(c, 0.5 * n, out=pend[0, k])
            pend[0, k] += m64  # u = m + n c / 2
            pend[1, k] = c
            k += 1
            if k == pend.shape[1]:  # apply the deferred terms (this call's included) as one GEMM
                new_s.addmm_(*_pending_factors(pend, k))
                k = 0
            spare = None if self._s_escaped else state_s
            new_n = self._n + n
            first_bad, bad_rows = self._first_bad, self._bad_rows  # never written in place: kept as they are
            if (broken or bad) and int(first_bad) < 0:
                first_bad = torch.tensor(index, device="cpu")
            if bad:
                bad_rows = bad_rows + bad
            # ---- commit: plain stores only
            self._shift = state_shift
            self._has_rows = has_rows
            self._n = new_n
            self._m = new_m
            self._s_spare = spare
            self._s_escaped = False
            self._s_lower = new_s
            self._s_stale = True
            self._pend = pend
            self._pend_k = k
            self._bad_rows = bad_rows
            self._first_bad = first_bad
            self._updates = index + 1
        return underflowed

    def _call_sums(self, rows: torch.Tensor, valid: torch.Tensor | None):
        """This call's ``(n, m, S, shift, broken)``: sums around the first chunk's shift, ``S`` valid in
        its lower triangle (fp32 for a one-chunk call in fp32 precision, else float64); touches no state.
        Reads nothing on the host (on CUDA a sync), so rows that underflow to all-zero sums
        (:func:`_rows_underflowed`) are not noticed on this path."""
        total = rows.shape[0]
        n = m = s = shift = broken = None
        for start in range(0, total, self.max_chunk_rows):
            if total <= self.max_chunk_rows:  # one chunk (the common case): no slicing
                chunk, cv = rows, valid
            else:
                chunk = rows[start : start + self.max_chunk_rows]
                cv = None if valid is None else valid[start : start + self.max_chunk_rows]
            nk = chunk.shape[0] if cv is None else cv.sum()
            # Each chunk is centered on its own shift (a row sample's mean), so drifting pools keep
            # low-precision products small; the exact float64 re-shift merges it. The shift stays in
            # the dtype whose values are subtracted (representable_shift's values, not converted to
            # float64): the re-shifts below read it into float64 arithmetic exactly.
            sdt = shift_dtype(self.precision, chunk.dtype)
            local = _sample_mean(chunk, cv, wide=sdt == torch.float64).to(sdt)
            if (cv is not None and total > self.max_chunk_rows and chunk.device.type == "cpu"
                    and np.count_nonzero(cv.numpy()) < chunk.shape[0]):
                # a CPU call of several chunks: only the valid rows are centred and multiplied (the shift
                # is the one of the whole chunk's sample above; the count is read from the mask's memory,
                # no torch op). Not on CUDA, where the count would be a host sync: there the masked rows
                # are zeroed and multiplied. (One-chunk calls reach this path on the CPU only when forced,
                # as benchmarks/bench_covariance.py --fixed-cost does to count CUDA's ops: they keep them.)
                chunk, cv = chunk.index_select(0, cv.nonzero().squeeze(1)), None
            mk, sk = chunk_moments(chunk, local, self.precision, cv, lower_only=True)
            # NaN iff some entry of m is NaN or +-Inf (Inf * 0 is NaN; finite entries give exact zeros, so
            # the sum cannot overflow): 3 kernels, not isfinite's 6
            bk = (mk * 0).sum().isnan() if self.nonfinite == "raise" else None
            if s is None:
                n, m, s, shift, broken = nk, mk, sk, local, bk
                continue
            if s.dtype != torch.float64:  # a second chunk: switch the call's sums to float64
                m, s = m.to(torch.float64), s.to(torch.float64)
            # in float64, so the difference of two chunks' shifts is exact; the first chunk with rows
            # gives it (a row count known on the host is > 0 from the first chunk on)
            shift = shift.to(torch.float64)
            if isinstance(n, torch.Tensor):
                shift = _adopt_shift(n, shift, local)
            accumulate_shifted(m, s, nk, mk, sk, local, shift)
            n = n + nk
            broken = None if bk is None else broken | bk
        return n, m, s, shift, broken

    def _rank2_scratch(self) -> tuple[torch.Tensor, ...]:
        """Views of a (3, d) float64 buffer with rows ``u, c, u`` for :meth:`_commit`'s re-shift:
        ``(c, c broadcast to 2 rows, the two u rows, (u c) as d x 2, (c u) as 2 x d)``. Scratch, kept
        per accumulator (until ``reset``): taking the views anew costs more host time per update
        than the kernel they save. Nothing of it becomes state, and each update writes ``c`` and
        ``u`` before reading them."""
        ucu = torch.empty(3, self._m.shape[0], dtype=torch.float64, device=self._m.device)
        self._rank2 = (ucu[1], ucu[1].expand(2, -1), ucu[0::2], ucu[0:2].t(), ucu[1:3])
        return self._rank2

    def _commit(self, n, m, s, shift, broken, bad) -> None:
        """Merge one call's sums into the state: new tensors are built first, then swapped in by plain
        attribute stores (no call in between, so no interrupt can split them). ``n`` is an int or a
        device tensor; ``broken`` (rows with NaN/Inf) and ``bad`` (rows dropped as such) are device
        tensors or ``None``."""
        index = self._updates
        spare = None
        if self.initialized:
            state_n, state_m, state_s, state_shift = self._n, self._m, self._s_lower, self._shift
            bad_rows, first_bad = self._bad_rows, self._first_bad
            # the exact float64 re-shift, as one rank-2 update (see reshift): S += u c^T + c u^T with
            # u = m + n c / 2, one GEMM of (u c) and (c u)^T. Each op reads the shift (fp32/bf16
            # values), m (fp32 unless the products were fp64) and a device row count into its float64
            # arithmetic itself: no conversion kernels.
            c, c_twice, u_twice, uc, cu = self._rank2 if self._rank2 is not None else self._rank2_scratch()
            has_rows = self._has_rows
            if not has_rows:  # masked or skipped rows only so far: the first rows give the shift
                state_shift = _adopt_shift(state_n, state_shift, shift)
            torch.sub(shift, state_shift, out=c)
            if isinstance(n, torch.Tensor):
                torch.addcmul(m, n, c_twice, value=0.5, out=u_twice)
                new_m = state_m + torch.addcmul(m, n, c)
            else:  # a host row count: fused scalar multiply-adds
                torch.add(m, c_twice, alpha=0.5 * n, out=u_twice)
                new_m = state_m + torch.add(m, c, alpha=float(n))
            new_s = self._s_spare if self._s_spare is not None else torch.empty_like(state_s)
            add_promoted(state_s, s, out=new_s)
            new_s.addmm_(uc, cu)  # one launch and one pass over S (two addr: two of each)
            spare = None if self._s_escaped else state_s  # the old state becomes the next spare
        else:
            dev = shift.device
            state_n = torch.zeros((), dtype=torch.int64, device=dev)
            bad_rows = torch.zeros((), dtype=torch.int64, device=dev)
            first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
            state_shift = shift.to(torch.float64)
            new_s = s.to(torch.float64, copy=True)
            new_m = m.to(torch.float64, copy=True)
            has_rows = False
        new_n = state_n + n
        has_rows = has_rows or (not isinstance(n, torch.Tensor) and n > 0)  # a host count: no sync
        # the first update with NaN/Inf rows: first_bad + (first_bad < 0) * flag * (index + 1) turns
        # the -1 of "none yet" into index, in one kernel after the comparison (torch.where with a
        # Python index also fills a scalar tensor)
        if broken is not None:
            first_bad = torch.addcmul(first_bad, first_bad < 0, broken, value=index + 1)
        if bad is not None:
            bad_rows = bad_rows + bad
            first_bad = torch.addcmul(first_bad, first_bad < 0, bad > 0, value=index + 1)
        dim = new_m.shape[0]
        # ---- commit: plain stores only
        self.dim = dim
        self._shift = state_shift
        self._n = new_n
        self._m = new_m
        self._s_spare = spare
        self._s_escaped = False
        self._s_lower = new_s
        self._s_stale = True
        self._bad_rows = bad_rows
        self._first_bad = first_bad
        self._updates = index + 1
        self._has_rows = has_rows

    # ---------------------------------------------------------------- results
    def _require_rows(self, k: int) -> int:
        return _row_count(self._n if self.initialized else None, self._label(), k)

    def _setup(self) -> _Setup:
        return _Setup(self._label(), self.name, self.dim, self.precision, self.nonfinite, self._updates,
                      self._low_products, self._underflowed, self._bad_ranks)

    def _live_sums(self) -> _Sums | None:
        with self._lock:
            if not self.initialized:
                return None
            return _Sums(self._n, self._m, self._s, self._bad_rows, self._first_bad)

    def _snapshot(self) -> tuple[_Setup, Callable[[], _Sums | None]]:
        with self._lock:  # not between two threads' updates (see update)
            return self._snapshot_now()

    def _snapshot_now(self) -> tuple[_Setup, Callable[[], _Sums | None]]:
        """The state as of now, without a host sync: ``(setup, materialize)``; ``materialize()``
        (meant for the worker thread) waits for the host copies and returns them as :class:`_Sums`.

        ``S`` is copied as stored (possibly valid in its lower triangle only) and mirrored by
        ``materialize``, with the same :func:`mirror_lower` as ``compute``, so no d x d kernel runs
        on the caller's stream beyond the copy itself.
        """
        setup = self._setup()
        if not self.initialized:
            return setup, lambda: None
        s, stale = self._s_lower, self._s_stale
        # CPU updates may hold deferred rank-2 re-shift terms (see _cpu_update): copy them too, and add
        # them on the worker exactly as the ``_s`` property would
        pend = self._pend[:, : self._pend_k].copy() if self._pend_k else None
        if s.device.type != "cpu":
            self._s_escaped = True  # a pending copy reads this buffer: never recycle it as the spare
        host, wait = _host_copies((self._n, self._m, s, self._bad_rows, self._first_bad))

        def materialize() -> _Sums:
            wait()
            n, m, s_host, bad_rows, first_bad = host
            return _Sums(n, m, _symmetric_s(s_host, pend) if stale or pend is not None else s_host, bad_rows, first_bad)

        return setup, materialize

    def covariance(self) -> torch.Tensor:
        """The float64 (d, d) centered covariance ``1/(N-1) sum (h - mean)(h - mean)^T``."""
        notes: list = []
        try:
            sums = self._live_sums()
            _finite_check(sums, self._setup(), notes)
            self._require_rows(2)
            return covariance_from_moments(sums.n, sums.m, sums.s)
        finally:
            emit(notes, stacklevel=2)

    def compute(self) -> Spectrum:
        """Eigenvalues of the covariance, descending, as a :class:`Spectrum` (raises if < 2 rows).

        Raises :class:`NonFiniteError` for NaN/Inf rows (``nonfinite="raise"``) and for rows whose
        products left the range of their precision (overflow, or a largest variance below 2^-100
        with float32 products); the message names the remedy.

        The float64 eigen-solve runs on the state's device (on CUDA it synchronizes the host); see
        :meth:`compute_async` to keep it off the caller's thread and off the GPU.
        """
        notes: list = []
        try:
            return _spectrum_of(self._live_sums(), self._setup(), notes)
        finally:
            emit(notes, stacklevel=2)

    def compute_async(self) -> SolveFuture:
        """:meth:`compute` for the state as of this call, solved in the background.

        On the calling thread: the float64 state is copied without a host sync (CUDA: ``non_blocking``
        copies into pinned host memory, then an event; CPU: clones), so later ``update``/``merge``/
        ``reset`` calls do not change the result. On spectral-lens's one worker thread: wait for the
        event, then the same checks and float64 covariance eigen-solve as ``compute``, on the CPU
        (no kernel on the training stream, no sync of the caller).

        Returns a :class:`concurrent.futures.Future` (:class:`~spectral_lens.background.SolveFuture`)
        of the :class:`Spectrum`. ``result()`` raises what ``compute`` would have raised
        (:class:`NonFiniteError`, ``ValueError`` for fewer than 2 rows) and re-emits, on the thread
        that calls it, the :class:`NonFiniteRowsWarning` that ``compute`` would have emitted. On the
        CPU the values equal ``compute()``'s bit for bit; for CUDA state they are the CPU LAPACK
        solve of the same float64 covariance (equal to ``compute()``'s cuSOLVER values to round-off).
        """
        setup, materialize = self._snapshot()
        return submit(lambda notes: _spectrum_of(materialize(), setup, notes))

    # ------------------------------------------------------------ combination
    def merge(self, other: "ActivationCovarianceAccumulator") -> "ActivationCovarianceAccumulator":
        """Add ``other``'s rows to this accumulator (exact float64 re-shift); returns ``self``."""
        with self._lock:  # not between two threads' updates (see update)
            return self._merge(other)

    def _merge(self, other: "ActivationCovarianceAccumulator") -> "ActivationCovarianceAccumulator":
        if not isinstance(other, ActivationCovarianceAccumulator):
            raise TypeError(f"{self._label()}: can only merge another ActivationCovarianceAccumulator")
        if other.nonfinite != self.nonfinite:
            raise ValueError(
                f"{self._label()}: cannot merge an accumulator with nonfinite={other.nonfinite!r} into one with "
                f"nonfinite={self.nonfinite!r}: their NaN/Inf bookkeeping differs; use one policy everywhere"
            )
        if not other.initialized:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"{self._label()}: cannot merge d={other.dim} into d={self.dim}")
        if self._synced:
            raise RuntimeError(f"{self._label()}: state was synced across ranks; call reset() before merging")
        # new tensors, then plain stores: an error part-way leaves this state as it was, and tensors
        # handed out before (a state_dict snapshot, a covariance) never change
        if self.initialized:
            n, m, s, shift, bad, first = self._n, self._m, self._s, self._shift, self._bad_rows, self._first_bad
        else:
            n, m, s, shift, bad, first = _zero_state(other.dim, other._s.device, other._shift, self.precision)
        o = {k: getattr(other, k).to(s.device) for k in ("_n", "_m", "_s", "_shift", "_bad_rows", "_first_bad")}
        if self.initialized and not self._has_rows:  # masked or skipped rows only: other's shift is nearer its rows
            shift = _adopt_shift(n, shift, o["_shift"])
        om, os_ = reshift(o["_n"], o["_m"], o["_s"], o["_shift"], shift)
        new_n, new_m, new_s, new_bad = n + o["_n"], m + om, s + os_, bad + o["_bad_rows"]
        shifted = torch.where(o["_first_bad"] >= 0, o["_first_bad"] + self._updates, -1)
        new_first = torch.where(first >= 0, first, shifted)
        # ---- commit: plain stores only
        self.dim = other.dim
        self._shift = shift
        self._n = new_n
        self._m = new_m
        self._s = new_s
        self._bad_rows = new_bad
        self._first_bad = new_first
        self._updates += other._updates
        self._low_products |= other._low_products
        self._underflowed |= other._underflowed
        self._has_rows |= other._has_rows
        return self

    def _sync_status(self, group, dev: torch.device) -> None:
        """Collective agreement before any sum: every rank raises the same error, or none does.

        Each rank contributes ``(dim or -1, nonfinite code, precision code, already synced, name digest
        or -1)``; one ``all_reduce(MAX)`` of ``(v, -v)`` gives every rank the maximum and the minimum of
        each field. The names must agree: all ranks' accumulators unnamed, or all named alike (a named
        one and an unnamed one are refused too, an unnamed ``-1`` being the minimum of any digest).
        """
        import torch.distributed as dist

        local = [
            self.dim if self.dim is not None else -1,
            _NONFINITE.index(self.nonfinite),
            PRECISIONS.index(self.precision),
            int(self._synced),
            -1 if self.name is None else int.from_bytes(hashlib.blake2b(self.name.encode()).digest()[:7], "big"),
        ]
        v = torch.tensor(local, dtype=torch.int64, device=dev)
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        hi, lo = both[:5].tolist(), (-both[5:]).tolist()
        where = f"{self._label()}: sync across {dist.get_world_size(group)} ranks refused"
        if hi[3]:
            raise RuntimeError(f"{where}: a rank is already synced; reset() on every rank before accumulating again")
        if lo[4] >= 0 and lo[4] != hi[4]:
            raise ValueError(
                f"{where}: the ranks' accumulators have different names (this rank's: {self.name!r}), so they "
                "measure different layers; sync on every rank the accumulator of the same layer"
            )
        if lo[4] != hi[4]:  # some ranks' accumulators are named (attached to a module), others not
            raise ValueError(
                f"{where}: some ranks' accumulators have a name and others none (this rank's: {self.name!r}), so "
                "they may measure different layers; build the accumulator the same way on every rank (attach it "
                "to the same module, or pass the same name=)"
            )
        if lo[0] < 0:
            raise RuntimeError(
                f"{where}: a rank saw no rows and has no dim; pass dim= to the accumulator so an empty rank can join"
            )
        if lo[0] != hi[0]:
            raise ValueError(f"{where}: ranks disagree on d (min {lo[0]}, max {hi[0]})")
        if lo[1] != hi[1]:
            raise ValueError(f"{where}: ranks disagree on nonfinite (both {_NONFINITE} are in use); use one policy")
        if lo[2] != hi[2]:
            raise ValueError(
                f"{where}: ranks disagree on precision ({PRECISIONS[lo[2]]!r} .. {PRECISIONS[hi[2]]!r}); use one precision"
            )

    def sync(self, group=None) -> "ActivationCovarianceAccumulator":
        """Replace each rank's state by the sum over ranks (``all_reduce`` of float64 sufficient statistics).

        First every rank all-reduces a small status vector (``dim``, ``nonfinite``, ``precision``,
        already synced, a digest of ``name``), so a rank that saw no rows and has no ``dim``, mismatched
        widths or policies, or accumulators named differently (other layers; a named and an unnamed one
        differ too) make *every* rank raise the same error at once instead of leaving the others waiting
        in a collective. Then all ranks agree on a common shift (the global mean) and re-shift exactly,
        and sum ``n``, ``m`` and ``S``: memory is O(d^2) per rank, not world_size x d^2 as with
        all_gather. A no-op without an initialized process group; ``ValueError`` on a rank that is not a
        member of ``group``. Afterwards ``update`` raises until ``reset``. A refused sync, or a collective
        that fails part-way (a rank that died, the process-group timeout), leaves this rank's state as it
        was (an accumulator without rows stays uninitialized).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if group is not None and dist.get_rank(group) < 0:  # a non-member: every collective would be a no-op
            raise ValueError(
                f"{self._label()}: sync(group) called on global rank {dist.get_rank()}, which is not a member of "
                "group; call sync(group) only on the group's member ranks"
            )
        if dist.get_world_size(group) == 1:
            return self
        if self.initialized:
            dev = self._s.device
        elif dist.get_backend(group) == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
        self._sync_status(group, dev)
        # locals only until the commit below: a collective that fails part-way (a rank that died, a
        # timeout) leaves this rank's state as it was; a rank without rows joins with a zero state
        if self.initialized:
            n, m0, s0, shift, bad, first = self._n, self._m, self._s, self._shift, self._bad_rows, self._first_bad
        else:
            n, m0, s0, shift, bad, first = _zero_state(self.dim, dev, torch.zeros(self.dim, dtype=torch.float64),
                                                       self.precision)
        n64 = n.to(torch.float64)
        totals = torch.cat([m0 + n64 * shift, n64.view(1)])
        dist.all_reduce(totals, group=group)
        common = shift if float(totals[-1]) == 0 else representable_shift(totals[:-1] / totals[-1], self.precision)
        m, s = reshift(n, m0, s0, shift, common)
        dist.all_reduce(s, group=group)
        packed = torch.cat([m, n64.view(1), bad.to(torch.float64).view(1)])
        dist.all_reduce(packed, group=group)
        # each rank's first update with NaN/Inf rows (-1: none), so that the errors can name the ranks;
        # any rank's products below float64 -> all ranks check their range
        world, me = dist.get_world_size(group), dist.get_rank(group)
        flags = torch.full((world + 2,), -1, dtype=torch.int64, device=first.device)
        flags[me] = first
        flags[world] = int(self._low_products)
        flags[world + 1] = int(self._underflowed)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        per_rank = flags[:world].tolist()
        bad_ranks = tuple((r if group is None else dist.get_global_rank(group, r), i)
                          for r, i in enumerate(per_rank) if i >= 0)
        # ---- commit: plain stores only
        self._shift, self._s, self._m = common, s, packed[:-2]
        self._n = packed[-2].round().to(torch.int64)
        self._bad_rows = packed[-1].round().to(torch.int64)
        self._first_bad = torch.tensor(min((i for _, i in bad_ranks), default=-1), device=first.device)
        self._bad_ranks = bad_ranks
        self._low_products = bool(flags[world])
        self._underflowed = bool(flags[world + 1])
        self._has_rows = float(totals[-1]) > 0
        self._synced = True
        return self

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Configuration and sufficient statistics (tensors on their device); restores exactly."""
        with self._lock:  # not between two threads' updates (see update)
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "dim": self.dim,
            "precision": self.precision,
            "nonfinite": self.nonfinite,
            "updates": self._updates,
            "synced": self._synced,
            "initialized": self.initialized,
            "low_precision_products": self._low_products,
            "products_underflowed": self._underflowed,
        }
        if self.initialized:
            sd.update(shift=self._shift, n=self._n, m=self._m, s=self._s, bad_rows=self._bad_rows, first_bad=self._first_bad)
        return sd

    def _validated(self, state: Any, origin: str) -> dict[str, Any]:
        """Check every field of a state against the format and this accumulator's configuration;
        returns the new attribute values (cloned tensors) without touching ``self``."""
        def fail(why: str) -> None:
            raise StateFormatError(f"{self._label()}: cannot load {origin}: {why}")

        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            fail("not an ActivationCovarianceAccumulator state")
        if state.get("precision") != self.precision:
            fail(f"precision {state.get('precision')!r} differs from this accumulator's {self.precision!r}")
        if state.get("nonfinite", self.nonfinite) != self.nonfinite:
            fail(f"nonfinite {state.get('nonfinite')!r} differs from this accumulator's {self.nonfinite!r}")
        dim, updates, synced = state.get("dim"), state.get("updates", 0), state.get("synced", False)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            fail(f"dim must be a positive int or null, got {dim!r}")
        if self.dim is not None and dim is not None and dim != self.dim:
            fail(f"dim {dim} differs from this accumulator's {self.dim}")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            fail(f"updates must be a non-negative int, got {updates!r}")
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
        out: dict[str, Any] = {"dim": dim if dim is not None else self.dim, "_updates": updates,
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
            out["_" + key] = t.clone()
        if not bool(torch.isfinite(out["_shift"]).all()):
            fail("shift is not finite")
        if int(out["_n"]) < 0 or int(out["_bad_rows"]) < 0 or int(out["_first_bad"]) < -1:
            fail(f"counts out of range (n={int(out['_n'])}, bad_rows={int(out['_bad_rows'])}, "
                 f"first_bad={int(out['_first_bad'])})")
        out["_has_rows"] = int(out["_n"]) > 0
        return out

    def load_state_dict(self, state: dict[str, Any], origin: str = "state_dict") -> None:
        """Restore a :meth:`state_dict`.

        Every field is validated (format, configuration including ``nonfinite``, shapes, dtypes,
        counts) before anything changes: a rejected state raises :class:`StateFormatError` and leaves
        this accumulator exactly as it was.
        """
        new = self._validated(state, origin)
        self.reset()
        for key, value in new.items():
            setattr(self, key, value)

    def to(self, device: str | torch.device) -> "ActivationCovarianceAccumulator":
        """Move the state to ``device`` (after ``model.to(device)``: the rows then arrive there); returns
        ``self``, as ``nn.Module.to`` and torchmetrics' ``Metric.to`` do. The state stays float64 and is
        moved exactly (the result is bit-identical); an accumulator without rows has nothing to move and
        adopts the device of its first rows."""
        if not isinstance(device, (str, int, torch.device)):  # model.to(torch.bfloat16) habits: a dtype
            raise TypeError(f"{self._label()}.to: expected a device (e.g. 'cuda:0'), got {type(device).__name__} "
                            f"{device!r}; the state is float64 whatever the rows' dtype")
        with self._lock:  # not between two threads' updates (see update)
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self._state_dict().items()}
            bad_ranks = self._bad_ranks
            self.load_state_dict(moved)
            self._bad_ranks = bad_ranks
        return self

    def save(self, path: str | Path, *, fsync: bool = True) -> Path:
        """Write the state as ``.npz`` with a JSON header (no pickle); resume with :meth:`load`.

        ``.npz`` is appended to a path without it. The write is atomic (temporary file in the same
        directory, fsync, rename): a failed save leaves a previous file at ``path`` intact.
        """
        sd = self.state_dict()
        header = {k: sd[k] for k in _HEADER_KEYS}
        arrays = {k: v.detach().cpu().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        path = Path(path)
        path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        blob = np.array(json.dumps(header))
        write_atomic(path, lambda fh: np.savez(fh, header=blob, **arrays), fsync=fsync)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", name: str | None = None,
             max_chunk_rows: int = 131072) -> "ActivationCovarianceAccumulator":
        """Rebuild an accumulator from :meth:`save` output.

        A corrupted, truncated, tampered (wrong dtype, shape, count or header field) or foreign file,
        or one missing an array, raises :class:`StateFormatError` naming the file.
        """
        path = Path(path)
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
            raise StateFormatError(f"{path}: unknown field(s) {unknown} in an accumulator state file")
        dim = header.get("dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise StateFormatError(f"{path}: header field dim={dim!r} is not a positive int or null")
        acc = cls(dim, precision=header["precision"], nonfinite=header.get("nonfinite", "raise"),
                  max_chunk_rows=max_chunk_rows, name=name)
        acc.load_state_dict({**header, **arrays}, origin=str(path))
        return acc

    def attach(self, model: nn.Module, target: Target, *, pick=None) -> "ActivationCapture":
        """Feed this accumulator from the output of the one module of ``model`` that ``target`` selects.

        ``target`` and ``pick`` are as in :func:`~spectral_lens.activation_capture.attach` (which builds
        one accumulator per module); here it must select exactly one module. Sets ``name`` to the module's name if unset or set by an
        earlier attach (a reused accumulator is named after the module it measures now). Returns
        the hook handle: a context manager with ``remove()`` and ``mask(...)``.
        """
        from .activation_capture import attach_one  # that module builds on this one

        return attach_one(self, model, target, pick)

    def __repr__(self) -> str:
        return (f"ActivationCovarianceAccumulator(name={self.name!r}, dim={self.dim}, precision={self.precision!r}, "
                f"nonfinite={self.nonfinite!r}, updates={self._updates})")
