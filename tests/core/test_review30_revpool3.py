"""Review 30 (revpool3) of the pool fingerprint after poolfp3 (``spectral_lens._pools``).

Found: a nested (``torch.nested``) ``attention_mask`` beside ``labels`` raised in the fingerprint (a failed
measurement; new in poolfp3), and so did nested ``input_ids`` without one; a floating-point ``attention_mask`` was
tried after ``mask_fn``'s mask and read as it is, so an additive one (0 = real, -inf = padding) under
``mask_fn=None`` read the padding only (every change unseen, every re-padding warned) and a 1/0 one under a
``mask_fn`` selecting the last token left a changed prompt unseen; a float mask's real tokens were its row maximum, so
a row of none (an empty document) was all real (a false alarm beside pad-id labels); ``labels`` padded with another
negative ignore index than -100 (-1) were read at their padding; TRL's flat preference batches
(``chosen_input_ids`` beside ``chosen_attention_mask``, ``input_ids_chosen`` beside ``attention_mask_chosen``) were
read with their padding; a packed batch without ``cu_seqlens`` (``DataCollatorWithFlattening``'s ``position_ids``
restarts, under a ``forward_fn`` of one's own) was one sample a row, so the same documents packed otherwise warned;
``cu_seqlens`` padded with repeated offsets counted their empty documents. Each test checks both directions.
"""

from __future__ import annotations

import pytest
import torch
from core.test_review29_poolfp2 import CHANGED, PAD, _collate, _docs, _Kw
from core.test_review30_poolfp3 import GROUPS, _check, _fp

from spectral_lens._pools import attention_mask
from spectral_lens._fingerprint import PoolFingerprint


def _real(batch):
    """mask_fn: the real tokens (PAD is never one)."""
    return batch["input_ids"] != PAD


# --------------------------------------------------------------------------- never a failed measurement

def test_nested_masks_and_inputs_never_fail_the_fingerprint():
    """Before: ``tuple(shape)`` of a nested ``attention_mask`` (beside ``labels``) and ``torch.ones(shape)`` of nested
    ``input_ids`` (without a mask) raised ``RuntimeError`` out of :meth:`PoolFingerprint.add`."""
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's prototype warning for nested tensors
        nested = torch.nested.nested_tensor([ids[0], ids[1, :3]])
    for batch in ({"input_ids": ids, "attention_mask": nested, "labels": ids},
                  {"input_ids": nested, "labels": ids}, {"input_ids": nested, "position_ids": ids},
                  {"inputs": {"input_ids": ids, "attention_mask": nested}, "labels": ids},
                  {"input_ids": nested, "cu_seqlens": torch.tensor([0, 2, 5])}):
        f = PoolFingerprint()
        f.add(batch, None)
        f.add(batch, ids != 0)
        assert isinstance(f.value(), int)


# --------------------------------------------------------------------------- floating-point attention masks

def _float_mask(kind, labels=False):
    """The ``attention_mask`` as a float: additive 0 / -inf, 0 / finfo.min, or 1 / 0; pad-id ``labels`` beside."""

    def extra(batch, rows):
        real = batch["attention_mask"].bool()
        if labels:
            batch["labels"] = batch["input_ids"].clone()
        batch["attention_mask"] = {"-inf": torch.zeros(real.shape).masked_fill(~real, float("-inf")),
                                   "finfo": torch.zeros(real.shape).masked_fill(~real, torch.finfo(torch.float).min),
                                   "1/0": real.float()}[kind]

    return extra


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["-inf", "finfo"])
def test_an_additive_mask_without_a_mask_fn_hashes_alike_and_sees_a_change(kind, side):
    """Before: under ``mask_fn=None`` (the default ``mask_fn`` refuses an additive mask), the float mask applied as it
    is, nonzero = read: the padding only (a changed token unseen, another padding warned)."""
    _check(_collate(_float_mask(kind), side), (3, 2), mask_fn=None)
    _check(_collate(_float_mask(kind, labels=True), side), (7, 1), mask_fn=None)


def test_an_additive_mask_without_a_mask_fn_through_the_lens():
    """The same, as ``SpectralLens.measure`` reads a fixed list of batches (every row measured, the padding too: a
    re-padded pool is warned by its row count): a changed token is warned. Before: the fingerprint read the padding
    only, and the row counts were the same, so nothing was said."""
    import warnings

    from spectral_lens import SpectralLens, SpectralLensWarning

    col = _collate(_float_mask("-inf"))

    def said(change):
        class Pool:
            i = 0

            def __iter__(self):
                docs = _docs(change if Pool.i else None)
                Pool.i += 1
                return iter([col(docs[:4]), col(docs[4:])])

        lens = SpectralLens(_Kw(), Pool(), layers="m.h.2", params=(), progress=False, mask_fn=None)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            for step in range(2):
                lens.measure(step, 0)
        return [str(w.message) for w in got if issubclass(w.category, SpectralLensWarning) and CHANGED in str(w.message)]

    assert not said(None)
    assert [w for w in said((5, 2)) if "other content" in w]


