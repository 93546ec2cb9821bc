"""Review 30 (grad30): per-sample gradients against an independent float64 reference, adversarial layouts.

(a) A probed ``nn.Linear`` applied to a tensor the samples share, whose dimension 0 is not the sample
index: a position table ``(T, d)`` (or Transformer-XL's ``(T, 1, d)``) projected once and broadcast over
the batch. Where ``T`` differs from the chunk's ``M`` the fast path's shape check refuses it; where
``T == M`` (``chunk_size == T``, or a last chunk of ``T`` samples) the check passed and the rows were
per-position gradients, silently (1.3 relative error). The even-samples backward that tells a
sequence-first ``(T, M, d)`` layout apart now runs for every call whose dimension 0 has the chunk's
``M`` when ``M`` is also a size the batch holds beyond dimension 0 (the sequence length).

(b) Uses the fast path serves exactly: one layer applied twice (the second call on the first's output),
the same layer in two branches, 4-D ``(B, T, H, d)`` inputs, non-contiguous and stride-0 inputs, keyword
calls, a layer of a per-sample pooled input with ``T == M``; and the measurement leaves a pre-existing
``.grad`` (gradient accumulation), optimizer state, modes and RNG streams as they were.
"""

from __future__ import annotations

import copy
import re
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss

VOCAB, D = 23, 8


def _batch(m, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (m, t + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _reference(model, names, batch):
    """float64 rows: a copy of the model, one ``torch.autograd.grad`` of each sample's own mean loss."""
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters(remove_duplicate=False))
    rows = {k: [] for k in names}
    for i in range(batch[0].shape[0]):
        sample = (batch[0][i : i + 1], batch[1][i : i + 1])
        gs = torch.autograd.grad(causal_lm_loss(m64(sample[0]), sample).sum(), [named[k] for k in names])
        for k, g in zip(names, gs):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(16, D)
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, VOCAB)


# ---------------------------------------------------------------------- (a) a shared tensor with T == M rows
class PositionProjection(_LM):
    """``lin`` projects the position table once, ``(T, d)`` (or ``(T, 1, d)``), broadcast over the samples."""

    def __init__(self, layout="2d"):
        super().__init__()
        self.layout = layout

    def forward(self, ids):
        table = self.pos.weight[: ids.shape[1]]
        if self.layout == "2d":
            shared = self.lin(table)
        else:  # Transformer-XL's relative-position layout
            shared = self.lin(table[:, None]).transpose(0, 1)
        return self.head(torch.tanh(self.emb(ids) + shared))


class PooledPerSample(_LM):
    """``lin`` sees ``(M, d)``, one pooled row per sample: dimension 0 is the sample index."""

    def forward(self, ids):
        h = self.emb(ids) + self.pos.weight[: ids.shape[1]]
        return self.head(torch.tanh(h + self.lin(h.mean(1))[:, None]))


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("m, t, chunk", [(12, 6, 6), (12, 5, 5)])  # every chunk T == M; two of three chunks
def test_a_layer_of_a_shared_position_table_with_t_equal_to_the_chunk_leaves_the_fast_path(layout, m, t, chunk):
    torch.manual_seed(0)
    model, batch = PositionProjection(layout).double().eval(), _batch(m, t)
    names = ["lin.weight", "lin.bias"]
    ref = _reference(model, names, batch)
    probe = PerSampleGradientProbe(model, names, chunk_size=chunk, keep_matrix=True).update(batch)
    assert probe.engines_ == {k: "vmap" for k in names}
    for k in names:
        assert _rel(probe.matrix(k), ref[k]) <= 1e-10, k  # before: 1.3 (fast-path rows per position)
        r = ref[k]
        ev = torch.linalg.eigvalsh(r @ r.T).flip(0)[: probe.compute()[k].dim]
        torch.testing.assert_close(probe.compute()[k].values.double(), ev, rtol=1e-10, atol=1e-10 * float(ev[0]))
    shape = "(6, 8)" if layout == "2d" else "(6, 1, 8)"
    if t == 6:
        with pytest.raises(ValueError, match=r"engine='fast' impossible for lin\.weight: .*" + re.escape(shape)):
            PerSampleGradientProbe(copy.deepcopy(model), "lin.weight", engine="fast", chunk_size=chunk).update(batch)


class Routed(_LM):
    """A mixture-of-experts-like layer: ``lin`` sees the tokens with id < 3, gathered across the samples
    as ``(k, d)``, and its output is added back at their positions."""

    def forward(self, ids):
        h = self.emb(ids)
        flat, sel = h.reshape(-1, D), (ids.reshape(-1) < 3).nonzero().squeeze(1)
        return self.head(flat.index_add(0, sel, torch.tanh(self.lin(flat[sel]))).view_as(h))


def test_tokens_gathered_across_samples_as_many_as_the_chunk_leave_the_fast_path():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 7), generator=g)
    ids[0, 1], ids[0, 4], ids[2, 2], ids[3, 5] = 0, 1, 2, 0  # 4 routed tokens in each chunk of 4 samples,
    ids[4, 1], ids[5, 3], ids[5, 5], ids[7, 2] = 1, 2, 0, 1  # 2 of them in one sample
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    torch.manual_seed(0)
    model = Routed().double().eval()
    ref = _reference(model, ["lin.weight"], batch)["lin.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot trace nonzero(): the loop, with EngineFallbackWarning
        probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True).update(batch)
    assert probe.engines_ == {"lin.weight": "loop"}
    assert _rel(probe.matrix("lin.weight"), ref) <= 1e-10  # before: 0.96
    with pytest.raises(ValueError, match=r"engine='fast' impossible for lin\.weight: .*\(4, 8\).*gathered"):
        PerSampleGradientProbe(copy.deepcopy(model), "lin.weight", engine="fast", chunk_size=4).update(batch)


