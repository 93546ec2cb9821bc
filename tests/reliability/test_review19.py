"""Review of the day's merges (packed batches, MoE weight spectra, rank-failure agreement): the regressions found.

Packed batches: only the exact ``DataCollatorWithFlattening`` form (integer ``position_ids`` from 0 restarting at
0, or a packing field) is read as its documents, and only where the probe / lens run the default forward; a
batch whose ``position_ids`` are merely non-consecutive (strided, scaled, counted from the first real token of a
left-padded row) is one sample per row as before, and a ``forward_fn`` of the user's gets its batch as given.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import spectral_lens as sl  # noqa: E402
from spectral_lens import PerSampleGradientProbe  # noqa: E402
from tests.support.data import cov_eigs  # noqa: E402
from tests.support.models import tiny_hf_llama  # noqa: E402

V = 50
LLAMA_W = "model.layers.1.self_attn.o_proj.weight"


def llama():
    return tiny_hf_llama(V)


def packed(lengths, seed=1):
    """DataCollatorWithFlattening's default output: one row, position_ids restarting at 0, no attention_mask."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    collator = transformers.DataCollatorWithFlattening(return_tensors="pt")
    return docs, dict(collator([{"input_ids": d.tolist()} for d in docs]))


def row_grad(model, name, forward, labels):
    """float64 reference: grad of the mean next-token loss of one row (labels -100 ignored) run by ``forward``."""
    w = dict(model.named_parameters())[name]
    logits = forward(model)[0, :-1]
    loss = F.cross_entropy(logits, labels[1:], ignore_index=-100)
    return torch.autograd.grad(loss, w)[0].flatten()


# ------------------------------------------------------------------------------------- packing: false positives
POSITIONS = {
    "strided": lambda t: (2 * torch.arange(t)).expand(2, t),
    "scaled_float": lambda t: (0.5 * torch.arange(t, dtype=torch.float64)).expand(2, t),
    "left_padded_from_1": lambda t: torch.tensor([[1, 1, 1] + list(range(t - 3)), list(range(t))]),
}


@pytest.mark.parametrize("kind", sorted(POSITIONS))
def test_non_consecutive_position_ids_are_one_sample_per_row(kind):
    """Non-consecutive position_ids without attention_mask that are no packing (RoPE scaling, strides, a
    left-padded row's positions as generate() counts them) stay one sample per row, each row's gradient that
    of the row run as given. The merged detection read every position jump as a new document: 16 one-token
    'documents' for a stride of 2 (NaN losses), a reshaped batch for the others."""
    model = llama()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 8), generator=g)
    pos = POSITIONS[kind](8)
    batch = {"input_ids": ids, "position_ids": pos, "labels": ids}
    probe = PerSampleGradientProbe(model, params=LLAMA_W, keep_matrix=True)
    probe.update(batch)
    rows = probe.matrix(LLAMA_W)
    assert rows.shape[0] == 2
    for m in range(2):
        ref = row_grad(model, LLAMA_W, lambda mod, m=m: mod(input_ids=ids[m:m + 1], position_ids=pos[m:m + 1]).logits,
                       ids[m])
        assert (rows[m] - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_custom_forward_fn_gets_the_packed_batch_as_given():
    """A forward_fn of the user's (a model that runs packed rows itself) is handed the batch as given, and each
    packed row is one sample (as before packing was read); the merged code handed it the padded documents
    (five rows with an attention_mask, position_ids padded by repeating the last one)."""
    model = llama()
    _, a = packed((5, 4, 3))
    _, b = packed((6, 6), seed=2)
    seen = []

    def forward(m, batch):  # documents kept apart by the model (transformers: no cache), as flash-attn varlen would
        seen.append((sorted(batch), tuple(batch["input_ids"].shape)))
        return m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

    probe = PerSampleGradientProbe(model, params=LLAMA_W, forward_fn=forward, keep_matrix=True)
    for batch in (a, b):
        probe.update(batch)
    rows = probe.matrix(LLAMA_W)
    assert rows.shape[0] == 2 and seen[-1] == (["input_ids", "labels", "position_ids"], (1, 12))
    for m, batch in enumerate((a, b)):
        ref = row_grad(model, LLAMA_W, lambda mod, b=batch: forward(mod, b).logits, batch["labels"][0])
        assert (rows[m] - ref).abs().max() <= 1e-12 * ref.abs().max()


def hidden(model, calls):
    got = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: got.append(out[0].reshape(-1, 16)))
    try:
        with torch.no_grad():
            for call in calls:
                call(model)
    finally:
        hook.remove()
    return torch.cat(got)


