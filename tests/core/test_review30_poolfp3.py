"""Review 30 (poolfp3): the pool-change warning's remaining false alarms and blind spots (``spectral_lens._pools``).

Found: a nested dict batch (``{"inputs": {"input_ids", "attention_mask"}, "labels"}``) had its mask not found, so
the same samples re-padded were warned; an ``(M, K)`` tensor (multi-label targets) whose ``K`` was the batch's
padded length by chance was read per position under the mask (a false alarm at a re-batching, and a change past a
sample's length unseen); a float or integer 3-D ``(M, T, T)`` attention mask was read by position with its padding;
``labels`` shifted by one against unchanged inputs (``[-100, x1, x2]`` to ``[x1, x2, -100]``) hashed alike; a
shared ``(T,)`` row in a batch of ``T`` samples was read per sample; a packed batch (``cu_seqlens``, ``max_seqlen``,
a model's own varlen ``forward_fn``) was read as one row, its boundaries as rows of one value. Each test checks both
directions: the same samples re-batched and re-padded hash alike, other content does not.
"""

from __future__ import annotations

import warnings
from collections import UserDict

import pytest
import torch
from core.test_review29_poolfp2 import CHANGED, PAD, _collate, _docs, _Kw

from spectral_lens import SpectralLens, SpectralLensWarning
from spectral_lens._pools import attention_mask
from spectral_lens._fingerprint import PoolFingerprint, batch_fingerprint

#: batchings of the nine documents (lengths 3, 8, 5, 9, 4, 6, 7, 2, 9): other padded lengths in each
GROUPS = [[[0, 1, 2, 3], [4, 5, 6, 7, 8]], [[8, 0], [5, 1, 3], [2, 4, 6, 7]], [[3], [0, 1, 2, 4, 5, 6, 7, 8]],
          [[7, 2, 5], [1, 0, 8, 3, 6, 4]], [[0, 2, 4, 5], [1, 3, 6, 7, 8]], [[0, 1, 2, 3, 4, 5, 6, 7, 8]]]


def _fp(batches, mask_fn=attention_mask):
    """The pool's fingerprint as the lens reads it (``mask_fn``'s mask beside each batch)."""
    f = PoolFingerprint()
    for b in batches:
        f.add(b, mask_fn(b) if mask_fn is not None else None)
    return f.value()


def _check(collate, change, mask_fn=attention_mask, groups=GROUPS):
    """The same documents in every batching of ``groups`` hash alike; ``change`` (doc, position) bumped is seen in
    each batching."""
    docs, other = _docs(), _docs(change)
    same = {_fp([collate([docs[i] for i in g]) for g in gs], mask_fn) for gs in groups}
    assert len(same) == 1, same
    for gs in groups:
        assert _fp([collate([other[i] for i in g]) for g in gs], mask_fn) not in same, gs


# --------------------------------------------------------------------------- nested dict batches

def _nest(layout, side="right"):
    """A collator of nested dict batches: ``layout`` names how the padded ``input_ids`` / ``attention_mask`` /
    ``labels`` are arranged."""
    flat = _collate(side=side)

    def collate(rows):
        b = flat(rows)
        ids, mask = b["input_ids"], b["attention_mask"]
        if layout == "inputs":
            return {"inputs": {"input_ids": ids, "attention_mask": mask}}
        if layout == "inputs+labels":  # labels -100 at the padding, beside the nested inputs
            return {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": ids.masked_fill(mask == 0, -100)}
        if layout == "inputs+pad-id-labels":  # labels = input_ids.clone(): padded with the pad id
            return {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": ids.clone()}
        if layout == "all-nested":
            return {"model_inputs": {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}}
        if layout == "user-dict":  # a nested mapping of another type (a BatchEncoding)
            return {"inputs": UserDict({"input_ids": ids, "attention_mask": mask}), "weights": mask.float() * 2}
        if layout == "pair":  # a preference pair: two mappings with their own masks and lengths
            rev = flat([r.flip(0)[: max(1, len(r) - 2)] for r in rows])
            return {"chosen": {"input_ids": ids, "attention_mask": mask},
                    "rejected": {"input_ids": rev["input_ids"], "attention_mask": rev["attention_mask"]}}
        raise AssertionError(layout)

    return collate


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layout", ["inputs", "inputs+labels", "inputs+pad-id-labels", "all-nested", "user-dict",
                                    "pair"])
