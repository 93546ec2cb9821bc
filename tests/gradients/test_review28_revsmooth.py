"""Review 28 (revsmooth): adversarial review of label smoothing in the chunked head loss.

* The Triton kernels with a masked vocabulary: a row whose first ``BLOCK_V`` logits are all ``-inf`` (a vocabulary
  masked by a ``-inf`` bias) made the online max ``-inf`` after the first block and ``exp(-inf - -inf)`` a NaN: the
  kernels returned NaN losses and gradients (also without smoothing) where the plain-PyTorch body and
  ``F.cross_entropy`` give the finite loss (``eps = 0``) or ``+inf`` (``eps > 0``: ``mean z = -inf``) and finite
  gradients. Run in Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess.
* The probe's non-finite-loss error under a label-smoothed default loss names the ``-inf`` logit cause (the old
  message blamed a sequence with no valid target only).
* The smoothed per-sequence loss the Hugging Face callback uses is bit for bit what it computed before it moved into
  ``causal_lm_loss`` (padding, ``-100`` labels, an all-ignored sequence, ``eps`` from 1e-6 to 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens._warnings import NonFiniteError
from spectral_lens.gradients import (
    PerSampleGradientProbe,
    causal_lm_head_loss,
    causal_lm_loss,
    causal_lm_targets,
    extract_logits,
    head_loss_fns,
)
from support.models import TinyGPT, lm_batch

ROOT = Path(__file__).resolve().parents[2]
PARAM = "transformer.h.1.attn.c_proj.weight"

_INTERP = r"""
import json, math, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[1])
from spectral_lens.gradients import _ce_kernel as K, fused_head as fh, linear_cross_entropy
g = torch.Generator().manual_seed(0)
out = {}
# V = 4100: three blocks of BLOCK_V = 2048, the last partial; the -inf logits fill the first block, the first two
# blocks (the max still -inf at the third), part of the second, or the padded tail
for masked, V, lo, hi, t in (("first-block", 4100, 0, 2048, [3001, 4099, 3500]),
                             ("first-two-blocks", 4500, 0, 4200, [4200, 4499, 4300]),
                             ("first-3000", 4100, 0, 3000, [3001, 4099, 3500]),
                             ("tail-900", 4100, 3200, 4100, [0, 3199, 2047])):
    t = torch.tensor(t)
    for eps in (0.0, 0.1):
        z = torch.randn(3, V, generator=g) * 4
        z[:, lo:hi] = float("-inf")
        w = torch.tensor([1.0, 0.5, 2.0])
        m, ls, loss = K.row_lse(z, t, eps)
        gk = K.softmax_grad(z, t, m, ls, w, eps)
        m2, ls2, loss2, g2 = K.lse_and_grad(z, t, w, eps)
        zd = z.double()
        ref = F.cross_entropy(zd, t, reduction="none", label_smoothing=eps)
        p = (torch.softmax(zd, -1) - eps / V) * w.double()[:, None]
        p[torch.arange(3), t] = 0.0
        p[torch.arange(3), t] = -p.sum(-1)
        fin = torch.isfinite(ref)
        out[f"{masked}-{eps}"] = dict(
            same_inf=bool(torch.equal(torch.isinf(loss), torch.isinf(ref)) and not loss.isnan().any()),
            loss_err=float(((loss.double() - ref)[fin].abs() / (ref[fin].abs() + math.log(V))).max()) if fin.any() else 0.0,
            g_finite=bool(gk.isfinite().all() and g2.isfinite().all()),
            g_err=float(((gk.double() - p).abs() / (p.abs().amax(-1, keepdim=True) + eps)).max()),
            fused_same=bool(torch.equal(loss.nan_to_num(), loss2.nan_to_num()) and torch.equal(gk, g2)))
