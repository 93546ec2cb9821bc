"""The cyclic task: the formula, the non-copyable target, the split, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.toy.task import CyclicTask, cyclic_sequences, is_prime


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


@settings(max_examples=30, deadline=None)
@given(c=st.sampled_from([67, 71, 97]), a=st.integers(0, 200), d=st.integers(1, 66), o=st.integers(0, 900))
def test_sequences_match_the_definition(c, a, d, o):
    row = cyclic_sequences(torch.tensor([a]), torch.tensor([d]), torch.tensor([o]), c, 65)[0].tolist()
    assert row == [o + (a + j * d) % c for j in range(65)]


def test_target_never_in_its_context_and_split_is_deterministic():
    task = CyclicTask(c=67, max_step=66, n_examples=3000, heldout=500, seed=3)
    s = task.split()
    assert s.x_train.shape == (2500, 64) and s.y_heldout.shape == (500,)
    x = torch.cat([s.x_train, s.x_heldout])
    y = torch.cat([s.y_train, s.y_heldout])
    assert not bool((x == y[:, None]).any())  # c prime > L: the answer has to be computed
    # the target continues the progression: y = x_{L-1} + d (mod c) with d = x_1 - x_0 (mod c)
    d = (x[:, 1] - x[:, 0]) % 67
    assert torch.equal((x[:, -1] + d) % 67, y % 67)
    assert torch.equal(s.phase_heldout, s.y_heldout % 67)
    again = task.split()
    assert all(torch.equal(a, b) for a, b in zip(s, again))
    assert not torch.equal(CyclicTask(c=67, max_step=66, n_examples=3000, heldout=500, seed=4).split().x_train, s.x_train)


def test_offsets_and_phase():
    s = CyclicTask(c=67, max_step=8, offsets=(0, 500), n_examples=400, heldout=100).split()
    assert set((s.y_heldout - s.phase_heldout).tolist()) <= {0, 500}
    assert int(s.phase_heldout.max()) < 67


@pytest.mark.parametrize("kw, msg", [
    (dict(c=31), "prime larger than context"),
    (dict(c=65), "prime larger than context"),
    (dict(max_step=0), "max_step"),
    (dict(offsets=(1000,)), "inside the vocabulary"),
    (dict(heldout=0), "heldout"),
])
def test_bad_task_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CyclicTask(**kw)
