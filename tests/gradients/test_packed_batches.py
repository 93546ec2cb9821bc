"""Packed and padded language-model batches in the probe and the lens (float64 tiny Hugging Face models).

A packed batch (``DataCollatorWithFlattening``: one row of concatenated documents, ``position_ids``
restarting at 0 in each, ``labels`` -100 at each document's first token, no ``attention_mask``) gives one
sample per document, and each per-document gradient equals the float64 gradient of the same model run on
that document alone (batch of one, no padding), with ``L_m`` the mean next-token cross-entropy over the
document's targets (protocol.md, section 4). Padded batches (right and left) give, for each sequence,
the gradient of that sequence alone. The lens's activation pass on a packed pool measures each document's
tokens as the document alone gives them, and no padding row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import spectral_lens as sl  # noqa: E402
from spectral_lens import PerSampleGradientProbe  # noqa: E402
from spectral_lens.gradients._batch import batch_as_run, batch_size, default_forward, plain_batch, unpack_documents  # noqa: E402
from spectral_lens.gradients.losses import causal_lm_loss  # noqa: E402
from tests.support.data import cov_eigs  # noqa: E402
from tests.support.models import tiny_hf_llama  # noqa: E402

V = 50
LENGTHS = (5, 9, 3, 7)
LLAMA_W = "model.layers.1.self_attn.o_proj.weight"
GPT2_W = "transformer.h.1.attn.c_proj.weight"


def llama():
    return tiny_hf_llama(V)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def documents(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def packed(docs, **kwargs):
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt", **kwargs)
    return collator([{"input_ids": d.tolist()} for d in docs])


def alone(model, name, ids, position_ids=None):
    """float64 reference: grad_W of the mean next-token loss of the sequence ``ids`` run by itself."""
    w = dict(model.named_parameters())[name]
    kw = {} if position_ids is None else {"position_ids": position_ids[None]}
    logits = model(input_ids=ids[None], **kw).logits[0, :-1]
    loss = F.cross_entropy(logits, ids[1:])
    return torch.autograd.grad(loss, w)[0].flatten(), loss.detach()


def probe_rows(model, name, batch):
    probe = PerSampleGradientProbe(model, params=name, keep_matrix=True)
    probe.update(batch)
    return probe.matrix(name), probe.losses_


def assert_rows_match(rows, losses, refs, rtol):
    assert rows.shape[0] == len(refs)
    for m, (g, loss) in enumerate(refs):
        scale = g.abs().max()
        assert (rows[m] - g).abs().max() <= rtol * scale, m
        assert abs(losses[m] - loss) <= rtol * abs(loss), m


# ------------------------------------------------------------------------------------- unpacking
def test_packed_row_reads_as_padded_documents():
    docs = documents()
    batch = packed(docs)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (1, sum(LENGTHS))
    out = batch_as_run(batch, default_forward)  # a BatchEncoding-free dict; any mapping is read the same way
    width = max(LENGTHS)
    assert out["input_ids"].shape == (len(docs), width) and batch_size(out) == len(docs)
    for m, d in enumerate(docs):
        n = len(d)
        assert out["attention_mask"][m].tolist() == [1] * n + [0] * (width - n)
        assert torch.equal(out["input_ids"][m, :n], d)
        assert out["position_ids"][m, :n].tolist() == list(range(n))
        assert out["labels"][m].tolist() == [-100] + d[1:].tolist() + [-100] * (width - n)


def test_two_packed_rows_and_every_packing_field_agree():
    docs = documents((4, 6, 2, 3, 5, 4))
    a, b = packed(docs[:3]), packed(docs[3:])
    assert a["input_ids"].shape == b["input_ids"].shape == (1, 12)
    two = {k: torch.cat([a[k], b[k]]) for k in ("input_ids", "labels", "position_ids")}
    out = unpack_documents(two)
    assert out["attention_mask"].sum(1).tolist() == [4, 6, 2, 3, 5, 4]
    for m, d in enumerate(docs):
        assert torch.equal(out["input_ids"][m, : len(d)], d)
    # seq_idx and the flash-attention boundaries alone (no position_ids) give the same documents, and are dropped
    full = packed(docs[:3], return_seq_idx=True, return_flash_attn_kwargs=True, return_position_ids=False)
    assert "position_ids" not in full and "cu_seq_lens_q" in full
    for keep in ("seq_idx", "cu_seq_lens_q"):
        part = {k: v for k, v in full.items() if k in ("input_ids", "labels", keep)}
        got = unpack_documents(part)
        assert set(got) == {"input_ids", "labels", "attention_mask"}
        assert torch.equal(got["input_ids"], unpack_documents(dict(a))["input_ids"])


def test_not_packed_batches_are_unchanged():
    ids = torch.randint(0, V, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding with position_ids from the mask: not a packed row (attention_mask given)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": ids}
    assert unpack_documents(padded) is padded and plain_batch(padded) is padded
    plain = {"input_ids": ids, "position_ids": torch.arange(6).expand(3, 6), "labels": ids}
    assert unpack_documents(plain) is plain and batch_size(plain) == 3


def test_packing_errors_name_the_fields():
    docs = documents()
    full = dict(packed(docs, return_seq_idx=True))
    full["seq_idx"] = full["seq_idx"].roll(1, dims=1)
    with pytest.raises(ValueError, match="position_ids and seq_idx give different document boundaries"):
        unpack_documents(full)
    both = dict(packed(docs, return_flash_attn_kwargs=True))
    both["attention_mask"] = torch.ones_like(both["input_ids"])
    with pytest.raises(ValueError, match=r"both attention_mask and the packing fields \['cu_seq_lens_q'"):
        unpack_documents(both)
    with pytest.raises(ValueError, match=r"packing fields \['max_length_q'\].*to find the documents"):
        unpack_documents({"inputs_embeds": torch.zeros(1, 24, 4), "max_length_q": 9})
    odd = dict(packed(docs))
    odd["doc_weights"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"field 'doc_weights' of shape \(4,\) cannot be split"):
        unpack_documents(odd)


# ------------------------------------------------------------------------------------- probe
@pytest.mark.parametrize("make, name", [(llama, LLAMA_W), (gpt2, GPT2_W)], ids=["llama", "gpt2"])
def test_probe_on_a_packed_batch_gives_each_document_alone(make, name):
    model = make()
    docs = documents()
    rows, losses = probe_rows(model, name, packed(docs))
    assert_rows_match(rows, losses, [alone(model, name, d) for d in docs], 1e-12)


def test_probe_on_padded_batches_gives_each_sequence_alone():
    """Right and left padding, different valid counts: each row is that sequence's own gradient (mean over
    its valid targets). Left padding shifts Llama's positions, which RoPE leaves the same up to rounding.
    On the old loss the last left pad "predicted" the first real token: 0.2 of the gradient off."""
    model = llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding, 5 tokens
    mask[1, :3] = 0  # left padding, 6 tokens
    mask[3, :6] = 0  # left padding, 3 tokens
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    rows, losses = probe_rows(model, LLAMA_W, batch)
    refs = [alone(model, LLAMA_W, ids[m][mask[m].bool()]) for m in range(4)]
    assert_rows_match(rows, losses, refs, 1e-9)


def test_left_padding_with_position_ids_gpt2():
    """GPT-2's positions are absolute: a left-padded batch passes position_ids (as generate() makes them)."""
    model = gpt2()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             "labels": ids.masked_fill(mask == 0, -100)}
    rows, losses = probe_rows(model, GPT2_W, batch)
    assert_rows_match(rows, losses, [alone(model, GPT2_W, ids[m][mask[m].bool()]) for m in range(3)], 1e-12)


