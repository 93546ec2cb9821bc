"""Review 24 (probe2): ``auto`` takes the loop at binding under InstanceNorm updating its running statistics.

``F.instance_norm`` updates the running statistics it is given whenever it normalizes by the input's statistics:
an ``InstanceNorm*`` with ``track_running_stats=True`` in train mode, and one whose ``track_running_stats`` was
switched off after construction (buffers kept) in either mode. That in-place write fails under ``torch.func``, so
``engine='auto'`` tried vmap in the first pass, failed, warned (``EngineFallbackWarning``) and fell back to the
loop; now it chooses the loop at binding (as for BatchNorm in train mode), no warning, the rows bit-identical to
``engine='loop'`` and to the fallback's, checked against a float64 per-sample reference. Also after a fast path
found unusable in the pass (a sequence-first layer), where ``auto`` took vmap whatever the running statistics.

A module of another class with running buffers (a BatchNorm-like layer of one's own) is not recognized (a frozen
BatchNorm keeps them unchanged, and vmap measures it): ``auto`` still falls back there, rows equal to the loop's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import spectral_lens as sl


def _loss(out, batch):
    return out.pow(2).sum((1, 2))


class _Net(nn.Module):
    """``emb -> norm over the sequence -> o``; ``seq_first``: ``o`` sees ``(T, M, d)`` (its fast path is found
    unusable in the first pass)."""

    def __init__(self, norm: nn.Module, seq_first: bool = False) -> None:
        super().__init__()
        self.emb, self.norm, self.o = nn.Embedding(11, 8), norm, nn.Linear(8, 8)
        self.seq_first = seq_first

    def forward(self, ids):
        h = self.norm(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        if self.seq_first:
            return torch.cumsum(self.o(h.transpose(0, 1)), 0).transpose(0, 1)
        return self.o(h)


class _OwnBatchNorm(nn.Module):
    """A BatchNorm-like layer of one's own (not a torch class): running buffers, updated in train mode."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, 0.1, 1e-5)


def _net(norm: str, seq_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = _OwnBatchNorm(8) if norm == "own" else nn.InstanceNorm1d(8, affine=True, track_running_stats=True)
    if norm == "switched_off":
        layer.track_running_stats = False  # buffers kept: F.instance_norm still gets (and updates) them
    model = _Net(layer, seq_first).double()
    with torch.no_grad():  # running statistics away from their initial values
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    return model


IDS = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(0))


def _matrix(model, param, engine, train_mode, expect_warning=False):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = sl.PerSampleGradientProbe(model, param, loss_fn=_loss, train_mode=train_mode, keep_matrix=True,
                                          engine=engine)
        bound = dict(probe.engines_)
        probe.update(IDS)
    fell = [w for w in caught if issubclass(w.category, sl.EngineFallbackWarning)]
    assert bool(fell) == expect_warning, [str(w.message) for w in caught]
    return bound, probe


def _reference(norm, param, train_mode, seq_first=False):
    """float64 per sample: each sequence alone through a fresh copy (its own statistics, its own buffer update)."""
    rows = []
    for i in range(len(IDS)):
        m = _net(norm, seq_first).train(train_mode)
        rows.append(torch.autograd.grad(_loss(m(IDS[i : i + 1]), None).sum(), m.get_parameter(param))[0].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("norm, train_mode", [("tracked", True), ("switched_off", True), ("switched_off", False)])
def test_auto_takes_the_loop_at_binding_under_instancenorm_updating_running_statistics(norm, train_mode):
    model = _net(norm)
    state = copy.deepcopy(model.state_dict())
    bound, auto = _matrix(model, "emb.weight", "auto", train_mode)
    assert bound == auto.engines_ == {"emb.weight": "loop"}  # at binding: no vmap attempt, no warning
    _, loop = _matrix(_net(norm), "emb.weight", "loop", train_mode)
    assert torch.equal(auto.matrix(), loop.matrix())
    for k, v in model.state_dict().items():  # running statistics as they were
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(auto.matrix().double(), _reference(norm, "emb.weight", train_mode), rtol=1e-12,
                               atol=1e-14)


def test_instancenorm_by_running_statistics_keeps_vmap():
    """Unchanged: ``track_running_stats=True`` in eval mode reads its buffers (vmap traces that)."""
    bound, probe = _matrix(_net("tracked"), "emb.weight", "auto", False)
    assert bound == probe.engines_ == {"emb.weight": "vmap"}


def test_a_fast_path_found_unusable_goes_to_the_loop_under_running_statistics():
    """Bound on the fast path (InstanceNorm does not mix samples), found sequence-first in the pass: the loop."""
    bound, auto = _matrix(_net("tracked", seq_first=True), "o.weight", "auto", True)
    assert bound == {"o.weight": "fast"} and auto.engines_ == {"o.weight": "loop"}
    _, loop = _matrix(_net("tracked", seq_first=True), "o.weight", "loop", True)
    assert torch.equal(auto.matrix(), loop.matrix())
    torch.testing.assert_close(auto.matrix().double(), _reference("tracked", "o.weight", True, seq_first=True),
                               rtol=1e-12, atol=1e-14)


def test_a_norm_layer_of_ones_own_still_falls_back_to_the_loop():
    """Documented: not recognized at binding; the fallback's rows are the loop's."""
    bound, auto = _matrix(_net("own"), "emb.weight", "auto", True, expect_warning=True)
    assert bound == {"emb.weight": "vmap"} and auto.engines_ == {"emb.weight": "loop"}
    _, loop = _matrix(_net("own"), "emb.weight", "loop", True)
    assert torch.equal(auto.matrix(), loop.matrix())