def test_lens_custom_forward_fn_on_a_packed_pool_keeps_the_default_mask():
    """The lens with a forward_fn of the user's and the default mask_fn on a packed pool: every token of the rows
    as that forward runs them (no attention_mask: no mask). The merged mask_fn gave the padded documents' mask,
    of another shape than the rows the forward ran (a ValueError)."""
    model = llama()
    pool = [packed((5, 4, 3))[1], packed((6, 6), seed=2)[1]]

    def forward(m, batch):
        return m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

    lens = sl.SpectralLens(pool=pool, layers="model.layers.1", params=(), forward_fn=forward, progress=False)
    with lens.attach(model):
        act = lens.measure(step=0, tokens=0).spectra["act:model.layers.1"]
    rows = hidden(model, [lambda mod, b=b: forward(mod, b) for b in pool])
    assert act.n_rows == rows.shape[0] == 24
    np.testing.assert_allclose(act.values.double().numpy(), cov_eigs(rows), rtol=1e-9, atol=1e-12)


def test_lens_custom_mask_fn_gets_the_documents_the_default_forward_runs():
    """With the default forward_fn, a mask_fn of the user's is handed the batch as it is run (the padded documents
    of a packed batch), so its mask fits the rows; the merged lens handed it the packed batch (a shape error)."""
    model = llama()
    docs, batch = packed((5, 4, 3))
    lens = sl.SpectralLens(pool=[batch], layers="model.layers.1", params=(), progress=False,
                           mask_fn=lambda b: b["attention_mask"].bool() & (b["labels"] != -100))
    with lens.attach(model):
        act = lens.measure(step=0, tokens=0).spectra["act:model.layers.1"]
    rows = hidden(model, [lambda mod, d=d: mod(input_ids=d[None]) for d in docs])
    keep = torch.cat([torch.arange(len(d)) > 0 for d in docs])  # labels -100 at each document's first token
    assert act.n_rows == int(keep.sum())
    np.testing.assert_allclose(act.values.double().numpy(), cov_eigs(rows[keep]), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------- MoE weight spectra
def test_three_d_weights_that_are_no_expert_stacks_stay_one_matrix():
    """Only an experts module's 3-D weights (path or class name with 'expert') are read as per-expert stacks.
    XLNet's attention projections (d_model, n_head, d_head) are one (d_model, n_head*d_head) map and
    nn.Bilinear's (out, in1, in2) one map on outer products: the merged rule split them into d_model (resp.
    out) tiny spectra, 'layer.0.rel_attn.q[0]' ... (16 + 16 + ... entries for one tiny XLNet layer)."""
    from spectral_lens.weights import weight_spectra

    torch.manual_seed(0)
    xlnet = transformers.XLNetModel(transformers.XLNetConfig(vocab_size=20, d_model=16, n_layer=1, n_head=2,
                                                             d_inner=32))
    spectra = weight_spectra(xlnet)
    assert not [k for k in spectra if "[" in k]
    for name in ("layer.0.rel_attn.q", "layer.0.rel_attn.o", "layer.0.rel_attn.seg_embed"):
        w = xlnet.get_parameter(name).detach().double()
        ref = torch.linalg.svdvals(w.reshape(w.shape[0], -1)) ** 2
        assert spectra[name].metadata["matrix_shape"] == [w.shape[0], w.shape[1] * w.shape[2]]
        torch.testing.assert_close(spectra[name].values.double(), ref, rtol=1e-10, atol=1e-12 * float(ref[0]))
    bilinear = torch.nn.Bilinear(4, 5, 6)
    got = weight_spectra(bilinear)
    assert list(got) == ["weight"] and got["weight"].metadata["matrix_shape"] == [6, 20]

    class Experts(torch.nn.Module):  # named as an experts module: still one spectrum per expert
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(3, 8, 4))

    assert list(weight_spectra(Experts())) == ["w1[0]", "w1[1]", "w1[2]"]
