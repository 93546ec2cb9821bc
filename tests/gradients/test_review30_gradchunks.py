"""Review 30 (gradchunks): fast-path rows kept from chunks the fast path accepted by coincidence.

(1) A shared tensor of 3 dimensions, ``(K, a, d)`` with ``K == chunk_size`` and ``K`` not a size of the batch (a
table of learned slots projected once and broadcast over the samples), passed every check: with ``M`` a multiple
of the chunk size every row was wrong (0.69 relative), else the last, smaller chunk left the fast path and the
earlier ones kept their rows. The even-samples check now runs for such inputs too, once per (module, input shape,
dtype) signature per probe (layouts of shared tensors are static): an LM's ``(M, T, d)`` layers pay one extra
backward per distinct shape, not per chunk.

(2) A chunk the fast path refuses for its input's layout after an earlier chunk of the same update was accepted
(the acceptance was a coincidence the even-samples check cannot see: samples permuted within the even and within
the odd ones) kept the earlier chunks' wrong rows, and ``engines_`` said "vmap". The update is now measured again
from its start on the engines as they are then (rows and random draws as with ``engine="vmap"`` from the start);
rows of earlier updates, whose batches are not kept, raise a ``RuntimeError`` naming the parameter, the shapes
and ``engine='vmap'``. A refusal that is not the layout (the module not called in a chunk) keeps the rows.

Every value against a float64 per-sample autograd reference (the review-30 grad tests' helpers).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss
from spectral_lens.gradients import engines

from .test_review30_grad30 import VOCAB, D, _batch, _reference, _rel  # the float64 reference of review 30


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, VOCAB)


class Shared3D(_LM):
    """``lin`` projects a shared ``(K, 2, d)`` table (K = 4 learned slots), pooled and broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 2, D))

    def forward(self, ids):
        s = torch.tanh(self.lin(self.table)).mean((0, 1))
        return self.head(torch.tanh(self.emb(ids) + s))


class Slots(_LM):
    """``lin`` projects a shared ``(4, d)`` table; each sample adds the row its first token selects
    (``ids[:, 0] % 4``, per sample: the same alone as in a batch). With the first tokens of four samples selecting
    rows 2, 3, 0, 1 the even samples reach even rows only and every even row is reached by an even sample: the
    even-samples check passes, and the fast path's row ``m`` is the gradient of another sample."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, D))
        self.drop = nn.Dropout(dropout)

    def forward(self, ids):
        shared = self.lin(self.table)
        return self.head(self.drop(torch.tanh(self.emb(ids) + shared[ids[:, 0] % 4][:, None])))


def _slots_batch(m, t=5, seed=0, rows=(2, 3, 0, 1, 1, 2)):
    x, y = _batch(m, t, seed)
    x[:, 0] = torch.tensor(rows[:m])  # the first four samples: rows 2, 3, 0, 1
    return x, y


class Sequence(_LM):
    """A per-sample ``(M, T, d)`` layer (the LM case): its rows are the fast path's, whatever ``T``."""

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(torch.tanh(self.emb(ids)))))


# ---------------------------------------------------------------------- (1) a shared (K, a, d) tensor, K == chunk
@pytest.mark.parametrize("m", [8, 6])
def test_a_shared_three_dimensional_table_with_as_many_rows_as_the_chunk_leaves_the_fast_path(m):
    torch.manual_seed(0)
    model, batch = Shared3D().double().eval(), _batch(m, 6)
    ref = _reference(model, ["lin.weight"], batch)["lin.weight"]
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True).update(batch)
    assert _rel(probe.matrix("lin.weight"), ref) <= 1e-10  # 0.69 before
    assert probe.engines_ == {"lin.weight": "vmap"}
    with pytest.raises(ValueError, match=r"saw inputs of shape \(4, 2, 8\) for a chunk of 4 samples"):
        PerSampleGradientProbe(model, "lin.weight", chunk_size=4, engine="fast").update(batch)