def test_loss_masks_the_pad_before_the_first_token():
    """causal_lm_loss alone, float64 logits: a left-padded row's loss is the mean over its own targets."""
    logits = torch.randn(2, 6, V, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = causal_lm_loss(logits, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    want = [F.cross_entropy(logits[0, 2:5], ids[0, 3:6]), F.cross_entropy(logits[1, 0:3], ids[1, 1:4])]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-14, atol=0)


def test_all_padding_row_and_one_token_document_are_named():
    model = llama()
    ids = torch.randint(0, V, (3, 6))
    mask = torch.ones_like(ids)
    mask[2] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    with pytest.raises(sl.NonFiniteError, match=r"sample\(s\) \[2\].*all padding.*drop it"):
        probe_rows(model, LLAMA_W, batch)
    with pytest.raises(sl.NonFiniteError, match=r"sample\(s\) \[1\].*one-token document of a packed batch"):
        probe_rows(model, LLAMA_W, packed(documents((4, 1, 5))))


# ------------------------------------------------------------------------------------- lens
def hidden_alone(model, docs):
    """float64 rows of the last decoder layer's output for each document run by itself."""
    got = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: got.append(out[0]))
    try:
        with torch.no_grad():
            for d in docs:
                model(input_ids=d[None])
    finally:
        hook.remove()
    return torch.cat(got)


