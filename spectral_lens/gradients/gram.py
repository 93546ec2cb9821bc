"""Pure math for gradient spectra: the float64 Gram matrix of per-sample gradients, by blocks.

The squared singular values of ``G`` (M x P) are the eigenvalues of the M x M Gram matrix
``K = G G^T``. Rows are held in their storage dtype as a list of row blocks (one per chunk of
samples); entries of ``K`` are float64 products of those stored rows, so ``K`` is the Gram matrix
of one well-defined matrix (exactly symmetric, PSD up to float64 round-off).

Products are formed on groups of up to ``block_rows`` rows, converted to float64 once per group
pair: filling the Gram of ``n`` rows costs ``n^2 P`` multiply-adds and about ``n^2 P / block_rows``
element conversions, with two ``block_rows x P`` float64 temporaries.
"""

from __future__ import annotations

import torch

from ..spectra.eigen import eigenvalues_descending
from ..spectra.moments import mirror_lower

__all__ = [
    "CPU_SLAB_ELEMENTS",
    "GRAM_BLOCK_ELEMENTS",
    "PANEL_ROWS",
    "block_rows_for",
    "gather_rows",
    "fill_gram",
    "fill_gram_by_columns",
    "gram_against",
    "symmetrized",
    "grow_square",
    "gram_spectrum",
]

#: Elements of one float64 temporary block (2**26 = 512 MiB); two are alive at once.
GRAM_BLOCK_ELEMENTS = 2**26

#: Elements of the float64 column slab when rows and Gram matrix are on the CPU (2**21 = 16 MiB):
#: 64 rows of 768 x 768 fill their Gram matrix in 0.45-0.49x the time of row blocks on the 2-core
#: CPU, 512 rows of 768 x 192 in 0.48x with the panels below (0.70x without them;
#: ``python benchmarks/bench_gradients.py --cpu-parts``).
CPU_SLAB_ELEMENTS = 2**21

#: Rows per panel of the CPU slab product (:func:`fill_gram_by_columns`): only the lower block
#: triangle of the Gram matrix is formed, in GEMMs of this many rows: 0.75x the time of the square
#: product at 256 and 512 rows on the 2-core CPU (BLAS ``dsyrk`` through SciPy, half the
#: multiply-adds, was slower than either at 64 rows and only 0.9x at 512).
PANEL_ROWS = 64


