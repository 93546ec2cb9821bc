"""``ActivationCovarianceAccumulator``: streaming, mergeable, checkpointable centered covariance.

State is the float64 shifted sums of :mod:`spectral_lens.spectra.moments` around a shift ``s``:
``n``, ``m = sum (x - s)``, ``S = sum (x - s)(x - s)^T``. Each chunk is centered on its own shift (the
mean of its valid rows, or from 3,072 rows of a sample of 1,024 of them: 16 runs of 64 consecutive rows spread over
the chunk, so that it does not line up with the sequences of a batch: ``_chunk_sums._sample_spacing``) before any product, and its sums are re-shifted into the
state exactly in float64, so pools whose mean drifts from chunk to chunk lose no precision. ``update`` never
synchronizes with the host; ``compute`` solves the eigenproblem once; ``compute_async`` snapshots the
state without a host sync and solves on the CPU in the background (:mod:`spectral_lens.background`).

The class holds the state and commits to it; the work is in private modules: a call's sums
(``_chunk_sums``; the CPU one-chunk path and its scratch too), ``S`` as CPU updates store it
(``_lower_s``), ``compute``'s checks and solve (``_compute``), ``sync``'s collectives (``_sync``) and
the state's format, validation and ``.npz`` file (``_persistence``).
"""

from __future__ import annotations

import numbers
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from .background import SolveFuture, emit, submit
from ._chunk_sums import _adopt_shift, _call_sums, _cpu_chunk_sums, _cpu_path
from ._compute import _finite_check, _host_copies, _row_count, _Setup, _spectrum_of, _Sums
from ._lower_s import _add_deferred, _defer, _pending_factors, _symmetric_s, _symmetric_s_
from ._persistence import _STATE_FORMAT, _read_state, _state_path, _validated, _write_state
from ._sync import _summed, _sync_status, deferred_interrupt
from .capture import Target, check_dense_rows
from .spectra.moments import (
    PRECISIONS,
    add_promoted,
    covariance_from_moments,
    product_dtype,
    representable_shift,
    reshift,
)
from .spectrum import Spectrum

if TYPE_CHECKING:
    from .activation_capture import ActivationCapture

__all__ = ["ActivationCovarianceAccumulator"]


_NATIVE_ROWS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # read as they are
#: float types whose tensors hold two values a byte: their shape is not the rows' shape, so never read
_PACKED = tuple(getattr(torch, n) for n in ("float4_e2m1fn_x2",) if hasattr(torch, n))


def _value_rows(x: torch.Tensor, where: str) -> torch.Tensor:
    """``x`` as rows of its values: a ``torch.ao`` quantized tensor (the ``quint8`` output of a statically
    quantized module) dequantized to float32, a float8 tensor (``float8_e4m3fn``, ``float8_e5m2``, their
    ``fnuz`` variants, ``float8_e8m0fnu``), which CPU kernels mostly cannot do arithmetic on, converted
    exactly to bfloat16 (every float8 value is a bfloat16 value); other tensors as they are. A packed
    float4 tensor is a ``TypeError``: its last dimension holds two values an element."""
    if not isinstance(x, torch.Tensor) or x.dtype in _NATIVE_ROWS:
        return x
    if x.is_quantized:
        return x.dequantize()
    if x.dtype in _PACKED:
        raise TypeError(f"{where}: rows of dtype {x.dtype} (shape {tuple(x.shape)}) pack two values into each "
                        "element, so their shape is not the rows' shape; unpack and dequantize them to a float "
                        "dtype first (for a hooked module: pick=)")
    if x.dtype.is_floating_point and x.dtype.itemsize == 1:
        return x.to(torch.bfloat16)
    return x


def _zero_state(dim: int, device: torch.device, shift: torch.Tensor, precision: str) -> tuple[torch.Tensor, ...]:
    """``(n, m, S, shift, bad_rows, first_bad)`` of an accumulator that has seen no rows, around ``shift``."""
    f64 = dict(dtype=torch.float64, device=device)
    return (torch.zeros((), dtype=torch.int64, device=device), torch.zeros(dim, **f64), torch.zeros(dim, dim, **f64),
            representable_shift(shift.to(device), precision), torch.zeros((), dtype=torch.int64, device=device),
            torch.full((), -1, dtype=torch.int64, device=device))


