"""Review 28 (poolfp): a held-out pool that silently changes content, and a tuple ``(x, y)`` passed as the pool.

The lens fingerprints the batches each measurement reads (``PoolFingerprint``: on the batches' device, read once
at the end) and warns once when a pool of the same row count gave other content than at the previous measurement
(before: only a changed row count was seen). A tuple of tensors passed as a pool (``(x, y)``, which the lens
reads as one batch everywhere else) is refused (before: iterated as two batches, the targets measured as inputs).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from spectral_lens import SpectralLens, SpectralLensWarning
from spectral_lens._fingerprint import PoolFingerprint, batch_fingerprint

from support.models import TinyLM

CHANGED = "SpectralLens: the pool changed between measurements"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tail window.*")
        yield


def _model():
    torch.manual_seed(0)
    return TinyLM(tied=False, dropout=0.0).double().eval()


def _seq(n=12, t=9, seed=0):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _fp(batches, masks=None):
    fp = PoolFingerprint()
    for i, b in enumerate(batches):
        fp.add(b, None if masks is None else masks[i])
    return fp.value()


class _Fresh:
    """A re-iterable whose every pass yields new batches of the same shapes (a fresh iterator of training batches,
    a streaming IterableDataset): the row count never changes."""

    def __init__(self, n=6):
        self.n, self.passes = n, 0

    def __iter__(self):
        self.passes += 1
        seq = _seq(self.n, seed=self.passes)
        yield seq[:, :-1], seq[:, 1:]


def _quietly(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        return fn()


# --------------------------------------------------------------------------- the fingerprint (pure)

def test_the_fingerprint_ignores_order_batching_and_padding_but_not_content():
    seq = _seq(8)
    x, y = seq[:, :-1], seq[:, 1:]
    whole = _fp([(x, y)])
    perm = torch.tensor([5, 1, 2, 7, 0, 3, 4, 6])
    assert _fp([(x[perm[:3]], y[perm[:3]]), (x[perm[3:]], y[perm[3:]])]) == whole  # reshuffled, rebatched
    assert _fp([(y, x)]) != whole  # the tensors' places count
    other = x.clone()
    other[3, 4] = (other[3, 4] + 1) % 64
    assert _fp([(other, y)]) != whole  # one token
    assert _fp([(x[:4], y[:4])]) != whole
    # padded to other lengths, on either side: the padding (attention_mask 0) is not read
    ones = torch.ones_like(x)
    right = {"input_ids": torch.cat([x, torch.full((8, 3), 63)], 1), "attention_mask": torch.cat([ones, 0 * ones[:, :3]], 1)}
    left = {"input_ids": torch.cat([torch.full((8, 2), 0), x], 1), "attention_mask": torch.cat([0 * ones[:, :2], ones], 1)}
    plain = {"input_ids": x, "attention_mask": ones}
    assert _fp([right]) == _fp([left]) == _fp([plain])
    assert _fp([{"input_ids": right["input_ids"]}]) != _fp([{"input_ids": x}])  # unmasked padding is content


def test_the_fingerprint_of_float_and_other_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 14_000, generator=g)  # 70,000 values per sample: 65,536 of them read
    assert _fp([x]) == _fp([x[[3, 1, 0]], x[[2, 5, 4]]])
    assert _fp([x]) != _fp([torch.randn(6, 5, 14_000, generator=g)])
    y = x.clone()
    y[2, 4, -1] += 1  # the last value of a sample is read
    assert _fp([y]) != _fp([x])
    assert _fp([x]) != _fp([x.double()]) and _fp([x.bfloat16()]) != _fp([x.half()])
    assert _fp([{"inputs_embeds": x, "labels": torch.zeros(6, dtype=torch.long)}]) != _fp([{"inputs_embeds": x}])
    assert _fp([torch.complex(x, -x)]) != _fp([x])
    assert _fp([torch.zeros(0, 3)]) == 0 and batch_fingerprint({"s": "text", "n": 3}) == []
    assert _fp([{"s": "text", "x": x}]) == _fp([{"s": "other", "x": x}])  # non-tensor leaves not read


# --------------------------------------------------------------------------- the lens

def test_a_pool_of_the_same_size_but_other_content_is_warned_once():
    """Before: no warning, the row counts being equal (the spectra of other sequences compared as one pool's)."""
    pool = _Fresh()
    lens = SpectralLens(_model(), pool, progress=False)
    _quietly(lambda: lens.measure(0, 0))
    with pytest.warns(SpectralLensWarning, match=CHANGED + r": the pool gave the same row counts .* other content"
                      r".*filterwarnings\('ignore', 'SpectralLens: the pool changed'"):
        lens.measure(1, 0)
    _quietly(lambda: lens.measure(2, 0))  # said once per lens
    # the advertised filter silences it
    lens = SpectralLens(_model(), _Fresh(), params=(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*tail window.*")
        warnings.filterwarnings("ignore", "SpectralLens: the pool changed", SpectralLensWarning)
        lens.measure(0, 0)
        lens.measure(1, 0)


def test_a_gradient_pool_of_other_content_is_warned_naming_it():
    seq = _seq(6)
    lens = SpectralLens(_model(), [(seq[:, :-1], seq[:, 1:])], gradient_pool=_Fresh(), progress=False)
    _quietly(lambda: lens.measure(0, 0))
    with pytest.warns(SpectralLensWarning, match=CHANGED + ": the gradient_pool gave the same row counts"):
        lens.measure(1, 0)


def test_a_fixed_pool_is_not_warned_shuffled_or_dynamically_padded():
    seq = _seq()
    lens = SpectralLens(_model(), [(seq[:6, :-1], seq[:6, 1:]), (seq[6:, :-1], seq[6:, 1:])], progress=False)
    _quietly(lambda: [lens.measure(i, 0) for i in range(3)])
    # a shuffled DataLoader padding each batch to its longest sequence: other batches, other padding, same pool
    lengths = [3, 8, 5, 9, 4, 6, 7, 2, 9]
    docs = [seq[i, :n] for i, n in enumerate(lengths)]

    def collate(batch):
        t = max(len(d) for d in batch)
        ids = torch.full((len(batch), t), 63)
        mask = torch.zeros(len(batch), t, dtype=torch.long)
        for i, d in enumerate(batch):
            ids[i, :len(d)], mask[i, :len(d)] = d, 1
        return {"input_ids": ids, "attention_mask": mask}

    class Dict(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask=None):
            return self.m(input_ids)

    loader = DataLoader(docs, batch_size=4, shuffle=True, collate_fn=collate)
    lens = SpectralLens(Dict(_model()), loader, layers="m.h.2", params=(), progress=False)
    orders = []
    for seed in range(3):
        torch.manual_seed(seed)  # the training loop's RNG moves between checkpoints: another order each time
        orders.append([tuple(b["input_ids"].shape) for b in loader])
        torch.manual_seed(seed)
        _quietly(lambda: lens.measure(seed, 0))
    assert len(set(map(tuple, orders))) > 1  # the batches did differ


def test_float_inputs_of_other_content_are_warned():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)).double()

    class Stream:
        passes = 0

        def __iter__(self):
            Stream.passes += 1
            yield torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(self.passes))

    lens = SpectralLens(model, Stream(), layers="1", params=(), progress=False)
    _quietly(lambda: lens.measure(0, 0))
    with pytest.warns(SpectralLensWarning, match=CHANGED + ": the pool gave the same row counts"):
        lens.measure(1, 0)
    fixed = SpectralLens(model, [torch.randn(40, 6, dtype=torch.float64)], layers="1", params=(), progress=False)
    _quietly(lambda: [fixed.measure(i, 0) for i in range(2)])


