"""Review 29 (revpool2) of the pool fingerprint after poolfp2: a seq2seq batch without ``decoder_input_ids``
(``DataCollatorForSeq2Seq`` without ``model=``) whose padded ``labels`` happened to be as long as its
``input_ids`` had its labels read under the encoder's ``attention_mask`` (a false alarm at a re-batching), and a
sparse or nested ``labels`` beside ``decoder_input_ids`` raised (a failed measurement)."""

import warnings

import pytest
import torch

from spectral_lens._pools import attention_mask
from spectral_lens._fingerprint import PoolFingerprint, batch_fingerprint


def _pad(rows, value):
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


_ENC = [torch.arange(1, 1 + n) for n in (4, 6, 5)]
_DEC = [torch.arange(50, 50 + n) for n in (6, 3, 2)]


def _fp(groups, dec=_DEC, side_pad=0):
    """The pool's fingerprint as the lens reads it, batched as ``groups`` (the default ``mask_fn``)."""
    fp = PoolFingerprint()
    for g in groups:
        batch = {"input_ids": _pad([_ENC[i] for i in g], 0),
                 "attention_mask": _pad([torch.ones_like(_ENC[i]) for i in g], 0),
                 "labels": _pad([dec[i] for i in g], -100)}
        if side_pad:  # padded to a multiple: other lengths, the same samples
            batch = {k: torch.nn.functional.pad(v, (0, side_pad), value=-100 if k == "labels" else 0)
                     for k, v in batch.items()}
        fp.add(batch, attention_mask(batch))
    return fp.value()


def test_seq2seq_labels_as_long_as_the_inputs_by_chance_hash_alike():
    # batched together, labels and inputs are both 6 long (the labels fit the encoder's mask); apart they are not
    same = {_fp([[0, 1, 2]]), _fp([[0], [1], [2]]), _fp([[1, 0], [2]]), _fp([[2, 1, 0]], side_pad=3)}
    assert len(same) == 1
    changed = [d.clone() for d in _DEC]
    changed[0][5] += 1  # a label token the encoder's mask of the batch-of-one would not cover
    assert _fp([[0, 1, 2]], changed) not in same
    assert _fp([[0], [1], [2]], changed) not in same


def test_causal_lm_labels_still_hash_alike_re_padded_and_see_a_change():
    ids = [torch.arange(3, 3 + n) for n in (5, 2, 7)]

    def fp(groups, side, change=False):
        out = PoolFingerprint()
        for g in groups:
            rows = [ids[i].clone() for i in g]
            labels = [r.clone() for r in rows]
            labels = [torch.cat([torch.tensor([-100]), r[1:]]) for r in labels]  # the first token not a target
            if change and 0 in g:
                labels[g.index(0)][2] += 1
            pad = (lambda rs, v: _pad(rs, v)) if side == "right" else \
                (lambda rs, v: _pad([r.flip(0) for r in rs], v).flip(1))
            batch = {"input_ids": pad(rows, 0), "attention_mask": pad([torch.ones_like(r) for r in rows], 0),
                     "labels": pad(labels, -100)}
            out.add(batch, attention_mask(batch))
        return out.value()

    same = {fp([[0, 1, 2]], "right"), fp([[2], [0, 1]], "left"), fp([[1], [2], [0]], "right")}
    assert len(same) == 1
    assert fp([[0, 1, 2]], "right", change=True) not in same


@pytest.mark.parametrize("kind", ["sparse", "nested", "jagged"])
def test_unreadable_labels_beside_decoder_inputs_are_not_read_and_never_fail(kind):
    warnings.simplefilter("ignore")  # (torch's beta/prototype notes on sparse and nested tensors)
    rows = [torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long)]
    labels = {"sparse": lambda: _pad(rows, -100).to_sparse(),
              "nested": lambda: torch.nested.nested_tensor(rows),
              "jagged": lambda: torch.nested.nested_tensor(rows, layout=torch.jagged)}[kind]()
    batch = {"input_ids": _pad(rows, 0), "attention_mask": _pad(rows, 0), "labels": labels,
             "decoder_input_ids": _pad(rows, 0)}
    got = batch_fingerprint(batch, attention_mask(batch))
    assert len(got) == 3  # input_ids, attention_mask, decoder_input_ids read; the labels not


