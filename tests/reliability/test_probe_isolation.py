"""Measuring per-sample gradients leaves every buffer bit-identical (also with ``train_mode=True``,
where BatchNorm updates its running statistics), and bad arguments get errors that name them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spectral_lens._warnings import NonFiniteError
from spectral_lens.gradients import PerSampleGradientProbe


class BNNet(nn.Module):
    """(B, T, 6) -> (B, 3): Linear, BatchNorm over channels and time, mean pool, Linear head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1  # a custom buffer mutated on every forward
        h = self.bn(self.inp(x).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(h).mean(1))


def _loss(out, batch):
    return F.cross_entropy(out, batch[1], reduction="none")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, 6, generator=g), torch.randint(0, 3, (6,), generator=g)


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("engine", ["auto", "loop"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_measuring_leaves_every_buffer_bit_identical(engine, train_mode):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model(_batch(9)[0])  # non-trivial running statistics
    model.eval()
    before = _buffers(model)
    refs = {n: b for n, b in model.named_buffers()}
    probe = PerSampleGradientProbe(model, "head.weight", loss_fn=_loss, forward_fn=lambda m, b: m(b[0]),
                                   engine=engine, chunk_size=3, train_mode=train_mode)
    for seed in range(2):
        probe.update(_batch(seed))
    spec = probe.compute()
    assert spec.n_rows == 12 and bool((spec.values > 0).any())
    after = dict(model.named_buffers())
    assert after.keys() == before.keys()
    for n in before:
        assert after[n] is refs[n], n  # the same tensor objects
        assert after[n].dtype == before[n].dtype and torch.equal(after[n], before[n]), (n, before[n], after[n])
    assert not model.training


def test_buffers_restored_when_update_raises():
    model = BNNet()
    before = _buffers(model)

    def failing_loss(out, batch):
        raise RuntimeError("loss failed")

    probe = PerSampleGradientProbe(model, "head.weight", loss_fn=failing_loss, forward_fn=lambda m, b: m(b[0]),
                                   engine="loop", train_mode=True)
    with pytest.raises(RuntimeError, match="loss failed"):
        probe.update(_batch(0))
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("params", [5, 2.5, ["head.weight", 3]])
def test_params_of_the_wrong_type_are_named(params):
    with pytest.raises(TypeError, match=r"params must be .*\(str\), got (int|float)"):
        PerSampleGradientProbe(BNNet(), params)


def test_a_custom_loss_returning_inf_is_named_without_the_ignore_index_hint():
    def exploding_loss(out, batch):
        return (out**2).sum(-1) + float("inf")

    probe = PerSampleGradientProbe(BNNet(), "head.weight", loss_fn=exploding_loss, forward_fn=lambda m, b: m(b[0]))
    with pytest.raises(NonFiniteError, match="exploding_loss") as info:
        probe.update(_batch(0))
    assert "ignore_index" not in str(info.value)
    assert "finite per-sample losses" in str(info.value)
