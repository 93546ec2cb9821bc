"""The sums of one ``update`` call, touching no accumulator state: ``(n, m, S, shift)`` around the
call's shift, to be merged into the state by ``ActivationCovarianceAccumulator``.

:func:`_call_sums` is the generic path (any device; chunks of ``max_chunk_rows``, no host read).
:func:`_cpu_chunk_sums` is the CPU one-chunk path: NumPy-driven, masked rows compacted away, the
centred rows and the product in per-thread recycled scratch (:func:`_recycled`).
"""

from __future__ import annotations

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

_SHIFT_ROWS = 1024  # rows sampled from each chunk of at least 3 * 1024 rows (see _sample_spacing); their mean is the chunk's shift
_RUN_ROWS = 64  # the sample: _RUNS runs of _RUN_ROWS consecutive rows, evenly spaced over the chunk
_RUNS = _SHIFT_ROWS // _RUN_ROWS
_CPU_DTYPES = (torch.float32, torch.float64)  # CPU rows that take the NumPy-driven one-chunk path
_CPU_HALF = (torch.bfloat16, torch.float16)  # CPU rows converted exactly into that path's scratch
_SCRATCH = threading.local()  # CPU: per thread, recycled chunk buffers (see _chunk_scratch)
_SCRATCH_SHAPES = 4  # chunk shapes kept per thread
_SCRATCH_MAX_BYTES = 16 << 20  # a chunk whose buffers are larger gets fresh ones each time
_ONE_SUM_MAX = 1 << 19  # entries up to which one float64 NumPy column sum beats two fp32 torch ones (see
# _cpu_centered; 2 threads, OMP_WAIT_POLICY=PASSIVE: 1024 x 256 0.92-0.94x the update's time, 1024 x 768 1.01-1.02x)


def _sample_spacing(n: int) -> int:
    """Distance between the starts of the shift sample's runs in a chunk of ``n`` rows, 0 below 3,072 rows
    (the sample is then every row). The sample: :data:`_RUNS` (16) runs of :data:`_RUN_ROWS` (64)
    consecutive rows, the first at row :func:`_sample_offset`, the last ending at most at row ``n - 1``.

    Why runs and not a stride: a sample at a fixed stride ``p`` aliases with sequences of ``L`` tokens
    whenever ``p`` divides ``L`` (then every sampled row sits at the same ``L / p`` positions of its
    sequence), and models give a sequence's first token activations 1e2-1e3 times the others' spread
    in a few dimensions. The odd-prime stride (review 27) had that at every ``L`` that is a multiple
    of it: at ``L = p`` the sample was all first tokens (3,072-16,383 rows: ``p`` = 3-13), and at
    ``L = 10 p`` (16,384 rows, ``L = 130``) the shift was 93 spreads from the chunk's mean and bf16
    products' eigenvalues 1-10 off by 7.5-8.3% (0.2-1.1% now). 64 consecutive rows hold every position of a sequence
    of ``L <= 64`` tokens equally often (give or take one), and 16 runs spread over the chunk sample
    longer sequences at 16 unrelated places: over ``L`` = 1..2048 and chunks of 3,072-131,072 rows
    the most over-sampled position takes at most 15.4/1024 more of the sample than its share (the prime
    stride: up to 1016/1024; ``tests/core/test_review28_chunk.py``).

    Why one less than an odd multiple of 64 (the largest such spacing at most ``(n - 64) // 15``; the
    runs, centred, leave under 1,000 rows unsampled at either end): a plain ``(n - 64) // 15`` put the runs' starts
    at nearly the same place of power-of-two sequences in power-of-two chunks (256 x 128: 4 tokens
    apart, so every run began in a sequence's first half and the sample held 1 first token in 1024, not
    8; 12.9/1024 too many at 15 x 8192). With ``64 * q`` (``q`` odd) the runs' starts fall on 16 distinct
    multiples of 64 of a sequence of ``2^j >= 1024`` tokens, and on each multiple of 64 equally often
    below; ``- 1`` moves the ``k``-th run back ``k`` rows, which keeps every position of a power-of-two
    sequence within 1.5/1024 of its share (the first token within 1/1024) from any offset, and keeps the
    spacing from being a multiple of a short odd ``L = q`` (``64 * 3`` sampled every 3-token sequence at
    one phase: 10.7/1024 too many first tokens; ``tests/core/test_review28_revchunk.py``)."""
    if n < 3 * _SHIFT_ROWS:
        return 0
    s = (n - _RUN_ROWS) // (_RUNS - 1)
    return s - (s - _RUN_ROWS + 1) % (2 * _RUN_ROWS)  # the largest s' <= s with s' = 64 (mod 128) - 1