def test_lens_on_a_packed_pool_measures_each_document_alone():
    model = llama()
    docs = documents((5, 9, 3, 7, 6, 4))
    pool = [packed(docs[:4]), packed(docs[4:])]
    lens = sl.SpectralLens(pool=pool, layers="model.layers.1", params=LLAMA_W, progress=False)
    with lens.attach(model):
        m = lens.measure(step=0, tokens=0)
    act = m.spectra["act:model.layers.1"]
    rows = hidden_alone(model, docs)
    assert act.n_rows == rows.shape[0] == sum(len(d) for d in docs)  # every token, no padding row
    np.testing.assert_allclose(act.values.double().numpy(), cov_eigs(rows), rtol=1e-9, atol=1e-12)
    grad = m.spectra[f"grad:{LLAMA_W}"]
    assert grad.n_rows == len(docs)  # one gradient per document
    refs = torch.stack([alone(model, LLAMA_W, d)[0] for d in docs])
    want = np.sort(torch.linalg.svdvals(refs).square().numpy())[::-1]
    np.testing.assert_allclose(grad.values.double().numpy()[: len(want)], want, rtol=1e-9, atol=1e-12 * want[0])


def test_transformers_masks_packed_rows_only_without_a_cache():
    """What docs/gradients.md says of transformers (5.24): a packed row's documents are kept apart by the
    model itself only with use_cache=False; the probe does not rely on it (each document runs alone)."""
    model = llama()
    docs = documents()
    batch = packed(docs)
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        apart = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        cached = model(input_ids=ids, position_ids=pos).logits[0]
        refs = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(apart, refs, rtol=1e-12, atol=1e-12)
    first = len(docs[0])  # the first document sees nothing before it either way
    assert (cached[first:] - refs[first:]).abs().max() > 1e-3


def test_gradient_samples_counts_documents():
    """gradient_samples caps documents, not packed rows: the first 3 documents of the pool's first row."""
    model = llama()
    docs = documents()
    lens = sl.SpectralLens(pool=[packed(docs)], params=LLAMA_W, gradient_samples=3, progress=False)
    with lens.attach(model):
        grad = lens.measure(step=0, tokens=0).spectra[f"grad:{LLAMA_W}"]
    refs = torch.stack([alone(model, LLAMA_W, d)[0] for d in docs[:3]])
    want = np.sort(torch.linalg.svdvals(refs).square().numpy())[::-1]
    assert grad.n_rows == 3
    np.testing.assert_allclose(grad.values.double().numpy()[:3], want, rtol=1e-9, atol=1e-12 * want[0])
