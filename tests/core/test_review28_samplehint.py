"""An ``IterableDataset`` of single samples (or a list of 1-D samples) passed as the pool: the lens runs each item as
a batch and the model fails deep inside (``idx.shape[1]``: a bare ``IndexError``). Such a pool cannot be refused
up front (an ``IterableDataset`` may yield whole batches; a model may take 1-D batches), so the first forward's
error gets a note naming the pool and the ``DataLoader`` wrap, its type and message unchanged (Python 3.11+)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch.utils.data import IterableDataset

from spectral_lens import SpectralLens
from spectral_lens._pools import single_sample_hint

from support.models import TinyGPT, lm_batch

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="BaseException.add_note is Python 3.11+")


class Samples(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def _measure(pool):
    torch.manual_seed(0)
    lens = SpectralLens(TinyGPT(), pool=pool, layers=["transformer.h.1"], params=())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lens.measure(step=0, tokens=0)


@pytest.mark.parametrize("make", [lambda x, y: Samples(x, y), lambda x, y: list(x)], ids=["iterable-dataset", "list"])
def test_a_pool_of_single_samples_fails_with_a_note_saying_to_wrap_it(make):
    x, y = lm_batch(m=4)
    pool = make(x, y)
    with pytest.raises(IndexError) as info:
        _measure(pool)
    notes = getattr(info.value, "__notes__", [])
    assert any(f"the pool ({type(pool).__name__}) gave a first batch whose tensors have at most one dimension" in n
               and "DataLoader(pool, batch_size=8)" in n for n in notes), notes


def test_the_hint_is_only_for_batches_without_a_batch_dimension():
    x, y = lm_batch(m=4)
    assert single_sample_hint([], (x[0], y[0])) is not None
    assert single_sample_hint([], {"input_ids": x[0], "attention_mask": torch.ones(10)}) is not None
    assert single_sample_hint([], (x, y)) is None  # a batch: an error in it is the model's own, no note
    assert single_sample_hint([], {"input_ids": x}) is None
    assert single_sample_hint([], ["text"]) is None  # no tensor
    m = _measure([(x, y)])  # a pool of batches measures as before
    assert m.spectra["act:transformer.h.1"].n_rows == 40
