"""Review 28 (smoothhead): label smoothing in the chunked head + loss (``linear_cross_entropy(label_smoothing=)``).

Per token ``F.cross_entropy(z, t, label_smoothing=eps)``: ``(1 - eps) (lse - z_t) + eps (lse - mean z)``, gradient
``softmax - (1 - eps) onehot - eps / V``. The references are float64: ``F.cross_entropy`` of the materialized
float64 logits, the logits' gradient formed with the target entry from the others' sum (so the reference has no
``p_t - 1`` cancellation), and ``torch.func`` per-sample gradients of ``F.cross_entropy(label_smoothing=eps)``.
The Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectral_lens.gradients import (
    PerSampleGradientProbe,
    causal_lm_head_loss,
    causal_lm_loss,
    chunked_head_fns,
    fused_head,
    head_loss_fns,
    linear_cross_entropy,
)
from support.per_sample import PROBLEMS, head_problem
from support.dispatch import LargestAllocation
from support.models import TinyGPT, lm_batch

ROOT = Path(__file__).resolve().parents[2]
PARAM = "transformer.h.1.attn.c_proj.weight"
EPSILONS = st.one_of(st.sampled_from([0.0, 1e-6, 0.1, 0.5, 0.999]), st.floats(0.0, 1.0, exclude_max=True))


def _logits_grad(z: torch.Tensor, t: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """float64 ``(softmax(z) - (1 - eps) onehot(t) - eps / V) * weight`` (0 for ignored rows), the target entry
    formed as minus the sum of the others (the entries sum to zero): exact to float64 rounding of each entry."""
    z = z.double()
    v = z.shape[-1]
    valid = t != -100
    safe = t.masked_fill(~valid, 0)[:, None]
    w = (weight.double() * valid)[:, None]
    g = (torch.softmax(z, -1) - eps / v) * w
    g = g.scatter(-1, safe, 0.0)
    return g.scatter(-1, safe, -g.sum(-1, keepdim=True))


def _reference(h, w, b, t, eps, grad):
    h, w, b = (x.detach().double() for x in (h, w, b))
    z = F.linear(h, w, b)
    loss = F.cross_entropy(z, t, ignore_index=-100, reduction="none", label_smoothing=eps)
    g = _logits_grad(z, t, eps, grad)
    return loss, g @ w, g.t() @ h, g.sum(0)


# ----------------------------------------------------------------------------- the loss itself, float64 references


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PROBLEMS, eps=EPSILONS, head_grad=st.booleans())
def test_smoothed_loss_and_gradients_match_float64(n, d, v, chunk, offset, ignore_frac, dtype, eps, head_grad, seed):
    """Any vocabulary, chunking, ignored targets, offsets up to 1e4, eps in [0, 1): the loss within the bound of
    fused_head's docstring (``4e-6 (|z|_max + log V)`` float32, ``1e-12`` float64) of float64 ``F.cross_entropy(...,
    label_smoothing=eps)``; ignored targets 0; the gradients of hidden states, head and bias (``head_grad``: the
    recomputing backward; else the input gradient formed in the forward) within ``4e-6 (|z|_max + 1)`` of their
    largest entry, as without smoothing."""
    h, w, b, t = head_problem(n, d, v, offset, ignore_frac, seed, dtype)
    grad = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    ref_loss, ref_h, ref_w, ref_b = _reference(h, w, b, t, eps, grad)
    hp = h.clone().requires_grad_()
    wp, bp = (x.clone().requires_grad_(head_grad) for x in (w, b))
    loss = linear_cross_entropy(hp, wp, t, bp, chunk_rows=chunk, label_smoothing=eps)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == (n,)
    wanted = (hp, wp, bp) if head_grad else (hp,)
    got = torch.autograd.grad(loss, wanted, grad.to(loss.dtype))
    z_max = float(F.linear(h.double(), w.double(), b.double()).abs().max())
    tol = 1e-12 if dtype == torch.float64 else 4e-6
    assert float((loss.detach().double() - ref_loss).abs().max()) <= tol * (z_max + math.log(v))
    assert bool((loss[t == -100] == 0).all())
    geps = 1e-11 if dtype == torch.float64 else 4e-6 * (z_max + 1)
    floor = 1e-300 if dtype == torch.float64 else 1e-7
    for g, ref in zip(got, (ref_h, ref_w, ref_b)):
        scale = max(float(ref.abs().max()), 1e-30)
        assert float((g.double() - ref).abs().max()) <= geps * scale + floor


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    v=st.integers(2, 400),
    chunk=st.integers(1, 40),
    offset=st.sampled_from([0.0, 30.0, 1e4, -1e4]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    eps=st.one_of(st.sampled_from([1e-6, 0.1, 1.0]), st.floats(0.0, 1.0)),
    precompute=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_smoothing_costs_no_rounding_at_the_offset_against_the_same_logits(n, v, chunk, offset, scale, eps,
                                                                          precompute, seed):
    """The error bound of the smoothing term, against the float64 loss and gradient of the *same* float32 logits
    (identity head): ``eps (log s - mean(z - m))`` is a sum of nonnegative terms, the mean a float32 sum of
    same-sign values, so the loss is within ``(log2 V + 4) 2^-24`` of ``|loss| + log V`` whatever the offset
    (``eps = 1`` is the smoothing term alone; an ``lse - mean z`` formed at the offset's scale would be 1e-3 off at
    1e4), and the logits' gradient within ``2^-20 (1 + log V)`` of ``|g|_max + eps`` (the entries
    ``p_j - eps / V`` round at the scale of ``eps / V``; the target entry is formed from the positive sum of the
    others' ``p_j``)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale + offset).float()
    t = torch.randint(0, v, (n,), generator=g)
    zr = z.clone().requires_grad_()
    eye = torch.eye(v, requires_grad=not precompute)
    loss = linear_cross_entropy(zr, eye, t, chunk_rows=chunk, label_smoothing=eps)
    (gz,) = torch.autograd.grad(loss.sum(), zr)
    ref = F.cross_entropy(z.double(), t, reduction="none", label_smoothing=eps)
    assert ((loss.double() - ref).abs() <= (math.log2(v) + 4) * 2**-24 * (ref.abs() + math.log(v))).all()
    p = _logits_grad(z, t, eps, torch.ones(n))
    bound = 2**-20 * (1 + math.log(v)) * (float(p.abs().max()) + eps) + 1e-37  # + float32's underflow
    assert float((gz.double() - p).abs().max()) <= bound


