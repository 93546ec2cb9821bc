"""Review 29 (poolfp2): the pool-change warning's false alarms and blind spots (``spectral_lens._pools``).

Found: a fixed pool, only shuffled and re-padded by its ``DataLoader``, was warned as changed where its batches hold a
tensor without the samples' leading dimension (a 0-dim per-batch token count: hashed once per batch; a ``(T,)`` or
``(1, T)`` ``position_ids`` shared by the batch: hashed as one sample of the padded length), a 4-D attention mask
(``(M, 1, T, T)``: read with its padding), seq2seq ``decoder_input_ids`` padded with the pad id (read with their
padding; the encoder's mask applied to them where the lengths happened to agree), or a ``mask_fn`` mask on another
device than the batch (the mask skipped, the padding read). A ``mask_fn`` that selects a part of the real tokens
(the answer, the last token) limited the fingerprint to them: a changed prompt, which the measured rows depend on
through attention, was not seen. Each test checks both directions: the same samples not warned, other content warned.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from spectral_lens import SpectralLens, SpectralLensWarning
from spectral_lens._fingerprint import PoolFingerprint, batch_fingerprint, tensor_fingerprint

from support.models import TinyLM

CHANGED = "SpectralLens: the pool changed between measurements"
PAD = 63
LENGTHS = [3, 8, 5, 9, 4, 6, 7, 2, 9]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tail window.*")
        yield


class _Kw(nn.Module):
    """A model taking a Hugging Face style dict batch: runs ``input_ids`` through a ``TinyLM``, the rest unread."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.m = TinyLM(tied=False, dropout=0.0).double().eval()

    def forward(self, input_ids, **kwargs):
        return self.m(input_ids)


def _docs(change=None):
    """Nine token rows of the LENGTHS, in 0 .. 62 (PAD never a token); ``change``: (doc, position) bumped by one."""
    seq = torch.randint(0, PAD, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(0))
    docs = [seq[i, :n].clone() for i, n in enumerate(LENGTHS)]
    if change is not None:
        d, p = change
        docs[d][p] = (docs[d][p] + 1) % PAD
    return docs


def _collate(extra=None, side="right"):
    """Pads each batch to its longest row (on ``side``), with its (M, T) attention_mask; ``extra(batch, ids, mask)``
    adds entries."""

    def collate(rows):
        t = max(len(d) for d in rows)
        ids = torch.full((len(rows), t), PAD)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        for i, d in enumerate(rows):
            sl = slice(0, len(d)) if side == "right" else slice(t - len(d), t)
            ids[i, sl], mask[i, sl] = d, 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if extra is not None:
            extra(batch, rows)
        return batch

    return collate


def _measures(collate, docs_at, mask_fn="default", seeds=3):
    """``measure`` ``seeds`` times over a shuffled ``DataLoader`` of ``docs_at(i)`` (the pool's samples at measurement
    ``i``), another order each time; the warnings raised, and whether the batches' shapes differed."""
    class Pool:
        """A shuffled DataLoader over this measurement's samples."""
        i = 0

        def __iter__(self):
            loader = DataLoader(docs_at(Pool.i), batch_size=4, shuffle=True, collate_fn=collate)
            Pool.i += 1
            return iter(loader)

    kw = {} if mask_fn == "default" else {"mask_fn": mask_fn}
    lens = SpectralLens(_Kw(), Pool(), layers="m.h.2", params=(), progress=False, **kw)
    shapes = set()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        for seed in range(seeds):
            torch.manual_seed(seed)
            shapes.add(tuple(tuple(b["input_ids"].shape) for b in DataLoader(docs_at(0), batch_size=4, shuffle=True,
                                                                             collate_fn=collate)))
            torch.manual_seed(seed)  # the training loop's RNG moves between checkpoints: another order each time
            lens.measure(seed, 0)
    return [str(w.message) for w in got if issubclass(w.category, SpectralLensWarning)], len(shapes) > 1


def _same_pool(collate, mask_fn="default"):
    """No warning for the same samples shuffled, re-batched and re-padded (the batches checked to differ)."""
    said, differed = _measures(collate, lambda i: _docs(), mask_fn)
    assert differed and not [w for w in said if CHANGED in w], said


