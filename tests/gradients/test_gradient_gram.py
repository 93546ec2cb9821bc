"""Blocked float64 Gram assembly against numpy, including multi-block paths inside the probe."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from spectral_lens.gradients import PerSampleGradientProbe, fill_gram, fill_gram_by_columns, gram_against, gram_spectrum
from spectral_lens.gradients import gram as gram_module
from spectral_lens.gradients import probe as probe_module


@settings(max_examples=60, deadline=None)
@given(
    fill=st.sampled_from([fill_gram, fill_gram_by_columns]),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    block=st.integers(1, 9),
    start_frac=st.floats(0, 1),
    offset=st.sampled_from([0.0, 1e3]),
    panel=st.sampled_from([1, 2, 5, 64]),
    seed=st.integers(0, 2**16),
)
def test_fill_gram_matches_numpy(fill, sizes, block, start_frac, offset, panel, seed):
    """Row blocks (``block`` rows) and column slabs (``block`` columns; on the CPU only the lower
    block triangle, by panels of ``panel`` rows) fill the same entries: those with
    ``max(i, j) >= start``, exactly symmetric, the rest untouched."""
    rng = np.random.default_rng(seed)
    blocks = [torch.from_numpy(rng.standard_normal((s, 7)) + offset).float() for s in sizes]
    g = torch.cat(blocks).double().numpy()
    n = g.shape[0]
    start = int(start_frac * n)
    k = torch.full((n, n), -7.0, dtype=torch.float64)
    with mock.patch.object(gram_module, "PANEL_ROWS", panel):
        fill(k, blocks, start, block)
    ref = g @ g.T
    filled = np.maximum.outer(np.arange(n), np.arange(n)) >= start
    np.testing.assert_allclose(k.numpy()[filled], ref[filled], rtol=1e-12, atol=1e-12)
    assert (k.numpy()[~filled] == -7.0).all()  # entries among the first `start` rows untouched
    np.testing.assert_array_equal(k.numpy(), k.numpy().T)  # exactly
    a = torch.from_numpy(rng.standard_normal((3, 7)))
    np.testing.assert_allclose(gram_against(a, blocks, block).numpy(), a.numpy() @ g.T, rtol=1e-12, atol=1e-9)


def test_offload_rows_is_a_no_op_on_cpu(gpt, helpers):
    model, batch = gpt(), helpers.lm_batch(m=7)
    a = PerSampleGradientProbe(model, chunk_size=3).update(batch)
    b = PerSampleGradientProbe(model, chunk_size=3, offload_rows=True).update(batch)
    assert all(r.device.type == "cpu" and not r.is_pinned() for r in b._rows[next(iter(b.params))])
    torch.testing.assert_close(a.gram(), b.gram(), rtol=0, atol=0)


def test_cpu_probe_fills_by_column_slabs(gpt, helpers, monkeypatch):
    """On the CPU the probe fills its Gram matrix by float64 column slabs: with slabs of 3 columns
    (many slabs, the last one partial) and two updates (the second fills only the new rows), the
    same matrix as one float64 product of the rows."""
    model, batch = gpt(), helpers.lm_batch(m=9)
    monkeypatch.setattr(probe_module, "CPU_SLAB_ELEMENTS", 3 * 9)
    probe = PerSampleGradientProbe(model, chunk_size=4, keep_matrix=True).update(batch)
    first = probe.gram().clone()  # fills the first 9 rows
    probe.update(helpers.lm_batch(m=5, seed=3))
    g = probe.matrix().double()
    torch.testing.assert_close(first, g[:9] @ g[:9].T, rtol=1e-12, atol=1e-12 * float(first.abs().max()))
    torch.testing.assert_close(probe.gram(), g @ g.T, rtol=1e-12, atol=1e-12 * float(first.abs().max()))
    assert torch.equal(probe.gram(), probe.gram().T)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_rows_on_cuda(gpt, helpers, monkeypatch):
    """Rows in pinned host memory: the same Gram, and device memory without the M x P rows (the
    column slab is capped at 64 x 4,096 float64 here so that it is small next to the rows)."""
    monkeypatch.setattr(probe_module, "GRAM_BLOCK_ELEMENTS", 64 * 4096)
    model = gpt(d=256, heads=4, vocab=97, ctx=16).float().cuda()
    batch = tuple(t.cuda() for t in helpers.lm_batch(m=64, t=16, vocab=97))
    peaks, grams = {}, {}
    for offload in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        probe = PerSampleGradientProbe(model, chunk_size=8, offload_rows=offload).update(batch)
        grams[offload] = probe.gram()
        peaks[offload] = torch.cuda.max_memory_allocated() - base
        if offload:
            rows = probe._rows[next(iter(probe.params))]
            assert all(r.device.type == "cpu" and r.is_pinned() for r in rows)
    torch.testing.assert_close(grams[True], grams[False], rtol=1e-12, atol=1e-9)
    rows_bytes = 64 * 256 * 256 * 4
    assert peaks[False] - peaks[True] >= rows_bytes // 2, (peaks, rows_bytes)


def test_gram_spectrum_truncates_to_rank_bound():
    g = np.random.default_rng(0).standard_normal((6, 4))
    vals = gram_spectrum(torch.from_numpy(g @ g.T), n_params=4)
    assert vals.shape == (4,)
    np.testing.assert_allclose(vals.numpy(), np.linalg.svd(g, compute_uv=False) ** 2, rtol=1e-12)


def test_probe_with_tiny_blocks(gpt, helpers, monkeypatch):
    model, batch = gpt(), helpers.lm_batch(m=9)
    names = ["transformer.h.1.attn.c_proj.weight", "transformer.ln_f.weight"]
    ref = PerSampleGradientProbe(model, names, chunk_size=2, keep_matrix=True).update(batch)
    monkeypatch.setattr(probe_module, "block_rows_for", lambda p: 3)
    for cap in (None, 4):
        small = PerSampleGradientProbe(model, names, chunk_size=2, max_resident_samples=cap)
        small.update((batch[0][:4], batch[1][:4]))
        small.gram(names[0])  # a fill between updates
        small.update((batch[0][4:], batch[1][4:]))
        for n in names:
            r = ref.matrix(n).numpy()
            k = small.gram(n).numpy()
            np.testing.assert_allclose(k, r @ r.T, rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(k, k.T)  # exactly symmetric in every memory mode