def test_a_per_sample_two_dimensional_input_with_t_equal_to_the_chunk_keeps_the_fast_path():
    """The check does not send a per-sample ``(M, d)`` layer away from the fast path."""
    torch.manual_seed(0)
    model, batch = PooledPerSample().double().eval(), _batch(8, 4)
    names = ["lin.weight", "lin.bias"]
    ref = _reference(model, names, batch)
    probe = PerSampleGradientProbe(model, names, engine="fast", chunk_size=4, keep_matrix=True).update(batch)
    for k in names:
        assert _rel(probe.matrix(k), ref[k]) <= 1e-10, k


# ---------------------------------------------------------------------- (b) uses the fast path serves exactly
def _twice(s, h):  # the second call on the first call's output: the row is the sum over both calls
    return s.lin(torch.tanh(s.lin(h)))


def _branches(s, h):  # the same layer in two branches
    return torch.tanh(s.lin(h)) * torch.sigmoid(s.lin(h.flip(-1)))


def _four_d(s, h):  # (B, T, H, d): a layer on heads of width d / 2, its transpose's rows as input
    return s.per_head(h.view(*h.shape[:2], 2, D // 2)).reshape(h.shape)


def _transposed(s, h):  # a non-contiguous input
    return s.lin(h.transpose(1, 2).contiguous().transpose(1, 2))


def _stride_zero(s, h):  # expanded inputs: stride 0 along the tokens, and along the samples
    return s.lin(h.mean(1, keepdim=True).expand_as(h)) + s.lin(s.emb.weight[:1].expand_as(h)) * h


def _keyword(s, h):
    return s.lin(input=h)


def _pooled(s, h):  # 2-D per-sample input (M, d), T != M
    return h + s.lin(h.mean(1))[:, None]


class Uses(_LM):
    def __init__(self, use):
        super().__init__()
        self.use, self.per_head = use, nn.Linear(D // 2, D // 2)

    def forward(self, ids):
        h = self.emb(ids) + self.pos.weight[: ids.shape[1]]
        return self.head(torch.tanh(self.use(self, h)))


USES = [_twice, _branches, _four_d, _transposed, _stride_zero, _keyword, _pooled]


def _trained(use):
    """A model with a pre-existing ``.grad`` (an accumulated micro-batch), AdamW state and mixed modes."""
    torch.manual_seed(0)
    model = Uses(use).double().train()
    model.head.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _batch(3, 6, seed=1)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    return model, opt


@pytest.mark.parametrize("use", USES, ids=lambda f: f.__name__.strip("_"))
def test_fast_path_uses_against_float64_and_no_side_effects(use):
    model, opt = _trained(use)
    names = ["per_head.weight", "per_head.bias"] if use is _four_d else ["lin.weight", "lin.bias"]
    batch = _batch(7, 6)  # chunks of 3, 3, 1
    ref = _reference(model.eval(), names, batch)
    model.train()
    model.head.eval()
    grads = {k: (p.grad, None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}
    assert grads[names[0]][0] is not None and grads["pos.weight"][0] is not None  # an accumulated micro-batch
    state = copy.deepcopy(opt.state_dict())
    before = model(batch[0]).detach()
    rng, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    probe = PerSampleGradientProbe(model, names, engine="fast", chunk_size=3, keep_matrix=True).update(batch)
    for k in names:
        assert _rel(probe.matrix(k), ref[k]) <= 1e-10, k
    ns, r = probe.noise_scale()[names[0]], ref[names[0]]
    mean = r.mean(0)
    trace = float(((r - mean) ** 2).sum()) / 6  # the centred sample variance, summed over coordinates
    assert ns.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert ns.grad_norm_sq == pytest.approx(float(mean @ mean) - trace / 7, rel=1e-9, abs=1e-12 * trace)
    for k, p in model.named_parameters():  # .grad: the same tensor object, the same values
        assert p.grad is grads[k][0] and (p.grad is None or torch.equal(p.grad, grads[k][1])), k
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    torch.testing.assert_close(opt.state_dict(), state, rtol=0, atol=0)
    assert torch.equal(model(batch[0]).detach(), before)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_duplicated_samples_single_tokens_and_uneven_chunks_against_float64(engine):
    """Three distinct sequences, each twice (one with a single real target, one with every other target
    ignored), in chunks of 4 (not dividing M = 6): rank 3, every value as float64's; then M = 2."""
    torch.manual_seed(0)
    model = Uses(_twice).double().eval()
    x, y = _batch(3, 6)
    y[0, 1:] = -100
    y[1, ::2] = -100
    batch = (torch.cat([x, x]), torch.cat([y, y]))
    names = ["lin.weight"]
    r = _reference(model, names, batch)["lin.weight"]
    probe = PerSampleGradientProbe(model, names, engine=engine, chunk_size=4, keep_matrix=True).update(batch)
    assert _rel(probe.matrix("lin.weight"), r) <= 1e-10
    values = probe.compute().values.double()
    ref = torch.linalg.svdvals(r) ** 2
    torch.testing.assert_close(values[:3], ref[:3], rtol=1e-10, atol=0)
    assert float(values[3:].max()) <= 1e-13 * float(values[0])  # duplicated rows: rank 3
    two = PerSampleGradientProbe(copy.deepcopy(model), names, engine=engine, keep_matrix=True).update((x[1:], y[1:]))
    assert _rel(two.matrix("lin.weight"), r[1:3]) <= 1e-10
    ns, mean = two.noise_scale(), r[1:3].mean(0)
    assert ns.trace_sigma == pytest.approx(float(((r[1:3] - mean) ** 2).sum()), rel=1e-10)  # M / (M - 1) = 2
