"""Gaps found by mutation testing of ``fused_head``: a head that runs twice in one forward must not be
chunked, and float64 inputs under an ambient autocast keep float64 logits (as an unfused head does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe, linear_cross_entropy
from support.models import TinyGPT, lm_batch

PARAM = "transformer.h.1.attn.c_proj.weight"


class _HeadTwice(TinyGPT):
    """The head runs twice: its first output feeds the hidden states of the second call, whose output
    is the logits. Bypassing the head (the chunked path) would change the first call too."""

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = block(x)
        h = tr.ln_f(x)
        aux = self.lm_head(h)
        return self.lm_head(h + 0.5 * aux[..., : h.shape[-1]])


def test_head_that_runs_twice_is_not_chunked(monkeypatch):
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    torch.manual_seed(4)
    model = _HeadTwice().double().eval()
    batch = lm_batch(vocab=30)
    # chunk_size=2: later chunks run the forward the decision chose (head bypassed if chunked)
    got = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2).update(batch)
    assert got.head_loss_.startswith("materialized: ") and "ran 2 times" in got.head_loss_, got.head_loss_
    ref = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2, head_loss="materialized").update(batch)
    assert torch.equal(got.matrix(), ref.matrix()) and torch.equal(got.losses_, ref.losses_)
    with pytest.raises(ValueError, match="ran 2 times"):
        PerSampleGradientProbe(model, PARAM, chunk_size=2, head_loss="chunked").update(batch)


@pytest.mark.parametrize("with_bias", [False, True])
def test_float64_inputs_under_autocast_stay_float64(with_bias):
    """Autocast leaves float64 alone, so an unfused float64 head under ``torch.autocast(bfloat16)``
    gives float64 logits; the chunked loss and gradient must match float64 to 1e-12, not bf16."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 13, 8, 29
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, b, chunk_rows=4)
    (dh,) = torch.autograd.grad(loss.sum(), h)
    assert loss.dtype == torch.float64
    h_ref = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, w, b), t, ignore_index=-100, reduction="none")
    (dh_ref,) = torch.autograd.grad(ref.sum(), h_ref)
    assert float((loss - ref).detach().abs().max()) <= 1e-12 * float(ref.detach().abs().max())
    assert float((dh - dh_ref).abs().max()) <= 1e-12 * float(dh_ref.abs().max())


class _HalfLinear(nn.Linear):
    """A subclass of ``nn.Linear`` whose forward differs: its output is not ``F.linear(h, W, b)``."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def test_head_of_a_linear_subclass_is_not_chunked(monkeypatch):
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    torch.manual_seed(4)
    model = TinyGPT()
    model.lm_head = _HalfLinear(16, 37, bias=False)
    model = model.double().eval()
    batch = lm_batch(vocab=30)
    got = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2).update(batch)
    assert got.head_loss_.startswith("materialized: ") and "a subclass of nn.Linear" in got.head_loss_, got.head_loss_
    ref = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2, head_loss="materialized").update(batch)
    assert torch.equal(got.matrix(), ref.matrix()) and torch.equal(got.losses_, ref.losses_)


def test_head_with_a_patched_instance_forward_is_not_chunked_and_keeps_it(monkeypatch):
    """A head whose ``forward`` is replaced on the instance (by a wrapper library) may compute anything:
    materialized, and the patched forward is still in place afterwards."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    torch.manual_seed(4)
    model = TinyGPT().double().eval()
    head = model.lm_head

    def patched(x):
        return 0.5 * F.linear(x, head.weight, head.bias)

    head.forward = patched
    batch = lm_batch(vocab=30)
    got = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2).update(batch)
    assert got.head_loss_.startswith("materialized: ") and "forward replaced on the instance" in got.head_loss_
    assert head.forward is patched
    ref = PerSampleGradientProbe(model, PARAM, keep_matrix=True, chunk_size=2, head_loss="materialized").update(batch)
    assert torch.equal(got.matrix(), ref.matrix()) and torch.equal(got.losses_, ref.losses_)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_check_forward_of_the_vmap_and_loop_engines_leaves_the_dropout_masks(monkeypatch, engine):
    """With the vmap / loop engine the head-loss decision takes a forward of its own; it runs on a
    forked RNG, so with dropout active the measured rows equal the materialized path's to rounding
    (the fast engine's case is tested in test_head_auto)."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    torch.manual_seed(2)
    model = TinyGPT(dropout=0.3).double()
    batch = lm_batch(m=4)
    kw = dict(engine=engine, train_mode=True, keep_matrix=True, chunk_size=2)
    got = PerSampleGradientProbe(model, PARAM, **kw).update(batch)
    ref = PerSampleGradientProbe(model, PARAM, head_loss="materialized", **kw).update(batch)
    assert got.head_loss_ == "chunked (lm_head)"
    g, r = got.matrix(), ref.matrix()
    assert float((g - r).abs().max()) <= 1e-10 * float(r.abs().max())
