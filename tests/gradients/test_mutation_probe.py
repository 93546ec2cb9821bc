"""Gaps found by mutation testing of ``PerSampleGradientProbe``'s bookkeeping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_lens import NonFiniteError
from spectral_lens.gradients import PerSampleGradientProbe
from support.models import TinyGPT, lm_batch

NAME = "transformer.h.1.attn.c_proj.weight"


def test_non_finite_gradient_names_the_sample_counted_from_the_first_update():
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    bad_at = []

    def loss_fn(out, batch):  # finite values; an infinite gradient for the samples in bad_at
        losses = nn.functional.cross_entropy(out.transpose(1, 2), batch[1], reduction="none").mean(1)
        rows = [losses[i : i + 1] + (losses[i : i + 1] - losses[i : i + 1].detach()).abs().sqrt() if i in bad_at
                else losses[i : i + 1] for i in range(losses.shape[0])]
        return torch.cat(rows)

    probe = PerSampleGradientProbe(model, NAME, loss_fn=loss_fn, chunk_size=2).update(lm_batch(m=3, seed=1))
    bad_at.append(1)
    with pytest.raises(NonFiniteError, match=rf"{NAME}: non-finite per-sample gradient for sample\(s\) \[4\]"):
        probe.update(lm_batch(m=3, seed=2))
    assert probe.n_samples_ == 3  # rolled back


def test_measuring_mode_is_train_mode_not_the_callers():
    """``train_mode=False`` (default) measures in eval mode even for a model left in train mode (no
    dropout: the rows equal those of the same model in eval mode), ``train_mode=True`` in train mode
    even for a model in eval mode (dropout: identical sequences get different rows); the caller's
    mode is restored either way."""
    torch.manual_seed(0)
    model = TinyGPT(dropout=0.5).double()
    x, y = lm_batch(m=1, seed=3)
    batch = (x.repeat(3, 1), y.repeat(3, 1))
    model.train()
    got = PerSampleGradientProbe(model, NAME, keep_matrix=True).update(batch).matrix()
    assert model.training
    model.eval()
    ref = PerSampleGradientProbe(model, NAME, keep_matrix=True).update(batch).matrix()
    assert torch.equal(got, ref) and torch.equal(got[0], got[1])
    noisy = PerSampleGradientProbe(model, NAME, keep_matrix=True, train_mode=True).update(batch).matrix()
    assert not model.training
    assert not torch.equal(noisy[0], noisy[1])


def test_more_samples_than_parameters_gives_dim_p(helpers):
    """M > P: ``G`` (M x P) has at most P non-zero singular values; the spectrum has ``dim = P`` and
    P values, the float64 reference's squared singular values."""
    import numpy as np

    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    name = "transformer.h.1.attn.c_proj.bias"  # 16 parameters
    batch = lm_batch(m=20, t=4, seed=5)
    spec = PerSampleGradientProbe(model, name).update(batch).compute()
    ref = helpers.sq_singular_values(helpers.reference_rows(model, [name], batch, helpers.lm_sample_loss)[name])
    assert spec.dim == 16 and spec.n_rows == 20 and spec.values.shape == (16,)
    assert np.abs(spec.values.numpy() - ref).max() <= 1e-10 * ref.max()