# the whole chunked loss, kernels forced, a head whose bias masks the first 2100 classes with -inf
V = 4100
h = torch.randn(6, 16, generator=g).requires_grad_()
b = torch.zeros(V); b[:2100] = float("-inf")
t = torch.randint(2100, V, (6,), generator=g); t[3] = -100
# head_grad: the recomputing backward, else the input gradient formed in the forward
for eps, head_grad in ((0.0, False), (0.1, False), (0.1, True)):
    wt = (torch.randn(V, 16, generator=g) * 0.5).requires_grad_(head_grad)
    res = {}
    for name, use in (("kernel", True), ("torch", False)):
        fh._kernels = (lambda hh, dt: K) if use else (lambda hh, dt: None)
        loss = linear_cross_entropy(h, wt, t, b, chunk_rows=4, label_smoothing=eps)
        (gh,) = torch.autograd.grad(loss, h, torch.linspace(0.5, 2, 6))
        res[name] = (loss.detach().double(), gh.double())
    (l1, g1), (l2, g2) = res["kernel"], res["torch"]
    fin = l2.isfinite()
    out[f"chunked-{eps}-{head_grad}"] = dict(
        same_inf=bool(torch.equal(torch.isinf(l1), torch.isinf(l2)) and not l1.isnan().any()),
        loss_err=float((l1 - l2)[fin].abs().max() / (l2[fin].abs().max() + 1)),
        g_finite=bool(g1.isfinite().all()), g_err=float((g1 - g2).abs().max() / g2.abs().max()),
        fused_same=bool(l1[3] == 0 and bool(torch.isinf(l2).sum() == (5 if eps else 0))))
print(json.dumps(out))
"""


def test_kernels_handle_a_masked_vocabulary_in_the_interpreter():
    """``-inf`` logits (a vocabulary masked or padded by a ``-inf`` bias) anywhere in the row, also filling the whole
    first block: the kernels' loss is finite as ``F.cross_entropy``'s for ``eps = 0`` and ``+inf`` (never NaN) for
    ``eps > 0``, the gradient ``softmax - (1 - eps) onehot - eps / V`` finite and within ``2^-20`` of
    ``|g|_max + eps`` of the float64 one; the one-launch kernel agrees bit for bit; the whole chunked loss with the
    kernels equals the plain-PyTorch body."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SPECTRAL_LENS_NO_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", _INTERP, str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 11
    for key, r in out.items():
        assert r["same_inf"] and r["g_finite"] and r["fused_same"], (key, r)
        bound = 1e-5 if key.startswith("chunked") else 2.0**-19
        assert r["loss_err"] < bound and r["g_err"] < (1e-5 if key.startswith("chunked") else 2.0**-20), (key, r)


# ----------------------------------------------------------------------------- the probe's error with smoothing


