"""Parameter gradient hooks (``param.register_hook``) registered *while* the probe runs: by a forward hook or
a wrapper framework that registers one on every call. Before, the probe set ``_backward_hooks = None`` for
its whole measurement and put the saved dictionary back on exit: such a hook on a parameter that already
had one went into a new dictionary that the exit then overwrote (lost, its handle's ``remove()`` a no-op),
and in the loop engine every one of them fired in the pass's own backward and changed the rows. Now the
engines switch parameter hooks off around each ``torch.autograd.grad`` alone
(``_isolation.silenced_tensor_hooks``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectral_lens import PerSampleGradientProbe
from spectral_lens.gradients._isolation import silenced_tensor_hooks

W_O = "transformer.h.1.attn.c_proj.weight"


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("had_a_hook", [True, False])
def test_hooks_registered_by_a_forward_hook_are_kept_and_do_not_change_the_rows(gpt, helpers, engine, had_a_hook):
    model = gpt()
    x, y = helpers.lm_batch(m=5)
    ref = torch.from_numpy(helpers.reference_rows(copy.deepcopy(model), [W_O], (x, y), helpers.lm_sample_loss)[W_O])
    w = dict(model.named_parameters())[W_O]
    calls, handles = [], []
    own = w.register_hook(lambda g: calls.append("own")) if had_a_hook else None

    def registers_one(module, args, output):  # a wrapper that hooks the weight on every call
        handles.append(w.register_hook(lambda g: calls.append("added") or 3 * g))

    forward = model.transformer.h[1].attn.c_proj.register_forward_hook(registers_one)
    try:
        probe = PerSampleGradientProbe(model, W_O, engine=engine, keep_matrix=True, chunk_size=2)
        probe.update((x, y))
        assert calls == []  # before (loop engine): "added" 3 times per sample, rows 3x or 9x the loss's
        torch.testing.assert_close(probe.matrix().double(), ref, rtol=1e-10, atol=1e-14)
        forward.remove()
        # every hook registered during the measurement is in place: a training backward calls each once
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        assert calls.count("added") == len(handles) > 0  # before: 0 where the weight had a hook (lost)
        assert calls.count("own") == int(had_a_hook)
        # and their handles remove them (before: remove() did nothing, the dictionary was gone)
        for h in handles:
            h.remove()
        if own is not None:
            own.remove()
        calls.clear()
        w.grad = None
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        assert calls == []
    finally:
        forward.remove()


def test_a_hook_registered_inside_the_block_is_chained_in_order_and_removable():
    """A hook registered inside the block itself (a forward re-run in the backward, e.g. by non-reentrant
    checkpointing, can do it) goes into a new dictionary torch attaches; on exit it is chained after the
    user's own hooks, in registration order, and its handle still removes it."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.double)
    order = []
    first = lin.weight.register_hook(lambda g: order.append("first") or 2 * g)
    with silenced_tensor_hooks(lin.parameters()):
        assert lin.weight._backward_hooks is None
        second = lin.weight.register_hook(lambda g: order.append("second") or g + 1)
        third = lin.weight.register_hook(lambda g: order.append("third") or None)
    plain = torch.autograd.grad(lin(x).square().sum(), lin.weight)[0]  # hooks run: first, second, third
    assert order == ["first", "second", "third"]
    with torch.no_grad():
        expected = 2 * torch.func.grad(lambda w: F.linear(x, w, lin.bias).square().sum())(lin.weight.detach()) + 1
    torch.testing.assert_close(plain, expected)
    second.remove()
    order.clear()
    torch.autograd.grad(lin(x).square().sum(), lin.weight)
    assert order == ["first", "third"]
    first.remove()
    third.remove()
    order.clear()
    torch.autograd.grad(lin(x).square().sum(), lin.weight)
    assert order == []


def test_chains_whose_hooks_were_removed_do_not_pile_up():
    """A framework that registers a hook in every re-run and removes the previous one (so at most one is
    live) left one empty chained entry per measurement before: the user's dictionary grew without bound
    over a long run. Emptied chains are now dropped; live hooks still run, in order."""
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.double)
    calls = []
    own = lin.weight.register_hook(lambda g: calls.append("own"))
    live = None
    for _ in range(50):
        with silenced_tensor_hooks(lin.parameters()):
            if live is not None:
                live.remove()
            live = lin.weight.register_hook(lambda g: calls.append("live"))
    assert len(lin.weight._backward_hooks) == 2  # own, and the chain holding the live hook (before: 51)
    torch.autograd.grad(lin(x).sum(), lin.weight)
    assert calls == ["own", "live"]  # the live one was chained and runs once; the removed ones are gone
    live.remove()
    own.remove()
    calls.clear()
    torch.autograd.grad(lin(x).sum(), lin.weight)
    assert calls == []
