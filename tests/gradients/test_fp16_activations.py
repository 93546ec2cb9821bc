"""float16 / bfloat16 activations with a large mean and a small spread, against float64.

``ActivationCovarianceAccumulator`` (what ``SpectralLens`` hooks feed) converts half-precision rows
exactly to float32 and centres them around a shift before the products, so a mean offset of 3e4
(near float16's largest value, 65504) with a spread of 1e-1 costs nothing beyond float32 products.
The reference is the covariance of the *same* half-precision values in float64 (the rounding of the
activations themselves is the model's, not the measurement's). Measured over this grid: every
eigenvalue above 1e-6 of the largest within 3.2e-6 relative ("exact") and 1.2e-10 ("float64").
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_lens import ActivationCovarianceAccumulator


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    offset=st.sampled_from([0.0, 1.0, 1e3, 3e4]),
    std=st.sampled_from([1e-3, 1e-1, 10.0]),
    updates=st.integers(1, 4),
    precision=st.sampled_from(["exact", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_half_activations_with_a_large_offset_match_float64(dtype, offset, std, updates, precision, seed):
    g = torch.Generator().manual_seed(seed)
    d = 24
    acc = ActivationCovarianceAccumulator(precision=precision)
    rows = []
    for _ in range(updates):
        z = torch.randn(97, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64) * std
        mean = offset * (1 + 0.01 * torch.randn(d, generator=g, dtype=torch.float64))
        x = (z + mean).to(dtype)
        acc.update(x)
        rows.append(x.double())
    x = torch.cat(rows)
    xc = x - x.mean(0)
    ref = torch.linalg.eigvalsh(xc.T @ xc / (x.shape[0] - 1)).flip(0)
    got = torch.as_tensor(np.asarray(acc.compute().values), dtype=torch.float64)
    if ref[0] == 0:  # the spread is below the offset's spacing: the half-precision rows are all equal
        assert bool((got == 0).all())
        return
    big = ref > ref[0] * 1e-6
    assert ((got[big] - ref[big]).abs() <= (2e-5 if precision == "exact" else 1e-9) * ref[big]).all()
