"""Review 30 (revgradchunks): adversarial review of the gradchunks pass (the update measured again when a layer
the fast path accepted is refused for its layout in a later chunk; the once-per-shape even-samples check).

(1) False positive: a refusal by the shape check whose input rows are not as many as an earlier accepted chunk's
samples is no evidence that the earlier acceptance was a coincidence. A model with a per-sequence path for a batch
of one (``lin`` on the one sample's ``(T, d)`` tokens) got its last chunk of 1 sample refused ("(5, 8) for a chunk
of 1 samples"): within an update the whole update was measured again on ``vmap`` (rows right, the work of every
chunk done twice), and after earlier updates ``update`` raised ``RuntimeError`` saying the earlier rows were wrong,
though they were exact (before gradchunks: that chunk went to ``vmap``, the update succeeded). Now such a refusal
keeps the earlier rows; a refused input with as many rows as an accepted chunk had samples (a shared table), or an
even-samples refusal, still measures again or raises (``test_review30_gradchunks.py``).

(2) Confirmed (no change): the update measured again in bounded-memory mode under train-mode dropout is bit for bit
``engine='vmap'``'s (Gram matrices, losses), and leaves numpy's and Python's RNG streams as they were.

Every value against a float64 per-sample autograd reference (the gradchunks tests' helpers).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss
from spectral_lens.gradients import probe as probe_module

from .test_review30_gradchunks import (
    _LM,
    D,
    Slots,
    _batch,
    _reference,
    _rel,
    _slots_batch,
)


class OnePath(_LM):
    """A batch of one sequence takes a per-sequence path (``lin`` on its ``(T, d)`` tokens, as generation code
    often does); any other batch the batched one. Per sample the same function: the fast path's rows are exact
    for chunks of several samples, and a chunk of 1 is refused by the shape check (``(T, d)``, ``T != 1``)."""

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        h = self.lin(h[0])[None] if ids.shape[0] == 1 else self.lin(h)
        return self.head(torch.tanh(h))


def test_a_shape_refusal_that_is_no_coincidence_keeps_earlier_updates_rows():
    torch.manual_seed(0)
    model, batch = OnePath().double().eval(), _batch(9, 5)
    ref = _reference(model, ["lin.weight"], batch)["lin.weight"]
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True)
    probe.update((batch[0][:8], batch[1][:8]))
    assert probe.engines_ == {"lin.weight": "fast"}
    probe.update((batch[0][8:], batch[1][8:]))  # RuntimeError before ("the rows held are wrong": they were not)
    assert probe.n_samples_ == 9 and probe.engines_ == {"lin.weight": "vmap"}
    assert _rel(probe.matrix(), ref) <= 1e-10


def test_a_shape_refusal_that_is_no_coincidence_does_not_measure_the_update_again(monkeypatch):
    calls = []
    vmap = probe_module.vmap_or_loop
    monkeypatch.setattr(probe_module, "vmap_or_loop", lambda *a, **k: calls.append(a[3]) or vmap(*a, **k))
    torch.manual_seed(0)
    model, batch = OnePath().double().eval(), _batch(9, 5)
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4, keep_matrix=True).update(batch)
    assert calls == [1]  # the last chunk alone (before: [1, 4, 4, 1], every chunk again on vmap)
    assert _rel(probe.matrix(), _reference(model, ["lin.weight"], batch)["lin.weight"]) <= 1e-10


class Table(_LM):
    """``lin`` on a shared ``(4, d)`` table; sample ``i`` of a chunk adds row ``i % 4`` of it (per-sample in chunks
    of 4, as a coincidence). In a later chunk of 2 samples the table keeps its 4 rows: the shape check refuses it,
    and the refused input has as many rows as the accepted chunks had samples."""

    def forward(self, ids):
        shared = self.lin(self.emb.weight[:4])
        return self.head(torch.tanh(self.emb(ids) + shared[torch.arange(ids.shape[0]) % 4][:, None]))


def test_a_shape_refusal_with_an_accepted_chunks_row_count_still_raises_after_earlier_updates():
    torch.manual_seed(0)
    model, batch = Table().double().eval(), _batch(6, 5)
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4)
    probe.update((batch[0][:4], batch[1][:4]))
    with pytest.raises(RuntimeError, match=r"lin\.weight: the fast path measured it.*shape \(4, 8\)"):
        probe.update((batch[0][4:], batch[1][4:]))
    assert probe.n_samples_ == 4 and probe.engines_ == {"lin.weight": "fast"}


@pytest.mark.parametrize("resident", [4, 2])
def test_the_update_measured_again_in_bounded_memory_under_dropout_is_vmaps_bit_for_bit(resident):
    torch.manual_seed(0)
    model, batch = Slots(dropout=0.3).double().eval(), _slots_batch(6)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    py, npy = random.getstate(), np.random.get_state()[1].copy()
    kw = {"chunk_size": 4, "max_resident_samples": resident, "train_mode": True}
    probe = PerSampleGradientProbe(model, ["lin.weight", "head.weight"], **kw).update(batch)
    assert random.getstate() == py and np.array_equal(np.random.get_state()[1], npy)
    vmap = PerSampleGradientProbe(model, ["lin.weight", "head.weight"], engine="vmap", **kw).update(batch)
    assert probe.engines_ == {"lin.weight": "vmap", "head.weight": "fast"}
    assert torch.equal(probe.gram("lin.weight"), vmap.gram("lin.weight"))
    assert torch.equal(probe.losses_, vmap.losses_)


class TwoTables(_LM):
    """Two layers on shared ``(4, d)`` tables, each sample adding the rows its first and second tokens select (per
    sample: the same alone as in a batch): ``lin``'s selections pass the even-samples check in the first chunk of 4
    and not in the second, ``lin2``'s pass it in both, and the shape check refuses ``lin2`` in the last chunk of 2
    (4 rows, as many as the accepted chunks had samples). Chunks of 4, 4, 2: refused in different chunks."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.lin2 = torch.nn.Linear(D, D)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, ids):
        a = self.lin(self.emb.weight[:4])[ids[:, 0] % 4]
        b = self.lin2(self.emb.weight[4:8])[ids[:, 1] % 4]
        return self.head(self.drop(torch.tanh(self.emb(ids) + (a + b)[:, None])))