def test_a_shared_cache_position_in_a_batch_as_long_as_it_has_rows_hashes_alike():
    rows = [torch.arange(1, 1 + n) for n in (4, 3, 2, 4, 1, 2)]

    def fp(groups, change=False):
        out = PoolFingerprint()
        for g in groups:
            rs = [rows[i].clone() for i in g]
            if change and 1 in g:
                rs[g.index(1)][0] += 1
            batch = {"input_ids": _pad(rs, 0), "attention_mask": _pad([torch.ones_like(r) for r in rs], 0)}
            batch["cache_position"] = torch.arange(batch["input_ids"].shape[1])  # (T,), T = M = 4 in the first
            out.add(batch, attention_mask(batch))
        return out.value()

    same = {fp([[0, 1, 2, 3], [4, 5]]), fp([[0, 1], [2, 3], [4, 5]]), fp([[5, 3, 1], [0, 2, 4]])}
    assert len(same) == 1
    assert fp([[0, 1, 2, 3], [4, 5]], change=True) not in same


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float32, torch.bool])
def test_the_4d_mask_path_leaves_the_batch_unchanged_and_sees_a_change(dtype):
    # (its blocks are reduced in place: on a copy, never on an int64 or float64 batch's own values)
    t = (torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    before = t.clone()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    first = int(batch_fingerprint({"m": t}, mask)[0])
    assert torch.equal(t, before)
    assert int(batch_fingerprint({"m": t}, mask)[0]) == first
    changed = t.clone()
    changed[1, 0, 2, 3] = True if dtype == torch.bool and not bool(t[1, 0, 2, 3]) else \
        (False if dtype == torch.bool else changed[1, 0, 2, 3] + 1)
    assert int(batch_fingerprint({"m": changed}, mask)[0]) != first


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_padded_with_the_pad_id_hash_alike_re_padded(side):
    # labels = input_ids.clone() (the padding the pad id, not -100): the padding, where the attention_mask is 0 and
    # the labels are the inputs, not read
    ids = [torch.arange(3, 3 + n) for n in (5, 2, 7)]

    def fp(groups, change=False):
        out = PoolFingerprint()
        for g in groups:
            rows = [ids[i].clone() for i in g]
            if change and 2 in g:
                rows[g.index(2)][6] += 1
            pad = _pad if side == "right" else (lambda rs, v: _pad([r.flip(0) for r in rs], v).flip(1))
            batch = {"input_ids": pad(rows, 0), "attention_mask": pad([torch.ones_like(r) for r in rows], 0)}
            batch["labels"] = batch["input_ids"].clone()
            out.add(batch, attention_mask(batch))
        return out.value()

    same = {fp([[0, 1, 2]]), fp([[2], [0, 1]]), fp([[1], [2], [0]]), fp([[1, 0], [2]])}
    assert len(same) == 1
    assert fp([[0, 1, 2]], change=True) not in same


def test_an_additive_attention_mask_yields_to_the_mask_fns_mask():
    # a float attention_mask of 0 (real) and -inf (padding) read as "nonzero = read" is the padding: mask_fn's
    # mask (the real tokens) comes first for a floating-point one
    rows = [torch.arange(3, 3 + n) for n in (4, 2, 6)]

    def fp(groups, change=False):
        out = PoolFingerprint()
        for g in groups:
            rs = [rows[i].clone() for i in g]
            if change and 0 in g:
                rs[g.index(0)][1] += 1
            real = _pad([torch.ones_like(r) for r in rs], 0)
            batch = {"input_ids": _pad(rs, 0),
                     "attention_mask": torch.zeros(real.shape).masked_fill(real == 0, float("-inf"))}
            out.add(batch, batch["attention_mask"] == 0)  # mask_fn=lambda b: b["attention_mask"] == 0
        return out.value()

    same = {fp([[0, 1, 2]]), fp([[0], [1], [2]]), fp([[2, 0], [1]])}
    assert len(same) == 1
    assert fp([[0, 1, 2]], change=True) not in same


def test_pixels_as_wide_as_the_padded_length_are_no_4d_mask():
    # (M, 3, 8, 8) pixels in a batch padded to 8 tokens: read as pixels, as in the batches of other lengths (a 4-D
    # tensor is read as a mask at its real query x key entries only under a mapping key naming a mask or a bias)
    rows = [torch.arange(3, 3 + n) for n in (8, 5, 4, 6)]
    pix = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def fp(groups, change=False):
        out = PoolFingerprint()
        for g in groups:
            images = torch.stack([pix[i] for i in g])
            if change and 0 in g:
                images[g.index(0), 1, 7, 7] += 1
            batch = {"input_ids": _pad([rows[i] for i in g], 0),
                     "attention_mask": _pad([torch.ones_like(rows[i]) for i in g], 0), "pixel_values": images}
            out.add(batch, attention_mask(batch))
        return out.value()

    same = {fp([[0, 1, 2, 3]]), fp([[1, 2, 3], [0]]), fp([[1, 3], [2, 0]]), fp([[1], [2], [3], [0]])}
    assert len(same) == 1
    assert fp([[0, 1, 2, 3]], change=True) not in same
    assert fp([[1], [2], [3], [0]], change=True) not in same


def test_the_revised_paths_read_nothing_back_to_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    ids = _pad([torch.arange(3, 3 + n) for n in (5, 2, 7)], 0)
    real = ids != 0
    batches = [({"input_ids": ids, "attention_mask": real.long(), "labels": ids.clone(),
                 "cache_position": torch.arange(ids.shape[1]), "pixel_values": torch.randn(3, 3, 7, 7)}, real),
               ({"input_ids": ids, "attention_mask": torch.zeros(ids.shape).masked_fill(~real, float("-inf")),
                 "labels": ids.masked_fill(~real, -100)}, real),
               ({"input_ids": ids, "attn_bias": torch.randn(3, 2, 7, 7, dtype=torch.float64)}, real)]
    fp = PoolFingerprint()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        for b, mask in batches:
            fp.add(b, mask)
    assert fp.batches == 3 and isinstance(fp.value(), int)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_input_ids_beside_labels_never_fail(layout):
    warnings.simplefilter("ignore")
    ids = torch.nested.nested_tensor([torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long)], layout=layout)
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.ones(2, 4, dtype=torch.long)}
    got = batch_fingerprint(batch, attention_mask(batch))
    assert len(got) >= 2  # the attention_mask and the labels read