def block_rows_for(n_params: int, budget: int = GRAM_BLOCK_ELEMENTS) -> int:
    """Rows per float64 block so that one block holds at most ``budget`` elements (at least 1)."""
    return max(1, budget // max(1, n_params))


def gather_rows(blocks: list[torch.Tensor], lo: int, hi: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows ``lo:hi`` of ``cat(blocks)`` as one float64 tensor on ``device`` (default: the blocks')."""
    out = torch.empty(hi - lo, blocks[0].shape[1], dtype=torch.float64, device=device or blocks[0].device)
    start = 0
    for b in blocks:
        stop = start + b.shape[0]
        a, z = max(lo, start), min(hi, stop)
        if a < z:
            out[a - lo : z - lo].copy_(b[a - start : z - start])
        start = stop
    return out


def symmetrized(square: torch.Tensor) -> torch.Tensor:
    """The upper triangle mirrored onto the lower one: exactly symmetric (a product ``A A^T`` from BLAS
    may differ from its transpose in the last bit)."""
    return torch.triu(square) + torch.triu(square, 1).t()


def fill_gram(k: torch.Tensor, blocks: list[torch.Tensor], start: int, block_rows: int) -> None:
    """Set ``k[i, j] = <row_i, row_j>`` for every ``i, j < n`` with ``max(i, j) >= start``, in place.

    ``blocks`` hold the ``n`` rows; entries among the first ``start`` rows are left untouched.
    """
    n = sum(b.shape[0] for b in blocks)
    for a in range(start, n, block_rows):
        a_end = min(n, a + block_rows)
        rows_a = gather_rows(blocks, a, a_end, k.device)
        for b in range(0, a_end, block_rows):
            b_end = min(a_end, b + block_rows)
            rows_b = rows_a[b - a :] if b >= a else gather_rows(blocks, b, b_end, k.device)
            prod = rows_a @ rows_b.t()
            k[a:a_end, b:b_end] = prod
            k[b:b_end, a:a_end] = prod.t()
    if start < n:  # blocks straddling the diagonal wrote some pairs twice from different products
        k[start:n, start:n] = symmetrized(k[start:n, start:n])
        k[:start, start:n] = k[start:n, :start].t()


def gram_against(a: torch.Tensor, blocks: list[torch.Tensor], block_rows: int) -> torch.Tensor:
    """``a @ cat(blocks)^T`` in float64 (``a``: m x P), converting ``blocks`` group by group."""
    n = sum(b.shape[0] for b in blocks)
    a64 = a.to(torch.float64)
    out = torch.empty(a.shape[0], n, dtype=torch.float64, device=a.device)
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        out[:, lo:hi] = a64 @ gather_rows(blocks, lo, hi, a.device).t()
    return out


def fill_gram_by_columns(k: torch.Tensor, blocks: list[torch.Tensor], start: int, cols: int) -> None:
    """:func:`fill_gram` by column slabs: for rows held in host memory while ``k`` lives on an
    accelerator, and for rows and ``k`` both on the CPU.

    Row-block products would move every row block once per partner block; here ``G`` crosses to
    ``k``'s device once, ``cols`` columns at a time (one ``n x cols`` float64 slab there), and the
    entries accumulate ``k[i, j] += <row_i[a:b], row_j[a:b]>`` over column slabs. On the CPU the
    slab is one reused float64 buffer that fits in cache, where row blocks are fresh float64 copies
    of all rows (0.3 GB for 64 rows of 768 x 768) whose page faults cost more than the product, and
    each slab adds only the lower block triangle, by panels of :data:`PANEL_ROWS` rows. Same
    entries as :func:`fill_gram` up to float64 summation order.
    """
    n = sum(b.shape[0] for b in blocks)
    if start >= n:
        return
    p = blocks[0].shape[1]
    cols = max(1, min(cols, p))
    if k.is_cuda:
        torch.cuda.synchronize(k.device)  # rows may still be arriving by non-blocking device-to-host copies
    local = blocks[0].device == k.device  # rows beside k: the slab is converted to float64 in place
    k[start:n, :n] = 0.0
    staging = torch.empty(n, cols, dtype=torch.float64 if local else blocks[0].dtype,
                          device=blocks[0].device, pin_memory=k.is_cuda and not local)
    # on the CPU only the lower block triangle: row panels of PANEL_ROWS new rows against the rows up
    # to the panel's end (0.56 of the square product's multiply-adds at n = 512)
    panels = [(i, min(n, i + PANEL_ROWS)) for i in range(start, n, PANEL_ROWS)] if k.device.type == "cpu" else None
    for a in range(0, p, cols):
        b = min(p, a + cols)
        stage, r = staging[:, : b - a], 0
        for blk in blocks:
            stage[r : r + blk.shape[0]].copy_(blk[:, a:b])
            r += blk.shape[0]
        slab = stage if local else stage.to(k.device).to(torch.float64)  # blocking: staging is reused
        if panels is None:
            k[start:n, :n].addmm_(slab[start:], slab.t())
            continue
        for i, e in panels:
            k[i:e, :e].addmm_(slab[i:e], slab[:e].t())
    block = k[start:n, start:n]  # exactly symmetric from the triangle the products filled
    k[start:n, start:n] = symmetrized(block) if panels is None else mirror_lower(block)
    k[:start, start:n] = k[start:n, :start].t()


def grow_square(k: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``k`` (m, m) zero-padded to (n, n) float64; a fresh zero matrix when ``k`` is None."""
    out = torch.zeros(n, n, dtype=torch.float64, device=device)
    if k is not None:
        out[: k.shape[0], : k.shape[0]] = k
    return out


def gram_spectrum(k: torch.Tensor, n_params: int) -> torch.Tensor:
    """Squared singular values of ``G`` from its Gram matrix: ``min(M, P)`` values, descending."""
    return eigenvalues_descending(k)[: min(k.shape[0], n_params)]