def test_the_three_dimensional_check_runs_once_per_shape_and_keeps_per_sample_rows(monkeypatch):
    """An LM's ``(M, T, d)`` layer with ``T != M``: one even-samples check per input shape per probe (chunks of 4
    and a last chunk of 2: two shapes, whatever the number of updates), the rows exact, the fast path kept."""
    calls = []
    mixes = engines._mixes_rows
    monkeypatch.setattr(engines, "_mixes_rows", lambda even, full: calls.append(tuple(even.shape)) or mixes(even, full))
    torch.manual_seed(0)
    model = Sequence().double().eval()
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True)
    batches = [_batch(10, 6, seed) for seed in range(3)]
    for b in batches:
        probe.update(b)
    assert sorted(calls) == [(2, 6, D), (4, 6, D)]
    assert probe.engines_ == {"lin.weight": "fast"}
    both = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert _rel(probe.matrix("lin.weight"), _reference(model, ["lin.weight"], both)["lin.weight"]) <= 1e-10
    probe.reset().update(batches[0])
    assert len(calls) == 2  # per probe and model, not per accumulation
    probe.detach()
    probe.attach(model)
    probe.update(batches[0])
    assert len(calls) == 4  # bound again: checked again


# ---------------------------------------------------------------------- (2) refused after an earlier acceptance
@pytest.mark.parametrize("resident", [None, 4, 2])
@pytest.mark.parametrize("later", ["shape", "mixed"])
def test_a_layout_refused_in_a_later_chunk_measures_the_update_again(resident, later):
    """Chunks of 4: the first passes every check (samples permuted within the even and the odd ones); a later one
    is refused, by the shape check (a last chunk of 2 samples, M = 6) or by the even-samples check (a chunk of 4
    whose even sample selects an odd row, M = 8). The first chunk's rows were other samples' (kept before). The
    per-sample ``head`` keeps the fast path and its exact rows. Bounded-memory mode too (``max_resident_samples``)."""
    torch.manual_seed(0)
    m = 6 if later == "shape" else 8
    model, batch = Slots().double().eval(), _slots_batch(m, rows=(2, 3, 0, 1, 0, 1, 3, 2))
    names = ["lin.weight", "head.weight"]
    ref = _reference(model, names, batch)
    probe = PerSampleGradientProbe(model, names, chunk_size=4, keep_matrix=resident is None,
                                   max_resident_samples=resident).update(batch)
    assert probe.engines_ == {"lin.weight": "vmap", "head.weight": "fast"}
    for k in names:
        if resident is None:
            assert _rel(probe.matrix(k), ref[k]) <= 1e-10, k
        gram = ref[k] @ ref[k].T
        assert float((probe.gram(k) - gram).abs().max() / gram.abs().max()) <= 1e-10, k
    torch.testing.assert_close(probe.losses_, torch.stack([causal_lm_loss(model(batch[0][i:i + 1]),
                               (batch[0][i:i + 1], batch[1][i:i + 1]))[0] for i in range(m)]).detach(),
                               rtol=1e-12, atol=0)


def test_the_update_measured_again_draws_as_vmap_and_has_no_side_effects():
    """With dropout (``train_mode=True``) the update measured again has the rows, losses and random draws of
    ``engine='vmap'`` from the start, bit for bit; ``.grad``, modes, RNG streams, hooks, outputs as before."""
    torch.manual_seed(0)
    model, batch = Slots(dropout=0.3).double().eval(), _slots_batch(6)
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    grad = model.lin.weight.grad
    handle = model.lin.register_forward_hook(lambda m, a, o: None)
    before = model(batch[0]).detach()
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    rng, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True, train_mode=True).update(batch)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy)
    vmap = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True, train_mode=True,
                                  engine="vmap").update(batch)
    assert probe.engines_ == {"lin.weight": "vmap"}
    assert torch.equal(probe.matrix(), vmap.matrix()) and torch.equal(probe.losses_, vmap.losses_)
    assert not torch.equal(probe.matrix()[:2], probe.matrix()[2:4])  # dropout drew
    assert model.lin.weight.grad is grad and bool((grad == 1).all())
    assert not model.training and all(not m.training for m in model.modules())
    assert list(model.lin._forward_hooks) == [handle.id] and not model.lin._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(batch[0]).detach(), before)


