"""The sums of one ``update`` call, touching no accumulator state: ``(n, m, S, shift)`` around the
call's shift, to be merged into the state by ``ActivationCovarianceAccumulator``.

:func:`_call_sums` is the generic path (any device; chunks of ``max_chunk_rows``, no host read).
:func:`_cpu_chunk_sums` is the CPU one-chunk path: NumPy-driven, masked rows compacted away, the
centred rows and the product in per-thread recycled scratch (:func:`_recycled`).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import numpy as np
import torch

from .spectra import moments
from .spectra.moments import (
    accumulate_shifted,
    chunk_moments,
    lower_panels,
    matmul_precision,
    product_dtype,
    shift_dtype,
    symmetric_product,
)

_SHIFT_ROWS = 1024  # rows sampled from each chunk (at least; see _sample_step); their mean is the chunk's shift
_CPU_DTYPES = (torch.float32, torch.float64)  # CPU rows that take the NumPy-driven one-chunk path
_CPU_HALF = (torch.bfloat16, torch.float16)  # CPU rows converted exactly into that path's scratch
_SCRATCH = threading.local()  # CPU: per thread, recycled chunk buffers (see _chunk_scratch)
_SCRATCH_SHAPES = 4  # chunk shapes kept per thread
_SCRATCH_MAX_BYTES = 16 << 20  # a chunk whose buffers are larger gets fresh ones each time


def _sample_step(n: int) -> int:
    """Stride of the shift's row sample over a chunk of ``n`` rows: the largest odd prime at most
    ``n // 1024`` (at least 1024 rows, every ``step``-th from the first), 1 (every row) below 3072 rows.

    Why a prime and not ``n // 1024``: a chunk of ``B`` sequences of ``L`` tokens, both powers of two, put
    every sampled row at a position that is a multiple of ``B`` in its sequence, so the sample held each
    sequence's first token ``B`` times too often. Models give that token activations 1e2-1e3 times the
    spread of the others in a few dimensions (GPT-2's "massive activations"): at ``B = 128``, ``L = 1024``
    the shift was 12% of that size away from the chunk's mean, and the float32 products of the rows
    centred on it were 3-15x less accurate relative to the largest eigenvalue (bf16 ones: eigenvalues
    1-10 off by 8-19% at d = 16, under 1% now; ``tests/core/test_review27_core.py``). A prime stride
    that does not divide ``L`` visits every position of a sequence equally often; only an ``L`` with
    that prime as a factor (3, 5 or 7, for chunks of 3-10 times 1024 rows) can still alias, as any
    period can with a fixed stride."""
    q = n // _SHIFT_ROWS
    return 1 if q < 3 else _odd_prime_at_most(q)


@functools.lru_cache(maxsize=64)
def _odd_prime_at_most(q: int) -> int:
    """The largest odd prime ``<= q`` (``q >= 3``), by trial division; cached: one per chunk height."""
    p = q if q % 2 else q - 1
    while any(p % f == 0 for f in range(3, int(p ** 0.5) + 1, 2)):
        p -= 2
    return p


def _sample_mean(rows: torch.Tensor, valid: torch.Tensor | None, wide: bool = False) -> torch.Tensor:
    """Mean of a sample of about 1024 valid rows of a chunk, every :func:`_sample_step`-th (its shift;
    need not be exact); 0 if no row is valid.

    Summed in float64 if ``wide`` (the shift is float64: float64 precision or float64 rows), so
    finite rows near float32's limit (|x| > ~1e35) cannot give an infinite shift; else in the rows'
    precision (fp32 for half types; float32 products of such rows overflow anyway), where a float64
    sum would cost one more conversion kernel per update.

    With a mask the sample is found on the device (no host read): the ``j``-th row is the first whose
    running count of valid rows exceeds ``j * step * count // n``, for the ``ceil(n / step)`` values of
    ``j`` the unmasked sample has (``step`` = :func:`_sample_step` of the chunk's ``n`` rows): spread
    evenly among the valid rows, and with every row valid exactly the unmasked sample (the prime
    stride). 1021 rows spread evenly among the valid ones (rank ``j * count // 1021``) aliased with the
    sequences much as a stride does: a spacing near ``L / m`` (``L`` tokens per sequence) sampled
    nearly the same position of ``m`` sequences in a row, so the last 72,928-row chunk of a call of 204
    sequences of 1000 tokens, all valid, held 7% first tokens instead of 0.1%
    (``tests/core/test_review27_revcore.py``). Rows partly masked in a pattern that repeats every
    sequence can still alias so, less often (a spacing ``step * count / n`` rather than ``count / 1021``).
    Rows of the chunk at a fixed stride could all be masked (a mask that keeps the last token of each
    sequence never meets a stride dividing the sequence length): the shift was then 0, and rows far
    from 0 lost their tail in the float32 products; a sample among the valid rows cannot miss them.
    """
    dtype = torch.float64 if wide else (None if rows.dtype == torch.float32 else torch.float32)
    if valid is None:  # one kernel: the sample is read and averaged in the accumulation dtype directly
        step = _sample_step(rows.shape[0])
        return (rows[::step] if step > 1 else rows).mean(0, dtype=dtype)
    rank = valid.cumsum(0)
    # valid ranks j * step * count // n: every step-th valid row when all are valid (int64: the product
    # j * step * count < n ** 2 fits for chunks of up to 3e9 rows)
    n = rows.shape[0]
    targets = torch.arange(0, n, _sample_step(n), device=rows.device).mul_(rank[-1]).div_(n, rounding_mode="floor")
    # searched in rank[:-1]: at most the last row, so no index is out of range when no row is valid
    head = rows.index_select(0, torch.searchsorted(rank[:-1], targets, right=True))
    # no valid row: the row read may hold anything (NaN, Inf); then a finite shift, whatever it is
    return head.mean(0, dtype=dtype).nan_to_num_(0.0, 0.0, 0.0)


def _adopt_shift(state_n: torch.Tensor, state_shift: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The shift to merge sums around: ``state_shift`` (float64), or ``shift`` (promoted to float64)
    while the state holds no rows; two kernels, no host read. A state without rows has ``m = 0`` and
    ``S = 0`` around any shift, but the shift it got from a chunk whose rows were all masked or skipped
    is an arbitrary 0: sums of rows far from it (a mean of 1e8, spread 1) would lose every digit when
    re-shifted there."""
    return torch.where(state_n > 0, state_shift, shift)


def _rows_underflowed(y: torch.Tensor, m: np.ndarray, s: torch.Tensor) -> bool:
    """Whether a CPU chunk's centred valid rows ``y`` (masked ones compacted away) are not all 0 although its column
    sums ``m`` and the diagonal of its product ``s`` are all exactly 0: rows so small that every product
    underflowed, with column sums that cancel exactly. Host reads of CPU tensors; ``y`` is read only when
    ``m`` and the diagonal are all 0 (constant rows, or this). Not checked on the generic path (CUDA,
    or CPU calls longer than ``max_chunk_rows``), which reads nothing on the host."""
    if m.any() or s.diagonal().numpy().any():  # (a NaN counts as nonzero)
        return False
    return bool(y.numpy().any())


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
    """An n x d buffer of ``dtype`` for :func:`_cpu_compacted`'s gather
    of half-precision (or fp32 rows into float64 products) valid rows, :func:`_recycled` like
    :func:`_chunk_scratch`'s buffers."""
    return _recycled(("gather", n, d, dtype), lambda: torch.empty(n, d, dtype=dtype, device="cpu"),
                     n * d * dtype.itemsize)


def _cpu_path(rows: torch.Tensor, max_chunk_rows: int) -> bool:
    """Whether a call's rows (``(n, d)``) take the CPU one-chunk path: CPU rows of a dtype in
    :data:`_CPU_DTYPES` or :data:`_CPU_HALF`, at least one and at most ``max_chunk_rows`` of them."""
    return (rows.device.type == "cpu" and 0 < rows.shape[0] <= max_chunk_rows
            and (rows.dtype in _CPU_DTYPES or rows.dtype in _CPU_HALF))  # half rows: converted in _cpu_centered


def _cpu_chunk_sums(rows: torch.Tensor, valid: torch.Tensor | None, precision: str, nonfinite: str):
    """``(n, m, s, shift, broken, bad, underflowed)`` of one chunk of CPU rows (:func:`_cpu_path`), valid
    rows ``valid``: the row count (an int), the column sums of the centred rows (a NumPy d-vector), their
    product ``s`` (valid in its lower triangle; :func:`_chunk_scratch`'s recycled buffer, or ``syrk``'s
    result), the shift (a fresh float64 NumPy array, as subtracted), whether NaN/Inf rows were seen under
    ``nonfinite="raise"``, the rows dropped as such under ``"skip"``, and :func:`_rows_underflowed`.

    Rows are not checked for NaN/Inf up front: a non-finite entry in a valid row makes its
    column's sum in ``m`` non-finite (no finite sum cancels an Inf or a NaN), so finite column
    sums clear the whole chunk. Otherwise ``nonfinite="raise"`` flags the update, and "skip"
    drops the non-finite rows and centres the chunk again, before the product.
    Call inside ``np.errstate(all="ignore")``."""
    keep = None if valid is None else valid.numpy()
    n, m, shift, (y, s, panels) = _cpu_centered(rows, keep, precision)
    broken, bad = False, 0
    if not np.isfinite(m).all():  # non-finite rows (or finite ones whose fp32 column sums overflowed)
        if nonfinite == "raise":
            broken = True
        else:  # centre again without the non-finite rows (their NaN may be in the shift too)
            finite = rows.isfinite().all(-1).numpy()  # torch: bf16 rows have no NumPy view
            checked = n
            n, m, shift, (y, s, panels) = _cpu_centered(rows, finite if keep is None else keep & finite, precision)
            bad = checked - n
    with matmul_precision(precision, "cpu"):
        if y.shape[0] >= moments.SYRK_MIN_ROWS:
            s = symmetric_product(y, lower_only=True)  # BLAS syrk
        else:
            for a, b, o in panels:
                torch.mm(a, b, out=o)
    shift64 = shift.astype(np.float64)  # a fresh array: it becomes state
    return n, m, s, shift64, broken, bad, _rows_underflowed(y, m, s)


def _cpu_centered(rows: torch.Tensor, keep: np.ndarray | None, precision: str):
    """``(n, m, shift, (y, out, panels))`` of one chunk of CPU rows (fp32/fp64, or bf16/fp16 converted
    exactly into the scratch first), valid rows ``keep`` (NumPy bool or ``None``): the row count (an
    int), the column sums and the shift of the centred rows (NumPy d-vectors; ``shift`` fp32, fp64
    where the products are float64: the values subtracted), and the centred valid rows ``y`` with
    the product's buffer ``out`` and GEMM views ``panels`` (:func:`_chunk_scratch`'s; ``y`` and
    ``panels`` cover only the first ``n`` rows of its buffer when some row is masked: see
    :func:`_cpu_compacted`). Call inside ``np.errstate(all="ignore")``."""
    n_rows, d = rows.shape
    work = product_dtype(rows, precision)  # fp32 or fp64 on the CPU
    scratch = _chunk_scratch(n_rows, d, work)
    if keep is not None:
        kept = np.flatnonzero(keep)
        if kept.size < n_rows:
            return _cpu_compacted(rows, kept, scratch)
    y = scratch[0]
    half = rows.dtype in _CPU_HALF
    if half:  # one exact conversion into the scratch, centred there in place: no fresh fp32 copy
        y.copy_(rows)  # (page faults), no slow mixed-dtype kernel
        rows = y
    step = _sample_step(n_rows)
    head = rows[::step] if step > 1 else rows
    if half and work == torch.float64:  # float64 precision: the shift from fp32 values, as for fp32 rows
        head = head.float()
    mean = head.sum(0).numpy() / head.shape[0]  # torch's mean bit for bit, one torch call instead of two
    if not np.isfinite(mean).all():  # an fp32 sum overflowed (|x| > ~1e35), or NaN/Inf rows (stay so)
        mean = np.add.reduce(head.numpy(), 0, dtype=np.float64) / head.shape[0]
    shift = _shift_values(mean, work)
    torch.sub(rows, torch.from_numpy(shift), out=y)
    return n_rows, y.sum(0).numpy(), shift, scratch


def _shift_values(mean: np.ndarray, work: torch.dtype) -> np.ndarray:
    """The shift actually subtracted: fp32-representable unless the products are float64 (as
    :func:`representable_shift`)."""
    return mean.astype(np.float64 if work == torch.float64 else np.float32, copy=False)


def _cpu_compacted(rows: torch.Tensor, kept: np.ndarray, scratch):
    """:func:`_cpu_centered` for a chunk with masked rows (``kept``: the indices of the ``n < len(rows)``
    valid ones):
    only the valid rows are gathered into the first ``n`` rows of the scratch (converted to its
    dtype), centred there and multiplied, so masked rows cost neither a pass nor a product (a mask
    keeping 1 position in 64 made the product 64x the kept rows' one). The shift is the mean of
    the same sample rows as without compaction (the valid ones among every ``step``-th row of the
    chunk (:func:`_sample_step`), else every ``_sample_step(n)``-th valid row: see :func:`_sample_mean`),
    summed in the same dtype.
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
    step = _sample_step(n_rows)
    sdt = np.float64 if rows.dtype == torch.float64 else np.float32
    values = y.numpy()
    sample = values[kept % step == 0] if step > 1 else values
    if n and not sample.shape[0]:  # every sampled row masked (see _sample_mean): valid rows instead
        sample = values[:: _sample_step(n)]
    sample = sample.astype(sdt, copy=False)
    mean = np.add.reduce(sample, 0) / max(1, sample.shape[0])
    if not np.isfinite(mean).all():  # an fp32 sum overflowed (|x| > ~1e35), or NaN/Inf rows (stay so)
        mean = np.add.reduce(sample, 0, dtype=np.float64) / max(1, sample.shape[0])
    shift = _shift_values(mean, y.dtype)
    y.sub_(torch.from_numpy(shift))
    return n, y.sum(0).numpy(), shift, (y, out, lower_panels(y, out))


def _call_sums(rows: torch.Tensor, valid: torch.Tensor | None, max_chunk_rows: int, precision: str, nonfinite: str):
    """This call's ``(n, m, S, shift, broken)``: sums around the first chunk's shift, ``S`` valid in
    its lower triangle (fp32 for a one-chunk call in fp32 precision, else float64); touches no state.
    Reads nothing on the host (on CUDA a sync), so rows that underflow to all-zero sums
    (:func:`_rows_underflowed`) are not noticed on this path."""
    total = rows.shape[0]
    n = m = s = shift = broken = None
    for start in range(0, total, max_chunk_rows):
        if total <= max_chunk_rows:  # one chunk (the common case): no slicing
            chunk, cv = rows, valid
        else:
            chunk = rows[start : start + max_chunk_rows]
            cv = None if valid is None else valid[start : start + max_chunk_rows]
        nk = chunk.shape[0] if cv is None else cv.sum()
        # Each chunk is centered on its own shift (a row sample's mean), so drifting pools keep
        # low-precision products small; the exact float64 re-shift merges it. The shift stays in
        # the dtype whose values are subtracted (representable_shift's values, not converted to
        # float64): the re-shifts below read it into float64 arithmetic exactly.
        sdt = shift_dtype(precision, chunk.dtype)
        local = _sample_mean(chunk, cv, wide=sdt == torch.float64).to(sdt)
        if (cv is not None and total > max_chunk_rows and chunk.device.type == "cpu"
                and np.count_nonzero(cv.numpy()) < chunk.shape[0]):
            # a CPU call of several chunks: only the valid rows are centred and multiplied (the shift
            # is the one of the whole chunk's sample above; the count is read from the mask's memory,
            # no torch op). Not on CUDA, where the count would be a host sync: there the masked rows
            # are zeroed and multiplied. (One-chunk calls reach this path on the CPU only when forced,
            # as benchmarks/bench_covariance.py --fixed-cost does to count CUDA's ops: they keep them.)
            chunk, cv = chunk.index_select(0, cv.nonzero().squeeze(1)), None
        mk, sk = chunk_moments(chunk, local, precision, cv, lower_only=True)
        # NaN iff some entry of m is NaN or +-Inf (Inf * 0 is NaN; finite entries give exact zeros, so
        # the sum cannot overflow): 3 kernels, not isfinite's 6
        bk = (mk * 0).sum().isnan() if nonfinite == "raise" else None
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