@pytest.mark.parametrize("resident", [None, 6])
def test_two_layers_refused_in_different_chunks_measure_the_update_again_twice_and_stop(resident, monkeypatch):
    """The update is measured again once per refused layer (two restarts, not a loop): rows exact against float64,
    and with train-mode dropout bit for bit a fresh probe's on the final engines (Gram matrices and losses)."""
    starts = []
    measure = probe_module.PerSampleGradientProbe._gradients
    monkeypatch.setattr(probe_module.PerSampleGradientProbe, "_gradients",
                        lambda self, b, n, *a: starts.append(n) or measure(self, b, n, *a))
    torch.manual_seed(0)
    names = ["lin.weight", "lin2.weight", "head.weight"]
    model, batch = TwoTables().double().eval(), _slots_batch(10, rows=(2, 3, 0, 1, 0, 1, 3, 2, 1, 3))
    batch[0][:, 1] = torch.tensor([0, 1, 2, 3, 2, 1, 0, 3, 0, 1])
    probe = PerSampleGradientProbe(model, names, chunk_size=4, keep_matrix=resident is None,
                                   max_resident_samples=resident).update(batch)
    assert probe.engines_ == {"lin.weight": "vmap", "lin2.weight": "vmap", "head.weight": "fast"}
    assert starts == [4, 4, 4, 4, 2, 4, 4, 2]  # restarts at chunk 2 (lin) and at chunk 3 (lin2)
    ref = _reference(model, names, batch)
    for k in names:
        gram = ref[k] @ ref[k].T
        assert float((probe.gram(k) - gram).abs().max() / gram.abs().max()) <= 1e-10, k
    dropped = TwoTables(dropout=0.3).double().eval()
    dropped.load_state_dict(model.state_dict())
    kw = {"chunk_size": 4, "max_resident_samples": resident, "train_mode": True}
    got = PerSampleGradientProbe(dropped, names, **kw).update(batch)
    fresh = PerSampleGradientProbe(dropped, names, **kw)
    fresh.engines_.update({"lin.weight": "vmap", "lin2.weight": "vmap"})  # the final engines from the start
    fresh.update(batch)
    assert got.engines_ == probe.engines_ == fresh.engines_
    for k in names:
        assert torch.equal(got.gram(k), fresh.gram(k)), k
    assert torch.equal(got.losses_, fresh.losses_)



def test_an_exception_in_the_update_measured_again_leaves_the_probe_as_before():
    """A failure inside the second attempt (the loss of its first chunk, on the fast path for ``head`` alone once
    ``lin`` left it) leaves the probe as before the update: no samples, both engines "fast" (the refusal found again
    at the next update), RNG streams and ``.grad`` untouched; the next update matches float64."""
    torch.manual_seed(0)
    model, batch = Slots().double().eval(), _slots_batch(6)
    failed = []

    def loss_fn(out, b):
        if b[0].shape[0] == 4 and probe.engines_["lin.weight"] != "fast" and not failed:
            failed.append(True)
            raise KeyError("boom")
        return causal_lm_loss(out, b)

    names = ["lin.weight", "head.weight"]
    probe = PerSampleGradientProbe(model, names, chunk_size=4, loss_fn=loss_fn, keep_matrix=True)
    rng = torch.get_rng_state()
    with pytest.raises(KeyError, match="boom"):
        probe.update(batch)
    assert failed and probe.n_samples_ == 0 and probe.engines_ == {k: "fast" for k in names}
    assert probe.losses_.numel() == 0 and torch.equal(torch.get_rng_state(), rng)
    assert model.lin.weight.grad is None and all(p.requires_grad for p in model.parameters())
    probe.update(batch)
    ref = _reference(model, names, batch)
    assert probe.engines_ == {"lin.weight": "vmap", "head.weight": "fast"}
    assert all(_rel(probe.matrix(k), ref[k]) <= 1e-10 for k in names)


def test_a_probe_pickled_with_a_set_of_fast_rows_stays_conservative():
    """A probe pickled by the gradchunks pass held the parameters with fast-path rows as a set, without their chunks'
    sample counts: unpickled, any layout refusal of such a parameter still raises (counts unknown)."""
    torch.manual_seed(0)
    model, batch = OnePath().double().eval(), _batch(9, 5)
    probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=4).update((batch[0][:8], batch[1][:8]))
    state = {**probe.__getstate__(), "_fast_rows": {"lin.weight"}}
    old = PerSampleGradientProbe.__new__(PerSampleGradientProbe)
    old.__setstate__(state)
    with pytest.raises(RuntimeError, match=r"lin\.weight: the fast path measured it for the 8 samples"):
        old.update((batch[0][8:], batch[1][8:]))
    probe.update((batch[0][8:], batch[1][8:]))  # its counts recorded: {4}, and the refused (5, 8) is no coincidence
    assert probe.n_samples_ == 9
