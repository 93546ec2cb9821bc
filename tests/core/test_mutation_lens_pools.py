"""Mutation audit of the lens's pool checks and schedule arithmetic at their boundaries: the exact cap
at which a shuffled pool stops being fixed, a ``drop_last`` that drops nothing, the step a fraction
names when ``f * total_steps`` falls between steps, and the argument checks of the schedules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spectral_lens import Schedule, SpectralLens
from spectral_lens.lens import unfixed_pool

from support.models import TinyLM, lm_pool


def _data(n=12):
    seq = torch.randint(0, 64, (n, 5), generator=torch.Generator().manual_seed(0))
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def test_a_shuffled_pool_is_fixed_exactly_when_every_sample_is_measured():
    loader = DataLoader(_data(12), batch_size=3, shuffle=True)
    assert unfixed_pool(loader, cap=None) is None
    assert unfixed_pool(loader, cap=12) is None  # the whole pool: the order does not matter
    assert unfixed_pool(loader, cap=100) is None
    assert "first 11 of its 12" in unfixed_pool(loader, cap=11)
    assert unfixed_pool(DataLoader(_data(12), batch_size=3), cap=5) is None  # not shuffled: always the first 5


def test_shuffled_drop_last_is_fixed_when_it_drops_nothing():
    assert unfixed_pool(DataLoader(_data(12), batch_size=4, shuffle=True, drop_last=True)) is None
    why = unfixed_pool(DataLoader(_data(12), batch_size=5, shuffle=True, drop_last=True))
    assert "drops a different 2 of its 12" in why


def test_fractions_between_steps_round_up():
    assert Schedule.at_fractions(10, [0.25]).steps == {3}  # 2.5 -> 3 (ceil, not round-half-even's 2)
    assert Schedule.at_fractions(10, [0.21, 0.3, 0.0]).steps == {3, 0}
    assert Schedule.at_fractions(7, [0.5]).steps == {4}  # 3.5 -> 4


def test_schedule_arguments_are_checked():
    assert [k for k in range(4) if k in Schedule.every(1)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        Schedule.every(0)
    with pytest.raises(ValueError, match="need total_steps >= first >= 1"):
        Schedule.log_spaced(5, 3, first=10)
    with pytest.raises(ValueError, match="need total_steps >= first >= 1"):
        Schedule.log_spaced(100, 3, first=0)
    assert Schedule.log_spaced(10, 3, first=10).steps == {10}
    assert Schedule.log_spaced(64, 1).steps == {64}
    with pytest.raises(ValueError, match="fraction -0.1 outside"):
        Schedule.at_fractions(10, [-0.1])
    early = Schedule.every(2, start=5)
    assert [k for k in range(-3, 10) if k in early] == [5, 7, 9]  # nothing before start, also at start - 2k


class _Endless:
    """A re-iterable gradient pool that never ends (a streaming loader): gradient_samples must stop it."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        while True:
            if self.drawn > 10:
                raise AssertionError("the lens kept drawing batches past gradient_samples")
            self.drawn += 1
            yield self.batches[(self.drawn - 1) % len(self.batches)]


@pytest.mark.parametrize("cap", [5, 6, 7])
def test_gradient_samples_stops_drawing_batches_once_reached(cap):
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0).double()
    pool = lm_pool(n_batches=4, batch=3, t=6)
    grad = _Endless(pool)
    lens = SpectralLens(model, pool[:1], gradient_pool=grad, gradient_samples=cap, layers="h.0", progress=False)
    m = lens.measure(0, 0)
    assert m.spectra["grad:h.2.attn.c_proj.weight"].n_rows == cap
    assert grad.drawn == -(-cap // 3)  # it stops: no batch past the cap is drawn


def test_gradient_progress_total_of_a_drop_last_loader_counts_only_the_kept_samples():
    loader = DataLoader(_data(12), batch_size=5, drop_last=True)  # 2 batches: 10 samples
    lens = SpectralLens(pool=loader, params=(), progress=False)
    assert lens._gradient_total() == 10 == sum(x.shape[0] for x, _ in loader)
    lens = SpectralLens(pool=DataLoader(_data(12), batch_size=5), params=(), progress=False)
    assert lens._gradient_total() == 12
    lens = SpectralLens(pool=loader, params=(), gradient_samples=7, progress=False)
    assert lens._gradient_total() == 7