def test_confident_target_with_small_smoothing_keeps_relative_accuracy():
    """p_t ~ 1, eps = 1e-9 (float32): the target entry ``eps (V - 1) / V - (1 - p_t)`` comes from the positive sum
    of the others, not from ``p_t - (1 - eps) - eps / V`` (which rounds at 2^-24, 1e-7 off a 2e-9 gradient)."""
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[30.0], [0.0], [0.0]])  # p_t = 1 - 2e-13 for target 0
    eps = 1e-9
    loss = linear_cross_entropy(h, w, torch.tensor([0]), chunk_rows=1, label_smoothing=eps)
    (gh,) = torch.autograd.grad(loss.sum(), h)
    q = 2 * math.exp(-30) / (1 + 2 * math.exp(-30))  # 1 - p_t
    ref = 30.0 * (eps * 2 / 3 - q)  # d loss / d h = sum_j g_j w_j = w_t g_t
    assert abs(float(gh) - ref) <= 1e-5 * abs(ref)


def test_eps_zero_is_the_plain_loss_bit_for_bit():
    h, w, b, t = head_problem(30, 8, 97, 30.0, 0.3, 3, torch.float32)
    for head_grad in (False, True):
        out = []
        for kw in ({}, {"label_smoothing": 0.0}):
            hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_(head_grad)
            loss = linear_cross_entropy(hp, wp, t, b, chunk_rows=7, **kw)
            out.append((loss, *torch.autograd.grad(loss.sum(), hp)))
        assert all(torch.equal(a, b) for a, b in zip(*out))


def test_never_forms_the_full_logits_with_smoothing():
    n, d, v, chunk = 24, 4, 200, 8
    h, w, b, t = head_problem(n, d, v, 0.0, 0.2, 0, torch.float32)
    for head_grad in (False, True):
        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_(head_grad)
        with LargestAllocation() as mode:
            linear_cross_entropy(hp, wp, t, b, chunk_rows=chunk, label_smoothing=0.1).sum().backward()
        assert mode.largest <= chunk * v < n * v


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_label_smoothing_is_refused_by_name(bad):
    h, w, b, t = head_problem(4, 3, 5, 0.0, 0.0, 0, torch.float32)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: label_smoothing must be a number in \[0, 1\]"):
        linear_cross_entropy(h, w, t, label_smoothing=bad)
    with pytest.raises(ValueError, match=r"causal_lm_loss: label_smoothing"):
        causal_lm_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), label_smoothing=bad)
    with pytest.raises(ValueError, match=r"chunked_head_fns: label_smoothing"):
        chunked_head_fns(TinyGPT(), "lm_head", label_smoothing=bad)


