"""Shared fixtures of the analysis tests: synthetic Theorem-6 sweeps written as run records."""

from __future__ import annotations

import pytest

from spectral_lens.analysis.synthetic import write_theorem6_sweep
from spectral_lens.records import open_runs

TIERS = (1, 2, 4, 8, 16, 32)


@pytest.fixture(scope="session")
def clean_sweep_dir(tmp_path_factory):
    """Exact Theorem-6 sweep: ordering of token efficiency known by construction."""
    root = tmp_path_factory.mktemp("clean")
    write_theorem6_sweep(root, TIERS, family="toy")
    return root


@pytest.fixture(scope="session")
def noisy_sweep_dir(tmp_path_factory):
    """Same sweep with multiplicative log-normal noise (sd 0.3) on every eigenvalue."""
    root = tmp_path_factory.mktemp("noisy")
    write_theorem6_sweep(root, TIERS, family="toy", noise=0.3, seed=0)
    return root


@pytest.fixture()
def clean_runs(clean_sweep_dir):
    return open_runs([clean_sweep_dir])


@pytest.fixture()
def noisy_runs(noisy_sweep_dir):
    return open_runs([noisy_sweep_dir])
