"""Shifted second moments: the sufficient statistics of a streaming covariance.

Every chunk ``x`` (n x d) is reduced to ``n``, ``m = sum(x - s)`` and ``S = sum (x - s)(x - s)^T``
around a fixed shift ``s``. Because ``s`` is close to the mean, the products never see the large
common offset that makes uncentered accumulation lose the tail of the spectrum in low precision.
Statistics around different shifts are merged exactly in float64 (the Chan et al. pairwise
update written for shifted sums). Pure functions on tensors: no module state, no host syncs.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "PRECISIONS",
    "chunk_moments",
    "covariance_from_moments",
    "matmul_precision",
    "add_promoted",
    "mirror_lower",
    "accumulate_shifted",
    "lower_panels",
    "product_dtype",
    "representable_shift",
    "reshift",
    "shift_dtype",
    "symmetric_product",
]

PRECISIONS = ("float64", "exact", "fast")
"""Product precisions. "float64": fp64 products (reference quality, slow on GPU); "exact": fp32
products with TF32 off (fp64 products for fp64 input); "fast": bf16 products with fp32 accumulation
on CUDA tensor cores (fp32 on other devices)."""

#: Row count from which the CPU product goes to SciPy's BLAS ``syrk``; shorter chunks use torch's own
#: GEMM (see :func:`symmetric_product`).
SYRK_MIN_ROWS = 8192


def matmul_precision(precision: str, device_type: str = "cpu"):
    """Pin IEEE float32 matmuls for ``precision`` on ``device_type`` and restore the caller's setting
    afterwards (a context manager).

    Through the per-backend setting where torch has it (``torch.backends.cuda.matmul`` /
    ``torch.backends.mkldnn.matmul``, ``.fp32_precision``; torch >= 2.9): only that one value is set
    and put back. The legacy global ``torch.set_float32_matmul_precision`` would overwrite every
    backend's choice, and reading it raises once the user has set backends apart.
    """
    if precision not in ("exact", "float64"):
        return contextlib.nullcontext()  # nothing to pin: a plain object, cheaper than a generator per update
    try:  # the common case in 0.2 us: the legacy getter answers only while every backend agrees
        if torch.get_float32_matmul_precision() == "highest":
            return contextlib.nullcontext()
    except RuntimeError:  # backends set apart with the per-backend API: read the one that matters
        pass
    backend = _MATMUL_BACKENDS.get(device_type)
    if backend is None or not hasattr(backend, "fp32_precision"):  # older torch, or another device
        return _highest_matmul()
    if _effective_fp32_precision(backend) == "ieee":
        return contextlib.nullcontext()
    return _ieee_matmul(backend)


def _effective_fp32_precision(backend) -> str:
    """The backend's matmul precision after inheritance: "none" defers to the backend's own setting,
    then to ``torch.backends.fp32_precision``; "none" all the way up means IEEE."""
    for level in (backend, _MATMUL_PARENTS.get(backend), torch.backends):
        value = getattr(level, "fp32_precision", "none") if level is not None else "none"
        if value != "none":
            return value
    return "ieee"


@contextlib.contextmanager
def _ieee_matmul(backend):
    previous = backend.fp32_precision
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = previous


@contextlib.contextmanager
def _highest_matmul():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


_MATMUL_BACKENDS = {"cuda": torch.backends.cuda.matmul, "cpu": getattr(torch.backends.mkldnn, "matmul", None)}
_MATMUL_PARENTS = {torch.backends.cuda.matmul: getattr(torch.backends, "cuda", None),
                   **({torch.backends.mkldnn.matmul: torch.backends.mkldnn}
                      if hasattr(torch.backends.mkldnn, "matmul") else {})}


def product_dtype(x: torch.Tensor, precision: str) -> torch.dtype:
    """The dtype in which centered rows enter the ``Y^T Y`` product."""
    if precision == "float64" or x.dtype == torch.float64:
        return torch.float64
    if precision == "fast" and x.is_cuda:
        return torch.bfloat16
    return torch.float32


def shift_dtype(precision: str, input_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype whose values a shift is rounded to (:func:`representable_shift`): what the products
    subtract (float64 wherever the products are: float64 precision or float64 rows)."""
    if precision == "float64" or input_dtype == torch.float64:
        return torch.float64
    if precision == "fast" and input_dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def representable_shift(shift: torch.Tensor, precision: str, input_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Round a float64 shift to what the products subtract, so the recorded shift is the one used.

    For bf16 rows in ``"fast"`` mode the shift is rounded to bf16: the subtraction then runs natively
    in bf16 and rounds exactly as an fp32 subtraction followed by one rounding to bf16 would. An entry
    beyond the range of that dtype keeps its float64 value (rows of such size cannot be in that
    dtype; this only happens to the float64 shift of a merged or synced state).
    """
    dtype = shift_dtype(precision, input_dtype)
    rounded = shift.to(dtype).to(torch.float64)
    if dtype == torch.float64:
        return rounded
    return torch.where(torch.isinf(rounded) & torch.isfinite(shift), shift.to(torch.float64), rounded)


def symmetric_product(y: torch.Tensor, blocks: bool | None = None, *, lower_only: bool = False) -> torch.Tensor:
    """``y^T y`` for fp32/fp64 ``y`` (exactly symmetric on the CPU).

    ``blocks=None`` chooses by device:

    * CPU: BLAS ``syrk`` through SciPy, which forms one triangle (half the multiply-adds): 1.7x
      faster than torch's GEMM for n = 65,536, d = 768 on the project's 2-core machine. SciPy's BLAS
      keeps its own thread pool (``OPENBLAS_NUM_THREADS``), not ``torch.set_num_threads``.
    * CUDA: for d >= 1024 the upper block triangle (3 of 4 GEMM blocks; measured on an H100: faster
      than one fp32 GEMM at d >= 1280), else one GEMM.

    ``blocks=True`` / ``False`` force the block form / one GEMM on any device.

    ``lower_only=True`` promises only the lower triangle (diagonal included); the strict upper
    triangle is then unspecified (on the CPU ``syrk`` path it is left as BLAS leaves it, which saves
    the d x d mirror pass; other paths return the full product). The accumulator's hot path uses it.
    """
    d = y.shape[1]
    if blocks is None:
        cpu_blas = y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)
        if cpu_blas and not y.requires_grad and y.shape[0] > 0:
            low = _syrk_lower(y) if y.shape[0] >= SYRK_MIN_ROWS else _gemm_lower(y)
            return low if lower_only else mirror_lower(low)
        blocks = y.is_cuda and d >= 1024
    if not blocks or d < 2:
        return y.t() @ y
    h = (d // 2 + 63) // 64 * 64
    a, b = y[:, :h], y[:, h:]
    s11, s12, s22 = a.t() @ a, a.t() @ b, b.t() @ b
    return torch.cat([torch.cat([s11, s12], 1), torch.cat([s12.t(), s22], 1)], 0)


def _gemm_lower(y: torch.Tensor) -> torch.Tensor:
    """``y^T y`` by torch's GEMM, lower triangle valid, strict upper unspecified. For d >= 128 only the
    lower block-row panels: row block ``i`` (``b`` columns of ``y``) times the columns up to the end
    of the block, ``out[i:i+b, :i+b]``; that is ``1/2 + b/(2d)`` of the multiply-adds (0.58 at
    d = 768, 0.75 at d = 256 with ``b`` = 128; :func:`_panel_width`), in ``d/b`` GEMMs of full height ``n``.
    With b = 64, one thread, n = 1,024, on the project's 2-core machine: 0.55x a full GEMM's time at
    d = 768 and 0.7x at d = 256 (a 2 x 2 split's three lower blocks: 0.8x and 0.7-0.8x)."""
    d = y.shape[1]
    if d < 128:
        return y.t() @ y
    out = torch.empty(d, d, dtype=y.dtype, device=y.device)
    for a, b, o in lower_panels(y, out):
        torch.mm(a, b, out=o)
    return out


def lower_panels(y: torch.Tensor, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The GEMMs of :func:`_gemm_lower` as ``(a, b, o)`` views, ``torch.mm(a, b, out=o)`` each: for
    buffers that are reused, the views can be too (slicing costs more than a small GEMM's call).
    Below d = 128 one full product."""
    d = y.shape[1]
    if d < 128:
        return [(y.t(), y, out)]
    b = _panel_width(d)
    ends = [min(d, i + b) for i in range(0, d, b)]
    return [(y[:, i:end].t(), y[:, :end], out[i:end, :end]) for i, end in zip(range(0, d, b), ends)]


def _panel_width(d: int) -> int:
    """Row-block height of :func:`_gemm_lower`: 128 up to d = 2,048, a multiple of 64 above (at most 16 GEMMs).
    128, not 64 (review 28, 2 threads, 1,024 rows, whole CPU updates interleaved in one process, passive
    OpenMP waits): 64-row panels' small GEMMs ran below the full product's rate and each woke the pool;
    updates 1.40 -> 1.24 ms at d = 256, 6.77 -> 6.18 ms at d = 768, 5.5 -> 5.0 at d = 512, 19.6 -> 18.5 at
    d = 1,024, 22.2 -> 20.9 at 4,096 x 768 (spinning waits: 0.73 -> 0.77 ms at d = 256, 5.74 -> 5.62 at d = 768)."""
    return max(128, -(-d // (16 * 64)) * 64)


def _syrk_lower(y: torch.Tensor) -> torch.Tensor:
    """``y^T y`` on the CPU by BLAS ``?syrk``: lower triangle valid, strict upper unspecified."""
    from scipy.linalg import blas  # imported on first use: keeps `import spectral_lens` light

    a = y.contiguous().numpy().T  # (d, n), Fortran-ordered: no copy on the way into BLAS
    f = blas.dsyrk if y.dtype == torch.float64 else blas.ssyrk
    # BLAS fills the upper triangle of a column-major result; read row-major (its transpose, no
    # copy) that is the lower triangle of a C-contiguous tensor.
    return torch.from_numpy(f(1.0, a, trans=0, lower=0).T)


def add_promoted(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a + b`` with ``b`` (e.g. fp32 chunk sums) promoted to ``a``'s dtype (``out`` is ``a``'s
    dtype and shape, and may be ``a``). On the CPU NumPy's casting add does it (torch's mixed-dtype
    add measured 1.5-1.8x slower at d = 768, 1 thread, on the 2-core machine)."""
    if a.device.type == "cpu" and b.device.type == "cpu":
        import numpy as np

        # Callers may pass matrices valid only in their lower triangle (the strict upper one holds
        # whatever an uninitialized buffer held, NaN included): adding it is harmless, so keep NumPy
        # from warning about it (the values are unchanged; non-finite rows are caught elsewhere).
        with np.errstate(invalid="ignore", over="ignore"):
            np.add(a.numpy(), b.numpy(), out=out.numpy())
        return out
    return torch.add(a, b, out=out)


def mirror_lower(s: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is ``s``'s; ``s``'s strict upper
    triangle is ignored (it may hold anything, even NaN). Returns a new tensor.

    Two d x d allocations (the result and the strict lower triangle), not three: the sum is formed in
    place, with the same bits."""
    return mirror_lower_(s.tril())


def mirror_lower_(s: torch.Tensor) -> torch.Tensor:
    """:func:`mirror_lower` in place on ``s`` (a matrix of the caller's own), with the same bits."""
    s.tril_()
    return s.add_(s.tril(-1).t())


def chunk_moments(
    x: torch.Tensor,
    shift: torch.Tensor,
    precision: str = "exact",
    valid: torch.Tensor | None = None,
    *,
    lower_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted sums of one chunk of rows.

    Args:
        x: (n, d) rows, any floating dtype.
        shift: (d,) shift ``s``, as returned by :func:`representable_shift` for ``x.dtype``: float64,
            or the same values in :func:`shift_dtype` (no conversion kernel when that is the dtype
            the rows are centred in).
        precision: one of :data:`PRECISIONS`.
        valid: optional (n,) bool; rows where it is False contribute nothing (also if they hold NaN).
        lower_only: only ``S``'s lower triangle (diagonal included) is needed; its strict upper
            triangle may then be left unspecified (see :func:`symmetric_product`).

    Returns:
        ``(m, S)`` over the valid rows, in fp32 (fp64 for fp64 products; in the CUDA fast mode ``m`` is
        float64 and ``S`` fp32, see :mod:`~spectral_lens.spectra.fast_moments`):
        ``m = sum_i (x_i - s)`` (d,) and ``S = sum_i (x_i - s)(x_i - s)^T`` (d, d). Merge them into float64 state with
        :func:`accumulate_shifted`.
    """
    dtype = product_dtype(x, precision)
    if dtype == torch.bfloat16:  # CUDA fast mode: one centring pass, then one GEMM (fast_moments)
        from .fast_moments import fast_chunk_moments

        return fast_chunk_moments(x, shift, valid)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.dtype != dtype and x.device.type == "cpu":  # the same values: mixed-dtype CPU ops take a slow path
        y.copy_(x).sub_(shift.to(work))
    else:
        torch.sub(x, shift.to(work), out=y)
    if valid is not None:
        y.masked_fill_(~valid.unsqueeze(-1), 0)
    with matmul_precision(precision, y.device.type):
        s = symmetric_product(y, lower_only=lower_only)
    return y.sum(0), s


def _rank2(m: torch.Tensor, c: torch.Tensor, n) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, V)`` with ``U @ V = m c^T + c m^T + n c c^T`` (``u = m + n c / 2``)."""
    u = m + (0.5 * n) * c
    return torch.stack([u, c], 1), torch.stack([c, u], 0)


def reshift(
    n: "torch.Tensor | int", m: torch.Tensor, s: torch.Tensor, old_shift: torch.Tensor, new_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Express shifted sums around ``old_shift`` as sums around ``new_shift`` (exact in float64).

    With ``c = old - new``: ``sum (x - new) = m + n c`` and
    ``sum (x - new)(x - new)^T = S + m c^T + c m^T + n c c^T``.
    """
    c = old_shift - new_shift
    n = n.to(torch.float64) if isinstance(n, torch.Tensor) else float(n)
    u, v = _rank2(m, c, n)
    return m + n * c, torch.addmm(s, u, v)


def accumulate_shifted(
    state_m: torch.Tensor, state_s: torch.Tensor, n: "torch.Tensor | int",
    m: torch.Tensor, s: torch.Tensor, shift: torch.Tensor, state_shift: torch.Tensor,
) -> None:
    """In place: add a chunk's sums ``(n, m, S)`` taken around ``shift`` to float64 state around
    ``state_shift``. ``m``/``S`` may be fp32 (promoted inside the adds); two passes over d^2."""
    c = shift - state_shift
    n = n.to(torch.float64) if isinstance(n, torch.Tensor) else float(n)
    m64 = m.to(torch.float64)
    u, v = _rank2(m64, c, n)
    state_s.add_(s)
    state_s.addmm_(u, v)
    state_m.add_(m64 + n * c)


def covariance_from_moments(n: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance ``(S - m m^T / n) / (n - 1)`` from shifted sums (float64, symmetrized).

    Two d x d allocations for float64 ``m`` and ``s`` (``m m^T``, reused for each step, and the symmetrized
    result), not six, so at most two such matrices beside ``s`` at once (three before: at d = 4096 each is
    128 MiB); the operations and so the bits are the same."""
    n = n.to(torch.float64)
    if m.dtype != torch.float64 or s.dtype != torch.float64 or m.requires_grad or s.requires_grad:
        cov = (s - torch.outer(m, m) / n) / (n - 1)  # promotions (and autograd) as they come
        return 0.5 * (cov + cov.t())
    cov = torch.outer(m, m).div_(n)
    torch.sub(s, cov, out=cov)
    cov.div_(n - 1)
    return (cov + cov.t()).mul_(0.5)