def test_a_nested_dict_batch_re_padded_hashes_alike_and_sees_a_change(layout, side):
    """Before: the nested ``attention_mask`` was not found (the default ``mask_fn`` reads the top level only), so
    the nested tensors were read with their padding: every re-padding warned."""
    _check(_nest(layout, side), (3, 6))
    _check(_nest(layout, side), (7, 0))


def test_a_nested_batch_under_a_selecting_mask_fn_sees_a_changed_prompt_through_the_lens():
    """Through the lens: a ``mask_fn`` that measures each row's last real token of a nested batch. Before, the
    fingerprint read the tokens under that mask only (the nested ``attention_mask`` not found), so a changed earlier
    token, which the measured rows read through attention, was not warned; the same samples re-batched still are
    not."""
    def last_token(b):
        real = b["inputs"]["attention_mask"].bool()
        return real & (real.long().cumsum(1) == real.sum(1, keepdim=True))

    def measure(docs_at):
        class Pool:
            i = 0

            def __iter__(self):
                loader = torch.utils.data.DataLoader(docs_at(Pool.i), batch_size=4, shuffle=True,
                                                     collate_fn=_nest("inputs"))
                Pool.i += 1
                return iter(loader)

        lens = SpectralLens(_Kw(), Pool(), layers="m.h.2", params=(), progress=False, mask_fn=last_token,
                            forward_fn=lambda model, b: model(**b["inputs"]))
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message=".*tail window.*")
            for seed in range(3):
                torch.manual_seed(seed)
                lens.measure(seed, 0)
        return [str(w.message) for w in got if issubclass(w.category, SpectralLensWarning)]

    assert not [w for w in measure(lambda i: _docs()) if CHANGED in w]
    said = measure(lambda i: _docs((2, 1) if i else None))  # document 2 (5 tokens): its second token
    assert [w for w in said if CHANGED in w and "other content" in w], said


# --------------------------------------------------------------------------- (M, K) tensors with K = T by chance

def _targets(kind):
    """Per-sample targets of 6 values (a function of the document) beside the padded tokens: batches padded to 6
    tokens (documents 0, 2, 4, 5) have them as wide as the mask."""

    def extra(batch, rows):
        base = torch.stack([(r.sum() + torch.arange(6) * (r[0] + 1)) % 5 for r in rows])
        batch[kind] = base.float() / 4 if kind == "targets" else (base > 2).long()

    return _collate(extra)


@pytest.mark.parametrize("kind", ["targets", "labels"])
def test_per_sample_targets_as_wide_as_the_padded_length_hash_alike(kind):
    """Before: in a batch padded to 6 tokens, the ``(M, 6)`` float targets were read per position under the
    ``attention_mask`` (a shorter document's last values left out): another batching hashed otherwise, and a change
    in those values was not seen. (Integer multi-hot ``labels`` are read under their own mask: checked unchanged.)"""
    _check(_targets(kind), (3, 1), groups=GROUPS[-2:] + GROUPS[:1])
    docs = _docs()
    col = _targets(kind)
    base = [col([docs[i] for i in g]) for g in GROUPS[-2]]  # its first batch: 6 tokens, documents of 3 .. 6
    assert base[0]["input_ids"].shape[1] == 6
    other = [dict(b, **{kind: b[kind].clone()}) for b in base]
    other[0][kind][0, 5] = other[0][kind][0, 5] + 1  # document 0 (3 tokens): its last target
    assert _fp(other) != _fp(base)


# --------------------------------------------------------------------------- 3-D (M, T, T) masks

