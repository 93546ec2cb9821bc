"""Mutation audit of ``attach()``'s picks and hooks: a negative int pick counts from the end of a tuple
output (Python indexing, as documented), checked against float64 rows gathered by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x):
        y = self.lin(x)
        return y, torch.tanh(y) * 3.0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _Pair()

    def forward(self, x):
        return self.pair(x)


def _cov_eigs(rows):
    return np.clip(np.linalg.eigvalsh(np.cov(rows, rowvar=False))[::-1], 0, None)


@pytest.mark.parametrize("pick, index", [(-1, 1), (-2, 0), (1, 1)])
def test_a_negative_int_pick_counts_from_the_end(pick, index):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    with sl.attach(net, "pair", pick=pick, precision="float64") as cap:
        net(x)
    got = cap.compute()["pair"].values.numpy()
    with torch.no_grad():
        ref = _cov_eigs(net(x)[index].reshape(-1, 4).numpy())
    assert np.abs(got - ref).max() <= 1e-12 * ref[0]
    with pytest.raises(IndexError, match=r"pair: pick=-3 is out of range.*tuple of 2 element"):
        with sl.attach(net, "pair", pick=-3):
            net(x)


def test_a_mask_applies_inside_its_block_only_and_nested_blocks_restore_the_outer_mask():
    torch.manual_seed(1)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    keep = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    with sl.attach(lin, "", precision="float64") as cap:
        with cap.mask(keep):
            with cap.mask(None):
                lin(x)  # all 10 rows
            lin(x)  # the outer mask again: 6 rows
        lin(x)  # no mask after the block: 10 rows
    assert cap.compute()[""].n_rows == 26
    with torch.no_grad():
        y = lin(x)
    rows = torch.cat([y.reshape(-1, 3), y[keep], y.reshape(-1, 3)]).numpy()
    ref = _cov_eigs(rows)
    assert np.abs(cap.compute()[""].values.numpy() - ref).max() <= 1e-12 * ref[0]


class _RefusesHooks(nn.Linear):
    """A module that cannot take a forward hook (as some wrapped or scripted modules cannot)."""

    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError("this module takes no forward hooks")


def test_an_attach_that_fails_midway_leaves_no_hook_on_the_modules_it_already_hooked():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), _RefusesHooks(2, 2))
    with pytest.raises(RuntimeError, match="takes no forward hooks"):
        sl.attach(net, ["0", "1", "2"])
    assert [len(m._forward_hooks) for m in net] == [0, 0, 0]
