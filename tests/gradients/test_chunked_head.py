"""The chunked head + cross-entropy (``fused_head``) against float64 references; it never forms (N, V)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_lens.gradients import (
    PerSampleGradientProbe,
    causal_lm_loss,
    head_loss_fns,
    linear_cross_entropy,
    without_head,
)

from support.per_sample import PROBLEMS, head_problem
from support.dispatch import LargestAllocation as _LargestAllocation
from support.models import TinyGPT, lm_batch


def _reference(h, w, b, t, grad):
    """float64 loss (``F.cross_entropy`` of the materialized head) and gradients. The logits'
    gradient is ``grad (softmax - onehot)`` with the target entry formed as minus the sum of the
    others: autograd through ``F.cross_entropy`` forms it as ``p_t - 1``, which cancels when
    ``p_t ~ 1`` (relative error ``2^-53 / (1 - p_t)``, 1e-11 at ``1 - p_t = 1e-5``) and would make the
    reference, not the path under test, the inexact side."""
    h, w, b = (x.detach().double() for x in (h, w, b))
    z = F.linear(h, w, b)
    loss = F.cross_entropy(z, t, ignore_index=-100, reduction="none")
    valid = t != -100
    safe = t.masked_fill(~valid, 0)[:, None]
    g = torch.softmax(z, -1) * (grad.double() * valid)[:, None]
    g = g.scatter(-1, safe, 0.0)
    g = g.scatter(-1, safe, -g.sum(-1, keepdim=True))
    return loss, g @ w, g.t() @ h, g.sum(0)


@settings(max_examples=30, deadline=None)
@given(**PROBLEMS)
def test_loss_and_gradients_match_float64(n, d, v, chunk, offset, ignore_frac, dtype, seed):
    h, w, b, t = head_problem(n, d, v, offset, ignore_frac, seed, dtype)
    grad = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    ref_loss, ref_h, ref_w, ref_b = _reference(h, w, b, t, grad)
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss = linear_cross_entropy(h, w, t, b, chunk_rows=chunk)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == (n,)
    gh, gw, gb = torch.autograd.grad(loss, (h, w, b), grad.to(loss.dtype))
    z_max = float((F.linear(h.double(), w.double(), b.double())).abs().max().detach())
    eps = 1e-12 if dtype == torch.float64 else 4e-6  # the bound stated in fused_head's docstring
    assert (loss.double() - ref_loss).abs().max() <= eps * (z_max + math.log(v))
    assert bool((loss[t == -100] == 0).all())
    # gradients: relative to the largest entry of each reference; float32 logits carry an absolute
    # rounding ~|z|_max 2^-24 each, which moves every softmax entry by that much relative
    geps = 1e-11 if dtype == torch.float64 else 4e-6 * (z_max + 1)
    for got, ref in ((gh, ref_h), (gw, ref_w), (gb, ref_b)):
        scale = max(float(ref.abs().max()), 1e-30)
        assert float((got.double() - ref).abs().max()) <= geps * scale + (1e-300 if dtype == torch.float64 else 1e-7)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 30),
    v=st.integers(2, 400),
    chunk=st.integers(1, 40),
    offset=st.sampled_from([0.0, 30.0, 1e4, -3e4]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    precompute=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_float32_offset_costs_no_rounding_against_the_same_logits(n, v, chunk, offset, scale, precompute, seed):
    """Against the float64 loss and softmax of the *same* float32 logits (the head is the identity, so
    the logits are exactly the given array), the loss is within a few float32 ulps of ``|loss| + log V``
    and the logits' gradient within a few ulps of its largest entry, whatever the common offset: the
    path keeps ``(m, log s)`` and never forms ``m + log s`` (which rounds at ``2^-24 |m|``: 6e-4 at an
    offset of 1e4, where PyTorch's own float32 cross-entropy is within 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale + offset).float()
    t = torch.randint(0, v, (n,), generator=g)
    zr = z.clone().requires_grad_()
    eye = torch.eye(v, requires_grad=not precompute)  # precompute: only the hidden states need a gradient
    loss = linear_cross_entropy(zr, eye, t, chunk_rows=chunk)
    (gz,) = torch.autograd.grad(loss.sum(), zr)
    ref = F.cross_entropy(z.double(), t, reduction="none")
    assert ((loss.double() - ref).abs() <= 2**-21 * (ref.abs() + math.log(v))).all()
    p = torch.softmax(z.double(), -1)  # the target entry as minus the others' sum (no p_t - 1 cancellation)
    p[torch.arange(n), t] = 0.0
    p[torch.arange(n), t] = -p.sum(-1)
    assert float((gz.double() - p).abs().max()) <= 2**-20 * (1 + math.log(v)) * float(p.abs().max())


@settings(max_examples=30, deadline=None)
@given(**PROBLEMS, with_bias=st.booleans())
def test_input_gradient_formed_in_the_forward_matches_float64(n, d, v, chunk, offset, ignore_frac, dtype, with_bias, seed):
    """When only the hidden states need a gradient (the probe's fast engine), the forward forms the
    unit-weight input gradient and the backward scales it: same bounds against float64, and the same
    values as the recomputing backward (run when the head weight needs a gradient too)."""
    h, w, b, t = head_problem(n, d, v, offset, ignore_frac, seed, dtype)
    b = b if with_bias else None
    grad = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    ref_loss, ref_h, _, _ = _reference(h, w, b if b is not None else torch.zeros(v, dtype=dtype), t, grad)
    hp = h.clone().requires_grad_()
    loss = linear_cross_entropy(hp, w, t, b, chunk_rows=chunk)  # w, b do not require grad
    saved = [x for x in loss.grad_fn.next_functions if x[0] is not None]
    assert saved, "the loss must be connected to the hidden states"
    (gh,) = torch.autograd.grad(loss, hp, grad.to(loss.dtype))
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    (gh_recomputed, _) = torch.autograd.grad(linear_cross_entropy(hr, wr, t, b, chunk_rows=chunk), (hr, wr), grad.to(loss.dtype))
    z_max = float(F.linear(h.double(), w.double(), None if b is None else b.double()).abs().max())
    eps = 1e-12 if dtype == torch.float64 else 4e-6
    assert (loss.detach().double() - ref_loss).abs().max() <= eps * (z_max + math.log(v))
    geps = 1e-11 if dtype == torch.float64 else 4e-6 * (z_max + 1)
    scale = max(float(ref_h.abs().max()), 1e-30)
    floor = 1e-300 if dtype == torch.float64 else 1e-7
    assert float((gh.double() - ref_h).abs().max()) <= geps * scale + floor
    assert float((gh.double() - gh_recomputed.double()).abs().max()) <= geps * scale + floor


def test_forward_formed_gradient_is_used_only_when_the_head_needs_none():
    """The forward forms the (N, d) unit gradient only under grad mode, for hidden states that need a
    gradient, with a head that needs none; otherwise its output is empty and the backward recomputes."""
    h, w, b, t = head_problem(6, 4, 11, 0.0, 0.0, 0, torch.float64)
    from spectral_lens.gradients.fused_head import _ChunkedLinearCrossEntropy as Fn

    seen = []
    original = Fn.forward

    def spy(*args):
        out = original(*args)
        seen.append(out[3].shape)
        return out

    Fn.forward = staticmethod(spy)
    try:
        linear_cross_entropy(h.clone().requires_grad_(), w, t)
        linear_cross_entropy(h.clone().requires_grad_(), w.clone().requires_grad_(), t)
        with torch.no_grad():
            linear_cross_entropy(h.clone().requires_grad_(), w, t)
    finally:
        Fn.forward = staticmethod(original)
    assert seen == [torch.Size([6, 4]), torch.Size([0]), torch.Size([0])]


def test_confident_target_gradient_keeps_relative_accuracy():
    """p_t ~ 1: the target entry -(1 - p_t) is formed without cancellation (float32)."""
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[30.0], [0.0], [0.0]])  # p_t = 1 - 2e-13 for target 0
    loss = linear_cross_entropy(h, w, torch.tensor([0]), chunk_rows=1)
    (gh,) = torch.autograd.grad(loss.sum(), h)
    # d loss / d h = sum_j p_j w_j - w_t = -30 (1 - p_t) = -30 * 2 e^-30 / (1 + 2 e^-30)
    ref = -30.0 * 2 * math.exp(-30) / (1 + 2 * math.exp(-30))
    assert abs(float(gh) - ref) <= 1e-5 * abs(ref)