def _nccl_device(group, device, held: torch.device | None, label: str) -> torch.device:
    """Where ``sync``'s collectives take tensors under NCCL: ``device`` (``sync``'s argument: a lens passes its
    measurement's, :func:`~spectral_lens._agree.collective_device`), else the device the process group is bound to
    (``init_process_group(device_id=...)``), else the state's GPU (``held``), else the current CUDA device. Why:
    NCCL takes CUDA tensors only, makes one communicator per device that every rank joins (its ranks on different
    GPUs), and a group bound to a device takes collectives on that device only."""
    from ._agree import bound_device

    bound = bound_device(group)
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda" or (bound is not None and device != bound):
            raise ValueError(
                f"{label}: sync(device={device}) under NCCL: expected a CUDA device"
                + ("" if bound is None else f", the one the process group is bound to ({bound}, "
                                            "init_process_group(device_id=...)): NCCL takes no other"))
        return device
    if bound is not None:
        return bound
    if held is not None and held.type == "cuda":
        return held
    return torch.device("cuda", torch.cuda.current_device())


class ActivationCovarianceAccumulator:
    """Streaming centered covariance of d-dimensional rows and its eigen-spectrum.

    Args:
        dim: row width ``d``; inferred from the first ``update`` when ``None``.
        precision: ``"exact"`` (default; fp32 products with TF32 off, fp64 for fp64 input),
            ``"fast"`` (bf16 products with fp32 accumulation on CUDA tensor cores; the products of
            ``"exact"`` on other devices, where bf16 rows are centred around a bf16-rounded shift) or ``"float64"`` (fp64 products). Chunk sums are always
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
        self._s_stale = False
        self._s_escaped = True
        self._torn = False  # see _begin_in_place
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
        stale; the first read mirrors it, once. CPU updates may also leave up to :data:`_PENDING`
        rank-2 re-shift terms deferred (``_pend``, see :meth:`_cpu_update`): the first read adds
        them, in float64, before mirroring. Both in place on the state's one ``d x d`` buffer unless
        it escaped (then into a new one, with the same bits). A tensor read through this property
        may escape (``state_dict``, ``merge``, ``covariance``), so it is never written in place
        afterwards: the next update writes its sum into a new buffer (copy-on-write).
        """
        self._refuse_torn()
        if self._s_stale or self._pend_k:
            if self._s_escaped:
                pend = self._pend[:, : self._pend_k] if self._pend_k else None
                self._s_lower, self._s_stale, self._pend_k = _symmetric_s(self._s_lower, pend), False, 0
            else:
                factors = _pending_factors(self._pend, self._pend_k) if self._pend_k else None
                self._begin_in_place()
                s = _symmetric_s_(self._s_lower, factors)
                self._s_lower, self._s_stale, self._pend_k, self._torn = s, False, 0, False
        self._s_escaped = True
        return self._s_lower

    @_s.setter
    def _s(self, value: torch.Tensor | None) -> None:
        self._s_lower, self._s_stale, self._s_escaped = value, False, True
        self._pend_k = 0

    def _begin_in_place(self) -> None:
        """Mark the state torn just before the first in-place write to ``S`` (its one ``d x d`` buffer);
        the plain stores that end the update (:meth:`_store`) or the read (``_s``) clear the mark.
        Every check that can reject the call has passed by then, so only an interrupt
        (``KeyboardInterrupt``; in the write itself, an error such as running out of memory) can stop it
        between the write and the stores, and then the state may be half-updated: with the mark left
        set, every later update, read, merge, sync, save and compute raises (:meth:`_refuse_torn`)
        instead of giving a silently wrong spectrum, until ``reset()`` or ``load_state_dict``."""
        self._torn = True

    def _refuse_torn(self) -> None:
        if self._torn:
            raise RuntimeError(
                f"{self._label()}: an earlier update or read was interrupted (KeyboardInterrupt or an error) "
                "while it added into the float64 sums S in place, so they may hold part of that update; "
                "the state is refused rather than giving a wrong spectrum. Call reset() and measure again "
                "(or restore a saved state with load_state_dict / load)"
            )

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
        if x.is_complex():
            raise TypeError(f"{where}: rows must be real floating point, got dtype {x.dtype} with shape {tuple(x.shape)}; "
                            "measure the real and imaginary parts as features: update(torch.view_as_real(x).flatten(-2)), "
                            "or pick=lambda out: torch.view_as_real(out).flatten(-2) for a hooked module")
        if not x.is_floating_point():
            raise TypeError(f"{where}: rows must be floating point, got dtype {x.dtype} with shape {tuple(x.shape)}; "
                            "integer rows are not read as values (their scale is not known here): dequantize "
                            "them first, e.g. update(x.float() * scale), or pick=lambda out: ... for a hooked "
                            "module (torch.ao quantized tensors are dequantized automatically)")
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
        exception (a rejected input, an error in the products) or a ``KeyboardInterrupt`` part-way
        leaves the state exactly as before the call. The one exception is the commit's last step, the
        float64 add into ``S`` in place (the state holds one ``d x d`` buffer, not a spare beside it):
        an interrupt between that write and the stores that follow it leaves the accumulator marked
        torn, and every later ``update``, ``compute``, ``state_dict``, ``merge``, ``sync`` or ``save``
        raises a ``RuntimeError`` saying so until ``reset()`` (never a silently wrong spectrum).
        Tensors handed out before (``state_dict()``, ``covariance()``) are never written afterwards: an
        update after such a read writes its sum into a new buffer (copy-on-write).
        No host synchronization; the eigen-solve waits for :meth:`compute`. Runs under
        ``torch.no_grad()``; inside ``torch.inference_mode()`` too, but with inference mode off, so
        the state and the recycled buffers it writes in place stay normal tensors, usable later
        outside inference mode (rows that are inference tensors are only read).

        Thread-safe: concurrent calls (a hooked module run from several threads, as
        ``nn.DataParallel`` runs its replicas) are serialized by a lock, so no row is lost or
        mixed; ``merge``, ``compute``, ``covariance``, ``compute_async``, ``state_dict``,
        ``load_state_dict`` and ``to`` take the same lock (``reset`` and ``sync`` do not).
        (Uncontended, it costs well under a microsecond per call.)
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
        self._refuse_torn()
        x = _value_rows(x, self._label())
        self._check_input(x, mask)
        rows = x.detach()
        if rows.ndim != 2:
            rows = rows.reshape(-1, x.shape[-1])
        # a mask on another device (a CPU attention mask for CUDA rows): a non_blocking copy, since a
        # blocking host-to-device copy synchronizes the host. Not towards the CPU: the host reads the
        # mask right away, so a device-to-host copy must have finished.
        valid = None if mask is None else mask.reshape(-1).to(rows.device, non_blocking=rows.device.type != "cpu")
        if _cpu_path(rows, self.max_chunk_rows):
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
        n, m, s, shift, broken = _call_sums(rows, valid, self.max_chunk_rows, self.precision, self.nonfinite)
        if s is None:  # no rows: nothing to add, but the call still counts (errors name updates by index)
            if self.dim is None:  # the width is known now: later updates (and sync) are checked against it
                self.dim = rows.shape[-1]
            self._updates += 1
            return
        self._commit(n, m, s, shift, broken, None if checked is None else checked - n)
        self._low_products |= product_dtype(rows, self.precision) != torch.float64

    def _cpu_update(self, rows: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """``update`` of one chunk of CPU rows (fp32/fp64, bf16/fp16): the same sums as :func:`_call_sums` and
        :meth:`_commit`, with the d-vector work and the row masks in NumPy (:func:`_cpu_chunk_sums`: far
        less per-call overhead than torch's dispatch), the float64 add on the lower triangle only and the
        rank-2 re-shift deferred.

        Each update's re-shift term ``u c^T + c u^T`` (see :func:`reshift`) is kept as its two
        d-vectors; every :data:`_PENDING` updates they are applied as one rank-64 float64 GEMM, and a
        read of the state applies the rest (:mod:`spectral_lens._lower_s`). Same commit as
        :meth:`_commit`: the float64 add into ``S`` in place (into a new buffer if ``S`` escaped) comes
        last, just before the stores; a deferred term goes into a slot past the committed count ``_pend_k``.

        Returns whether the rows underflowed to all-zero sums (:func:`_rows_underflowed`)."""
        # NumPy would warn where torch is silent (non-finite rows, an fp64 shift beyond fp32 range);
        # such rows are reported by compute() (NonFiniteError), as on every other path.
        with np.errstate(all="ignore"):
            n, m, s, shift64, broken, bad, underflowed = _cpu_chunk_sums(rows, valid, self.precision, self.nonfinite)
            if not self.initialized:
                self._commit(n, torch.from_numpy(m), s, torch.from_numpy(shift64),
                             torch.tensor(broken, device="cpu") if broken else None,
                             torch.tensor(bad, device="cpu") if bad else None)
                return underflowed
            index = self._updates
            state_s = self._s_lower
            state_shift, has_rows = self._shift, self._has_rows
            if not has_rows:  # masked or skipped rows only so far (m = S = 0): the first rows give the shift
                if int(self._n) == 0:  # a CPU count: read on the host, once rows are known never again
                    state_shift = torch.from_numpy(shift64)
                has_rows = n > 0 or state_shift is self._shift
            c = shift64 - state_shift.numpy()
            m64 = m.astype(np.float64)
            new_m = torch.from_numpy(self._m.numpy() + (m64 + n * c))
            pend, k, factors = _defer(self._pend, self._pend_k, c, m64, n)
            new_n = self._n + n
            first_bad, bad_rows = self._first_bad, self._bad_rows  # never written in place: kept as they are
            if (broken or bad) and int(first_bad) < 0:
                first_bad = torch.tensor(index, device="cpu")
            if bad:
                bad_rows = bad_rows + bad
            # ---- the float64 add: in place (last, just before the stores), or copy-on-write
            if self._s_escaped:
                new_s = torch.empty_like(state_s)
            else:
                new_s = state_s
                self._begin_in_place()
            _add_deferred(state_s, s, new_s, factors)
            self._store(state_shift, new_n, new_m, new_s, pend, k, bad_rows, first_bad, index, has_rows)
        return underflowed

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
        """Merge one call's sums into the state: everything but ``S`` is built as new tensors first; then
        the float64 add into ``S``, in place (its one ``d x d`` buffer, marked torn meanwhile: see
        :meth:`_begin_in_place`) or, if ``S`` escaped, into a new buffer; then plain attribute stores
        (:meth:`_store`: no call in between). ``n`` is an int or a device tensor; ``broken`` (rows with
        NaN/Inf) and ``bad`` (rows dropped as such) are device tensors or ``None``."""
        index = self._updates
        initialized = self.initialized
        if initialized:
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
            in_place = not self._s_escaped
            new_s = state_s if in_place else torch.empty_like(state_s)  # copy-on-write for an escaped S
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
        if initialized:  # ---- the float64 add into S: last, just before the stores
            if in_place:
                self._begin_in_place()
            add_promoted(state_s, s, out=new_s)
            new_s.addmm_(uc, cu)  # one launch and one pass over S (two addr: two of each)
        self._store(state_shift, new_n, new_m, new_s, self._pend, self._pend_k, bad_rows, first_bad, index, has_rows)

    def _store(self, shift, n, m, s_lower, pend, pend_k, bad_rows, first_bad, index, has_rows) -> None:
        """Swap in the new state of update #``index`` (:meth:`_commit`, :meth:`_cpu_update`): plain attribute
        stores only, no call between them, so no interrupt can split them (CPython checks for signals
        at calls and backward jumps, not between plain stores). ``s_lower`` is valid in its lower
        triangle (the state's buffer, updated in place, or a new one); ``pend[:, :pend_k]`` are the
        deferred re-shift terms. The last store clears the torn mark (:meth:`_begin_in_place`)."""
        self.dim = m.shape[0]
        self._shift = shift
        self._n = n
        self._m = m
        self._s_escaped = False
        self._s_lower = s_lower
        self._s_stale = True
        self._pend = pend
        self._pend_k = pend_k
        self._bad_rows = bad_rows
        self._first_bad = first_bad
        self._updates = index + 1
        self._has_rows = has_rows
        self._torn = False

    # ---------------------------------------------------------------- results
    def _require_rows(self, k: int) -> int:
        return _row_count(self._n if self.initialized else None, self._label(), k, self._updates)

    def _setup(self) -> _Setup:
        return _Setup(self._label(), self.name, self.dim, self.precision, self.nonfinite, self._updates,
                      self._low_products, self._underflowed, self._bad_ranks)

    def _live_sums(self) -> tuple[_Setup, _Sums | None]:
        """The configuration and the sums as of now, read under one hold of the lock: an update or a
        ``load_state_dict`` in between would pair one state's sums with another's flags and counts."""
        with self._lock:
            setup = self._setup()
            if not self.initialized:
                return setup, None
            return setup, _Sums(self._n, self._m, self._s, self._bad_rows, self._first_bad)

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
        self._refuse_torn()
        setup = self._setup()
        if not self.initialized:
            return setup, lambda: None
        s, stale = self._s_lower, self._s_stale
        # CPU updates may hold deferred rank-2 re-shift terms (see _cpu_update): copy them too, and add
        # them on the worker exactly as the ``_s`` property would
        pend = self._pend[:, : self._pend_k].copy() if self._pend_k else None
        if s.device.type != "cpu":
            self._s_escaped = True  # a pending copy reads this buffer: never write it in place again
        copies = [_host_copies((self._n, self._m, s, self._bad_rows, self._first_bad))]

        def materialize() -> _Sums:
            # taken out of the closure: the job's reference to the copy of S is its only one, so the copy is
            # freed once mirrored, not held through the solve (one d x d matrix less at the peak)
            host, wait = copies.pop()
            wait()
            n, m, s_host, bad_rows, first_bad = host
            del host
            return _Sums(n, m, _symmetric_s(s_host, pend) if stale or pend is not None else s_host, bad_rows, first_bad)

        return setup, materialize

    def covariance(self) -> torch.Tensor:
        """The float64 (d, d) centered covariance ``1/(N-1) sum (h - mean)(h - mean)^T``."""
        notes: list = []
        try:
            setup, sums = self._live_sums()
            _finite_check(sums, setup, notes)
            _row_count(None if sums is None else sums.n, setup.label, 2, setup.updates)
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
            setup, sums = self._live_sums()
            return _spectrum_of(sums, setup, notes)
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
        """Add ``other``'s rows to this accumulator (exact float64 re-shift); returns ``self``.

        Holds both accumulators' locks (see update), taken in one order (by ``id``), so ``a.merge(b)`` and
        ``b.merge(a)`` at once cannot deadlock: ``other`` is read (its first read may mirror its ``S`` in place)
        between its updates, not during one."""
        if other is self or not isinstance(other, ActivationCovarianceAccumulator):
            with self._lock:  # not between two threads' updates (see update)
                return self._merge(other)
        first, second = sorted((self, other), key=id)
        with first._lock, second._lock:
            return self._merge(other)

    def _merge(self, other: "ActivationCovarianceAccumulator") -> "ActivationCovarianceAccumulator":
        if not isinstance(other, ActivationCovarianceAccumulator):
            raise TypeError(f"{self._label()}: can only merge another ActivationCovarianceAccumulator")
        self._refuse_torn()
        other._refuse_torn()
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

    def sync(self, group=None, *, device=None) -> "ActivationCovarianceAccumulator":
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
        was (an accumulator without rows stays uninitialized). A failure of one rank's own work between the
        collectives (its zero state or its re-shift out of memory) or a Ctrl-C held back during them is agreed:
        every rank raises, each state as it was. A Ctrl-C during the last collective, too late to ride in it,
        is raised after the commit: every rank's state is synced alike.

        Under NCCL the collectives take tensors on one CUDA device per rank: ``device`` (a lens passes the one
        its other collectives use), else the device the process group is bound to, else the state's GPU, else the
        current device (a rank without rows). A state elsewhere is copied there for the sums (a d x d float64
        copy) and the result put back on the state's device, into buffers made there before the sums (their
        allocation failing is agreed as above, not left to one rank after the last collective). Other backends: the state's device, else the CPU
        (``device`` is not used).
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
        home = self._shift.device if self.initialized else None  # where the state is, and stays (not S: read
        # below, where its refusal of a torn state or its mirroring out of memory is agreed, not before a collective)
        if dist.get_backend(group) == "nccl":
            dev = _nccl_device(group, device, home, self._label())
        else:
            dev = home if home is not None else torch.device("cpu")
        # a Ctrl-C from the status collective to the sums' last one is held back and agreed in that last one
        # (inside a lens's sync the lens holds it: this one is then a no-op)
        with deferred_interrupt() as interrupted:
            _sync_status(group, dev, self._label(), self.name, self.dim, self.nonfinite, self.precision,
                         self._synced)
            # locals only until the commit below: a collective that fails part-way (a rank that died, a
            # timeout) leaves this rank's state as it was; a rank without rows joins with a zero state
            back = None  # a state elsewhere: the buffers on its device that the sums are put back into
            # a copy to dev, the buffers back home or the zero state out of memory: agreed in the sums' first
            # collective (no copy where the state is on dev)
            try:
                if self.initialized:
                    held = (self._n, self._m, self._s, self._shift, self._bad_rows, self._first_bad)
                    if home != dev:  # made now, filled in place (no allocation) after the last collective, where
                        back = tuple(torch.empty_like(t) for t in held)  # a failure would be this rank's only
                    state = tuple(t.to(dev) for t in held)
                else:
                    state = _zero_state(self.dim, dev, torch.zeros(self.dim, dtype=torch.float64), self.precision)
            except BaseException as exc:
                state = exc
            sums, (bad_ranks, low, underflowed, has_rows) = _summed(
                group, state, self.dim, dev, self.precision, self._low_products, self._underflowed, interrupted)
            if back is not None:  # the state back where it was
                sums = tuple(b.copy_(t) for b, t in zip(back, sums))
            n, m, s, shift, bad_rows, first_bad = sums
        # ---- commit: plain stores only
        self._shift, self._s, self._m = shift, s, m
        self._n = n
        self._bad_rows = bad_rows
        self._first_bad = first_bad
        self._bad_ranks = bad_ranks
        self._low_products = low
        self._underflowed = underflowed
        self._has_rows = has_rows
        self._synced = True
        if interrupted:  # during the last collective, too late to ride in it: after the commit, as on every rank
            raise KeyboardInterrupt
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

    def load_state_dict(self, state: dict[str, Any], origin: str = "state_dict") -> None:
        """Restore a :meth:`state_dict`.

        Every field is validated (format, configuration including ``nonfinite``, shapes, dtypes,
        counts) before anything changes: a rejected state raises :class:`StateFormatError` and leaves
        this accumulator exactly as it was. Takes the lock ``update`` takes: not between two threads' updates.
        """
        with self._lock:
            self._load_state_dict(state, origin)

    def _load_state_dict(self, state: dict[str, Any], origin: str = "state_dict") -> None:
        new = _validated(state, origin, self._label(), self.precision, self.nonfinite,
                         getattr(self, "_dim_given", self.dim))
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
            self._load_state_dict(moved)
            self._bad_ranks = bad_ranks
        return self

    def save(self, path: str | Path, *, fsync: bool = True) -> Path:
        """Write the state as ``.npz`` with a JSON header (no pickle); resume with :meth:`load`.

        ``.npz`` is appended to a path without it. The write is atomic (temporary file in the same
        directory, fsync, rename): a failed save leaves a previous file at ``path`` intact.
        """
        return _write_state(self.state_dict(), path, fsync)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", name: str | None = None,
             max_chunk_rows: int = 131072) -> "ActivationCovarianceAccumulator":
        """Rebuild an accumulator from :meth:`save` output.

        ``path`` is read as :meth:`save` named it: a ``path`` without ``.npz`` that does not exist is read
        with ``.npz`` appended (``load(p)`` reads what ``save(p)`` wrote). A corrupted, truncated, tampered
        (wrong dtype, shape, count or header field) or foreign file, or one missing an array, raises :class:`StateFormatError` naming the file.
        """
        path = _state_path(Path(path))
        header, arrays = _read_state(path, device)
        acc = cls(header.get("dim"), precision=header["precision"], nonfinite=header.get("nonfinite", "raise"),
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
