"""The accumulator's ``S`` as CPU updates leave it: a float64 buffer valid in its lower triangle, plus
up to :data:`_PENDING` deferred rank-2 re-shift terms, applied as one GEMM when full or on a read
(:func:`_symmetric_s`).
"""

from __future__ import annotations

import numpy as np
import torch

from .spectra.moments import mirror_lower, mirror_lower_

_PENDING = 32  # CPU: rank-2 re-shift terms deferred, then applied as one rank-64 GEMM (or on read)
_LOWER_BLOCK = 256  # CPU: row-block height of the lower-triangle float64 add
_SMALL_BLOCK = 128  # ... for d <= _LOWER_BLOCK (see _add_lower)


def _pending_factors(pend: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V = sum_j u_j c_j^T + c_j u_j^T`` over the first ``k`` deferred re-shift
    terms (``pend[0, j] = u_j``, ``pend[1, j] = c_j``; see :func:`spectral_lens.spectra.moments.reshift`)."""
    uc = pend[:, :k].reshape(2 * k, -1)  # rows u_1..u_k, c_1..c_k
    cu = np.concatenate((pend[1, :k], pend[0, :k]))  # rows c_1..c_k, u_1..u_k
    return torch.from_numpy(uc).t(), torch.from_numpy(cu)


def _symmetric_s(lower: torch.Tensor, pend: np.ndarray | None) -> torch.Tensor:
    """The symmetric float64 ``S`` from a stored ``S`` valid in its lower triangle and the deferred
    re-shift terms ``pend`` (``(2, k, d)``, or ``None``): the terms added, then the lower triangle
    mirrored, into a new matrix (``lower`` is left as it is). Shared by the ``_s`` property (for a
    buffer that escaped) and ``compute_async``'s snapshot; :func:`_symmetric_s_` gives the same bits."""
    if pend is not None:  # a new matrix of its own: mirrored in place (one d x d allocation fewer)
        return mirror_lower_(torch.addmm(lower, *_pending_factors(pend, pend.shape[1])))
    return mirror_lower(lower)


def _symmetric_s_(lower: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """:func:`_symmetric_s` in place on ``lower`` (a buffer that never escaped), with the same bits, the
    deferred terms given as their :func:`_pending_factors` (formed by the caller before this first write)."""
    if factors is not None:
        lower.addmm_(*factors)
    return mirror_lower_(lower)


def _add_lower(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a + b`` (``b`` promoted to ``out``'s dtype) on the lower triangle, by row blocks of
    :data:`_LOWER_BLOCK`; outside the lower triangle ``out`` is unspecified (garbage there, NaN
    included, is harmless). ``out`` may be ``a`` (the update in place of a state that never escaped):
    then each block is one mixed-dtype torch add (torch promotes ``b``'s block, then adds; the same
    float64 sums, as addition commutes). Otherwise each block is a promoting copy of ``b`` then an add
    of ``a``: two torch passes, both parallel, which beat NumPy's single-threaded casting add (2
    threads, d = 768, on the project's 2-core machine: 0.27 ms vs 0.56 ms; one thread: equal, and 2x
    faster at d = 256); the in-place form measured 0.29 ms there (0.37 ms for the copy form that day).
    Up to d = 256 the blocks are :data:`_SMALL_BLOCK` rows (d = 256: 128 x 128 and 128 x 256, 3/4 of the
    matrix), small enough that torch runs each on the calling thread: one 256 x 256 block is a parallel
    kernel, and under ``OMP_WAIT_POLICY=PASSIVE`` waking the sleeping pool cost more than the add
    (review 28: 0.12-0.14 ms vs 0.03 ms; with spinning threads 0.020 vs 0.033 ms)."""
    d = a.shape[0]
    step = _SMALL_BLOCK if d <= _LOWER_BLOCK else _LOWER_BLOCK
    for r0 in range(0, d, step):
        r1 = min(d, r0 + step)
        block = out[r0:r1, :r1]
        if out is a:
            block.add_(b[r0:r1, :r1])
        else:
            block.copy_(b[r0:r1, :r1])
            block.add_(a[r0:r1, :r1])


def _defer(pend: np.ndarray | None, k: int, c: np.ndarray, m64: np.ndarray, n: int
           ) -> tuple[np.ndarray, int, tuple[torch.Tensor, torch.Tensor] | None]:
    """One CPU update's re-shift term ``u c^T + c u^T`` (``u = m64 + n c / 2``, ``m64`` its float64
    column sums; see :func:`spectral_lens.spectra.moments.reshift`) deferred into slot ``k`` of ``pend``
    (a new ``(2, _PENDING, d)`` buffer if ``None``), past the committed count. Writes no state: returns
    the ``(pend, k)`` to commit and, when the slots are full, the :func:`_pending_factors` of all of them
    (this call's included; then ``k`` is 0) for :func:`_add_deferred` to add."""
    if pend is None:
        pend = np.empty((2, _PENDING, c.shape[0]))
    np.multiply(c, 0.5 * n, out=pend[0, k])
    pend[0, k] += m64  # u = m + n c / 2
    pend[1, k] = c
    k += 1
    if k == pend.shape[1]:  # apply the deferred terms as one GEMM
        return pend, 0, _pending_factors(pend, k)
    return pend, k, None


def _add_deferred(state_s: torch.Tensor, s: torch.Tensor, new_s: torch.Tensor,
                  factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``new_s = state_s + s`` on the lower triangle (:func:`_add_lower`; ``new_s`` may be ``state_s``),
    then the full slots' deferred terms (:func:`_defer`) added as one GEMM."""
    _add_lower(state_s, s, new_s)
    if factors is not None:
        new_s.addmm_(*factors)