def _masked_vocab_model() -> TinyGPT:
    """TinyGPT whose head has a bias of ``-inf`` on its last 5 classes (a padded vocabulary no target uses)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=42).double().eval()
    head = nn.Linear(16, 42, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[-5:] = float("-inf")
    model.lm_head = head
    return model


@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
def test_smoothed_loss_with_masked_vocabulary_is_inf_on_both_paths_and_the_error_says_why(head_loss):
    """``eps > 0`` and a ``-inf`` logit: the smoothed loss is ``+inf`` (``F.cross_entropy``'s and HF's
    ``LabelSmoother``'s too: the mean of ``-log p`` over the vocabulary), chunked as materialized, not NaN; the probe
    refuses it naming label smoothing and the ``-inf`` logits, and measures the plain loss afterwards."""
    model = _masked_vocab_model()
    x, y = lm_batch(m=3, vocab=37)
    with torch.no_grad():
        out = model(x)
        ref = causal_lm_loss(out, (x, y), label_smoothing=0.1)
        fns = head_loss_fns(model)
        chunked = causal_lm_head_loss(fns["forward_fn"](model, (x, y)), (x, y), model.lm_head, label_smoothing=0.1)
    assert torch.isinf(ref).all() and torch.isinf(chunked).all() and (ref > 0).all() and (chunked > 0).all()
    assert torch.isfinite(causal_lm_loss(out, (x, y))).all()
    probe = PerSampleGradientProbe(model, PARAM, head_loss=head_loss)
    with pytest.raises(NonFiniteError, match=r"label-smoothed \(eps=0.1, .*a logit of -inf"):
        with probe._trained_loss(0.1):
            probe.update((x, y))
    probe.update((x, y))  # the plain loss again: finite
    assert probe.n_samples_ == 3 and probe._label_smoothing == 0.0


# ----------------------------------------------------------------------------- the callback's loss, before and after


def _old_smoothed_causal_lm_loss(output, batch, epsilon, ignore_index=-100):
    """``integrations.hf._smoothed_causal_lm_loss`` as it was before commit 94df5df."""
    logits, targets = causal_lm_targets(extract_logits(output), batch, ignore_index)
    if logits.dtype != torch.float64:
        logits = logits.float()
    tok = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index, reduction="none",
                          label_smoothing=epsilon).view(targets.shape)
    return tok.sum(-1) / (targets != ignore_index).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_callbacks_smoothed_loss_is_bit_for_bit_the_old_one(dtype):
    """Padding (``attention_mask``), ``-100`` labels, an all-ignored sequence (NaN in both), tuple, dict and bare
    batches, ``eps`` 1e-6 to 1: ``causal_lm_loss(label_smoothing=eps)`` is what the callback computed before."""
    torch.manual_seed(0)
    model = TinyGPT().to(dtype)
    x, y = lm_batch(m=4)
    y[1, :3] = -100
    y[2, :] = -100
    mask = torch.ones_like(x)
    mask[3, -4:] = 0
    with torch.no_grad():
        out = model(x)
    for eps in (1e-6, 0.1, 1.0):
        for batch in ((x, y), {"input_ids": x, "labels": y}, {"input_ids": x, "labels": x, "attention_mask": mask}, x):
            old = _old_smoothed_causal_lm_loss(out, batch, eps)
            new = causal_lm_loss(out, batch, label_smoothing=eps)
            assert new.dtype == old.dtype and torch.equal(new.isnan(), old.isnan())
            assert torch.equal(new.nan_to_num(), old.nan_to_num()), (eps, batch if torch.is_tensor(batch) else type(batch))


# ----------------------------------------------------------------------------- head_loss proofs with smoothing


class _SoftCapped(TinyGPT):
    """Gemma 2's ``final_logit_softcapping``: ``cap * tanh(z / cap)`` after the head (the same shape)."""

    def forward(self, idx):
        return torch.tanh(super().forward(idx) / 3.0) * 3.0


def _tied_biased() -> TinyGPT:
    torch.manual_seed(1)
    model = TinyGPT(tie=True).double().eval()
    head = nn.Linear(16, 37, bias=True).double()
    head.weight = model.transformer.wte.weight  # tied, with a bias of its own
    with torch.no_grad():
        head.bias.normal_()
    model.lm_head = head
    return model


def test_smoothed_head_loss_proofs_tied_biased_and_soft_capped(monkeypatch):
    """With smoothing on, ``head_loss`` decides as for the plain loss: a tied head with a bias chunks (rows and
    losses equal the materialized smoothed loss's in float64), a soft-capped one is refused (``"chunked"`` raises,
    ``"auto"`` takes the materialized logits and smooths the capped logits, as ``F.cross_entropy`` on them)."""
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    x, y = lm_batch(m=4)
    y[2, :5] = -100
    model = _tied_biased()
    probes = {}
    for mode in ("materialized", "chunked", "auto"):
        probes[mode] = PerSampleGradientProbe(model, PARAM, head_loss=mode, keep_matrix=True)
        with probes[mode]._trained_loss(0.3):
            probes[mode].update((x, y))
            assert probes[mode].head_loss_ == ("chunked (lm_head)" if mode != "materialized"
                                               else "materialized: head_loss='materialized'")
    mat = probes["materialized"]
    with torch.no_grad():
        torch.testing.assert_close(mat.losses_, causal_lm_loss(model(x), (x, y), label_smoothing=0.3), rtol=1e-13, atol=0)
    for mode in ("chunked", "auto"):
        torch.testing.assert_close(probes[mode].losses_, mat.losses_, rtol=1e-12, atol=0)
        assert float((probes[mode].matrix() - mat.matrix()).abs().max()) <= 1e-10 * float(mat.matrix().abs().max())

    torch.manual_seed(0)
    capped = _SoftCapped().double().eval()
    probe = PerSampleGradientProbe(capped, PARAM, head_loss="chunked")
    with pytest.raises(ValueError, match="head_loss='chunked' impossible for _SoftCapped"):
        with probe._trained_loss(0.3):
            probe.update((x, y))
    assert probe._label_smoothing == 0.0
    probe = PerSampleGradientProbe(capped, PARAM, head_loss="auto")
    with probe._trained_loss(0.3):
        probe.update((x, y))
        assert probe.head_loss_.startswith("materialized: the logits")
    with torch.no_grad():
        z = capped(x)
        ref = F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none", label_smoothing=0.3).view(y.shape)
    torch.testing.assert_close(probe.losses_, ref.sum(1) / (y != -100).sum(1), rtol=1e-13, atol=0)
