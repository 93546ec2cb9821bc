"""Fourier probes against float64 references, on planted modes with large mean offsets."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.toy.probes import (BAND_SWEEP, band_concentration, fourier_summaries, mode_energy, pc1_peak_mass,
                                 peak_concentration, phase_means)


def _reference_energy(means: np.ndarray) -> np.ndarray:
    c = means.shape[0]
    k = np.arange(c)
    out = []
    for r in range(1, c // 2 + 1):
        F = (means * np.exp(-2j * np.pi * r * k / c)[:, None]).sum(axis=0)
        e = float((np.abs(F) ** 2).sum())
        out.append(e if 2 * r == c else 2 * e)
    return np.array(out)


@settings(max_examples=25, deadline=None)
@given(c=st.integers(3, 40), d=st.integers(1, 6), seed=st.integers(0, 10_000), offset=st.floats(-1e4, 1e4))
def test_mode_energy_matches_explicit_dft(c, d, seed, offset):
    means = np.random.default_rng(seed).normal(size=(c, d)) + offset
    ours = mode_energy(torch.from_numpy(means)).numpy()
    ref = _reference_energy(means)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9 * (1 + abs(offset)) ** 2 * c)
    # Parseval: the mode energies add up to c * the centered energy (the DC mode carries the mean)
    centered = means - means.mean(axis=0)
    assert ours.sum() == pytest.approx(c * (centered**2).sum(), rel=1e-8, abs=1e-6)


def _planted(c=67, r0=5, dim=16, n=4000, noise=0.05, offset=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    phase = torch.randint(c, (n,), generator=g)
    phase[:c] = torch.arange(c)
    u, v = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    ang = 2 * math.pi * r0 * phase.double() / c
    h = offset + ang.cos()[:, None] * u + ang.sin()[:, None] * v + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return h, phase


def test_planted_mode_is_found_despite_a_large_offset():
    h, phase = _planted(r0=5)
    means = phase_means(h, phase, 67)
    m = mode_energy(means)
    assert int(m.argmax()) + 1 == 5
    assert peak_concentration(m) > 0.95
    assert band_concentration(m, (1, 8)) > 0.95
    assert band_concentration(m, (9, 33)) < 0.05
    assert pc1_peak_mass(means) > 0.95
    assert pc1_peak_mass(means, (9, 20)) < 0.05  # the peak lies outside this band


def test_high_mode_is_outside_the_low_band():
    h, phase = _planted(r0=20)
    s = fourier_summaries(h, phase, 67)
    assert s["H_S"] < 0.05 and s["H_peak"] > 0.95
    assert s["pc1_peak:17-33"] > 0.95 and s["pc1_peak:1-8"] < 0.05
    assert {f"pc1_peak:{a}-{b}" for a, b in BAND_SWEEP} <= set(s)


def test_phase_means_float64_reference():
    h = torch.randn(500, 3, dtype=torch.float32) + 1e4
    phase = torch.arange(500) % 7
    ours = phase_means(h, phase, 7)
    ref = np.stack([h.double().numpy()[phase.numpy() == k].mean(axis=0) for k in range(7)])
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


def test_missing_phase_and_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"no row has phase \[3\]"):
        phase_means(torch.zeros(6, 2), torch.tensor([0, 1, 2, 4, 5, 6]), 7)
    with pytest.raises(ValueError, match="phases must lie in"):
        phase_means(torch.zeros(2, 2), torch.tensor([0, 9]), 7)
    with pytest.raises(ValueError, match=r"hidden must be \(N, d\)"):
        phase_means(torch.zeros(6), torch.zeros(6, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="band"):
        band_concentration(torch.ones(5), (0, 2))
