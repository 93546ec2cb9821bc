"""Review 28 (revpool): adversarial review of the pool's content fingerprint (``spectral_lens._pools``).

Found: a fixed pool re-padded per batch was warned as changed where a sample holds more than 65,536 values (an
``inputs_embeds`` pool, token rows longer than 65,536: the evenly spaced values read depended on the padded length);
so was one whose ``labels`` are padded with -100 to another length than the mask (a seq2seq collator). A sample's
values in another order (a random flip) hashed alike (values hashed without positions), and so did any two samples
of equal value count, sum and sum of squares (the per-value mix was one square). Unsigned 16-64 bit tensors were
not read, and a non-contiguous sample was copied whole before its values were picked.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from spectral_lens import SpectralLens, SpectralLensWarning
from spectral_lens._fingerprint import PoolFingerprint, tensor_fingerprint

CHANGED = "SpectralLens: the pool changed between measurements"


def _fp(batches):
    fp = PoolFingerprint()
    for b in batches:
        fp.add(b)
    return fp.value()


def _quietly(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        return fn()


def _padded(docs, idx, side="right", key="inputs_embeds", pad=0):
    """Dict batch of ``docs[i]`` for ``i`` in ``idx``, padded to the longest on ``side``, with its attention_mask."""
    t = max(len(docs[i]) for i in idx)
    x = torch.full((len(idx), t, *docs[0].shape[1:]), pad, dtype=docs[0].dtype)
    mask = torch.zeros(len(idx), t, dtype=torch.long)
    for r, i in enumerate(idx):
        n = len(docs[i])
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        x[r, sl], mask[r, sl] = docs[i], 1
    return {key: x, "attention_mask": mask}


# --------------------------------------------------------------------------- false warnings of a fixed pool

def test_a_re_padded_pool_of_inputs_embeds_hashes_alike():
    """Before: (M, T, 768) embeddings hold more than 65,536 values a sample from T = 86 on, and the evenly spaced
    values read moved with the padded length T: the same samples, batched or padded otherwise, hashed otherwise."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randn(n, 768, generator=g) for n in (40, 100, 130, 90, 60, 120)]
    fixed = _fp([_padded(docs, [0, 1, 2]), _padded(docs, [3, 4, 5])])
    assert _fp([_padded(docs, [4, 0, 3]), _padded(docs, [2, 5, 1])]) == fixed  # shuffled, re-padded
    assert _fp([_padded(docs, [0, 1, 2], "left"), _padded(docs, [3, 4, 5], "left")]) == fixed
    other = [d.clone() for d in docs]
    other[4][59, 767] += 1  # the last value of a sample's last real token
    assert _fp([_padded(other, [0, 1, 2]), _padded(other, [3, 4, 5])]) != fixed


def test_token_rows_longer_than_the_sample_cap_re_padded_hash_alike():
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 50_000, (n,), generator=g) for n in (70_000, 66_000)]
    assert _fp([_padded(docs, [0, 1], key="input_ids")]) == _fp([_padded(docs, [1], key="input_ids"),
                                                                  _padded(docs, [0], "left", key="input_ids")])


def test_labels_padded_with_the_ignore_index_to_their_own_length_hash_alike():
    """A seq2seq collator pads ``labels`` with -100 to the batch's longest target, another length than the inputs'
    mask: before, the -100 padding was read, and a shuffled pool re-padded otherwise was warned."""
    g = torch.Generator().manual_seed(2)
    src = [torch.randint(1, 100, (n,), generator=g) for n in (5, 9, 7, 4)]
    tgt = [torch.randint(1, 100, (n,), generator=g) for n in (3, 8, 2, 6)]

    def batch(idx):
        b = _padded(src, idx, key="input_ids")
        b["labels"] = _padded(tgt, idx, key="labels", pad=-100)["labels"]
        return b

    assert _fp([batch([0, 1]), batch([2, 3])]) == _fp([batch([3, 0]), batch([1, 2])])
    changed = [t.clone() for t in tgt]
    changed[2][1] += 1
    assert _fp([batch([0, 1]), batch([2, 3])]) != _fp([{**batch([0, 1]), "labels": _padded(changed, [0, 1], key="labels",
                                                                                          pad=-100)["labels"]},
                                                       {**batch([2, 3]), "labels": _padded(changed, [2, 3], key="labels",
                                                                                          pad=-100)["labels"]}])


