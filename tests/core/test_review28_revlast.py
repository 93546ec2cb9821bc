"""Review 28 (revlast): a Dataset subclass with its own ``__iter__`` yielding whole batches is a legitimate
pool (iterating it never reads single items), so it is not refused as a map-style dataset of samples; a
map-style Dataset, ``StackDataset`` included, still is."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset, StackDataset, TensorDataset

from spectral_lens import SpectralLens
from spectral_lens.lens import sample_dataset

from support.models import TinyGPT

GRAD = "transformer.h.1.attn.c_proj.weight"


def _seq(n=8, t=10):
    ids = torch.randint(0, 37, (n, t + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


class _BatchingDataset(Dataset):
    """Map-style items (samples) for a DataLoader, and an ``__iter__`` of whole batches of 4."""

    def __init__(self):
        self.x, self.y = _seq()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __iter__(self):
        for i in range(0, len(self.x), 4):
            yield self.x[i:i + 4], self.y[i:i + 4]


def _gpt():
    torch.manual_seed(0)
    return TinyGPT(vocab=37, ctx=12).double().eval()


def _values(lens):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tail window.*")
        return {k: s.values for k, s in lens.measure(0, 0).spectra.items()}


def test_a_dataset_with_its_own_iter_of_batches_is_taken_and_measures_the_same_pool():
    assert sample_dataset(_BatchingDataset()) is None
    x, y = _seq()
    ref = _values(SpectralLens(_gpt(), pool=[(x[:4], y[:4]), (x[4:], y[4:])], params=GRAD, progress=False))
    got = _values(SpectralLens(_gpt(), pool=_BatchingDataset(), params=GRAD, progress=False))
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_stack_and_tensor_datasets_are_still_refused():
    x, y = _seq()
    for ds in (StackDataset(x, y), StackDataset(input_ids=x, labels=y), TensorDataset(x, y)):
        assert sample_dataset(ds) is not None, type(ds).__name__
        with pytest.raises(TypeError, match="map-style Dataset"):
            SpectralLens(_gpt(), pool=ds, params=GRAD, progress=False)


def _cov(x, precision):
    from spectral_lens import ActivationCovarianceAccumulator

    a = ActivationCovarianceAccumulator(x.shape[1], precision=precision)
    a.update(x)
    return a.covariance().double().numpy()


@pytest.mark.parametrize("case", ["offset", "heavy_rounding", "mixed_scales", "bf16"])
def test_cpufix2_one_sum_m_is_consistent_with_the_fp32_centred_products(case, monkeypatch):
    """cpufix2 takes m = sum(x) - n * shift (float64) rather than the fp32 sum of the centred rows y = fl(x - s)
    that S is formed from. Adversarial rows (offsets 1e3-1e6, rows far from the shift that round in fl(x - s),
    log-normal column scales, bf16 rows): the covariance is as close to float64 as the two-pass path's (both at
    fp32 rounding of S), entrywise relative to sqrt(C_ii C_jj)."""
    import numpy as np

    from spectral_lens import _chunk_sums

    g = np.random.default_rng(7)
    n, d = 1537, 96
    if case == "offset":
        x = 1e6 * (1 + g.random(d)) + g.standard_normal((n, d)) * np.logspace(3, 0, d)  # spreads the fp32 rows resolve
    elif case == "heavy_rounding":
        x = g.standard_normal((n, d))
        x[::7] += 1e6
    elif case == "mixed_scales":
        x = 1e3 * np.exp(3 * g.standard_normal((n, d)))
    else:
        x = 1e4 + 10 * g.standard_normal((n, d))
    rows = torch.from_numpy(x).to(torch.bfloat16 if case == "bf16" else torch.float32)
    x64 = rows.double().numpy()
    ref = np.cov(x64, rowvar=False)
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    for precision in ("exact", "fast"):
        assert rows.numel() <= _chunk_sums._ONE_SUM_MAX
        one_sum = np.abs(_cov(rows, precision) - ref) / scale
        monkeypatch.setattr(_chunk_sums, "_ONE_SUM_MAX", -1)  # the two-pass path, as before cpufix2
        two_pass = np.abs(_cov(rows, precision) - ref) / scale
        monkeypatch.undo()
        assert one_sum.max() <= 2 * two_pass.max() + 1e-6, (case, precision, one_sum.max(), two_pass.max())
        assert one_sum.max() < 1e-4, (case, precision, one_sum.max())
