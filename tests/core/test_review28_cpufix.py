"""Review 28 (cpufix): the CPU one-chunk update's product panels (128 rows) and the small-d lower-triangle
float64 add (128-row blocks up to d = 256) cover the whole lower triangle and keep fp32 accuracy against a
float64 reference."""

import numpy as np
import pytest
import torch

from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens import _lower_s
from spectral_lens.spectra import moments


@pytest.mark.parametrize("d", [127, 128, 129, 200, 256, 257, 384, 768])
def test_lower_panels_cover_the_lower_triangle(d):
    y = torch.randn(40, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    out = torch.full((d, d), float("nan"), dtype=torch.float64)
    for a, b, o in moments.lower_panels(y, out):
        torch.mm(a, b, out=o)
    ref = y.T @ y
    low = torch.tril(torch.ones(d, d, dtype=torch.bool))
    assert torch.equal(torch.isnan(out[low]), torch.zeros(int(low.sum()), dtype=torch.bool))
    torch.testing.assert_close(out[low], ref[low], rtol=1e-12, atol=1e-12)
    if d >= 128:
        assert len(moments.lower_panels(y, out)) == -(-d // 128)


@pytest.mark.parametrize("d", [1, 2, 100, 127, 128, 129, 200, 255, 256, 257, 600])  # both block sizes
@pytest.mark.parametrize("in_place", [True, False])
def test_add_lower_covers_the_lower_triangle(d, in_place):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    b = torch.randn(d, d, generator=g)
    want = a + b.double()
    out = a.clone() if in_place else torch.full((d, d), float("nan"), dtype=torch.float64)
    _lower_s._add_lower(out if in_place else a, b, out)
    low = torch.tril(torch.ones(d, d, dtype=torch.bool))
    assert torch.equal(out[low], want[low])


@pytest.mark.parametrize("d", [256, 768])
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_cpu_updates_match_float64(d, precision):
    """The benchmark's rows (offset 5, spreads 3..0.1), 1,024-row updates: covariance within fp32 accuracy
    of a float64 reference."""
    g = torch.Generator().manual_seed(d)
    acc = ActivationCovarianceAccumulator(d, precision=precision)
    xs = [torch.randn(1024, d, generator=g) * torch.linspace(3, 0.1, d) + 5.0 for _ in range(3)]
    for x in xs:
        acc.update(x)
    x64 = torch.cat(xs).double()
    ref = torch.cov(x64.T, correction=1).numpy()
    got = acc.covariance().numpy()
    scale = np.abs(np.diag(ref)).max()
    assert np.abs(got - ref).max() < 2e-6 * scale