def _three_d(kind):
    """The padding and causality as an (M, T, T) mask: additive float (0 = read, -inf = not), 1/0 float, or 1/0
    integer."""

    def extra(batch, rows):
        real = batch["attention_mask"].bool()
        t = real.shape[1]
        keep = torch.ones(t, t, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None]
        batch["attention_mask"] = {"additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")),
                                   "float": keep.float(), "int": keep.long()}[kind]

    return extra


def _real(batch):
    """mask_fn: the real tokens (PAD is never one)."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    return ids != PAD


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["additive", "float", "int"])
def test_a_3d_attention_mask_re_padded_hashes_alike_and_sees_a_change(kind, side):
    """Before: a non-bool ``(M, T, T)`` mask was read per query position (64 of its keys, padding included)."""
    col = _collate(_three_d(kind), side)
    _check(col, (4, 2), _real)
    docs = _docs()
    b = col(docs[:4])
    other = dict(b, attention_mask=b["attention_mask"].clone())
    other["attention_mask"][1, 5, 2] = -1e9 if kind == "additive" else 0  # query 5 of row 1 no longer reads key 2
    assert batch_fingerprint(b, _real(b)) != batch_fingerprint(other, _real(other))


@pytest.mark.parametrize("kind", ["additive", "float"])
def test_a_3d_float_mask_in_a_tuple_batch_is_read_as_one(kind):
    """A tuple ``(input_ids, mask)`` has no names: an ``(M, T, T)`` float tensor is read as a mask where it is one
    in every batch of the pass (an ``(M, T, d)`` embedding whose ``d`` is ``T`` in one batch stays by position)."""
    flat = _collate(_three_d(kind))

    def col(rows):
        b = flat(rows)
        return b["input_ids"], b["attention_mask"]

    _check(col, (5, 3), _real)


def test_an_embedding_as_wide_as_one_batchs_padded_length_is_read_by_position():
    g = torch.Generator().manual_seed(3)
    emb = {n: torch.randn(n, 6, generator=g) for n in (3, 8, 5, 9, 4, 6, 7, 2, 9)}
    docs = _docs()
    vec = [emb[len(d)] + d[:, None] for d in docs]  # (n, 6) per document

    def col(rows_idx):
        rows = [vec[i] for i in rows_idx]
        t = max(len(r) for r in rows)
        x = torch.zeros(len(rows), t, 6)
        real = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            x[i, :len(r)], real[i, :len(r)] = r, True
        return x, real

    def fp(groups):
        f = PoolFingerprint()
        for gr in groups:
            x, real = col(gr)
            f.add((x,), real)
        return f.value()

    same = {fp(gs) for gs in GROUPS}  # GROUPS[-2] has a batch of 6 tokens: (M, 6, 6)
    assert len(same) == 1


# --------------------------------------------------------------------------- labels shifted against the inputs

def _labels(shift, side="right"):
    """Causal-LM labels aligned with the inputs: ``[-100, x1, .., xn]`` (the model shifts), or shifted by one:
    ``[x1, .., xn, -100]``; -100 at the padding."""

    def extra(batch, rows):
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        lab = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            where = real[i].nonzero().flatten()
            seq = torch.cat([torch.tensor([-100]), r[1:]]) if not shift else torch.cat([r[1:], torch.tensor([-100])])
            lab[i, where] = seq
        batch["labels"] = lab

    return _collate(extra, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_shifted_against_unchanged_inputs_are_seen(side):
    """Before: labels were read from their first non-ignored value, so ``[-100, x1, x2]`` and ``[x1, x2, -100]``
    (the same inputs, the targets moved by one) hashed alike."""
    docs = _docs()
    for gs in GROUPS:
        aligned = _fp([_labels(False, side)([docs[i] for i in g]) for g in gs])
        shifted = _fp([_labels(True, side)([docs[i] for i in g]) for g in gs])
        assert aligned != shifted, gs
    _check(_labels(False, side), (1, 3))
    _check(_labels(True, side), (1, 3))


# --------------------------------------------------------------------------- 1-D rows and packed batches

#: eight documents of lengths 4, 2, 3, 4, 6, 5, 7, 3: a batch of the first four is as long (4) as it has rows
_SQUARE = [torch.arange(10 * i, 10 * i + n) % PAD for i, n in enumerate((4, 2, 3, 4, 6, 5, 7, 3))]
_SQUARE_GROUPS = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4, 1, 5], [2, 6, 3, 7]], [[7, 6, 5, 4], [3, 2, 1, 0]],
                  [[0, 1], [2, 3, 4, 5, 6, 7]], [[5, 2, 7], [0, 6, 3, 1, 4]]]


def _square_check(extra):
    """The eight documents re-batched hash alike (a batch of 4 x 4 tokens in some batchings); a changed token of
    document 3 (in the 4 x 4 batch) is seen."""
    col = _collate(extra)
    assert col(_SQUARE[:4])["input_ids"].shape == (4, 4)
    same = {_fp([col([_SQUARE[i] for i in g]) for g in gs]) for gs in _SQUARE_GROUPS}
    assert len(same) == 1, same
    other = [d.clone() for d in _SQUARE]
    other[3][2] = (other[3][2] + 1) % PAD
    for gs in _SQUARE_GROUPS:
        assert _fp([col([other[i] for i in g]) for g in gs]) not in same, gs


def _weights(batch, rows):
    """A per-position loss weight shared by the batch's samples, ``(T,)``, and a per-document value beside it."""
    batch["loss_weights"] = (torch.arange(batch["input_ids"].shape[1]) % 3 + 1).float()


