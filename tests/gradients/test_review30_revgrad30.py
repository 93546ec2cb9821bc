"""Review 30 (revgrad30): the fast engine's even-samples check, adversarial layouts, against float64.

(a) Tokens of the odd samples alone gathered across the chunk, as many as its ``M`` (a mixture-of-experts
layer's ``(k, d)`` with ``k == M``): no even sample's loss reaches any row, so the even-samples backward
saw zeros and the fast path took row ``2j`` (a token of sample ``2j + 1``) as sample ``2j``'s, silently
(0.53 relative error). An even row that no even sample's loss reaches but the chunk's losses do is now
a mixed layout too.

(b) float16 (weights, or autocast): the even-samples backward was not loss-scaled, so small per-sample
gradients underflowed to zero in it and a shared position table ``(T, d)`` with ``T == M`` kept the fast
path (1.1 relative error); it now runs after the main backward, at that backward's loss scale (which the
second test of (a) needs: unscaled, a float16 per-sample head's even rows underflowed there, a false alarm).

(c) Layouts that are per sample keep the fast path: an even sample whose row gets no gradient (a gate
that zeroes it), ``M == 2``, a float16 pooled head, dropout in ``train_mode=True`` under non-reentrant
checkpointing (the extra backward re-runs the segment and replays its draws).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss

from .test_review30_grad30 import VOCAB, D, PositionProjection, Routed, _LM, _batch, _rel


def _reference(model, names, batch, weight=1.0):
    """float64 rows: a copy of the model, one ``torch.autograd.grad`` of each sample's own loss."""
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters())
    rows = {k: [] for k in names}
    for i in range(batch[0].shape[0]):
        sample = (batch[0][i : i + 1], batch[1][i : i + 1])
        loss = causal_lm_loss(m64(sample[0]), sample).sum() * weight
        for k, g in zip(names, torch.autograd.grad(loss, [named[k] for k in names])):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