@pytest.mark.parametrize("kind", ["-inf", "1/0"])
def test_a_float_mask_under_a_selecting_mask_fn_sees_a_changed_prompt(kind):
    """Before: a float ``attention_mask`` was tried after ``mask_fn``'s, so under a ``mask_fn`` measuring each row's
    last real token only that token was read (an integer mask is read whole, review 29)."""
    def last(batch):
        real = batch["input_ids"] != PAD
        return real & (real.long().cumsum(1) == real.sum(1, keepdim=True))

    _check(_collate(_float_mask(kind)), (3, 2), mask_fn=last)


#: the nine documents with document 3 empty (a row of padding only)
_EMPTY = [0, 1, 2, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("kind", ["-inf", "1/0"])
def test_a_float_mask_with_an_empty_row_beside_pad_id_labels_hashes_alike(kind):
    """Before: a float mask's real tokens were its row maximum, so the row of an empty document (all 0, or all -inf)
    was all real: its pad-id labels were read, as many as the batch's padded length."""
    docs = _docs()
    docs[3] = docs[3][:0]
    col = _collate(_float_mask(kind, labels=True))
    groups = GROUPS[:2] + GROUPS[3:]  # (not a batch of the empty document alone: a (1, 0) batch has no sample)
    same = {_fp([col([docs[i] for i in g]) for g in gs], _real) for gs in groups}
    assert len(same) == 1, same
    other = [d.clone() for d in docs]
    other[5][2] = (other[5][2] + 1) % PAD
    assert _fp([col([other[i] for i in g]) for g in GROUPS[0]], _real) not in same
    assert _fp([col([docs[i] for i in g]) for g in [_EMPTY[:4], _EMPTY[4:]]], _real) not in same  # one sample fewer


# --------------------------------------------------------------------------- labels padded with another ignore index

@pytest.mark.parametrize("ignore", [-1, -7])
@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_padded_with_another_negative_ignore_index_hash_alike(ignore, side):
    """Before: only -100 was the labels' padding; labels padded with -1 (``ignore_index=-1``) were read at every
    padded position, so another padding warned."""
    def extra(batch, rows):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, ignore)

    _check(_collate(extra, side), (3, 2))
    _check(_collate(extra, side), (0, 0))


# --------------------------------------------------------------------------- TRL's flat preference batches

def _preference(style):
    """TRL's flat preference batches: ``prompt_``/``chosen_``/``rejected_`` prefixes (DPO, ORPO, CPO; the prompt
    left-padded) or ``_chosen``/``_rejected`` suffixes (the reward trainer), with -100-padded labels."""
    right, left = _collate(), _collate(side="left")

    def collate(rows):
        chosen, rejected = right(rows), right([r.flip(0)[: max(1, len(r) - 2)] for r in rows])
        if style == "suffix":
            return {"input_ids_chosen": chosen["input_ids"], "attention_mask_chosen": chosen["attention_mask"],
                    "input_ids_rejected": rejected["input_ids"], "attention_mask_rejected": rejected["attention_mask"],
                    "return_loss": True}
        prompt = left([r[:2] for r in rows])
        out = {}
        for name, b in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = b["input_ids"], b["attention_mask"]
        out["chosen_labels"] = chosen["input_ids"].masked_fill(chosen["attention_mask"] == 0, -100)
        return out

    return collate


@pytest.mark.parametrize("style", ["prefix", "suffix"])
@pytest.mark.parametrize("mask_fn", [attention_mask, None])
def test_a_flat_preference_batch_re_padded_hashes_alike_and_sees_a_change(style, mask_fn):
    """Before: a mapping without an ``attention_mask`` had its ``chosen_input_ids`` read with their padding: every
    re-padding warned."""
    _check(_preference(style), (3, 6), mask_fn=mask_fn)  # chosen only
    _check(_preference(style), (4, 0), mask_fn=mask_fn)  # the last token of a rejected (the document flipped)


# --------------------------------------------------------------------------- packed rows without cu_seqlens

def _flattened(seq_idx=False, flat=False, sep=-100):
    """``DataCollatorWithFlattening`` without flash-attention kwargs: the batch's documents in one row, their
    ``position_ids`` restarting at 0, ``labels`` with ``sep`` at each document's first token; ``seq_idx`` (each token's
    document in the batch) as with ``return_seq_idx=True``."""

    def collate(rows):
        b = {"input_ids": torch.cat(rows), "position_ids": torch.cat([torch.arange(len(r)) for r in rows]),
             "labels": torch.cat([torch.cat([torch.tensor([sep]), r[1:]]) for r in rows])}
        if seq_idx:
            b["seq_idx"] = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)]).int()
        return b if flat else {k: v[None] for k, v in b.items()}

    return collate


