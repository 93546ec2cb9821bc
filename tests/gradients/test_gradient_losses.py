"""The default per-sample loss: token cross-entropy, logits extraction, target conventions."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_lens.gradients import causal_lm_loss, extract_logits
from spectral_lens.gradients import losses as losses_module
from spectral_lens.gradients.losses import _scaled_rows, _SoftmaxCrossEntropy, token_cross_entropy


def test_token_cross_entropy_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(13, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (13,))
    t[[3, 8]] = -100
    w = torch.randn(13, dtype=torch.float64)
    a, b = token_cross_entropy(x, t), F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    ga, gb = (torch.autograd.grad((v * w).sum(), x, retain_graph=True)[0] for v in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda z: token_cross_entropy(z, t), (x,))
    per_sample = vmap(grad(lambda z, y: token_cross_entropy(z, y).sum()))(x.detach().view(13, 1, 7), t.view(13, 1))
    torch.testing.assert_close(per_sample.view(13, 7), torch.autograd.grad(a.sum(), x)[0], rtol=1e-14, atol=1e-14)


def _reference_grad(z, t, w, ignore_index=-100):
    """float64 ``w (softmax(z) - onehot(t))`` with the target entry as ``-w * sum_{j != t} p_j``: unlike
    autograd through ``F.cross_entropy`` (``p_t - 1``), it does not cancel to 0 when ``p_t ~ 1``."""
    valid = t != ignore_index
    safe = t.masked_fill(~valid, 0)[:, None]
    g = torch.softmax(z.double(), -1) * (w.double() * valid)[:, None]
    g.scatter_(-1, safe, 0.0)
    return g.scatter(-1, safe, -g.sum(-1, keepdim=True))


def test_softmax_cross_entropy_is_exact_in_float64():
    """The bf16 kernel's algebra (lse from p_max, target entry as minus the others) checked in float64."""
    torch.manual_seed(3)
    x = (torch.randn(40, 11, dtype=torch.float64) * 6).requires_grad_()
    x.data[:10, 0] += 60.0  # p ~ 1 rows: the target entry must not cancel
    t = torch.randint(0, 11, (40,))
    t[:5], t[[12, 30]] = 0, -100
    w = torch.randn(40, dtype=torch.float64)
    a, b = _SoftmaxCrossEntropy.apply(x, t, -100)[0], F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-13)
    ga = torch.autograd.grad((a * w).sum(), x, retain_graph=True)[0]
    gb = _reference_grad(x.detach(), t, w)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-300)
    gc = torch.autograd.grad((b * w).sum(), x)[0]  # PyTorch agrees away from the p_t ~ 1 entries
    torch.testing.assert_close(ga, gc, rtol=1e-12, atol=1e-15)
    # the backward works on a fresh softmax: a second backward through the retained graph agrees
    torch.testing.assert_close(torch.autograd.grad((a * w).sum(), x)[0], ga, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda z: _SoftmaxCrossEntropy.apply(z, t, -100)[0], (x.detach().requires_grad_(),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batching rules exist for every op (no per-sample fallback)
        per_sample = vmap(grad(lambda z, y: _SoftmaxCrossEntropy.apply(z, y, -100)[0].sum()))(x.detach()[:, None], t[:, None])
    torch.testing.assert_close(per_sample[:, 0], gb / w[:, None], rtol=1e-11, atol=1e-300)


class _Float32Arrays(TorchDispatchMode):
    """Records the shapes of float32 tensors that ops produce."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.shapes.append(tuple(t.shape))
        return out


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    v=st.integers(2, 3000),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    offset=st.sampled_from([0.0, -500.0, 3000.0]),
    confident=st.integers(0, 40),
    block=st.sampled_from([1, 37, 2**18]),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=3, v=2031, scale=0.1, offset=3000.0, confident=0, block=1, seed=64291450)  # p_max at a bf16 half-ulp
def test_token_cross_entropy_bf16_against_float64(n, v, scale, offset, confident, block, seed):
    """bf16 logits (also under autocast): no float32 copy of the (N, V) array is ever made (on the CPU
    the backward's scaling converts row blocks of at most ``block`` elements, or one row); loss within
    2^-8 absolute and every gradient entry within 2 (target: 3) bf16 roundings of float64 on the same logits,
    also for confident rows (p_t ~ 1), large offsets and ignored targets."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale + offset
    t = torch.randint(0, v, (n,), generator=g)
    k = min(confident, n)
    z[torch.arange(k), t[:k]] += 50.0
    t[torch.rand(n, generator=g) < 0.2] = -100
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    x = z.to(torch.bfloat16).requires_grad_()
    spy = _Float32Arrays()
    with torch.autocast("cpu", dtype=torch.bfloat16), spy, mock.patch.object(losses_module, "_CPU_BLOCK_ELEMENTS", block):
        loss = token_cross_entropy(x, t, method="recompute")
        gx = torch.autograd.grad((loss * w.float()).sum(), x)[0]
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16
    wide = [shape for shape in spy.shapes if len(shape) == 2 and shape[1] == v and v > 1]
    assert all(rows <= max(1, block // v) for rows, _ in wide), (wide, block)
    ref = F.cross_entropy(x.detach().double(), t, reduction="none")
    gref = _reference_grad(x.detach(), t, w)
    # one rounding of p_max, and the float32 rounding of the loss itself (not of |z|_max: the offset
    # cancels exactly in z_max - z_t; this failed at offset 3000 when lse was rounded first)
    assert ((loss.double() - ref).abs() <= 2**-8 * 1.01 + 2**-23 * ref.abs()).all()
    # two roundings relative to each entry (softmax, scale), three at the target (a sum of entries
    # that carry two, rounded once more); entries below bf16's normal range round absolutely
    roundings = torch.full_like(gref, 2.0).scatter_(-1, t.clamp_min(0)[:, None], 3.0)
    err = (gx.double() - gref).abs()
    assert (err <= roundings * 2**-8 * gref.abs() * 1.01 + 1e-38).all(), float((err / gref.abs().clamp_min(1e-300)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_scaled_rows_matches_mixed_dtype_product(dtype):
    """The backward's scaling rounds exactly as PyTorch's in-place mixed-dtype ``g.mul_(w)`` (one
    float32 product per entry, rounded once): by row blocks on the CPU, for row counts that do not
    divide into blocks, and under vmap; its input is left as it was."""
    g0 = torch.Generator().manual_seed(6)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for n, v, block in ((1, 5, 1), (13, 300, 700), (40, 1000, 2**18), (7, 3, 2)):
        g = (torch.rand(n, v, generator=g0) * 3).to(dtype)
        w = torch.rand(n, 1, generator=g0, dtype=wide) / 7 + 1e-3
        before = g.clone()
        with mock.patch.object(losses_module, "_CPU_BLOCK_ELEMENTS", block):
            got = _scaled_rows(g, w)
            batched = vmap(_scaled_rows)(g[:, None], w[:, None])
        want = g.clone().mul_(w)
        assert got.dtype == dtype and torch.equal(got, want) and torch.equal(g, before)
        assert torch.equal(batched[:, 0], want)
        if dtype != torch.float64:  # rounding w first would differ: the check can fail
            assert not torch.equal(want, g.mul(w.to(dtype)))
        # the branch CUDA takes (one in-place mixed-dtype product on a copy), reached here by a 3-d input
        got3 = _scaled_rows(g[:, None], w[:, None])
        assert got3.dtype == dtype and torch.equal(got3[:, 0], want) and torch.equal(g, before)


def _one_ulp_below(t: torch.Tensor) -> torch.Tensor:
    """The next representable value below each (finite, nonzero) entry of ``t``, in ``t``'s dtype."""
    bits = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    below = torch.where(t > 0, bits - 1, bits + 1).view(t.dtype)  # sign-magnitude: the magnitude moves
    assert (below < t).all() and (below.double() >= t.double() - t.double().abs() * 2.0**-7).all()
    return below


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    n=st.integers(1, 30),
    v=st.integers(1, 5000),
    scale=st.sampled_from([1e-3, 1.0, 8.0, 60.0]),
    offset=st.sampled_from([0.0, -300.0, 2000.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_softmax_max_sits_at_the_logits_argmax(dtype, n, v, scale, offset, seed):
    """The loss reads ``p_max`` as the largest softmax entry: it is the entry at the logits' arg max,
    bit for bit, also with near-ties (a logit one ulp below the largest) and exact ties."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    top, arg = z.max(-1)
    if v > 1:
        near = (arg + 1) % v
        z[torch.arange(n), near] = _one_ulp_below(top)
        z[: n // 2, (arg[: n // 2] + 2) % v] = top[: n // 2]  # exact ties in half of the rows
    p = torch.softmax(z, -1)
    assert torch.equal(p.amax(-1), p.gather(-1, z.argmax(-1, keepdim=True)).squeeze(-1))


def test_token_cross_entropy_methods():
    torch.manual_seed(4)
    x = torch.randn(6, 30).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 30, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, native = token_cross_entropy(x, t), token_cross_entropy(x, t, method="native")
        recompute = token_cross_entropy(x, t, method="recompute")
    assert auto.dtype == native.dtype == recompute.dtype == torch.float32
    torch.testing.assert_close(auto, recompute, rtol=0, atol=0)  # auto picks recompute for bf16
    torch.testing.assert_close(recompute, native, rtol=0, atol=2**-8)
    assert native.grad_fn is not None and "Softmax" not in type(native.grad_fn).__name__
    assert auto.grad_fn is not None and recompute.grad_fn is not None
    logits = torch.randn(2, 5, 30, dtype=torch.float64)
    ids = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(causal_lm_loss(logits, ids, method="recompute"), causal_lm_loss(logits, ids), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="method must be one of"):
        token_cross_entropy(x, t, method="fast")


def test_extract_logits_and_target_conventions():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    for out in (logits, (logits, None), [logits], {"logits": logits}, SimpleNamespace(logits=logits)):
        assert extract_logits(out) is logits
    with pytest.raises(TypeError, match="cannot find logits"):
        extract_logits("nope")
    ids = torch.randint(0, 11, (2, 5))
    bare = causal_lm_loss(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none").view(2, 4).mean(1)
    torch.testing.assert_close(bare, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(causal_lm_loss(logits, {"input_ids": ids, "labels": ids}), ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(causal_lm_loss(logits[:, :-1], (ids[:, :-1], ids[:, 1:])), ref, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match=r"do not match targets"):
        causal_lm_loss(logits, (ids, ids[:, 1:]))
    with pytest.raises(ValueError, match=r"\(input_ids, targets"):
        causal_lm_loss(logits, (ids,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_softmax_max_sits_at_the_logits_argmax_on_cuda(dtype):
    """The same property on CUDA's softmax kernels (bounded there by one more bf16 rounding of
    ``p_max`` if it failed, which the loss bound of the next test would still cover)."""
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(512, 50304, generator=g, dtype=torch.float64) * 4).to(dtype)
    top, arg = z.max(-1)
    z[torch.arange(512), (arg + 1) % 50304] = _one_ulp_below(top)
    z[:256, (arg[:256] + 2) % 50304] = top[:256]
    z = z.cuda()
    p = torch.softmax(z, -1)
    assert torch.equal(p.amax(-1), p.gather(-1, z.argmax(-1, keepdim=True)).squeeze(-1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_method_on_cuda_bf16():
    """On CUDA, bf16 logits take the recompute kernel: same bounds as on CPU, no float32 (N, V) array,
    and it runs under ``torch.use_deterministic_algorithms(True)``."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(512, 4099, generator=g, dtype=torch.float64) * 4).cuda()
    t = torch.randint(0, 4099, (512,), generator=g).cuda()
    t[::7] = -100
    w = (torch.rand(512, generator=g, dtype=torch.float64) + 0.5).cuda()
    x = z.to(torch.bfloat16).requires_grad_()
    spy = _Float32Arrays()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # no op without a deterministic CUDA kernel may be used
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16), spy:
            loss = token_cross_entropy(x, t)
            gx = torch.autograd.grad((loss * w.float()).sum(), x)[0]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert (512, 4099) not in spy.shapes
    ref = F.cross_entropy(x.detach().double(), t, reduction="none")
    assert ((loss.double() - ref).abs() <= 2**-8 * 1.01 + 2**-23 * ref.abs()).all()
    ref = _reference_grad(x.detach(), t, w)
    assert ((gx.double() - ref).abs() <= 3 * 2**-8 * ref.abs() * 1.01 + 1e-38).all()
