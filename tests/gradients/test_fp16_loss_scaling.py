"""float16 per-sample gradients against float64: the backward is loss-scaled by a power of two.

A model loaded in float16 runs its backward in float16, which flushes entries below 2^-24 (6e-8) to
zero and overflows above 65504. Per-sample gradients of a mean-reduced loss are small: with small
weights (a deep stack's lower layers, tiny logit gradients) the old probe returned rows with most
entries zero (relative error 3e-2 on the fast engine, 0.34 on vmap / loop), and a loss whose
gradients pass 65504 gave a NonFiniteError. The references run the same (float16-rounded) weights in
float64, one autograd pass per sample.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support.models import TinyLM

from spectral_lens import NonFiniteError
from spectral_lens.gradients import PerSampleGradientProbe
from spectral_lens.gradients import engines

NAMES = ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"]


def tiny(dtype, wscale, vocab=64, t=16, m=3, dropout=0.0):
    torch.manual_seed(0)
    model = TinyLM(vocab=vocab, d=16, layers=1, ctx=t, tied=False, dropout=dropout).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(wscale)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (m, t + 1), generator=g)
    return model.to(dtype), (ids[:, :-1], ids[:, 1:])


def mean_ce(factor):
    return lambda logits, batch: F.cross_entropy(logits.transpose(1, 2).float(), batch[1], reduction="none").mean(1) * factor


def reference_rows(model, batch, factor):
    """float64 copy of the same weights, one torch.autograd.grad per sample."""
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters())
    rows = {k: [] for k in NAMES}
    for i in range(batch[0].shape[0]):
        sample = (batch[0][i : i + 1], batch[1][i : i + 1])
        for k, g in zip(NAMES, torch.autograd.grad(mean_ce(factor)(m64(sample[0]), sample).sum(), [named[k] for k in NAMES])):
            rows[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


def rel_rows(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def rel_sv(got, ref):
    s, s_ref = torch.linalg.svdvals(got.double()), torch.linalg.svdvals(ref)
    return ((s - s_ref).abs() / s_ref).max().item()


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("wscale, factor", [(0.02, 1.0), (1.0, 2.0 ** 24)], ids=["underflow", "overflow"])
def test_fp16_rows_match_float64(engine, wscale, factor):
    """Underflow: weights scaled by 0.02, the largest entry of a row ~1e-6 (was: two thirds of c_attn's
    entries zero; relative error 3e-2 fast, 0.34 vmap / loop). Overflow: the mean loss times 2^24,
    logit gradients past 65504 (was: NonFiniteError). Bound: rows within 5e-3 (measured <= 7.1e-4) and every singular
    value within 1e-3 relative (measured <= 3.1e-4) of float64. The measurement leaves the model as it
    was: dtype, weights bit for bit, no .grad, the global RNG stream."""
    model, batch = tiny(torch.float16, wscale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = reference_rows(model, batch, factor)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = PerSampleGradientProbe(model, NAMES, engine=engine, loss_fn=mean_ce(factor), keep_matrix=True)
        probe.update(batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.float16 and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for k in NAMES:
        got = probe.matrix(k)
        assert torch.isfinite(got).all()
        assert rel_rows(got, ref[k]) <= 5e-3, k
        assert rel_sv(got, ref[k]) <= 1e-3, k


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_autocast_float16_rows_match_float64(engine):
    """float32 weights under ``autocast_dtype=torch.float16``: the backward's activations are float16
    (the vmap and loop engines' rows float32, so only the autocast says so). Was 0.3 relative on vmap
    / loop; the reference is the float32 weights in float64 (the bound includes the float16 forward)."""
    model, batch = tiny(torch.float32, 0.02)
    ref = reference_rows(model, batch, 1.0)
    probe = PerSampleGradientProbe(model, NAMES, engine=engine, loss_fn=mean_ce(1.0), keep_matrix=True,
                                   autocast_dtype=torch.float16).update(batch)
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    for k in NAMES:
        assert rel_rows(probe.matrix(k), ref[k]) <= 5e-3, k
        assert rel_sv(probe.matrix(k), ref[k]) <= 1e-3, k


def test_bfloat16_backward_is_not_scaled(monkeypatch):
    """bfloat16 has float32's exponent range: its backward runs once at scale 1."""
    model, batch = tiny(torch.bfloat16, 0.03, t=8)
    scale = engines.LossScale()
    sites = {k: (model.get_submodule(k.rpartition(".")[0]), "weight") for k in NAMES}
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    checked = set()  # a second call: the (3, 8, d) inputs' layout check (one more backward) ran in the first
    for _ in range(2):
        calls.clear()
        engines.fast_engine(model, sites, batch, 3, lambda m, b: m(b[0]), mean_ce(1.0), loss_scale=scale,
                            checked=checked)
    assert scale.value == 1.0 and len(calls) == 1


def test_vmap_retries_replay_the_random_draws():
    """train-mode dropout under vmap: a start far from the right scale costs retries, and each retry
    draws the first try's masks, so the rows are those of a start at the final scale, and the global
    stream ends where one pass leaves it."""
    model, batch = tiny(torch.float16, 0.03, t=8, dropout=0.3)
    model.train()
    params = {k: dict(model.named_parameters())[k] for k in NAMES}
    out = []
    for start in (2.0 ** -30, None):
        scale = engines.LossScale()
        if start is None:
            scale.value = out[0][2]  # the scale the first run settled on: one pass
        else:
            scale.value = start
        torch.manual_seed(5)
        rows, _ = engines.vmap_engine(model, params, batch, 3, lambda m, b: m(b[0]), mean_ce(1.0), loss_scale=scale)
        out.append((rows, torch.get_rng_state(), scale.value))
    (a, rng_a, s_a), (b, rng_b, s_b) = out
    assert s_a == s_b != 2.0 ** -30
    assert torch.equal(rng_a, rng_b)
    assert all(torch.equal(a[k], b[k]) for k in NAMES)


def test_overflow_at_every_scale_names_the_weight_and_float16():
    """A gradient that is NaN whatever the seed (sqrt at 0) is an error naming the weight and float16,
    not zeros."""
    model, batch = tiny(torch.float16, 1.0, t=8)

    def loss_fn(logits, b):
        z = logits[:, 0, 0].float()
        return mean_ce(1.0)(logits, b) + (z - z.detach()).abs().sqrt()

    probe = PerSampleGradientProbe(model, NAMES[:1], loss_fn=loss_fn)
    with pytest.raises(NonFiniteError, match=r"h\.0\.attn\.c_attn\.weight: non-finite .*dtype float16.*65504"):
        probe.update(batch)
    assert probe.n_samples_ == 0


def test_overflow_hint_under_bfloat16_autocast_over_float16_weights():
    """float16 weights under autocast_dtype=bfloat16 (fast engine): the hint says which parts run in float16
    (those autocast does not cast) and that autocast leaves the weights' dtype, rather than that the backward
    runs in float16 and bfloat16 would help. A float32 model under the same autocast gets no float16 hint.
    (No LayerNorm: on the CPU it refuses float16 weights under bfloat16 autocast.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 64))
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = (ids[:, :-1], ids[:, 1:])

    def loss_fn(logits, b):
        z = logits[:, 0, 0].float()
        return mean_ce(1.0)(logits, b) + (z - z.detach()).abs().sqrt()

    for dtype, hint in ((torch.float16, (r" \(parameter of dtype float16; float16 weights under autocast_dtype=bfloat16: "
                                         r"the operations autocast does not cast .*65504.*does not change the weights'")),
                        (torch.float32, r"non-finite per-sample gradient for sample\(s\) \[[0-9, ]*\]$")):
        probe = PerSampleGradientProbe(model.to(dtype), "1.weight", loss_fn=loss_fn, forward_fn=lambda m, b: m(b[0]),
                                       autocast_dtype=torch.bfloat16)
        assert probe.engines_ == {"1.weight": "fast"}
        with pytest.raises(NonFiniteError, match=hint):
            probe.update(batch)


@settings(max_examples=60, deadline=None)
@given(
    exponent=st.integers(-70, 40),
    hidden=st.integers(0, 12),
    start=st.integers(-40, 40),
    spread=st.integers(0, 20),
)
def test_scaled_backward_finds_a_representable_scale(exponent, hidden, start, spread):
    """A stand-in backward in float16: gradients of magnitude 2^exponent (entries spread over 2^spread)
    whose hidden intermediate is 2^hidden times larger (an overflow there is an Inf in the result).
    Whatever the start, the kept pass is finite, its largest entry is at least 2^6 unless a larger
    scale overflowed or the bound was reached, and every entry within 2^-20 of the largest is float16-
    accurate (relative 2^-10) once unscaled."""
    g = torch.Generator().manual_seed(exponent * 1000 + spread)
    true = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5) * 2.0 ** (
        exponent - torch.randint(0, spread + 1, (64,), generator=g).double()
    )
    true[0] = 2.0 ** exponent

    def grads_at(s):
        inner = (true * s * 2.0 ** hidden).to(torch.float16)
        return [(inner.double() / 2.0 ** hidden).to(torch.float16)]

    scale = engines.LossScale()
    scale.value = 2.0 ** start
    (got,), s = engines.scaled_backward(grads_at, lambda gs: gs, scale)
    # an all-zero pass (gradients below float16's range at 2^40 too) leaves the carried scale as it was
    assert scale.value == (s if got.abs().max() > 0 else 2.0 ** start) and math.log2(s) == round(math.log2(s))
    assert 2.0 ** -40 <= s <= 2.0 ** 40
    assert torch.isfinite(got).all()
    amax = got.abs().max().item()
    if s < 2.0 ** 40:
        # a finite pass with a small maximum is kept only when twice its scale overflows the hidden step
        assert amax >= 2.0 ** 6 or (true.max() * 2 * s * 2.0 ** hidden) >= 65504
    big = true >= true.max() * 2.0 ** -20
    unscaled = got.double() / s
    if s * true.max() * 2.0 ** -20 >= 2.0 ** -14:  # within float16's normal range once scaled
        assert ((unscaled[big] - true[big]).abs() <= 2.0 ** -10 * true[big]).all()