def _other_pool(collate, change, mask_fn="default"):
    """A warning for the pool with one token of ``change`` (doc, position) bumped from the second measurement on."""
    said, _ = _measures(collate, lambda i: _docs(change if i else None), mask_fn, seeds=2)
    assert [w for w in said if CHANGED in w and "other content" in w], said


# --------------------------------------------------------------------------- tensors without the samples' dimension

def _count(batch, rows):
    batch["num_tokens"] = batch["attention_mask"].sum()  # 0-dim: another value for every other batching


def test_a_per_batch_token_count_does_not_warn_a_shuffled_pool():
    """Before: the 0-dim count was hashed once per batch (as a sample of one value): warned at every reshuffle."""
    _same_pool(_collate(_count))
    _other_pool(_collate(_count), (3, 4))


def _positions_1d(batch, rows):
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])  # (T,), shared by the batch


def _positions_2d(batch, rows):
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]  # (1, T), broadcast over the batch


@pytest.mark.parametrize("extra", [_positions_1d, _positions_2d], ids=["T", "1xT"])
def test_shared_position_ids_do_not_warn_a_re_padded_pool(extra):
    """Before: a ``(T,)`` or ``(1, T)`` tensor was hashed as one sample of the padded length T per batch."""
    _same_pool(_collate(extra))
    _other_pool(_collate(extra), (1, 7))


def test_a_per_sample_length_vector_and_one_sample_batches_hash_alike():
    """A ``(M,)`` per-sample tensor is per sample (unchanged); a ``(1, T)`` tensor in a batch of one sample is that
    sample's, as the ``(1, T)`` tensor broadcast over a batch of more is each of its samples'."""
    docs = _docs()
    col = _collate(lambda b, rows: b.update(lengths=b["attention_mask"].sum(1), position_ids=torch.arange(
        b["input_ids"].shape[1])[None]))

    def fp(groups):
        f = PoolFingerprint()
        for g in groups:
            f.add(col([docs[i] for i in g]))
        return f.value()

    assert fp([[0, 1, 2], [3, 4, 5, 6, 7, 8]]) == fp([[8], [5, 0, 3], [1], [2, 4, 6, 7]])
    assert fp([[0, 1, 2], [3, 4, 5, 6, 7, 8]]) != fp([[0, 1, 2], [3, 4, 5, 6, 7]])
    shifted = col([docs[i] for i in (0, 1, 2)])
    shifted["position_ids"] = shifted["position_ids"] + 1  # other positions: other content
    assert _fp_of([shifted, col([docs[i] for i in (3, 4, 5, 6, 7, 8)])]) != fp([[0, 1, 2], [3, 4, 5, 6, 7, 8]])


def test_a_leading_dimension_of_one_that_is_not_the_masks_length_is_rows_of_its_own():
    """One image's ``(1, 3)`` ``image_grid_thw`` in a batch of more samples is that image's row, not each sample's: the
    images' rows, batched otherwise, hash alike (as before review 29)."""
    docs = _docs()
    grids = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 8, 8]])

    def batch(idx, images):
        b = _collate()([docs[i] for i in idx])
        b["image_grid_thw"] = grids[images]
        return b

    assert _fp_of([batch([0, 1], [0]), batch([2, 3, 4], [1, 2])]) == _fp_of([batch([0, 1], [0, 1]),
                                                                            batch([2, 3, 4], [2])])
    assert _fp_of([batch([0, 1], [0]), batch([2, 3, 4], [1, 2])]) != _fp_of([batch([0, 1], [0]),
                                                                            batch([2, 3, 4], [1, 1])])


# --------------------------------------------------------------------------- 4-D attention masks

def _four_d(batch, rows):
    """The (M, T) padding as an (M, 1, T, T) bool mask, causal: query q reads the real keys up to q."""
    real = batch["attention_mask"].bool()
    t = real.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    batch["attention_mask"] = (causal & real[:, None, :] & real[:, :, None])[:, None]


def _diagonal(batch):
    return batch["attention_mask"][:, 0].diagonal(dim1=1, dim2=2)  # (M, T): the real queries


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_re_padded_pool_with_a_4d_attention_mask_is_not_warned(side):
    """Before: the (M, 1, T, T) mask was read with its padding (every entry of up to 65,536 a sample), and the tokens
    without it (the batch's 4-D mask fitted none of them): another padded length hashed otherwise."""
    col = _collate(_four_d, side)
    _same_pool(col, _diagonal)
    _other_pool(col, (5, 2), _diagonal)


