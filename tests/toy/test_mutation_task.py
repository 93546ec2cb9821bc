"""Mutation audit (task.py): the documented draws and split, checked against the promise, not the code.

Each test was written because a one-line mutant of ``CyclicTask.split`` passed tests/toy/test_task.py.
"""
import torch

from examples.toy.task import CyclicTask


def _latents(x: torch.Tensor, c: int, offsets):
    """Recover ``(o, d, a)`` from contexts: ``o`` is the block the tokens lie in, ``a = x_0 - o``,
    ``d = x_1 - x_0 (mod c)``."""
    o = torch.tensor([max(v for v in offsets if v <= int(t)) for t in x[:, 0]])
    return o, (x[:, 1] - x[:, 0]) % c, x[:, 0] - o


def test_draws_cover_every_step_phase_and_offset_uniformly():
    # "d uniformly from 1 .. max_step, a uniformly from Z_c, o uniformly from offsets": with 6,000
    # draws every value occurs, and no value is far from its expected count (killed: d drawn from
    # 1 .. max_step - 1; a from Z_{c-1}; o always offsets[0])
    c, max_step, offsets = 17, 5, (0, 20, 40)
    t = CyclicTask(c=c, context=16, vocab=64, max_step=max_step, offsets=offsets, n_examples=6000, heldout=1000)
    s = t.split()
    x = torch.cat([s.x_heldout, s.x_train])
    o, d, a = _latents(x, c, offsets)
    for values, support in ((d, range(1, max_step + 1)), (a, range(c)), (o, offsets)):
        counts = torch.tensor([int((values == v).sum()) for v in support], dtype=torch.float64)
        assert int(counts.sum()) == len(x)  # nothing outside the support
        expected = len(x) / len(support)
        assert bool((counts > 0.7 * expected).all()), (list(support), counts.tolist())


def test_heldout_is_the_first_draws_and_train_the_rest_without_overlap():
    # "the first `heldout` of the n_examples i.i.d. draws are the held-out split": the concatenation
    # [held-out; train] is the same sequence of draws whatever the split point (killed: train taken
    # from index heldout - 1, sharing one draw with the held-out split and dropping the last)
    kw = dict(c=17, context=16, vocab=64, max_step=4, n_examples=500, seed=7)
    a, b = CyclicTask(heldout=100, **kw).split(), CyclicTask(heldout=300, **kw).split()
    for s, h in ((a, 100), (b, 300)):
        assert len(s.x_heldout) == len(s.y_heldout) == len(s.phase_heldout) == h
        assert len(s.x_train) == len(s.y_train) == 500 - h
    assert torch.equal(torch.cat([a.x_heldout, a.x_train]), torch.cat([b.x_heldout, b.x_train]))
    assert torch.equal(torch.cat([a.y_heldout, a.y_train]), torch.cat([b.y_heldout, b.y_train]))
    # the phase is y - o of the held-out example itself
    o, _, _ = _latents(b.x_heldout, 17, (0,))
    assert torch.equal(b.phase_heldout, b.y_heldout - o)