# ---------------------------------------------------------------------- (a) tokens of the odd samples alone
@pytest.mark.parametrize("chunk", [4, 2])
def test_tokens_of_odd_samples_alone_gathered_as_many_as_the_chunk_leave_the_fast_path(chunk):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (8, 7), generator=g)
    for s in (1, 3, 5, 7):  # two routed tokens in each odd sample, none in the even ones: k == 4 (== 2 per 2)
        ids[s, 1 + s % 3], ids[s, 4] = 0, 2
    batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    torch.manual_seed(0)
    model = Routed().double().eval()
    ref = _reference(model, ["lin.weight"], batch)["lin.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap cannot trace nonzero(): the loop, with EngineFallbackWarning
        probe = PerSampleGradientProbe(model, "lin.weight", chunk_size=chunk, keep_matrix=True).update(batch)
    assert probe.engines_ == {"lin.weight": "loop"}
    assert _rel(probe.matrix("lin.weight"), ref) <= 1e-10  # before: 0.53, the fast path's rows
    shape = re.escape(f"({chunk}, {D})")
    with pytest.raises(ValueError, match=rf"engine='fast' impossible for lin\.weight: .*{shape}.*gathered"):
        PerSampleGradientProbe(copy.deepcopy(model), "lin.weight", engine="fast", chunk_size=chunk).update(batch)


# ---------------------------------------------------------------------- (b) float16, small gradients
_SMALL = 2.0**-30  # a per-sample loss weight: its logit gradients, about 2^-33, underflow in float16 unscaled


def _small_loss(out, batch):
    return causal_lm_loss(out, batch) * _SMALL


@pytest.mark.parametrize("half", ["weights", "autocast"])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_float16_shared_position_table_with_small_gradients_leaves_the_fast_path(layout, half):
    torch.manual_seed(0)
    model, batch = PositionProjection(layout).eval(), _batch(12, 6)
    model, cast = (model.half(), None) if half == "weights" else (model, torch.float16)
    names = ["lin.weight", "lin.bias"]
    ref = _reference(model, names, batch, _SMALL)
    probe = PerSampleGradientProbe(model, names, loss_fn=_small_loss, chunk_size=6, keep_matrix=True,
                                   autocast_dtype=cast).update(batch)
    assert probe.engines_ == {k: "vmap" for k in names}
    for k in names:
        assert _rel(probe.matrix(k), ref[k]) <= 1e-2, k  # float16 rounding: 1e-3; before: 1.1 (per position)
    with pytest.raises(ValueError, match=r"engine='fast' impossible for lin\.weight: .*position table"):
        PerSampleGradientProbe(copy.deepcopy(model), "lin.weight", loss_fn=_small_loss, engine="fast",
                               chunk_size=6, autocast_dtype=cast).update(batch)


# ---------------------------------------------------------------------- (c) per-sample layouts keep the fast path
class GatedPooled(_LM):
    """``lin`` sees ``(M, d)`` pooled rows, its output gated per sample by the batch: zero for a sample whose
    first token is below 6, so that sample's row gets no gradient in any pass."""

    def __init__(self, dropout=0.0, ckpt=False):
        super().__init__()
        self.drop, self.ckpt = nn.Dropout(dropout), ckpt

    def _top(self, h, pooled, gate):
        return self.head(self.drop(torch.tanh(h + (self.lin(pooled) * gate)[:, None])))

    def forward(self, ids):
        h = self.emb(ids) + self.pos.weight[: ids.shape[1]]
        gate = (ids[:, :1] >= 6).to(h.dtype)
        if self.ckpt:
            return checkpoint(self._top, h, h.mean(1), gate, use_reentrant=False)
        return self._top(h, h.mean(1), gate)


@pytest.mark.parametrize("m, chunk", [(7, 4), (2, 16)])
def test_per_sample_rows_with_a_gated_even_sample_keep_the_fast_path(m, chunk):
    batch = _batch(m, 5, seed=3)
    batch[0][0, 0] = 1  # sample 0 (an even row) gated off: its row's gradient is zero in every pass
    batch[0][1:, 0] = 7
    torch.manual_seed(0)
    model = GatedPooled().double().eval()
    names = ["lin.weight", "lin.bias"]
    ref = _reference(model, names, batch)
    assert float(ref["lin.weight"][0].abs().max()) == 0 and float(ref["lin.weight"][1:].abs().min(1).values.max()) > 0
    probe = PerSampleGradientProbe(model, names, engine="fast", chunk_size=chunk, keep_matrix=True).update(batch)
    for k in names:
        assert _rel(probe.matrix(k), ref[k]) <= 1e-10, k


def test_float16_pooled_head_keeps_the_fast_path():
    torch.manual_seed(0)
    model, batch = GatedPooled().half().eval(), _batch(8, 6, seed=4)
    batch[0][:, 0] = 7
    names = ["lin.weight"]
    ref = _reference(model, names, batch, _SMALL)["lin.weight"]
    probe = PerSampleGradientProbe(model, names, loss_fn=_small_loss, chunk_size=4, keep_matrix=True).update(batch)
    assert probe.engines_ == {"lin.weight": "fast"}
    assert _rel(probe.matrix("lin.weight"), ref) <= 1e-2


def test_dropout_under_checkpointing_with_a_two_dimensional_input_keeps_the_fast_path_and_its_rows():
    """The extra backward re-runs the checkpointed segment (dropout included): the rows equal the same
    model's without checkpointing, which replays no draw, and the global streams are as before."""
    batch = _batch(6, 5, seed=5)
    batch[0][:, 0] = 7
    rows, streams = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GatedPooled(dropout=0.3, ckpt=ckpt).double()
        torch.manual_seed(1)
        probe = PerSampleGradientProbe(model, ["lin.weight"], engine="fast", chunk_size=4, keep_matrix=True,
                                       train_mode=True).update(batch)
        rows.append(probe.matrix("lin.weight"))
        streams.append(torch.rand(3))
    assert float(rows[0].norm(dim=1).min()) > 0  # dropout kept every row alive
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-10, atol=0)
    assert torch.equal(streams[0], streams[1])