def test_the_fingerprint_changes_no_output_and_no_rng_stream(monkeypatch):
    seq = _seq()
    pool = [(seq[:6, :-1], seq[:6, 1:]), (seq[6:, :-1], seq[6:, 1:])]

    def run():
        torch.manual_seed(3)
        m = SpectralLens(_model(), pool, progress=False).measure(0, 0)
        return m, torch.get_rng_state()

    with_fp, rng = run()
    monkeypatch.setattr(PoolFingerprint, "add", lambda self, batch, mask=None: None)
    without, rng_without = run()
    assert torch.equal(rng, rng_without)
    for name, s in with_fp.spectra.items():
        assert torch.equal(s.values, without.spectra[name].values), name


# --------------------------------------------------------------------------- a tuple as the pool

def test_a_tuple_of_tensors_passed_as_the_pool_is_refused():
    """Before: ``(x, y)`` was iterated as two batches, ``x`` and then ``y``: the targets measured as inputs (and
    their per-sample gradients taken), silently."""
    seq = _seq()
    x, y = seq[:, :-1], seq[:, 1:]
    with pytest.raises(TypeError, match=r"pool is a tuple of 2 tensors \(shapes \(12, 8\), \(12, 8\)\).*one batch.*"
                                        r"pool=\[\(x, y\)\].*list\(ids.split\(8\)\)"):
        SpectralLens(_model(), (x, y), progress=False)
    with pytest.raises(TypeError, match=r"gradient_pool is a tuple of 3 tensors.*gradient_pool=\[\(x, y\)\]"):
        SpectralLens(_model(), [(x, y)], gradient_pool=(x, y, y), progress=False)
    with pytest.raises(TypeError, match="tuple of 3 tensors"):
        SpectralLens(_model(), x.split(4), params=(), progress=False)
    # what to pass instead, and tuples of batches, are taken
    SpectralLens(_model(), [(x, y)], progress=False).measure(0, 0)
    SpectralLens(_model(), ((x[:6], y[:6]), (x[6:], y[6:])), progress=False).measure(0, 0)
    SpectralLens(_model(), list(x.split(4)), params=(), progress=False).measure(0, 0)
    SpectralLens(_model(), (x,), params=(), progress=False).measure(0, 0)  # one tensor: the same either way


