"""The default per-sample loss: token cross-entropy, logits extraction, target conventions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from spectral_lens.gradients import causal_lm_loss, extract_logits
from spectral_lens.gradients.losses import token_cross_entropy


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


def test_token_cross_entropy_bf16_logits():
    torch.manual_seed(1)
    x = torch.randn(9, 50, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    a = token_cross_entropy(x, t)
    assert a.dtype == torch.float32
    # computed by the bf16 kernels (float32 accumulation, bf16 result): bf16 rounding of the loss
    torch.testing.assert_close(a, F.cross_entropy(x.float(), t, reduction="none"), rtol=8e-3, atol=8e-3)
    g = torch.autograd.grad(a.sum(), x)[0]
    assert g.dtype == torch.bfloat16
    ref = torch.autograd.grad(F.cross_entropy(x.float(), t, reduction="sum"), x)[0]
    torch.testing.assert_close(g.float(), ref.float(), rtol=1.6e-2, atol=4e-3)


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
