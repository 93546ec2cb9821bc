"""Session 28: the shift's row sample no longer aliases with the sequence length.

The bug: review 27's sample took every ``p``-th row of a chunk (``p`` the largest odd prime <= n // 1024),
so a sequence length ``L`` that is a multiple of ``p`` put every sampled row at the same ``L / p``
positions of its sequence; at ``L = p`` the sample was all first tokens (3,072-16,383-row chunks:
``p`` = 3-13; 32,768 rows: 31). Models give that token activations 1e2-1e3 times the others' spread in a
few dimensions, so the shift landed far from the chunk's mean and low-precision products lost the
spectrum. The sample is now 16 runs of 64 consecutive rows (:func:`spectral_lens._chunk_sums._sample_spacing`).

References are float64 covariances (``np.cov`` of the rows converted exactly to float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectral_lens._chunk_sums as chunk_sums
from spectral_lens import ActivationCovarianceAccumulator
from spectral_lens.spectra.fast_moments import fast_chunk_moments
from spectral_lens.spectra.moments import covariance_from_moments

EPS32 = float(np.finfo(np.float32).eps)


def _first_tokens(n: int, length: int, start: int = 0) -> torch.Tensor:
    """(n, 1) float32 rows of sequences of ``length`` tokens from token ``start`` of one: 1 at each
    sequence's first position, else 0 (a sample's mean is its share of first tokens)."""
    return ((torch.arange(start, start + n) % length) == 0).float()[:, None]


# (chunk rows, sequence length): L = the review-27 prime stride p (the sample was all first tokens), a
# multiple of it (L = 100 at p = 5: 5% first tokens instead of 1%), and two L it did not divide
ALIASED = [(3072, 3), (5120, 5), (5120, 100), (7168, 7), (7168, 14), (12288, 11), (16384, 13), (32768, 31),
           (32768, 1024), (7000, 1000)]


@pytest.mark.parametrize("n, length", ALIASED)
def test_shift_sample_holds_first_tokens_at_their_share_on_every_path(n, length):
    """The first-token share of the shift's sample, on every path that samples (the generic path with
    and without a mask, the CPU one-chunk path and its masked compaction, a masked multi-chunk call), is
    within 4/1024 of the chunk's share, about 1/L (8/1024 for partly masked rows, whose valid counts move
    the sample at random), for chunks that start at a sequence's first token or mid-sequence. Measured:
    at most 2.9/1024 (4.7/1024 masked). Before: up to 991/1024 (at L = p every sampled row was a first
    token), 42/1024 at L = 100, p = 5."""
    for start in (0, length // 2 + 1):
        x = _first_tokens(n, length, start)
        truth = float(x.mean())
        g = torch.Generator().manual_seed(n + length)
        some = torch.rand(n, generator=g) > 0.05  # a padding mask that drops 5% of the rows
        every = torch.ones(n, dtype=torch.bool)
        got = {"generic": float(chunk_sums._sample_mean(x, None)),
               "generic, all valid": float(chunk_sums._sample_mean(x, every)),
               "generic, masked": float(chunk_sums._sample_mean(x, some))}
        for name, mask in (("cpu", None), ("cpu, masked", some)):
            acc = ActivationCovarianceAccumulator()
            acc.update(x, mask)
            got[name] = float(acc._shift[0])
        acc = ActivationCovarianceAccumulator(max_chunk_rows=n)  # two chunks: the first one's shift
        acc.update(torch.cat([x, x]), torch.cat([some, some]))
        got["multi-chunk, masked"] = float(acc._shift[0])
        bad = {k: v for k, v in got.items() if abs(v - truth) > (8 if "masked" in k else 4) / 1024}
        assert not bad, (n, length, start, truth, bad)


def test_no_sequence_length_aliases_with_the_sample():
    """Over every sequence length L = 1..2048 and every offset of the chunk in the sequence, no position
    of a sequence takes more than 16/1024 of the sample beyond its share (nor that much less), for
    chunks of 3,072-131,072 rows (measured worst: 15.4/1024; the prime stride: up to 1016/1024, every
    sampled row at L = p). Pure index arithmetic: which rows :func:`_sample_index` holds."""
    lengths = np.arange(1, 2049)
    worst = 0.0
    for n in (3072, 4096, 5000, 5120, 6144, 7168, 8192, 10240, 12288, 16384, 32768, 72928, 131072):
        index = chunk_sums._sample_index(n)
        assert index.size == 1024 and index[-1] < n and (np.diff(index) > 0).all(), n
        for length in lengths:
            counts = np.bincount(index % length, minlength=length)  # position (r + offset) % L: a rotation
            share = 1.0 / length
            worst = max(worst, counts.max() / 1024 - share, share - counts.min() / 1024)
    assert worst <= 16 / 1024, worst * 1024


@pytest.mark.parametrize("n", [1, 1023, 3071, 3072, 5120, 16384, 32768 - 7, 131072])
def test_every_path_takes_the_same_sample_rows(n):
    """The sample view (:func:`_sample_view`, what the unmasked paths average), the generic path with
    every row valid, and the CPU compaction's membership test hold the rows :func:`_sample_index` names:
    every row below 3,072 rows, else 16 runs of 64 from row 0 to the chunk's end."""
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    index = chunk_sums._sample_index(n)
    expected = x[torch.from_numpy(index)].mean(0)
    torch.testing.assert_close(chunk_sums._sample_mean(x, None, wide=True), expected, rtol=1e-12, atol=0)
    every = torch.ones(n, dtype=torch.bool)
    torch.testing.assert_close(chunk_sums._sample_mean(x, every, wide=True), expected, rtol=1e-12, atol=0)
    assert np.array_equal(np.flatnonzero(chunk_sums._in_sample(np.arange(n), n)), index)
    if n >= 3072:
        # (review 28, revchunk: spacing 64 q - 1, q odd, the largest at most (n - 64) // 15)
        s = chunk_sums._sample_spacing(n)
        o = chunk_sums._sample_offset(n, s)  # the runs centred: as many rows unsampled at either end, +-1
        assert index.size == 1024 and index[0] == o and index[-1] == o + 15 * s + 63 and abs(n - 1 - index[-1] - o) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_massive_first_tokens_at_a_multiple_of_the_prime_stride_keep_their_accuracy(seed):
    """16,384 rows of sequences of 130 tokens (10 x the review-27 stride's p = 13), d = 16, a power-law bulk
    of mean 3, the first token 1e3 spreads out in two dimensions. Against the float64 covariance of the
    same float32 rows: the CUDA fast mode's arithmetic (bf16 centred rows, fp32 products;
    ``fast_chunk_moments`` on the CPU) around the generic path's shift keeps eigenvalues 1-10 within 2%,
    and the CPU accumulator's float32 products stay within 4 eps32 of ||C||. Measured (seeds 0-2): the
    shift 0.06-0.09 spreads from the chunk's mean, eigenvalues 1-10 off by 0.2-1.1% (the exact mean as
    the shift: 0.15-0.5%); before, the shift was 93 spreads away (10% first tokens instead of 0.8%) and
    eigenvalues 1-10 were off by 7.5-8.3%."""
    n, length, d = 16384, 130, 16
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -1.2
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * lam.sqrt()) @ basis.T + 3.0
    x[::length, :2] += 1e3
    x = x.float()
    ref = np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False))[::-1]
    shift = chunk_sums._sample_mean(x, None).double()
    # review 28 (revchunk): the shift within 2.5 spreads of the chunk's mean in the first tokens' dimensions
    # (measured 1.9 with the 64 q - 1 spacing, 0.06-0.09 with (n - 64) // 15; the prime stride: 93). The bf16
    # eigenvalues 1-10 are not the test: their error is periodic in the shift, period 4 (bf16's spacing near
    # 1e3): the exact mean + delta gives 0.2% at delta = 0 or +-4 and 5.5-8.4% at delta = +-2 (seeds 0-2), as
    # much as the prime stride's 7.5-8.3%; what the first tokens' bf16 rounding costs depends on where the
    # shift puts them on that grid, not on how close it is. Reported, not asserted.
    mean = x.double().mean(0)
    assert float((shift - mean)[:2].abs().max()) <= 2.5
    m, s = fast_chunk_moments(x, shift, use_triton=False)
    fast = np.linalg.eigvalsh(covariance_from_moments(torch.tensor(n), m.double(), s.double()).numpy())[::-1]
    assert (np.abs(fast[:10] - ref[:10]) / ref[:10]).max() <= 0.1  # every grid phase: at most 8.4%
    acc = ActivationCovarianceAccumulator(precision="exact")
    acc.update(x)
    assert np.abs(acc.compute().values.numpy() - ref).max() <= 4 * EPS32 * ref[0]