def _sample_offset(n: int, s: int) -> int:
    """First row of the shift sample's first run (spacing ``s`` = :func:`_sample_spacing`, 0 for none):
    the runs centred in the chunk, so the sample's mean row is the chunk's (a mean drifting along the
    chunk is met in its middle; the spacing leaves up to 15 * 127 rows over)."""
    return (n - (_RUNS - 1) * s - _RUN_ROWS) // 2 if s else 0


def _sample_view(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(view, count)``: the shift's sample of a chunk's rows as a view (no copy, no index tensor, any
    device: ``(runs, run, d)`` from ``unfold``, or the rows themselves below 3,072 rows) and the number
    of rows it holds."""
    s = _sample_spacing(rows.shape[0])
    if not s:
        return rows, rows.shape[0]
    o = _sample_offset(rows.shape[0], s)  # cut at the last run's end: unfold makes every window that fits
    return rows[o : o + (_RUNS - 1) * s + _RUN_ROWS].unfold(0, _RUN_ROWS, s).transpose(1, 2), _SHIFT_ROWS


def _sample_sum(head: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Column sums of :func:`_sample_view`'s view, in ``dtype``: over the runs' rows, then over the runs.
    Two one-dim sums: torch's CPU sum over dims (0, 1) of the 3-D view took 10-40x longer (180 us vs 16 us
    at 32,768 x 256, 2 threads)."""
    return head.sum(0, dtype=dtype) if head.dim() == 2 else head.sum(1, dtype=dtype).sum(0)


def _sample_index(n: int) -> np.ndarray:
    """The rows of :func:`_sample_view`'s sample of a chunk of ``n`` rows, ascending (NumPy int64)."""
    s = _sample_spacing(n)
    if not s:
        return np.arange(n)
    o = _sample_offset(n, s)
    return (np.arange(o, o + _RUNS * s, s)[:, None] + np.arange(_RUN_ROWS)).reshape(-1)


def _in_sample(index: np.ndarray, n: int) -> np.ndarray:
    """Which of the rows ``index`` (of a chunk of ``n`` rows) :func:`_sample_index` holds (NumPy bool)."""
    s = _sample_spacing(n)
    if not s:
        return np.ones(index.shape, dtype=bool)
    i = index - _sample_offset(n, s)
    return (i >= 0) & (i % s < _RUN_ROWS) & (i < (_RUNS - 1) * s + _RUN_ROWS)


def _sample_mean(rows: torch.Tensor, valid: torch.Tensor | None, wide: bool = False) -> torch.Tensor:
    """Mean of a sample of 1024 valid rows of a chunk (every row below 3,072 rows; its shift, need not
    be exact): 16 runs of 64 consecutive rows (:func:`_sample_spacing`); 0 if no row is valid.

    Summed in float64 if ``wide`` (the shift is float64: float64 precision or float64 rows), so
    finite rows near float32's limit (|x| > ~1e35) cannot give an infinite shift; else in the rows'
    precision (fp32 for half types; float32 products of such rows overflow anyway), where a float64
    sum would cost one more conversion kernel per update.

    With a mask the sample is found on the device (no host read) among the valid rows, at the ranks
    ``i * count // n`` for the unmasked sample's rows ``i`` (``count`` valid rows): with every row
    valid exactly the unmasked sample; else runs of consecutive valid rows (each repeated about
    ``n / count`` times), spread evenly over them. The ``j``-th ranked row is the first whose running
    count of valid rows exceeds ``j``. Review 27's reasons hold: 1021 rows spread evenly among the valid
    ones aliased with sequences (``tests/core/test_review27_revcore.py``), and rows of the chunk at fixed
    places could all be masked (a mask that keeps the last token of each sequence): the shift was then
    0, and rows far from 0 lost their tail in the float32 products; a sample among the valid rows cannot
    miss them.
    """
    dtype = torch.float64 if wide else (None if rows.dtype == torch.float32 else torch.float32)
    if valid is None:  # the sample (a view) is read and averaged in the accumulation dtype directly
        head, count = _sample_view(rows)
        if head.dim() == 3 and rows.device.type == "cpu":  # see _sample_sum; elsewhere one kernel
            return _sample_sum(head, dtype).div_(count)
        return head.mean((0, 1) if head.dim() == 3 else 0, dtype=dtype)
    rank = valid.cumsum(0)
    n, device = rows.shape[0], rows.device
    s = _sample_spacing(n)
    if s:  # the unmasked sample's rows, made on the device (no host-to-device copy)
        o = _sample_offset(n, s)
        index = (torch.arange(o, o + _RUNS * s, s, device=device)[:, None]
                 + torch.arange(_RUN_ROWS, device=device)).view(-1)
    else:
        index = torch.arange(n, device=device)
    # valid ranks i * count // n (int64: i * count < n ** 2 fits for chunks of up to 3e9 rows)
    targets = index.mul_(rank[-1]).div_(n, rounding_mode="floor")
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
    if work == torch.float32 and not _sample_spacing(n_rows) and rows.numel() <= _ONE_SUM_MAX:
        # fp32 products (fp32 rows, or half rows converted above) whose sample is every row: one float64
        # column sum (NumPy, this thread) gives the shift and m = sum(x) - n * shift, so no pass over the
        # centred rows. Its error, ~2^-53 n max|x|, is below the fp32 sum of y's it replaces (~2^-24 of each
        # partial sum: 3-4e-6 at 1,000 rows, offsets 0-5); not for float64 products, where the sum of y
        # (error ~2^-53 n spread) is the better m.
        # Rows so large that x - shift overflows fp32 leave m finite: the product's Inf is then reported
        # as an overflow of finite rows (as it is)
        total = np.add.reduce(rows.numpy(), 0, dtype=np.float64)
        shift = _shift_values(total / n_rows, work)
        torch.sub(rows, torch.from_numpy(shift), out=y)
        return n_rows, total - n_rows * shift.astype(np.float64, copy=False), shift, scratch
    head, count = _sample_view(rows)
    if half and work == torch.float64:  # float64 precision: the shift from fp32 values, as for fp32 rows
        head = head.float()
    mean = _sample_sum(head).numpy() / count
    if not np.isfinite(mean).all():  # an fp32 sum overflowed (|x| > ~1e35), or NaN/Inf rows (stay so)
        mean = np.add.reduce(head.numpy(), tuple(range(head.dim() - 1)), dtype=np.float64) / count
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
    the same sample rows as without compaction (the valid ones among :func:`_sample_index`'s rows of
    the chunk, else, none of them valid, that sample of the ``n`` valid rows: see :func:`_sample_mean`),
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
    # the shift's sample, as on the uncompacted rows: valid rows among the sample's, summed in the
    # rows' dtype (fp32 for half rows, which are exact in it)
    sdt = np.float64 if rows.dtype == torch.float64 else np.float32
    values = y.numpy()
    sample = values[_in_sample(kept, n_rows)] if _sample_spacing(n_rows) else values
    if n and not sample.shape[0]:  # every sampled row masked (see _sample_mean): the sample of the valid rows
        sample = values[_sample_index(n)]
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
