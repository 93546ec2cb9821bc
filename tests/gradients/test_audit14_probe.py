"""PerSampleGradientProbe: stateful forwards and sequence-first layers with T == chunk_size.

(a) A forward that updates a buffer it reads (a counter, a renormalization by running statistics): each
pass (a chunk on the fast engine, a sample on the loop engine) saw the buffers the previous passes had
written, so the rows depended on ``chunk_size`` and on the engine, though the buffers were restored
afterwards. Every pass now starts from the buffers the measurement found.

(b) A layer fed sequence-first, ``(T, M, d)``, with ``T`` equal to the chunk's ``M``: the fast path's
shape check (the chunk's ``M`` in dimension 0) passed, and the rows were per-position gradients, silently.
Where dimensions 0 and 1 both hold ``M`` a backward of the even samples' losses tells the layouts apart.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe

VOCAB, D = 40, 8


def _forward(model, batch):
    return model(batch[0])


def _loss(logits, batch):
    return F.cross_entropy(logits.transpose(1, 2), batch[1], reduction="none").mean(1)


def _reference_gram(model, batch, param, train):
    """float64 G G^T from one autograd pass per sample, each on a fresh copy of the model (its buffers as
    the measurement found them)."""
    rows = []
    for i in range(batch[0].shape[0]):
        m = copy.deepcopy(model).train(train)
        sample = (batch[0][i : i + 1], batch[1][i : i + 1])
        (g,) = torch.autograd.grad(_loss(_forward(m, sample), sample).sum(), [m.get_parameter(param)])
        rows.append(g.reshape(-1))
    g = torch.stack(rows).double()
    return g @ g.T


def _gram(model, batch, param, **kw):
    probe = PerSampleGradientProbe(model, params=[param], forward_fn=_forward, loss_fn=_loss, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vmap engine's fallback to the loop
        probe.update(batch)
    return probe.gram(), probe.engines_[param]


# ------------------------------------------------------------------------------ (a) stateful forwards
class Drift(nn.Module):
    """Doubles a buffer in every forward (train mode only if ``train_only``) and scales by it."""

    def __init__(self, train_only: bool):
        super().__init__()
        self.train_only = train_only
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def forward(self, x):
        if self.training or not self.train_only:
            self.scale.mul_(2.0)
        return x * self.scale


class StatefulLM(nn.Module):
    def __init__(self, train_only: bool):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.drift = Drift(train_only)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, ids):
        return self.out(torch.tanh(self.drift(self.emb(ids))))


@pytest.mark.parametrize("train_mode", [True, False])
def test_stateful_forward_rows_do_not_depend_on_chunk_size_or_engine(train_mode):
    torch.manual_seed(0)
    model = StatefulLM(train_only=train_mode).double()
    ids = torch.randint(0, VOCAB, (6, 5))
    batch = (ids, torch.roll(ids, -1, dims=1))
    reference = _reference_gram(model, batch, "out.weight", train_mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for engine, chunk in [("fast", 6), ("fast", 1), ("fast", 4), ("loop", 6), ("auto", 4)]:
        gram, used = _gram(model, batch, "out.weight", engine=engine, chunk_size=chunk, train_mode=train_mode)
        assert torch.allclose(gram, reference, rtol=1e-10, atol=0), (engine, chunk, used)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # buffers as before


# ---------------------------------------------------------------------- (b) sequence-first, T == chunk
class SequenceFirst(nn.Module):
    """``mid`` sees ``(T, M, d)``, as a layer behind ``nn.Transformer``'s default layout."""

    def __init__(self, batch_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, D)
        self.mid = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        if self.batch_first:
            return self.out(torch.tanh(self.mid(h)))
        return self.out(torch.tanh(self.mid(h.transpose(0, 1))).transpose(0, 1))


def _causal_batch(n, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def test_sequence_first_layer_with_t_equal_to_chunk_size_leaves_the_fast_path():
    torch.manual_seed(0)
    model = SequenceFirst().double()
    t = 4
    batch = _causal_batch(8, t)
    reference = _reference_gram(model, batch, "mid.weight", False)
    gram, used = _gram(model, batch, "mid.weight", chunk_size=t)  # engine="auto"
    assert used == "vmap"
    assert torch.allclose(gram, reference, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"engine='fast' impossible for mid\.weight: .*\(4, 4, 8\).*sequence-first"):
        _gram(model, batch, "mid.weight", chunk_size=t, engine="fast")


def test_batch_first_layer_with_t_equal_to_chunk_size_keeps_the_fast_path():
    """The check does not send the ordinary (M, T, d) layout with T == M away from the fast path."""
    torch.manual_seed(0)
    model = SequenceFirst(batch_first=True).double()
    batch = _causal_batch(8, 4)
    reference = _reference_gram(model, batch, "mid.weight", False)
    gram, used = _gram(model, batch, "mid.weight", chunk_size=4, engine="fast")
    assert used == "fast"
    assert torch.allclose(gram, reference, rtol=1e-10, atol=0)


def test_rewind_reads_only_version_counters_and_the_exit_sees_data_writes(monkeypatch):
    """The probe puts back the buffers a pass wrote with ``preserved_buffers``' rewind: an unwritten buffer is
    judged on the host (no ``torch.equal``, which waits for a GPU, and no copy), a written or swapped one is
    put back from the block's one snapshot, also after several rewinds; the exit compares values, so it
    also restores a write through ``.data``, which bumps no version counter."""
    from spectral_lens.gradients import _isolation

    model = nn.BatchNorm1d(3)
    model.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    mean, var = model.running_mean, model.running_var
    before = mean.clone()
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(_isolation.torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    with _isolation.preserved_buffers(model) as rewind:
        version = mean._version
        rewind()
        assert calls == [] and mean._version == version  # nothing written: no comparison, no copy
        for _ in range(3):
            mean.add_(5.0)
            var.data = torch.full((4,), 7.0)  # swapped storage and shape: seen without a counter bump
            rewind()
            assert calls == []
            assert real_equal(mean, before) and real_equal(var, torch.ones(3))
            assert model.running_mean is mean and model.running_var is var
        var.add_(1.0)  # the snapshot was kept apart from the live buffer by the rewinds
        rewind()
        assert real_equal(var, torch.ones(3))
        mean.data.add_(1.0)  # a .data write: no version bump, not seen by a rewind
        rewind()
        assert not real_equal(mean, before)
    assert calls  # the exit compared
    assert real_equal(mean, before) and real_equal(var, torch.ones(3))
