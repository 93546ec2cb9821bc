"""Protocol sections 1 and 4 (paper Sec. 2, App. B): spectra are measured on a **fixed** held-out pool,
the same sequences at every checkpoint. A shuffling DataLoader is fine where the spectrum does not
depend on the order (the whole pool); it is not when only part of each pass is measured: with
``gradient_samples`` below the pool's size the lens took the first M sequences of a fresh shuffle at
every checkpoint, so the gradient spectrum of unchanged weights changed between measurements."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from spectral_lens import SpectralLens

from support.models import TinyLM

GRAD = "grad:h.2.attn.c_proj.weight"


def _setup():
    torch.manual_seed(0)
    model = TinyLM(tied=False).double().eval()
    seq = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(0))
    return model, TensorDataset(seq[:, :-1], seq[:, 1:]), seq


def _hand_gradient_spectrum(model, x, y):
    """Squared singular values of G (M x P), one row per sequence: grad of its mean token loss (float64)."""
    w = model.h[2].attn.c_proj.weight
    rows = []
    for m in range(x.shape[0]):
        loss = torch.nn.functional.cross_entropy(model(x[m : m + 1])[0], y[m], reduction="mean")
        rows.append(torch.autograd.grad(loss, w)[0].flatten())
    return torch.linalg.svdvals(torch.stack(rows)) ** 2


def test_shuffled_pool_capped_by_gradient_samples_is_refused():
    model, ds, _ = _setup()
    with pytest.raises(ValueError, match="fixed held-out pool"):
        SpectralLens(model, DataLoader(ds, batch_size=3, shuffle=True), gradient_samples=4, progress=False)
    with pytest.raises(ValueError, match="gradient_pool .*shuffles"):
        SpectralLens(model, [ds[:6]], gradient_pool=DataLoader(ds, batch_size=3, shuffle=True),
                     gradient_samples=4, progress=False)


@pytest.mark.parametrize("loader, why", [
    (lambda ds: DataLoader(ds, batch_size=3, sampler=WeightedRandomSampler([1.0] * 12, 12)), "replacement"),
    (lambda ds: DataLoader(ds, batch_size=5, shuffle=True, drop_last=True), "drop_last"),
])
def test_pools_whose_passes_differ_are_refused(loader, why):
    model, ds, _ = _setup()
    with pytest.raises(ValueError, match=why):
        SpectralLens(model, loader(ds), progress=False)


def test_fixed_pool_measures_the_first_m_sequences_at_every_checkpoint():
    model, ds, seq = _setup()
    lens = SpectralLens(model, DataLoader(ds, batch_size=3), gradient_samples=4, progress=False)
    torch.manual_seed(1)
    a = lens.measure(0, 0).spectra[GRAD].values
    torch.manual_seed(2)
    b = lens.measure(1, 0).spectra[GRAD].values
    ref = _hand_gradient_spectrum(model, seq[:4, :-1], seq[:4, 1:])
    torch.testing.assert_close(a[: ref.numel()], ref, rtol=1e-10, atol=1e-12 * float(ref[0]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shuffled_pool_without_a_cap_is_accepted_and_order_invariant():
    # every sequence of the pool enters: the covariance and the Gram spectrum do not depend on the order
    model, ds, seq = _setup()
    lens = SpectralLens(model, DataLoader(ds, batch_size=3, shuffle=True), progress=False)
    torch.manual_seed(1)
    got = lens.measure(0, 0).spectra[GRAD].values
    ref = _hand_gradient_spectrum(model, seq[:, :-1], seq[:, 1:])
    torch.testing.assert_close(got[: ref.numel()], ref, rtol=1e-10, atol=1e-12 * float(ref[0]))