def test_the_4d_mask_is_read_at_its_real_entries():
    """Another attention pattern among the real tokens (a document boundary inside a row) is other content, and the
    query blocks (a few million entries each) read as one."""
    docs = _docs()
    col = _collate(_four_d)
    b = col(docs[:4])
    m = b["input_ids"] != PAD
    other = dict(b, attention_mask=b["attention_mask"].clone())
    other["attention_mask"][1, 0, 5, 2] = False  # query 5 of row 1 no longer reads key 2
    assert batch_fingerprint(b, m) != batch_fingerprint(other, m)
    g = torch.Generator().manual_seed(1)
    n, extra = 1500, 120  # 4 x 1500 x 1500: three query blocks
    real = torch.ones(4, n, dtype=torch.bool)
    x = torch.rand(4, 1, n, n, generator=g) < 0.5
    padded = torch.zeros(4, 1, n + extra, n + extra, dtype=torch.bool)
    padded[:, :, extra:, extra:] = x  # left-padded by 120: one block fewer or more
    preal = torch.cat([torch.zeros(4, extra, dtype=torch.bool), real], 1)
    assert int(tensor_fingerprint(x, real)) == int(tensor_fingerprint(padded, preal))
    y = x.clone()
    y[3, 0, n - 1, 0] = ~y[3, 0, n - 1, 0]  # the last block's first key
    assert int(tensor_fingerprint(y, real)) != int(tensor_fingerprint(x, real))
    # an additive float mask (0 = read, -inf = not) of the same pattern: read by its bits, the same way
    small, psmall = x[:, :, :40, :40], padded[:, :, :extra + 40, :extra + 40]
    rs, prs = real[:, :40], torch.cat([torch.zeros(4, extra, dtype=torch.bool), real[:, :40]], 1)
    add, padd = (torch.where(m, 0.0, float("-inf")) for m in (small, psmall))
    assert int(tensor_fingerprint(add, rs)) == int(tensor_fingerprint(padd, prs))
    other = add.clone()
    other[0, 0, 3, 1] = -1e9
    assert int(tensor_fingerprint(other, rs)) != int(tensor_fingerprint(add, rs))


# --------------------------------------------------------------------------- seq2seq batches

def _seq2seq(batch, rows):
    """A seq2seq collator's targets: labels padded with -100, decoder_input_ids (labels shifted right, the start id
    0) padded with the pad id, to the longest target of the batch."""
    targets = [(d.flip(0) + 1) % PAD for d in rows]  # another length than the sources: the reversed rows, cut
    targets = [t[: max(1, len(t) - 1)] for t in targets]
    t = max(len(x) for x in targets)
    labels = torch.full((len(rows), t), -100)
    dec = torch.full((len(rows), t), PAD)
    for i, x in enumerate(targets):
        labels[i, :len(x)] = x
        dec[i, :len(x)] = torch.cat([torch.zeros(1, dtype=x.dtype), x[:-1]])
    batch["labels"], batch["decoder_input_ids"] = labels, dec


def test_a_re_padded_seq2seq_pool_is_not_warned():
    """Before: ``decoder_input_ids`` padded with the pad id were read with their padding (and under the encoder's
    attention_mask where the lengths happened to agree)."""
    _same_pool(_collate(_seq2seq))
    _other_pool(_collate(_seq2seq), (3, 0))  # doc 3's first token: the last target token, a decoder_input_ids one


def test_a_decoder_attention_mask_is_the_decoder_tensors_mask():
    docs = _docs()

    def with_mask(batch, rows):
        _seq2seq(batch, rows)
        batch["decoder_attention_mask"] = (batch["labels"] != -100).long()
        batch["decoder_input_ids"][batch["labels"] == -100] = 7  # its padding: any id
        batch.pop("labels")

    col = _collate(with_mask)

    def fp(groups):
        return _fp_of([col([docs[i] for i in g]) for g in groups])

    assert fp([[0, 1, 2, 3], [4, 5, 6, 7, 8]]) == fp([[8, 0], [5, 1, 3], [2, 4, 6, 7]])
    changed = [col([docs[i] for i in (0, 1, 2, 3)]), col([docs[i] for i in (4, 5, 6, 7, 8)])]
    changed[1]["decoder_input_ids"][0, 1] += 1
    assert _fp_of(changed) != fp([[0, 1, 2, 3], [4, 5, 6, 7, 8]])


