"""Review 28 (dspool): a ``torch.utils.data.Dataset`` passed as the pool, in place of a ``DataLoader`` over it.

Iterated as a pool, a dataset gives one *sample* per "batch" (``(T,)`` token rows, tuples or dicts of them): a
nanoGPT-style model failed deep in its forward (``idx.shape[1]``: a bare ``IndexError``), a Hugging Face
causal LM in its rotary or mask code, and a map-style dataset without ``__iter__`` was refused with a
message that did not say what to do. A map-style ``Dataset`` (unambiguous: its items are samples) is now a
``TypeError`` when the lens is built, naming it and saying to wrap it in a ``DataLoader``. What works and is
right is still taken: lists and tuples of batches, ``DataLoader``s, an ``IterableDataset`` that yields whole
batches, a re-iterable with a ``len``, and a list of 1-D batches of a model taking 1-D input (float64 reference).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from spectral_lens import SpectralLens
from spectral_lens.lens import sample_dataset

from support.models import TinyGPT

GRAD = "transformer.h.1.attn.c_proj.weight"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tail window.*")
        yield


def _seq(n=8, t=10):
    ids = torch.randint(0, 37, (n, t + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _gpt():
    torch.manual_seed(0)
    return TinyGPT(vocab=37, ctx=12).double().eval()


class _Dicts(Dataset):
    """A map-style dataset of dict samples (a Hugging Face dataset converted to torch), iterable like one."""

    def __init__(self):
        self.x, self.y = _seq()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _Batches(IterableDataset):
    """An IterableDataset that yields whole batches (what ``DataLoader(batch_size=None)`` takes)."""

    def __iter__(self):
        x, y = _seq()
        return iter([(x[:4], y[:4]), (x[4:], y[4:])])


class _BatchItems(Dataset):
    """A map-style dataset whose items are whole batches: the refusal's other remedy, batch_size=None."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        x, y = _seq()
        return x[4 * i: 4 * i + 4], y[4 * i: 4 * i + 4]


class _Sized:
    """A re-iterable with a len whose ``__iter__`` is a generator function."""

    def __len__(self):
        return 2

    def __iter__(self):
        x, y = _seq()
        yield x[:4], y[:4]
        yield x[4:], y[4:]


def _datasets():
    x, y = _seq()
    return {
        "TensorDataset": TensorDataset(x, y),
        "Subset": Subset(TensorDataset(x, y), range(6)),
        "ConcatDataset": ConcatDataset([TensorDataset(x), TensorDataset(x)]),
        "_Dicts": _Dicts(),
    }


@pytest.mark.parametrize("name", ["TensorDataset", "Subset", "ConcatDataset", "_Dicts"])
@pytest.mark.parametrize("what", ["pool", "gradient_pool"])
def test_a_map_style_dataset_is_refused_at_construction_saying_to_wrap_it(name, what):
    # before: TensorDataset/Subset/ConcatDataset refused as "must be a re-iterable ..." without the remedy, and
    # _Dicts (a dataset with __iter__) accepted, each sample run as a batch: a bare error deep in the model
    ds = _datasets()[name]
    x, y = _seq()
    kwargs = {"pool": ds} if what == "pool" else {"pool": [(x, y)], "gradient_pool": ds}
    n = len(ds)
    pattern = (rf"SpectralLens: {what} is a map-style Dataset \({name} of {n} samples\), whose items are single "
               rf"samples, not batches.*{what}=DataLoader\(dataset, batch_size=8\).*batch_size=None")
    with pytest.raises(TypeError, match=pattern):
        SpectralLens(_gpt(), params=GRAD, progress=False, **kwargs)
    with pytest.raises(TypeError, match=pattern):  # a lens built without a model: the same check
        SpectralLens(params=GRAD, progress=False, **kwargs)


@pytest.mark.slow  # transformers import: ~5 s
def test_the_dict_dataset_failed_deep_in_a_causal_lm_before():
    """Why it is refused: each dict sample run as a batch of a Hugging Face causal LM fails inside its mask code
    (the behaviour the constructor's check replaces; transformers only, no download)."""
    pytest.importorskip("transformers")
    from support.models import tiny_hf_llama

    model = tiny_hf_llama(37)
    with pytest.raises(Exception) as caught, torch.no_grad():
        model(**next(iter(_Dicts())))
    assert "SpectralLens" not in str(caught.value)  # a bare error, naming neither the pool nor the remedy


def test_sample_dataset_names_only_map_style_datasets():
    x, y = _seq()
    assert sample_dataset(TensorDataset(x, y)) is not None
    for pool in ([(x, y)], ((x, y),), DataLoader(TensorDataset(x, y), batch_size=4), _Batches(), _Sized(),
                 [x[i] for i in range(8)], None):
        assert sample_dataset(pool) is None, type(pool).__name__


class _NoLen(Dataset):
    def __getitem__(self, i):
        return torch.zeros(3)


def test_a_dataset_without_len_is_named_without_its_size():
    with pytest.raises(TypeError, match=r"pool is a map-style Dataset \(_NoLen\), whose items"):
        SpectralLens(pool=_NoLen(), progress=False)


def _values(lens):
    return {k: s.values for k, s in lens.measure(0, 0).spectra.items()}


def test_what_works_is_still_taken_and_measures_the_same_pool():
    """A DataLoader over the dataset (and over one of whole batches, batch_size=None), an IterableDataset of whole batches, a re-iterable with a len, a tuple of
    dict batches: the same samples, the same spectra as the list of batches (bit for bit: the same batches)."""
    x, y = _seq()
    ref = _values(SpectralLens(_gpt(), pool=[(x[:4], y[:4]), (x[4:], y[4:])], params=GRAD, progress=False))
    assert set(ref) == {"act:transformer.h.1", f"grad:{GRAD}"}
    pools = [DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(_BatchItems(), batch_size=None), _Batches(),
             _Sized()]
    for pool in pools:
        got = _values(SpectralLens(_gpt(), pool=pool, params=GRAD, progress=False))
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=f"{type(pool).__name__} {k}")
    dicts = ({"input_ids": x[:4]}, {"input_ids": x[4:]})  # a tuple of dict batches (activations only)
    got = _values(SpectralLens(_gpt(), pool=dicts, forward_fn=lambda m, b: m(b["input_ids"]), params=(),
                                 progress=False))
    torch.testing.assert_close(got["act:transformer.h.1"], ref["act:transformer.h.1"], rtol=0, atol=0)


class _Tokens(nn.Module):
    """A model taking 1-D input: one token per sample, (B,) -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(37, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, idx):
        return self.mlp(self.emb(idx))


def test_a_list_of_1d_batches_of_a_model_taking_1d_input_is_measured_right():
    """The ambiguous case left alone (documented): a list of 1-D tensors is a pool of batches for a model whose
    samples are single values; its spectrum against a float64 reference."""
    model = _Tokens().double().eval()
    x, _ = _seq()
    pool = [x[i] for i in range(8)]  # 8 batches of 10 one-token samples
    got = SpectralLens(model, pool=pool, layers=["mlp"], params=(), progress=False).measure(0, 0).spectra
    (spectrum,) = got.values()
    with torch.no_grad():
        rows = model(x.flatten()).to(torch.float64)
    centered = rows - rows.mean(0)
    ref = torch.linalg.eigvalsh(centered.T @ centered / (rows.shape[0] - 1)).flip(0).clamp_min(0)
    assert spectrum.n_rows == 80
    torch.testing.assert_close(spectrum.values[: ref.numel()], ref, rtol=1e-9, atol=1e-12 * float(ref[0]))