@pytest.mark.parametrize("variant", ["row", "row+seq_idx", "flat"])
def test_a_packed_row_without_cu_seqlens_is_read_by_document(variant):
    """Before: a packed row whose documents are told by ``position_ids`` restarts alone (a ``forward_fn`` of one's own
    gets it as it is) was read as one sample: the same documents packed otherwise warned, and ``seq_idx`` (numbered
    per batch) was read; a flat ``(N,)`` row was ``N`` samples of one token (a document's tokens swapped unseen)."""
    col = _flattened(seq_idx="seq_idx" in variant, flat=variant == "flat")
    _check(col, (3, 5), mask_fn=None)
    _check(col, (7, 1), mask_fn=None)
    docs = _docs()
    same = _fp([col([docs[i] for i in g]) for g in GROUPS[0]], None)
    moved = [col([docs[i] for i in g]) for g in GROUPS[0]]
    pos = moved[0]["position_ids"]
    pos[..., 3] = pos[..., 2] + 1  # the second document's first token joined to the first: a moved boundary
    assert _fp(moved, None) != same
    swapped = [d.clone() for d in docs]
    swapped[1][[2, 5]] = swapped[1][[5, 2]]  # two tokens of a document in the other order: other content
    assert _fp([col([swapped[i] for i in g]) for g in GROUPS[0]], None) != same


def test_a_row_of_one_document_hashes_as_the_same_document_packed_with_others():
    """A document alone in its row (position_ids without a restart, read as before) and the same document packed
    with others (read by document) hash alike; so does a batch of rows of one document each."""
    docs = _docs()
    col = _flattened()
    one_each = [col([d]) for d in docs]
    packed = [col([docs[i] for i in g]) for g in GROUPS[0]]
    padded = [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in one_each]  # as read before packing
    assert _fp(one_each, None) == _fp(packed, None) == _fp(padded, None)
    blocks = {"input_ids": torch.stack([docs[3][:8], docs[8][:8]]), "position_ids": torch.arange(8).repeat(2, 1)}
    blocks["labels"] = blocks["input_ids"].clone()
    rows = [{k: v[i:i + 1] for k, v in blocks.items()} for i in range(2)]
    assert _fp([blocks], None) == _fp(rows, None)


def test_hugging_faces_flattening_collator_under_a_forward_fn_of_ones_own():
    transformers = pytest.importorskip("transformers")
    collator = transformers.DataCollatorWithFlattening(return_seq_idx=True)
    docs, other = _docs(), _docs((5, 4))

    def col(rows):
        return collator([{"input_ids": r.tolist()} for r in rows])

    same = {_fp([col([docs[i] for i in g]) for g in gs], None) for gs in GROUPS}
    assert len(same) == 1, same
    assert _fp([col([other[i] for i in g]) for g in GROUPS[1]], None) not in same


def test_cu_seqlens_padded_with_repeated_offsets_hash_alike():
    """Before: each empty document of ``cu_seqlens`` padded to a fixed length (repeated last offsets, for a static
    shape) was read as an empty sample: another number of them warned."""
    def col(rows):
        lens = torch.tensor([len(r) for r in rows])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        cu = torch.cat([cu, cu[-1:].expand(10 - len(cu))]).int()  # 10 offsets whatever the document count
        return {"input_ids": torch.cat(rows)[None], "cu_seqlens": cu}

    _check(col, (3, 5), mask_fn=None)


# --------------------------------------------------------------------------- cost

def test_the_new_readings_read_nothing_back_to_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    docs = _docs()
    batches = [_collate(_float_mask("-inf", labels=True))(docs[:4]), _collate(_float_mask("1/0", labels=True))(docs[4:]),
               _preference("prefix")(docs[:3]), _preference("suffix")(docs[3:]), _flattened(seq_idx=True)(docs[:5]),
               _flattened(flat=True)(docs[5:])]
    fp = PoolFingerprint()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        for b in batches:
            fp.add(b, None)
    assert fp.batches == len(batches) and isinstance(fp.value(), int)


def test_a_mask_of_other_tokens_than_padding_is_still_read_whole():
    """``global_attention_mask`` (Longformer: 1 at the tokens that attend globally) names no inputs of its own
    (``global_input_ids``): not a padding mask for a flat preference batch's tensors, so a moved global token is
    seen (read under its own mask, its 1s alone would hash alike wherever they are)."""
    docs = _docs()

    def col(at):
        def collate(rows):
            b = _collate()(rows)
            b["global_attention_mask"] = torch.zeros_like(b["input_ids"])
            b["global_attention_mask"][:, at] = 1
            return b
        return collate

    _check(col(0), (3, 2))
    assert _fp([col(0)(docs[:4])]) != _fp([col(1)(docs[:4])])


def test_a_packed_mapping_on_the_meta_device_never_fails():
    """A packed row whose ``input_ids`` are on the meta device beside real ``position_ids``: its documents were put on
    the meta device, and :meth:`PoolFingerprint.value` raised reading them (a failed measurement)."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    for batch in ({"input_ids": torch.ones(1, 8, dtype=torch.long, device="meta"), "position_ids": pos},
                  {"input_ids": torch.ones(1, 8, dtype=torch.long, device="meta"), "position_ids": pos,
                   "cu_seqlens": torch.tensor([0, 3, 8])}):
        f = PoolFingerprint()
        f.add(batch, None)
        assert isinstance(f.value(), int)
