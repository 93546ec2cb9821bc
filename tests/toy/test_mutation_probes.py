"""Mutation audit (probes.py): band edges, the default task band, PC1 centering and the band sweep keys,
each against a hand computation. Written because one-line mutants of these passed test_probes.py."""
import math

import numpy as np
import pytest
import torch

from examples.toy.probes import band_concentration, fourier_summaries, pc1_peak_mass, phase_means


def test_band_edges_are_inclusive_and_one_based():
    # modes r = 1..6 with energies 1, 2, 4, 8, 16, 32 (total 63): every band's share is a distinct number
    m = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], dtype=torch.float64)
    assert band_concentration(m, (1, 1)) == 1 / 63
    assert band_concentration(m, (2, 3)) == 6 / 63
    assert band_concentration(m, (5, 6)) == 48 / 63
    assert band_concentration(m, (4, 100)) == 56 / 63  # clipped at the last mode


def _hidden(c, modes, n=None, seed=0):
    """Rows whose phase means hold ``amp * cos(2 pi r k / c)`` on dimension ``dim`` for each (r, amp, dim)."""
    g = np.random.default_rng(seed)
    n = n or 6 * c
    phase = np.arange(n) % c
    h = np.zeros((n, 4)) + 100.0 * np.array([1.0, -2.0, 0.5, 3.0])  # a large mean offset
    for r, amp, dim in modes:
        h[:, dim] += amp * np.cos(2 * np.pi * r * phase / c + g.uniform(0, 2 * np.pi))
    return torch.from_numpy(h), torch.from_numpy(phase)


def test_default_band_h_s_is_modes_1_to_8_by_hand():
    c = 37
    h, phase = _hidden(c, [(2, 1.0, 1), (8, 1.0, 2), (9, 1.0, 3), (12, 1.0, 0)])
    s = fourier_summaries(h, phase, c)
    # hand DFT of the phase means (float64), conjugates counted together
    means = np.stack([h.numpy()[phase.numpy() == k].mean(axis=0) for k in range(c)])
    k = np.arange(c)
    e = np.array([2 * (np.abs((means * np.exp(-2j * np.pi * r * k / c)[:, None]).sum(0)) ** 2).sum()
                  for r in range(1, c // 2 + 1)])
    assert s["H_S"] == pytest.approx(e[:8].sum() / e.sum(), rel=1e-9)  # 2 of the 4 equal modes: 0.5
    assert s["H_S"] == pytest.approx(0.5, abs=1e-9)
    assert s["H_peak"] == pytest.approx(e.max() / e.sum(), rel=1e-9)


def test_pc1_is_taken_after_centering():
    # the offset direction (dimension 0 carries a mean of 100) must not be PC1: the strongest varying
    # direction is dimension 1 (mode 3, amplitude 5); dimension 0 varies weakly along mode 7
    c = 31
    h, phase = _hidden(c, [(3, 5.0, 1), (7, 1.0, 0)])
    means = phase_means(h, phase, c)
    assert pc1_peak_mass(means, (1, 4)) == pytest.approx(1.0, abs=1e-6)  # mode 3 inside band 1-4
    assert pc1_peak_mass(means, (5, 10)) == pytest.approx(0.0, abs=1e-6)  # nothing of PC1 at mode 7


def test_band_sweep_keeps_every_band_that_starts_within_the_modes():
    # c = 17 has modes 1..8: the bands starting at or below 8 are kept, also when they end beyond it
    h, phase = _hidden(17, [(1, 1.0, 1), (5, 0.5, 2)])
    s = fourier_summaries(h, phase, 17)
    keys = {k for k in s if k.startswith("pc1_peak:")}
    assert keys == {"pc1_peak:1-2", "pc1_peak:1-4", "pc1_peak:1-8", "pc1_peak:1-16", "pc1_peak:3-6", "pc1_peak:5-12"}
    assert math.isclose(s["pc1_peak:1-16"], s["pc1_peak:1-8"])  # the same 8 modes
