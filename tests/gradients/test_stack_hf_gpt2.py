"""Hugging Face GPT-2 (config-built, no download) with padded dict batches through ``SpectralLens``.

GPT-2's projections are ``transformers.pytorch_utils.Conv1D`` (weight stored transposed), and its
attention-mask handling is data-dependent control flow that ``torch.func.vmap`` cannot trace.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from spectral_lens import EngineFallbackWarning, PerSampleGradientProbe, SpectralLens  # noqa: E402

PARAM = "transformer.h.1.attn.c_proj.weight"
LAYER = "transformer.h.1"


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _padded_pool(seed=0):
    """Two right-padded batches: 3 + 2 sequences of length 9 with 9, 6, 4 | 7, 3 real tokens."""
    g = torch.Generator().manual_seed(seed)
    pool = []
    for lengths in ((9, 6, 4), (7, 3)):
        ids = torch.randint(1, 61, (len(lengths), 9), generator=g)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = ids.masked_fill(mask == 0, 0)
        pool.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return pool


def _reference_rows(model, pool, param=PARAM) -> np.ndarray:
    """Independent per-sample autograd loop: HF causal-LM loss of one sequence, its own padding."""
    w = model.get_parameter(param)
    rows = []
    for batch in pool:
        for i in range(batch["input_ids"].shape[0]):
            ids, am, lab = (batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=am).logits
            loss = F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100)  # HF shift, mean over real tokens
            (g,) = torch.autograd.grad(loss, [w])
            rows.append(g.reshape(-1).double().numpy())
    return np.stack(rows)


def _reference_activations(model, pool) -> np.ndarray:
    """Float64 outputs of the deepest block at the unpadded positions only."""
    out = []
    h = model.get_submodule(LAYER).register_forward_hook(
        lambda m, a, o: out.append((o[0] if isinstance(o, tuple) else o).detach()))  # transformers 4.x: a tuple
    try:
        with torch.no_grad():
            for batch in pool:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h.remove()
    return np.concatenate([o[b["attention_mask"].bool()].numpy() for o, b in zip(out, pool)])


def test_gpt2_padded_dict_batches_through_spectral_lens():
    model = _gpt2()
    pool = _padded_pool()
    lens = SpectralLens(model, pool, precision="float64", progress=False)
    assert lens.layers == LAYER and list(lens.probe.params) == [PARAM]
    assert lens.probe.engines_ == {PARAM: "fast"}  # Conv1D has a fast path now
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        m = lens.measure(step=0, tokens=0)

    # gradients: squared singular values of G equal a per-sample autograd loop's, <= 1e-10
    ref = np.linalg.svd(_reference_rows(model, pool), compute_uv=False)
    got = m.spectra[f"grad:{PARAM}"]
    assert got.n_rows == 5
    s = np.sqrt(np.clip(got.values.numpy()[: ref.size], 0, None))
    assert np.max(np.abs(s - ref)) <= 1e-10, np.max(np.abs(s - ref))

    # activations: rows are exactly the unpadded positions, and their spectrum is theirs
    act = m.spectra[f"act:{LAYER}"]
    n_real = sum(int(b["attention_mask"].sum()) for b in pool)
    assert n_real == 9 + 6 + 4 + 7 + 3
    assert act.n_rows == n_real
    rows = _reference_activations(model, pool)
    want = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
    np.testing.assert_allclose(act.values.numpy(), want, rtol=1e-9, atol=1e-12 * want[0])

    # the default mask is what excludes the padding: without it every position is measured
    unmasked = SpectralLens(model, pool, params=(), mask_fn=None, precision="float64", progress=False)
    assert unmasked.measure(0, 0).spectra[f"act:{LAYER}"].n_rows == sum(b["input_ids"].numel() for b in pool)


def test_gpt2_vmap_engine_falls_back_to_loop_with_a_warning():
    model = _gpt2(seed=1)
    pool = _padded_pool(seed=1)
    tied = "transformer.wte.weight"  # tied to lm_head.weight: engine "auto" takes vmap
    probe = PerSampleGradientProbe(params=tied)  # built before the model is known
    lens = SpectralLens(model, pool, probe=probe, params=None, precision="float64", progress=False)
    assert probe.model is model and probe.engines_ == {tied: "vmap"}
    with pytest.warns(EngineFallbackWarning, match=r"vmap cannot trace GPT2LMHeadModel .*engine='loop'"):
        m = lens.measure(0, 0)
    assert probe.engines_ == {tied: "loop"}
    ref = np.linalg.svd(_reference_rows(model, pool, tied), compute_uv=False)
    s = np.sqrt(np.clip(m.spectra[f"grad:{tied}"].values.numpy()[: ref.size], 0, None))
    assert np.max(np.abs(s - ref)) <= 1e-10
    # engine="vmap" asked for explicitly does not switch engines by itself: it says what to do
    explicit = PerSampleGradientProbe(model, PARAM, engine="vmap")
    with pytest.raises(RuntimeError, match=r"engine='vmap' cannot trace GPT2LMHeadModel .*Pass engine='loop'"):
        explicit.update(pool[0])
    assert explicit.n_samples_ == 0
