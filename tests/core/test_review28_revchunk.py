"""Session 28 review of the shift sample's runs (:func:`spectral_lens._chunk_sums._sample_spacing`).

The bug: the 16 runs of 64 rows were spaced ``(n - 64) // 15`` apart, so in the commonest chunk (``B``
sequences of ``L`` tokens, both powers of two) the runs' starts sat at nearly the same place of their
sequences: at 256 x 128 (32,768 rows) the spacing was 4 (mod 128), every run began in the first 64 tokens,
the sample held one first token in 1024 instead of 8 and the shift sat 6.8 (the bulk's spread) from the
chunk's mean in the first token's dimensions (the prime stride before it: 0.7). Over power-of-two batches and lengths the first-token
share was up to 7/1024 off (prime stride: 1/1024), and 12.9/1024 at 15 x 8192. The spacing is now an odd
multiple of 64 less one: the runs nearly tile every power-of-two sequence length (each position within
1.5/1024 of its share, the first token within 1/1024).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectral_lens._chunk_sums as chunk_sums
from spectral_lens import ActivationCovarianceAccumulator

POW2 = [(b, length) for b in (2 ** k for k in range(9)) for length in (2 ** k for k in range(6, 14))
        if b * length >= 3072]


def test_runs_sample_every_position_of_power_of_two_sequences_near_its_share():
    """Chunks of ``B`` sequences of ``L`` tokens, ``B`` = 1..256 and ``L`` = 64..8192 powers of two, and
    chunks of the same rows starting at any token (a rotation of the positions): every position of a
    sequence takes within 1.5/1024 of its share ``1/L`` of the sample, the first token of a chunk that
    starts at one within 1/1024 (measured: 1.5 and 0.97). Before: up to 7/1024 off (256 x 128: the
    first token sampled once instead of 8 times, positions 124-127 never)."""
    bad = []
    for b, length in POW2:
        counts = np.bincount(chunk_sums._sample_index(b * length) % length, minlength=length) / 1024
        worst = max(counts.max() - 1 / length, 1 / length - counts.min()) * 1024
        first = abs(counts[0] - 1 / length) * 1024
        if worst > 1.5 + 1e-9 or first > 1 + 1e-9:
            bad.append((b, length, worst, first))
    assert not bad, bad


def test_spacing_is_one_less_than_an_odd_multiple_of_64_and_spans_the_chunk():
    """The spacing rule itself: 0 below 3,072 rows; else ``64 q - 1`` (``q`` odd), the largest at most
    ``(n - 64) // 15``, so the runs leave under 15 * 128 rows unsampled, half at either end."""
    assert [chunk_sums._sample_spacing(n) for n in (1, 3071)] == [0, 0]
    for n in [3072, 3073, 3136, 4096, 5000, 7168, 32768, 72928, 122880, 131072, 10 ** 7, 3 * 10 ** 9]:
        s = chunk_sums._sample_spacing(n)
        assert (s + 1) % 128 == 64 and 0 <= (n - 64) // 15 - s < 128, (n, s)
        o = chunk_sums._sample_offset(n, s)  # centred: the sample's mean row is the chunk's (+-1/2)
        assert 15 * s + 64 <= n and n - (15 * s + 64) < 15 * 128 + 15 and abs(2 * o + 15 * s + 63 - (n - 1)) <= 1, (n, s)


@pytest.mark.parametrize("batch, length", [(256, 128), (256, 256), (15, 8192)])
def test_massive_first_tokens_leave_the_shift_at_the_chunk_mean(batch, length):
    """The shift of a chunk whose first tokens are 1e3 out in two dimensions (d = 16) is within 1.5 (of the
    bulk's unit spread) of the chunk's float64 mean in those dimensions on the generic and CPU paths: one
    first token more or less in the 1024-row sample moves it by 0.98 (measured: 0.03-0.97; before 6.8 at
    256 x 128, 2.9 at 256 x 256, 12.6 at 15 x 8192)."""
    n, d = batch * length, 16
    g = torch.Generator().manual_seed(length)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0
    x[::length, :2] += 1e3
    x = x.float()
    mean = x.double().mean(0)
    acc = ActivationCovarianceAccumulator()
    acc.update(x)
    for name, shift in (("generic", chunk_sums._sample_mean(x, None).double()),
                        ("cpu", torch.as_tensor(acc._shift, dtype=torch.float64))):
        assert float((shift - mean)[:2].abs().max()) <= 1.5, (name, batch, length, (shift - mean)[:2])


@pytest.mark.parametrize("n", [3072, 3073, 4095, 5000, 12288, 32768, 131071])
def test_sample_view_holds_exactly_the_16_runs(n):
    """``unfold`` makes a window at every multiple of the spacing that fits; with the spacing below
    ``(n - 64) // 15`` more than 16 fit, so the view is cut at the 16th run's end (else the CPU path's sum,
    divided by 1024, and the generic mean would read extra runs)."""
    x = torch.arange(n, dtype=torch.float64)[:, None].expand(n, 2)  # a non-contiguous (stride 0) view too
    view, count = chunk_sums._sample_view(x)
    assert count == 1024 and tuple(view.shape) == (16, 64, 2)
    assert np.array_equal(view[:, :, 0].reshape(-1).numpy(), chunk_sums._sample_index(n).astype(np.float64))


def _sample_checks(device: str) -> None:
    """The generic path's sample mean (unmasked, all valid, a transposed row view) is the mean of
    :func:`_sample_index`'s rows (float64 rows, summation order aside)."""
    for n in (3072, 5000, 32768 - 7):
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)).to(device).T
        expected = x.cpu()[torch.from_numpy(chunk_sums._sample_index(n))].mean(0)
        every = torch.ones(n, dtype=torch.bool, device=device)
        for rows, valid in ((x, None), (x.contiguous(), None), (x, every)):
            got = chunk_sums._sample_mean(rows, valid, wide=True).cpu()
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_sample_of_non_contiguous_rows():
    """Rows that are a transposed view (``unfold`` of a non-contiguous tensor is still a view)."""
    _sample_checks("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda():
    """On CUDA the unmasked sample is one strided mean over dims (0, 1) of the ``(16, 64, d)`` view; the
    masked one builds the same rows' index on the device."""
    _sample_checks("cuda")