def _fp_of(batches):
    f = PoolFingerprint()
    for b in batches:
        f.add(b)
    return f.value()


# --------------------------------------------------------------------------- a mask_fn that selects a part

def _last_token(batch):
    """Only each row's last real token measured (a classifier's readout)."""
    real = batch["attention_mask"].bool()
    last = real.long().cumsum(1) == real.sum(1, keepdim=True)
    return last & real


def test_a_changed_prompt_under_a_mask_fn_that_selects_the_last_token_is_warned():
    """Before: the fingerprint read only the positions ``mask_fn`` selects, so a change in the other real tokens
    (which the measured rows read through attention) was not seen. The batch's own attention_mask (its padding) is
    the fingerprint's mask now."""
    _other_pool(_collate(), (3, 1), _last_token)  # doc 3 (8 tokens): its second token
    _same_pool(_collate(), _last_token)


def test_a_mask_fn_on_a_batch_without_attention_mask_is_still_read_under_it():
    """A tuple batch has no padding of its own: ``mask_fn``'s mask is the fingerprint's (a part of the tokens only,
    as documented)."""
    x = torch.randint(0, PAD, (4, 6), generator=torch.Generator().manual_seed(2))
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[:, -1] = True
    y = x.clone()
    y[0, 0] += 1
    assert batch_fingerprint((x,), m) == batch_fingerprint((y,), m)
    assert batch_fingerprint((x,), None) != batch_fingerprint((y,), None)


# --------------------------------------------------------------------------- a mask on another device

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a mask on another device)")
def test_a_mask_on_another_device_is_applied():
    """Before: a ``mask_fn`` mask on the GPU for a CPU batch was skipped, its padding read: a re-padded pool warned."""
    def cuda_mask(batch):
        return batch["attention_mask"].bool().cuda()

    docs = _docs()
    col = _collate()

    def fp(groups, to=None):
        f = PoolFingerprint()
        for g in groups:
            b = col([docs[i] for i in g])
            f.add(b if to is None else {k: v.to(to) for k, v in b.items()}, cuda_mask(b) if to is None else
                  b["attention_mask"].bool())
        return f.value()

    assert fp([[0, 1, 2, 3], [4, 5, 6, 7, 8]]) == fp([[8, 0], [5, 1, 3], [2, 4, 6, 7]])
    # and a CPU mask of a CUDA batch (read on the GPU): the same value as on one device
    assert fp([[0, 1, 2, 3], [4, 5, 6, 7, 8]], "cuda") == fp([[0, 1, 2, 3], [4, 5, 6, 7, 8]])
    x = torch.randint(0, PAD, (4, 6)).cuda()
    cpu_mask = torch.ones(4, 6, dtype=torch.bool)
    cpu_mask[:, 4:] = False
    y = x.clone()
    y[:, 5] = 0  # padding only
    assert int(tensor_fingerprint(x, cpu_mask)) == int(tensor_fingerprint(y, cpu_mask))


def test_a_mask_on_another_device_is_moved_without_a_host_read(monkeypatch):
    """The CPU one copied to the other's device (``non_blocking``): checked on the CPU by the call it makes."""
    from spectral_lens import _fingerprint

    calls = []
    t, m = torch.arange(6).reshape(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert _fingerprint._on_one_device(t, m) == (t, m)  # one device: as they are

    class Fake:
        def __init__(self, kind):
            self.type = kind

    class T:
        def __init__(self, kind):
            self.device = Fake(kind)

        def to(self, device, non_blocking=False):
            calls.append((self.device.type, device.type, non_blocking))
            return self

    _fingerprint._on_one_device(T("cpu"), T("cuda"))
    _fingerprint._on_one_device(T("cuda"), T("cpu"))
    assert calls == [("cpu", "cuda", True), ("cpu", "cuda", True)]


# --------------------------------------------------------------------------- cost

def test_the_new_paths_read_nothing_back_to_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    docs = _docs()
    batches = [_collate(_count)(docs[:4]), _collate(_positions_1d)(docs[4:]), _collate(_seq2seq)(docs[:3])]
    four = _collate(_four_d)(docs[2:6])
    fp = PoolFingerprint()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        for b in batches:
            fp.add(b)
        fp.add(four, four["input_ids"] != PAD)
    assert fp.batches == 4 and isinstance(fp.value(), int)