def test_causal_lm_head_loss_and_head_loss_fns_smooth_as_causal_lm_loss():
    """The per-sequence means (ignored targets out of sum and count): chunked equals the materialized
    ``causal_lm_loss(label_smoothing=)`` (which is ``F.cross_entropy``'s) in float64."""
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    x, y = lm_batch(m=4)
    y[1, :3] = -100
    with torch.no_grad():
        logits = model(x)
        ref = causal_lm_loss(logits, (x, y), label_smoothing=0.2)
        manual = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none", label_smoothing=0.2)
        manual = manual.view(y.shape).sum(1) / (y != -100).sum(1)
        torch.testing.assert_close(ref, manual, rtol=1e-14, atol=0)
        fns = head_loss_fns(model, label_smoothing=0.2, example=(x, y))
        got = fns["loss_fn"](fns["forward_fn"](model, (x, y)), (x, y))
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
        hidden = fns["forward_fn"](model, (x, y))
        torch.testing.assert_close(causal_lm_head_loss(hidden, (x, y), model.lm_head, label_smoothing=0.2), ref,
                                   rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="label_smoothing=0.2 runs F.cross_entropy"):
        causal_lm_loss(logits, (x, y), method="recompute", label_smoothing=0.2)


# ----------------------------------------------------------------------------- the probe's rows


def _func_rows(model, x, y, eps, param):
    """float64 per-sample gradients of ``F.cross_entropy(label_smoothing=eps)`` (the mean over each sequence's
    non-ignored targets) by ``torch.func.vmap(grad(...))``: the reference the probe's rows must equal."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        logits = torch.func.functional_call(model, {**params, param: p}, (xi[None],))[0]
        return F.cross_entropy(logits, yi, ignore_index=-100, label_smoothing=eps)

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params[param], x, y).flatten(1)


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("eps", [0.1, 0.7])
def test_probe_rows_chunked_equal_materialized_and_torch_func(engine, eps, monkeypatch):
    """Inside ``_trained_loss(eps)`` (the Hugging Face callback's way), ``head_loss="chunked"`` and ``"auto"`` (on
    CUDA with Triton, here by the speed rule patched) chunk the smoothed loss through the head; the rows, the
    losses and the spectrum equal the materialized path's (float64, 1e-10) and ``torch.func``'s per-sample
    gradients of ``F.cross_entropy(label_smoothing=eps)`` (1e-10); afterwards the probe is back to its plain
    default loss and its plain decision."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    x, y = lm_batch(m=5, t=10)
    y[1, :4] = -100
    y[3, -2:] = -100
    ref_rows = _func_rows(model, x, y, eps, PARAM)
    results = {}
    for mode in ("materialized", "chunked", "auto"):
        probe = PerSampleGradientProbe(model, PARAM, engine=engine, chunk_size=2, keep_matrix=True, head_loss=mode)
        with mock.patch.object(fused_head, "CHUNK_BYTES", 4 * 37 * 7):  # 7 tokens per block
            with probe._trained_loss(eps):
                probe.update((x, y))
                decided = probe.head_loss_
        results[mode] = probe
        assert decided == ("materialized: head_loss='materialized'" if mode == "materialized" else "chunked (lm_head)")
        assert probe._label_smoothing == 0.0 and probe.loss_fn.keywords == {"ignore_index": -100}
        assert probe.head_loss_ == (None if mode != "materialized" else decided)
    mat = results["materialized"]
    for mode in ("chunked", "auto"):
        got = results[mode]
        assert float((got.matrix() - mat.matrix()).abs().max()) <= 1e-10 * float(mat.matrix().abs().max())
        torch.testing.assert_close(got.losses_, mat.losses_, rtol=1e-12, atol=0)
        a, b = got.compute(), mat.compute()
        assert float((a.values - b.values).abs().max()) <= 1e-10 * float(b.values.max())
    assert float((mat.matrix() - ref_rows).abs().max()) <= 1e-10 * float(ref_rows.abs().max())
    plain = PerSampleGradientProbe(model, PARAM, engine=engine, keep_matrix=True).update((x, y))
    assert not torch.allclose(plain.matrix(), mat.matrix(), rtol=1e-3)


# ----------------------------------------------------------------------------- the Triton kernels (interpreter)

