"""Mutation audit of SpectralLens's protocol details: the default tail window follows the depth of the
model's stack, a user's pick applies to the lens's own choice of blocks, and the record keeps
``val_loss`` in its own field only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import SpectralLens
from spectral_lens.records import RunInfo, RunRecord, RunWriter

from support.models import TinyLM, lm_pool


def _model():
    torch.manual_seed(0)
    return TinyLM(tied=False, dropout=0.0).double()


class _Deep(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(2, 2) for _ in range(depth))


@pytest.mark.parametrize("depth, want", [(3, (100, 200)), (20, (200, 400)), (40, (400, 800))])
def test_default_tail_window_follows_the_depth_of_the_stack(depth, want):
    lens = SpectralLens(_Deep(depth), [torch.zeros(1, 2)], params=(), progress=False)
    assert lens._windows() == (want, (10, 40)) == (sl.tail_window(depth), (10, 40))


def test_a_users_pick_applies_to_the_blocks_the_lens_chose():
    model, pool = _model(), lm_pool(n_batches=2)
    plain = SpectralLens(model, pool, layers="all", params=(), precision="float64", progress=False).measure(0, 0)
    doubled = SpectralLens(model, pool, layers="all", params=(), precision="float64", progress=False,
                           pick=lambda out: 2 * out).measure(0, 0)
    for name in ("act:h.0", "act:h.2"):
        want = 4 * plain.spectra[name].values
        torch.testing.assert_close(doubled.spectra[name].values, want, rtol=1e-12, atol=1e-12 * float(want[0]))


def test_the_record_keeps_val_loss_in_its_own_field_only(tmp_path):
    writer = RunWriter(tmp_path / "r", RunInfo("r", total_tokens=100, n_layer=3), fsync=False)
    lens = SpectralLens(_model(), lm_pool(n_batches=2), writer=writer, layers="h.0", progress=False)
    m = lens.measure(1, 10, val_loss=2.5)
    writer.close()
    back = RunRecord.open(tmp_path / "r").measurements[0]
    assert m.scalars["val_loss"] == 2.5 == back.val_loss
    assert {k: (s.metadata["step"], s.metadata["tokens"]) for k, s in m.spectra.items()} == {
        "act:h.0": (1, 10), "grad:h.2.attn.c_proj.weight": (1, 10)}
    assert set(back.scalars) == set(m.scalars) - {"val_loss"} == {"noise_scale", "noise_scale:h.2.attn.c_proj.weight"}