def test_the_fingerprint_reads_nothing_back_to_the_host_per_batch(monkeypatch):
    """On a GPU each read would be a host sync per batch: the running sum stays a tensor until ``value()``."""
    fp = PoolFingerprint()

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in PoolFingerprint.add")

    seq = _seq()
    batches = [(seq[:6, :-1], seq[:6, 1:]), {"input_ids": seq, "attention_mask": torch.ones_like(seq),
                                             "inputs_embeds": torch.randn(12, 9, 300, requires_grad=True)}]
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        for b in batches:
            fp.add(b)
    assert fp.batches == 2 and isinstance(fp.value(), int)


# --------------------------------------------------------------------------- per rank

class _HalfFresh:
    """Four batches; batches 1 and 3 (group rank 1's share on two ranks) are new at every pass, of the same shape."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for i in range(4):
            seq = _seq(3, seed=100 + i + (1000 * self.passes if i % 2 else 0))
            yield seq[:, :-1], seq[:, 1:]


def _half_fresh_on_each_rank(rank):
    lens = SpectralLens(_model(), _HalfFresh(), params=(), progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lens.measure(0, 0)
        lens.measure(1, 0)
    return [str(w.message)[:60] for w in seen if "the pool changed" in str(w.message)]


@pytest.mark.slow
@pytest.mark.distributed
def test_each_rank_compares_its_own_share_on_two_gloo_ranks(tmp_path):
    """No collective: the rank whose share changed warns, the other does not (its batches are the same)."""
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, {"half": _half_fresh_on_each_rank}, 2, pg_timeout_s=30, join_s=240.0,
                             preload="torch.distributed")
    r0, r1 = checked_case(results, "half", None)
    assert r0["error"] is None and r1["error"] is None, (r0, r1)
    assert r0["value"] == [] and len(r1["value"]) == 1 and r1["value"][0].startswith(CHANGED), (r0, r1)


class _Stream(torch.utils.data.IterableDataset):
    """Streams new text at every pass (a tokenized web stream), six sequences a pass."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        yield from _seq(6, seed=50 + self.passes)


def test_a_dataloader_over_a_streaming_iterable_dataset_is_warned():
    """Before: not seen (6 sequences at every pass, same row counts); nothing in the constructor can tell."""
    lens = SpectralLens(_model(), DataLoader(_Stream(), batch_size=3), params=(), progress=False)
    _quietly(lambda: lens.measure(0, 0))
    with pytest.warns(SpectralLensWarning, match=CHANGED + ": the pool gave the same row counts"):
        lens.measure(1, 0)