@pytest.mark.parametrize("resident, engine", [(None, "auto"), (4, "auto"), (None, "fast")])
def test_a_layout_refused_after_earlier_updates_on_the_fast_path_raises(resident, engine):
    """Rows of an earlier update whose batch is not kept cannot be measured again: ``RuntimeError`` naming the
    parameter, the shapes and ``engine='vmap'``; the probe as before the update (its 4 samples, the fast
    engine), RNG streams and ``.grad`` untouched."""
    torch.manual_seed(0)
    model, batch = Slots().double().eval(), _slots_batch(6)
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, max_resident_samples=resident, engine=engine)
    probe.update((batch[0][:4], batch[1][:4]))
    assert probe.engines_ == {"lin.weight": "fast"}  # wrong rows, undetectable in that update
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=r"lin\.weight: the fast path measured it for the 4 samples of earlier "
                                           r"updates.*shape \(4, 8\).*chunk of 2 samples.*engine='vmap'"):
        probe.update((batch[0][4:], batch[1][4:]))
    assert probe.n_samples_ == 4 and probe.engines_ == {"lin.weight": "fast"}
    assert torch.equal(torch.get_rng_state(), rng) and model.lin.weight.grad is None
    assert all(p.requires_grad for p in model.parameters()) and not model.lin._forward_hooks
    vmap = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, engine="vmap", keep_matrix=True).update(batch)
    assert _rel(vmap.matrix(), _reference(model, ["lin.weight"], batch)["lin.weight"]) <= 1e-10  # the remedy


class Sometimes(_LM):
    """``lin`` runs only for chunks of more than 2 samples (a branch on the batch): a refusal that is no layout."""

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        return self.head(torch.tanh(self.lin(h)) if ids.shape[0] > 2 else h)


def test_a_module_not_called_in_a_later_chunk_keeps_the_earlier_rows():
    torch.manual_seed(0)
    model, batch = Sometimes().double().eval(), _batch(6, 5)
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True).update(batch)
    rows = probe.matrix()
    for i in range(6):  # the per-sample reference of what each chunk computed: the first 4 through lin
        sample = (batch[0][i : i + 1], batch[1][i : i + 1])
        lin = torch.tanh(model.emb(sample[0]))
        if i < 4:
            lin = torch.tanh(model.lin(lin))
            g = torch.autograd.grad(causal_lm_loss(model.head(lin), sample).sum(), model.lin.weight)[0]
            assert _rel(rows[i], g.reshape(-1)) <= 1e-10, i
        else:
            assert float(rows[i].abs().max()) == 0, i
    assert probe.engines_ == {"lin.weight": "vmap"}
    probe.update(batch)  # earlier updates on the fast path: no error for a refusal that is not the layout
    assert probe.n_samples_ == 12


def test_a_chunk_whose_losses_reach_nothing_does_not_vouch_for_its_shape():
    """A first chunk of zero-weighted losses (no gradient anywhere: the check sees nothing) does not mark the
    ``(4, 2, d)`` signature per-sample; the next chunk is checked and leaves the fast path."""
    torch.manual_seed(0)
    model, (x, y) = Shared3D().double().eval(), _batch(8, 6)
    w = torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64)

    def loss_fn(out, b):
        return causal_lm_loss(out, (b[0], b[1])) * b[2]

    ref = _reference(model, ["lin.weight"], (x, y))["lin.weight"] * w[:, None]
    probe = PerSampleGradientProbe(model, "lin.weight", forward_fn=lambda m, b: m(b[0]), loss_fn=loss_fn,
                                   chunk_size=4, keep_matrix=True).update((x, y, w))
    assert probe.engines_ == {"lin.weight": "vmap"}
    assert _rel(probe.matrix(), ref) <= 1e-10