_INTERP = r"""
import json, math, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from spectral_lens.gradients import _ce_kernel as K, fused_head as fh, linear_cross_entropy
g = torch.Generator().manual_seed(0)
out = {}
cases = [(torch.float32, 0.0, 1, 5, 0.1), (torch.float32, 0.0, 3, 5000, 0.1), (torch.float32, 1e4, 3, 2049, 0.9),
         (torch.float32, -1e4, 2, 4100, 1.0), (torch.bfloat16, 300.0, 3, 2049, 0.1), (torch.bfloat16, 0.0, 1, 7, 1.0)]
for dtype, offset, c, v, eps in cases:
    z = (torch.randn(c, v, generator=g) * 6 + offset).to(dtype)
    t = torch.randint(0, v, (c,), generator=g); t[0] = v - 1
    w = torch.rand(c, generator=g) + 0.5
    m, ls, loss = K.row_lse(z, t, eps)
    gk = K.softmax_grad(z, t, m, ls, w, eps)
    m2, ls2, loss2, g2 = K.lse_and_grad(z, t, w, eps)
    zd = z.double()
    ref = F.cross_entropy(zd, t, reduction="none", label_smoothing=eps)
    p = (torch.softmax(zd, -1) - eps / v) * w.double()[:, None]
    p[torch.arange(c), t] = 0.0
    p[torch.arange(c), t] = -p.sum(-1)
    out[f"{dtype}-{offset:g}-{v}-{eps}"] = dict(
        loss_err=float(((loss.double() - ref).abs() / (ref.abs() + math.log(v))).max()),
        g_err=float(((gk.double() - p).abs() / (p.abs().amax(-1, keepdim=True) + eps)).max()),
        fused_same=bool(torch.equal(loss, loss2) and torch.equal(gk, g2) and torch.equal(ls, ls2)))
# the chunked loss with the kernels (forced under the interpreter) against the plain-PyTorch body
for dtype, head_grad in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
    h = torch.randn(20, 16, generator=g).to(dtype).requires_grad_()
    wt = (torch.randn(2100, 16, generator=g) * 0.5).to(dtype).requires_grad_(head_grad)
    t = torch.randint(0, 2100, (20,), generator=g); t[3] = -100
    res = {}
    for name, use in (("kernel", True), ("torch", False)):
        fh._kernels = (lambda hh, dt: K) if use else (lambda hh, dt: None)
        loss = linear_cross_entropy(h, wt, t, chunk_rows=8, label_smoothing=0.3)
        (gh,) = torch.autograd.grad((loss * torch.linspace(0.5, 2, 20)).sum(), h)
        res[name] = (loss.detach().double(), gh.double())
    (l1, g1), (l2, g2) = res["kernel"], res["torch"]
    out[f"loss-{dtype}-headgrad{head_grad}"] = dict(
        loss_err=float((l1 - l2).abs().max() / (l2.abs().max() + 1)),
        grad_err=float((g1 - g2).abs().max() / g2.abs().max()), ignored_zero=bool(l1[3] == 0))
print(json.dumps(out))
"""


def test_kernels_smooth_in_the_interpreter():
    """Triton's interpreter on the CPU: ``row_lse``, ``softmax_grad`` and the one-launch ``lse_and_grad`` with
    ``eps`` in {0.1, 0.9, 1} (one case each of V below, at and above BLOCK_V, offsets 0 to 1e4) against float64 ``F.cross_entropy(label_smoothing=eps)`` and its gradient, V not a
    multiple of BLOCK_V, offsets up to 1e4: fp32 loss within ``(V / BLOCK_V + 13) 2^-24`` of ``|loss| + log V``
    (the kernel's bound, 2^-19 here), fp32 gradient within ``2^-20`` of ``|g|_max + eps`` (bf16: the logits' own
    rounding, 2^-7); the two launches and the fused one agree bit for bit; and the
    whole chunked loss with the kernels equals the plain-PyTorch body with smoothing (ignored tokens 0)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SPECTRAL_LENS_NO_TRITON", None)
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", _INTERP, str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 9
    for key, r in out.items():
        if key.startswith("loss-"):
            assert r["ignored_zero"], key
            assert r["loss_err"] < 1e-5 and r["grad_err"] < (1e-5 if "float32" in key else 2.0**-6), (key, r)
            continue
        assert r["fused_same"], key
        if "float32" in key:
            assert r["loss_err"] < 2.0**-19 and r["g_err"] < 2.0**-20, (key, r)
        else:  # bf16 logits: exact in fp32; the loss as fp32's, the gradient rounded once to bf16
            assert r["loss_err"] < 2.0**-19 and r["g_err"] < 2.0**-7, (key, r)