def test_a_shuffled_re_padded_inputs_embeds_pool_is_not_warned():
    """End to end: before, the second measurement warned that the pool changed (it had not)."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.randn(n, 768, generator=g, dtype=torch.float64) for n in (40, 100, 130, 90, 60, 120, 70)]

    class Embeds(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(768, 12), nn.Linear(12, 12)

        def forward(self, inputs_embeds, attention_mask=None):
            return self.out(torch.tanh(self.inp(inputs_embeds)))

    loader = DataLoader(list(range(len(docs))), batch_size=3, shuffle=True, collate_fn=lambda idx: _padded(docs, idx))
    torch.manual_seed(0)
    lens = SpectralLens(Embeds().double(), loader, layers="out", params=(), progress=False)
    orders = []
    for seed in range(3):
        torch.manual_seed(seed)  # the training loop moves the RNG between checkpoints: another order each time
        orders.append(tuple(tuple(b["inputs_embeds"].shape) for b in loader))
        torch.manual_seed(seed)
        _quietly(lambda s=seed: lens.measure(s, 0))
    assert len(set(orders)) > 1  # the batches were padded otherwise


# --------------------------------------------------------------------------- other content that hashed alike

def test_a_sample_in_another_order_is_other_content():
    """Before: each sample's values were a multiset, so a random flip (a common augmentation, which changes the
    activations) was not seen; a re-ordered batch still hashes alike."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 16, 16, generator=g)
    assert _fp([x.flip(-1)]) != _fp([x])
    ids = torch.randint(0, 1000, (4, 16), generator=g)
    assert _fp([ids.flip(1)]) != _fp([ids])
    assert _fp([x[[3, 1, 0, 2]], x[[7, 5, 4, 6]]]) == _fp([x])


def test_samples_of_equal_power_sums_are_other_content():
    """Before: the per-value mix was one square, so a sample hashed as its value count, sum and sum of squares:
    {1, 5, 6} and {2, 3, 7} (sums 12, squares 62) collided."""
    assert tensor_fingerprint(torch.tensor([[1, 5, 6, 100]])) != tensor_fingerprint(torch.tensor([[2, 3, 7, 100]]))
    assert tensor_fingerprint(torch.tensor([[0, 4, 5]])) != tensor_fingerprint(torch.tensor([[1, 2, 6]]))


def test_a_randomly_flipped_pool_is_warned():
    """End to end: the same rows, in another order within each sample at every pass (random augmentation)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    class Flipped:
        passes = 0

        def __iter__(self):
            Flipped.passes += 1
            yield x.flip(1) if Flipped.passes % 2 else x

    lens = SpectralLens(model, Flipped(), layers="1", params=(), progress=False)
    _quietly(lambda: lens.measure(0, 0))
    with pytest.warns(SpectralLensWarning, match=CHANGED + ": the pool gave the same row counts"):
        lens.measure(1, 0)


def test_unsigned_tensors_are_read():
    """Before: uint16/uint32/uint64 (torch >= 2.3) returned None, not read: a pool of them was never seen to change."""
    for name in ("uint16", "uint32", "uint64"):
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        a = torch.arange(12).reshape(3, 4).to(dtype)
        b = (torch.arange(12).reshape(3, 4) + 1).to(dtype)
        assert tensor_fingerprint(a) is not None and tensor_fingerprint(a) != tensor_fingerprint(b), name


def test_a_non_contiguous_sample_is_read_without_a_copy_of_it():
    """Before: ``reshape`` copied a non-contiguous sample whole before the 65,536 values were picked (channels-last
    pixels: O(numel) per batch); here an expanded tensor of 2**42 values a sample, which no copy can hold."""
    base = torch.arange(2**21, dtype=torch.int32)
    huge = base[:, None].expand(2**21, 2**21)[None].expand(4, -1, -1)  # strides (0, 1, 0): no view as (4, -1)
    h = tensor_fingerprint(huge)
    assert h is not None and h != tensor_fingerprint((base + 1)[:, None].expand(2**21, 2**21)[None].expand(4, -1, -1))
    pixels = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(6))  # 76,800 values a sample
    assert tensor_fingerprint(pixels.contiguous(memory_format=torch.channels_last)) == tensor_fingerprint(pixels)


def test_the_fingerprint_stays_within_int64_at_extreme_values():
    """Products stay below 2**63: the extremes of every integer dtype, and NaN/inf bits, give a residue in [0, P)."""
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        info = torch.iinfo(dtype)
        t = torch.tensor([[info.min, info.max, -1, 0, -100]], dtype=dtype)
        h = int(tensor_fingerprint(t))
        assert 0 <= h < 2**31 - 1
    f = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 3.4e38]])
    assert 0 <= int(tensor_fingerprint(f)) < 2**31 - 1


def test_the_fingerprint_reads_nothing_back_to_the_host_on_the_new_paths(monkeypatch):
    """The mask's positions (a cumsum), the gathered values and the ignore index: still no host read."""
    fp = PoolFingerprint()

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    g = torch.Generator().manual_seed(7)
    docs = [torch.randn(n, 768, generator=g) for n in (90, 100)]
    batches = [_padded(docs, [0, 1]), {"input_ids": torch.randint(0, 9, (2, 5)), "labels": torch.full((2, 3), -100)},
               torch.randn(2, 3, 160, 160).contiguous(memory_format=torch.channels_last)]
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        for b in batches:
            fp.add(b)
    assert fp.batches == 3 and isinstance(fp.value(), int)