def test_a_shared_1d_row_in_a_batch_of_as_many_samples_as_tokens_hashes_alike():
    """Before: the ``(T,)`` row of a batch of ``T`` = ``M`` = 4 was read as four samples of one value, in the other
    batches as each sample's row: another batching hashed otherwise. Now per sample only where every batch of the
    pass has as many rows as its row has values."""
    _square_check(_weights)


def test_a_per_sample_vector_in_a_batch_of_as_many_samples_as_tokens_is_still_per_sample():
    _square_check(lambda b, rows: b.update(lengths=b["attention_mask"].sum(1), first=b["input_ids"][:, 0] * 2))


def _packed(flat=False, cu_key="cu_seqlens", boundaries=None):
    """A varlen collator (a model's own ``forward_fn``): the batch's documents in one row (or flat), their
    boundaries, the longest length; ``boundaries``: other boundaries over the same tokens."""

    def collate(rows):
        ids = torch.cat(rows)
        lens = torch.tensor([len(r) for r in rows])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
        if boundaries is not None:
            cu = boundaries(cu)
        pos = torch.cat([torch.arange(len(r)) for r in rows])
        labels = torch.cat([torch.cat([torch.tensor([-100]), r[1:]]) for r in rows])
        b = {"input_ids": ids, "position_ids": pos, "labels": labels}
        if not flat:
            b = {k: v[None] for k, v in b.items()}
        b[cu_key] = cu
        b["max_seqlen"] = lens.max().reshape(1)
        return b

    return collate


@pytest.mark.parametrize("cu_key", ["cu_seqlens", "cu_seq_lens_q"])
@pytest.mark.parametrize("flat", [False, True], ids=["row", "flat"])
def test_a_packed_pool_re_packed_hashes_alike_and_sees_a_change(flat, cu_key):
    """Before: the packed row was one sample (another packing, another hash), a flat ``(N,)`` row N samples of one
    token (the tokens' order within a document unseen), the boundaries read as rows of one value."""
    _check(_packed(flat, cu_key), (3, 5), mask_fn=None)
    _check(_packed(flat, cu_key), (7, 1), mask_fn=None)
    docs = _docs()

    def moved(cu):  # the second boundary one token later: other documents, the same tokens
        cu = cu.clone()
        cu[1] += 1
        return cu

    same = _fp([_packed(flat, cu_key)([docs[i] for i in g]) for g in GROUPS[0]], None)
    assert _fp([_packed(flat, cu_key, boundaries=moved)([docs[i] for i in g]) for g in GROUPS[0]], None) != same
    swapped = [d.clone() for d in docs]
    swapped[1][[2, 5]] = swapped[1][[5, 2]]  # two tokens of a document in the other order: other content
    assert not torch.equal(swapped[1], docs[1])
    assert _fp([_packed(flat, cu_key)([swapped[i] for i in g]) for g in GROUPS[0]], None) != same


