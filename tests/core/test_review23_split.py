"""Review 23 (lens.py split): the gradient protocol's batches, moved to the private ``_gradient_pool.py`` as
functions of the pool, the cap and the probe's ``forward_fn``, cut and count as the lens did, called
without a lens; and the lens still feeds its probe through them."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from spectral_lens import SpectralLens
from spectral_lens._gradient_pool import gradient_batches, gradient_total
from spectral_lens.gradients import default_forward

from support.models import TinyLM, lm_pool


def _data(n=12):
    seq = torch.randint(0, 64, (n, 5), generator=torch.Generator().manual_seed(0))
    return TensorDataset(seq[:, :-1], seq[:, 1:])


class _Counted:
    """A re-iterable pool that counts the batches drawn from it."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


def test_gradient_batches_cut_at_the_cap_and_draw_no_batch_past_it():
    pool = _Counted(lm_pool(n_batches=4, batch=3, t=6))
    got = list(gradient_batches(pool, 7, default_forward))
    assert [b[0].shape[0] for b in got] == [3, 3, 1]  # the last batch sliced to the cap
    assert torch.equal(got[2][0], pool.batches[2][0][:1])
    assert pool.drawn == 3
    pool.drawn = 0
    assert [b[0].shape[0] for b in gradient_batches(pool, 6, default_forward)] == [3, 3] and pool.drawn == 2
    assert len(list(gradient_batches(pool, None, default_forward))) == 4


def test_gradient_batches_count_a_packed_batch_as_its_documents():
    """With the default forward a packed row (Hugging Face's DataCollatorWithFlattening) is the padded batch of
    its documents: the cap counts documents."""
    packed = {"input_ids": torch.arange(1, 9).view(1, 8), "labels": torch.arange(1, 9).view(1, 8),
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])}
    got = list(gradient_batches([packed], 2, default_forward))
    assert got[0]["input_ids"].shape[0] == 2  # 3 documents, cut to 2
    own = lambda m, b: m(b)  # noqa: E731  a forward of your own gets the packed row as given
    assert list(gradient_batches([packed], 2, own))[0]["input_ids"].shape[0] == 1
    assert gradient_total([packed], None, default_forward) == 3 and gradient_total([packed], None, own) == 1


def test_gradient_total_of_lists_loaders_and_caps():
    pool = lm_pool(n_batches=4, batch=3, t=6)
    assert gradient_total(pool, None, default_forward) == 12 and gradient_total(pool, 5, default_forward) == 5
    assert gradient_total(pool, 50, default_forward) == 12
    assert gradient_total(DataLoader(_data(12), batch_size=5, drop_last=True), None, default_forward) == 10
    assert gradient_total(DataLoader(_data(12), batch_size=5), None, default_forward) == 12
    assert gradient_total(iter(pool), None, default_forward) is None and gradient_total(iter(pool), 4, None) == 4


def test_the_lens_measures_the_cut_gradient_pool():
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0).double()
    pool = _Counted(lm_pool(n_batches=4, batch=3, t=6))
    lens = SpectralLens(model, lm_pool(n_batches=1, batch=3, t=6), gradient_pool=pool, gradient_samples=5,
                        layers="h.0", progress=False, tail_window=(4, 16))
    assert lens._gradient_total() == 5
    m = lens.measure(0, 0)
    assert m.spectra["grad:h.2.attn.c_proj.weight"].n_rows == 5 and pool.drawn == 2
