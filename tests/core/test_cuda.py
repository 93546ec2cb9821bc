"""CUDA-only checks (skipped without a GPU): fast/exact modes vs float64, bf16 chunk sums with masks,
and that ``update`` never synchronizes with the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator, BandAlphaFitter
from spectral_lens.spectra.moments import chunk_moments

from support.data import rows_with_spectrum

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _pool(n=200_000, d=768, mean=5.0, seed=0, dtype=torch.bfloat16):
    rng = np.random.default_rng(seed)
    rows = rows_with_spectrum(n, np.arange(1, d + 1.0) ** -1.2, mean, rng)
    return torch.from_numpy(rows).to("cuda", dtype)


@pytest.mark.parametrize("precision,tol_eig,tol_alpha", [("fast", 2e-3, 1e-3), ("exact", 1e-4, 1e-5), ("float64", 1e-9, 1e-9)])
def test_modes_against_float64(precision, tol_eig, tol_alpha):
    x = _pool()
    ref = np.linalg.eigvalsh(np.cov(x.double().cpu().numpy(), rowvar=False))[::-1]
    acc = ActivationCovarianceAccumulator(precision=precision, max_chunk_rows=65536)
    for chunk in x.split(50_000):
        acc.update(chunk)
    vals = acc.compute().values.numpy()
    assert np.abs(vals[:700] - ref[:700]).max() / ref[699] < tol_eig * 50  # relative to the tail's scale
    assert (np.abs(vals[:700] - ref[:700]) / ref[:700]).max() < tol_eig
    ours = BandAlphaFitter((400, 700)).fit(acc.compute()).alpha
    from spectral_lens.spectra import band_alpha

    assert abs(ours - band_alpha(ref, (400, 700)).alpha) < tol_alpha


@pytest.mark.parametrize("d", [64, 130, 768, 1600])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_chunk_sums_against_float64(d, masked):
    from spectral_lens.spectra.moments import representable_shift

    x = _pool(n=70_001, d=d, dtype=torch.bfloat16, seed=d)
    shift = representable_shift(x[:1024].double().mean(0), "fast", torch.bfloat16)
    valid = (torch.rand(x.shape[0], device="cuda") > 0.3) if masked else None
    x[~valid if masked else slice(0, 0)] = float("nan")  # masked rows may hold anything
    m1, s1 = (t.double() for t in chunk_moments(x, shift, "fast", valid))
    m2, s2 = chunk_moments(x, shift, "float64", valid)
    scale = float(s2.diagonal().max())
    # bf16 rounding of centered values (2^-9 relative) and fp32 accumulation: entries within 1e-2 of scale,
    # and the symmetric result exact in symmetry.
    assert torch.allclose(s1, s2, rtol=0, atol=1e-2 * scale)
    assert torch.allclose(m1, m2, rtol=0, atol=1e-2 * float(m2.abs().max() + 1))
    assert torch.equal(s1, s1.t())


def test_update_never_syncs_with_host():
    x = _pool(n=100_000, d=256)
    mask = torch.rand(x.shape[0], device="cuda") > 0.1
    for precision in ("fast", "exact"):
        for nonfinite in ("raise", "skip"):
            acc = ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite, max_chunk_rows=30_000)
            acc.update(x[:10], mask=mask[:10])  # first call allocates state and warms cuBLAS
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                acc.update(x)
                acc.update(x, mask=mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert acc.n_rows == int(mask[:10].sum()) + x.shape[0] + int(mask.sum())


def test_merge_across_devices_and_fp32_input():
    x = _pool(n=20_000, d=128, dtype=torch.float32)
    gpu = ActivationCovarianceAccumulator(precision="fast")
    gpu.update(x[:10_000])
    cpu = ActivationCovarianceAccumulator(precision="fast")
    cpu.update(x[10_000:].cpu())
    gpu.merge(cpu)
    ref = np.cov(x.double().cpu().numpy(), rowvar=False)
    assert np.abs(gpu.covariance().cpu().numpy() - ref).max() < 5e-3 * np.abs(ref).max()


def test_cpu_rows_with_a_cuda_mask():
    """The mask is read on the host right after its copy: the device-to-host copy must be complete."""
    x = _pool(n=4_096, d=64, dtype=torch.float32)
    torch.cuda._sleep(50_000_000)  # a busy stream: an unfinished copy would be read as zeros
    mask = torch.arange(x.shape[0], device="cuda") % 3 != 0
    acc = ActivationCovarianceAccumulator()
    acc.update(x.cpu(), mask)
    ref = np.cov(x[mask].double().cpu().numpy(), rowvar=False)
    assert acc.n_rows == int(mask.sum())
    assert np.abs(acc.covariance().numpy() - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_centring_bit_equal_to_torch(dtype, masked):
    """The one-pass Triton kernel against the torch ops on the GPU: the same bf16 rows bit for bit
    (both round to nearest even), column sums equal to float64 sums of those rows; the same for
    looped launches (several row tiles per program)."""
    from spectral_lens.spectra import fast_moments as fm
    from spectral_lens.spectra.moments import representable_shift

    if not fm.triton_available():
        pytest.skip("Triton not installed")
    from spectral_lens.spectra import _center_kernel as ck

    for n, d in ((1, 8), (70_001, 768), (4097, 1600), (333, 130)):
        x = _pool(n=n, d=d, dtype=dtype, seed=n, mean=1e3 if dtype != torch.float16 else 50.0)
        valid = (torch.rand(n, device="cuda") > 0.3) if masked else None
        if masked:
            x[~valid] = float("nan")
        keep = valid if masked else torch.ones(n, dtype=torch.bool, device="cuda")
        shift = representable_shift(x[keep][:1024].double().mean(0).nan_to_num(), "fast", dtype)
        y1, c1 = fm.center_cast(x, shift, valid, use_triton=False)
        y2, c2 = fm.center_cast(x, shift, valid, use_triton=True)
        assert torch.equal(y1, y2), (n, d)
        ref = y2.double().sum(0)
        assert torch.allclose(c2, ref, rtol=0, atol=1e-6 * float(y2.double().abs().sum(0).max() + 1))
        for tiles, block_r, warps in ((4, 128, 8), (16, 64, 4)):  # looped launches (bench_covariance.LOOPED)
            y3 = torch.empty_like(y2)
            part = torch.empty(ck.partial_rows(n, block_r, tiles), d, device="cuda")
            ck.center_cast(x.contiguous(), shift, None if valid is None else valid.view(torch.uint8), y3, part,
                           block_r=block_r, num_warps=warps, tiles=tiles)
            assert torch.equal(y3, y2), (n, d, tiles)
            assert torch.allclose(part.sum(0, dtype=torch.float64), ref, rtol=0,
                                  atol=1e-6 * float(y2.double().abs().sum(0).max() + 1))


@pytest.mark.parametrize("use_triton", [True, False])
def test_fast_sums_against_float64_of_rounded_rows(use_triton):
    """The fast chunk sums equal the float64 sums of the same bf16-rounded rows up to the tensor cores'
    fp32 accumulation (measured 3-5e-5 of the largest diagonal entry at 65,536 rows; bound 2e-4)."""
    from spectral_lens.spectra import fast_moments as fm
    from spectral_lens.spectra.moments import representable_shift

    if use_triton and not fm.triton_available():
        pytest.skip("Triton not installed")
    x = _pool(n=100_000, d=768, seed=int(use_triton))
    valid = torch.rand(x.shape[0], device="cuda") > 0.2
    shift = representable_shift(x[:1024].double().mean(0), "fast", torch.bfloat16)
    m, s = fm.fast_chunk_moments(x, shift, valid, use_triton=use_triton)
    y = fm.center_cast(x, shift, valid, use_triton=False)[0].double()
    ref_s, ref_m = y.t() @ y, y.sum(0)
    assert torch.allclose(s.double(), ref_s, rtol=0, atol=2e-4 * float(ref_s.diagonal().max()))
    assert torch.allclose(m, ref_m, rtol=0, atol=1e-6 * float(ref_m.abs().max() + 1))
    assert torch.equal(s, s.t())