def test_packed_boundaries_that_are_not_offsets_never_fail():
    docs = _docs()
    b = _packed()(docs[:3])
    for cu in (b["cu_seqlens"].float(), b["cu_seqlens"][None], b["cu_seqlens"].flip(0), torch.tensor([0, 999]),
               torch.tensor([5, 2, 1]), torch.empty(0, dtype=torch.long)):
        f = PoolFingerprint()
        f.add(dict(b, cu_seqlens=cu))
        assert isinstance(f.value(), int)


# --------------------------------------------------------------------------- cost

def test_the_new_paths_read_nothing_back_to_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    docs = _docs()
    batches = [(_nest("inputs+pad-id-labels")(docs[:4]), None), (_nest("pair", "left")(docs[4:]), None),
               (_targets("targets")([docs[i] for i in (0, 2, 4, 5)]), None),
               (_collate(_three_d("additive"))(docs[:3]), None), (_labels(True)(docs[3:7]), None),
               (_collate(_weights)(_SQUARE[:4]), None), (_packed()(docs[:5]), None), (_packed(True)(docs[5:]), None)]
    batches = [(b, _real(b) if "attention_mask" in b and b["attention_mask"].ndim == 3 else attention_mask(b))
               for b, _ in batches]
    fp = PoolFingerprint()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        for b, mask in batches:
            fp.add(b, mask)
    assert fp.batches == len(batches) and isinstance(fp.value(), int)


# --------------------------------------------------------------------------- labels beside an additive mask

def _additive_labels(shift=False, side="right"):
    """A float ``attention_mask`` of 0 (real) and -inf (padding), and causal-LM ``labels = input_ids.clone()`` (the
    padding the pad id), or those labels shifted by one (the last real one -100)."""

    def extra(batch, rows):
        real = batch["attention_mask"].bool()
        lab = batch["input_ids"].clone()
        if shift:
            for i in range(len(rows)):
                where = real[i].nonzero().flatten()
                lab[i, where] = torch.cat([lab[i, where][1:], torch.tensor([-100])])
        batch["labels"] = lab
        batch["attention_mask"] = torch.zeros(real.shape).masked_fill(~real, float("-inf"))

    return _collate(extra, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_id_labels_beside_an_additive_attention_mask_hash_alike_and_see_a_shift(side):
    """Before: the labels' padding (the pad id, where the ``attention_mask`` is 0 and they are the inputs) was taken
    where an additive mask is 0, its real tokens: the labels were read at the padding only, so a re-padded pool was
    warned and a changed label not seen."""
    _check(_additive_labels(False, side), (4, 3), _real)
    docs = _docs()
    for gs in GROUPS:
        assert _fp([_additive_labels(False, side)([docs[i] for i in g]) for g in gs], _real) != \
            _fp([_additive_labels(True, side)([docs[i] for i in g]) for g in gs], _real), gs


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_the_aligned_labels_second_residue_is_the_labels_own_reading(dtype):
    # (a pass takes the labels' own reading from _aligned_labels in some batches, from tensor_fingerprint in others:
    # they must agree)
    from spectral_lens._fingerprint import _aligned_labels, tensor_fingerprint

    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 200, (5, 11), generator=g)
    labels[:, 0] = -100 if dtype != torch.uint8 else 0
    labels[2, 7:] = -100 if dtype != torch.uint8 else 0
    labels = labels.to(dtype)
    read = labels != (-100 if dtype != torch.uint8 else 0)
    real = torch.ones(5, 11, dtype=torch.bool)
    real[3, :4] = False
    both = _aligned_labels(labels, read, real)
    assert int(both[1]) == int(tensor_fingerprint(labels, read))
    assert int(both[0]) != int(both[1])