# --------------------------------------------------------------------------- what docs/lens.md says of collators

def test_a_shuffled_packed_pool_hashes_as_its_documents():
    """``DataCollatorWithFlattening`` rows, read as the lens runs them (the padded batch of their documents, with
    the default mask_fn): another packing of the same documents hashes alike."""
    from spectral_lens._pools import attention_mask
    from spectral_lens.gradients._batch import batch_as_run, default_forward

    g = torch.Generator().manual_seed(8)
    docs = [torch.randint(1, 500, (n,), generator=g) for n in (5, 9, 3, 7, 6, 4)]

    def packed(idx):
        return {"input_ids": torch.cat([docs[i] for i in idx])[None],
                "position_ids": torch.cat([torch.arange(len(docs[i])) for i in idx])[None],
                "labels": torch.cat([torch.cat([torch.tensor([-100]), docs[i][1:]]) for i in idx])[None]}

    def fp(batches):
        f = PoolFingerprint()
        for b in batches:
            b = batch_as_run(b, default_forward)
            f.add(b, attention_mask(b))
        return f.value()

    assert fp([packed([0, 1, 2]), packed([3, 4, 5])]) == fp([packed([5, 0]), packed([2, 4, 1, 3])])
    assert fp([packed([0, 1, 2]), packed([3, 4, 5])]) != fp([packed([0, 1, 2]), packed([3, 4])])


def test_a_collator_that_masks_at_random_is_warned():
    """An MLM-style collator draws its masks from the RNG that training moves: other inputs at every measurement."""
    from support.models import TinyLM

    seq = torch.randint(1, 64, (8, 9), generator=torch.Generator().manual_seed(9))

    def collate(rows):
        ids = torch.stack(rows)
        return ids.masked_fill(torch.rand(ids.shape) < 0.15, 0)

    torch.manual_seed(0)
    lens = SpectralLens(TinyLM(tied=False, dropout=0.0).double().eval(), DataLoader(list(seq), batch_size=4,
                        collate_fn=collate), params=(), progress=False)
    torch.manual_seed(1)
    _quietly(lambda: lens.measure(0, 0))
    torch.manual_seed(2)  # training moved the RNG
    with pytest.warns(SpectralLensWarning, match=CHANGED):
        lens.measure(1, 0)


def test_the_spaced_indices_do_not_overflow_at_any_sample_size():
    """``arange(65536) * (n - 1)`` overflows int64 from n = 2**47 values a sample (an expanded tensor): indices
    wrapped negative, read out of order. Here each value is its own row index: read in order, first and last."""
    from spectral_lens._fingerprint import _spaced

    rows = torch.arange(2**24)[None, :, None].expand(2, 2**24, 2**24)  # 2**48 values a sample, no memory
    got = _spaced(rows, 1, 65_536)[0]
    assert got[0] == 0 and got[-1] == 2**24 - 1 and bool((got.diff() >= 0).all())
    one = torch.ones((), dtype=torch.int8)
    assert tensor_fingerprint(one.expand(2, 2**24, 2**24)) != tensor_fingerprint((one + 1).expand(2, 2**24, 2**24))