def test_never_forms_the_full_logits():
    n, d, v, chunk = 64, 8, 500, 16
    h, w, b, t = head_problem(n, d, v, 0.0, 0.2, 0, torch.float32)
    h.requires_grad_()
    with _LargestAllocation() as mode:
        loss = linear_cross_entropy(h, w, t, b, chunk_rows=chunk)
        loss.sum().backward()
    assert mode.largest <= chunk * v < n * v
    with _LargestAllocation() as mode:  # the materialized path, for contrast (the check can fail)
        F.cross_entropy(F.linear(h, w, b), t, reduction="none").sum().backward()
    assert mode.largest >= n * v


def test_default_chunk_and_autocast_dtype():
    h, w, b, t = head_problem(10, 4, 7, 0.0, 0.0, 1, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t, b)
        ref = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")  # bf16 logits, like a bf16 head
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", [False, True])
def test_default_block_budget(kernels):
    """Without ``chunk_rows``: blocks of ``CHUNK_BYTES`` of float32 logits in the plain body, of
    ``KERNEL_CHUNK_BYTES`` in the logits' dtype where the Triton kernels run (stubbed here: only the
    chosen ``chunk_rows`` is read)."""
    from unittest import mock

    from spectral_lens.gradients import fused_head

    v = 50304
    h, w, t = torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(v, 4, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long)
    seen = []

    def apply(*args):
        seen.append(args[5])
        return (torch.zeros(3),)

    with mock.patch.object(fused_head, "_kernels", lambda hidden, dtype: object() if kernels else None), \
            mock.patch.object(fused_head._ChunkedLinearCrossEntropy, "apply", apply):
        linear_cross_entropy(h, w, t)
    assert seen == [5336 if kernels else 667]  # 2^29 / (2 bytes x V), 2^27 / (4 bytes x V)
    assert seen[0] == (fused_head.KERNEL_CHUNK_BYTES // (2 * v) if kernels else fused_head.CHUNK_BYTES // (4 * v))


def test_bad_inputs_have_clear_errors():
    h, w, b, t = head_problem(5, 4, 7, 0.0, 0.0, 1, torch.float32)
    with pytest.raises(ValueError, match=r"hidden \(N, d\) and weight \(V, d\)"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="integer targets"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(h, w, t, b[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, t, chunk_rows=0)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
@pytest.mark.parametrize("tied", [True, False])
def test_probe_with_head_loss_fns_equals_default_loss(tied, engine):
    """Per-sample gradients of W_O through the chunked head equal the materialized path's (float64),
    with the fast engine and under ``torch.func.vmap`` (the generic engine)."""
    torch.manual_seed(0)
    model = TinyGPT(tie=tied).double()
    batch = lm_batch()
    param = "transformer.h.1.attn.c_proj.weight"
    ref = PerSampleGradientProbe(model, params=param, keep_matrix=True).update(batch)
    fns = head_loss_fns(model, chunk_rows=3)
    got = PerSampleGradientProbe(model, params=param, engine=engine, keep_matrix=True, **fns).update(batch)
    a, b = got.matrix().numpy(), ref.matrix().numpy()
    assert np.abs(a - b).max() <= 1e-10 * np.abs(b).max()
    assert np.allclose(got.losses_.numpy(), ref.losses_.numpy(), rtol=1e-12, atol=0)
    assert "forward" not in vars(model.lm_head)  # the head is restored


def test_head_loss_matches_causal_lm_loss_for_hf_style_batches():
    torch.manual_seed(1)
    model = TinyGPT().double()
    idx = lm_batch()[0]
    labels = idx.clone()
    mask = torch.ones_like(idx)
    mask[0, -3:] = 0
    batch = {"input_ids": idx, "labels": labels, "attention_mask": mask}
    fns = head_loss_fns(model)
    got = fns["loss_fn"](fns["forward_fn"](model, batch), batch)
    ref = causal_lm_loss(model(idx), batch)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_without_head_restores_on_error_and_refuses_non_linear():
    model = TinyGPT().double()
    with pytest.raises(RuntimeError):
        with without_head(model, "lm_head"):
            raise RuntimeError("inside")
    assert "forward" not in vars(model.lm_head)
    with pytest.raises(TypeError, match="nn.Linear head"):
        head_loss_fns(model, head="transformer.ln_f")


def test_transformed_output_is_refused():
    class Capped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 4)
            self.lm_head = torch.nn.Linear(4, 11)

        def forward(self, idx):
            return self.lm_head(self.emb(idx))[..., :5]  # slices the head's output (hidden 4 wide: 4 kept)

    class SoftCapped(Capped):
        def forward(self, idx):
            return 2.0 * torch.tanh(self.lm_head(self.emb(idx)) / 2.0)  # same shape, other values

    batch = (torch.randint(0, 11, (2, 3)), torch.zeros(2, 3, dtype=torch.long))
    for cls in (Capped, SoftCapped):
        model = cls()
        with pytest.raises(ValueError, match="does not reproduce the model's logits"):
            head_loss_fns(model, example=batch)
    plain = Capped()
    plain.forward = lambda idx: plain.lm_head(plain.emb(idx)).sum(-1)  # drops the last dim
    with pytest.raises(ValueError, match="transforms the head's output"):
        head_loss_fns(plain)["forward_fn"](plain, batch)
    ok = TinyGPT().double()
    head_loss_fns(ok, example=lm_batch())  # an untransformed head passes the check