def test_a_packed_pool_with_a_batch_of_one_document_hashes_alike():
    # DataCollatorWithFlattening's rows as the lens runs them (the default forward: the padded batch of the row's
    # documents, with an attention_mask; one document as it is, without): read alike, under the input_ids' shape
    from spectral_lens.gradients._batch import batch_as_run, default_forward

    docs = [torch.arange(5 + 10 * i, 5 + 10 * i + n) for i, n in enumerate((4, 2, 6, 3, 5))]

    def fp(groups, change=False):
        out = PoolFingerprint()
        for g in groups:
            rows = [docs[i].clone() for i in g]
            if change and 3 in g:
                rows[g.index(3)][1] += 1
            packed = {"input_ids": torch.cat(rows)[None],
                      "position_ids": torch.cat([torch.arange(len(r)) for r in rows])[None],
                      "labels": torch.cat([torch.cat([torch.tensor([-100]), r[1:]]) for r in rows])[None]}
            batch = batch_as_run(packed, default_forward)
            out.add(batch, attention_mask(batch))
        return out.value()

    same = {fp([[0, 1], [2, 3, 4]]), fp([[4, 0, 1, 2], [3]]), fp([[0], [1], [2], [3], [4]]), fp([[3, 1, 4, 0, 2]])}
    assert len(same) == 1
    assert fp([[4, 0, 1, 2], [3]], change=True) not in same
    assert fp([[0, 1], [2, 3, 4]], change=True) not in same


@pytest.mark.parametrize("ids", [torch.empty(0, 5, dtype=torch.long), torch.empty(3, 0, dtype=torch.long),
                                 torch.ones(2, 3, dtype=torch.long, device="meta")])
def test_input_ids_without_an_attention_mask_never_fail(ids):
    fp = PoolFingerprint()
    fp.add({"input_ids": ids, "labels": ids.clone()})
    assert isinstance(fp.value(), int)


def _targets(batch, rows):
    """A seq2seq collator's labels without decoder_input_ids (``DataCollatorForSeq2Seq`` without ``model=``): a
    target of ``11 - n`` tokens for a row of ``n``, padded with -100: as long as the inputs in some batchings."""
    targets = [torch.cat([d.flip(0)] * 6)[:11 - len(d)] for d in rows]
    batch["labels"] = _pad(targets, -100)


def test_a_re_batched_seq2seq_pool_without_decoder_inputs_is_not_warned_by_the_lens():
    from core.test_review29_poolfp2 import _collate, _other_pool, _same_pool

    col = _collate(_targets)
    _same_pool(col)
    _other_pool(col, (2, 1))
