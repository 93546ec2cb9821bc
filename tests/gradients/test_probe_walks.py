"""The probe's fixed per-update cost: one walk over the model per ``update`` (``_isolation.module_list``), its
module and parameter lists shared by the mode switch, the ``requires_grad`` flags, the buffer snapshot, the
backward-hook silencing and the CUDA device list (each walked the model itself: five walks per update).

The lists are read afresh at every update (nothing is cached across updates), so a module added or replaced, a
``requires_grad`` flag or a train/eval flag toggled, or a hook added by the user between updates is measured
exactly as a fresh probe measures it: the rows are bit-identical to a fresh probe's on the model as it is at each
update, every flag and RNG stream comes back, and no hook is called or left behind.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from support.models import TinyGPT
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe

W = "transformer.h.1.attn.c_proj.weight"
SW = "gpt." + W  # in _Slot


class _Slot(nn.Module):
    """TinyGPT with one more module, ``extra``, applied to the final hidden state (replaceable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(d=16, layers=2, ctx=8, dropout=0.1)
        self.extra = nn.Identity()

    def forward(self, idx):
        tr = self.gpt.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
        for block in tr.h:
            x = block(x)
        return self.gpt.lm_head(self.extra(tr.ln_f(x)))


def _batches(n: int, seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 37, (b, 8), generator=g), torch.randint(0, 37, (b, 8), generator=g)) for _ in range(n)]


def _state(model: nn.Module) -> tuple:
    """What measuring must leave as it found: modes, flags, hook dictionaries' contents, every RNG stream."""
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, list(m._forward_hooks), list(m._backward_hooks), list(m._backward_pre_hooks),
              sorted(k for k in vars(m) if k.startswith("_get_backward"))) for n, m in model.named_modules()],
            torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate())


def _same_state(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3]) and a[4:] == b[4:]


def _rows(model: nn.Module, batch, **kw) -> torch.Tensor:
    """The rows a fresh probe measures on ``model`` as it is now."""
    return PerSampleGradientProbe(model, SW, keep_matrix=True, **kw).update(batch).matrix()


def _replace_extra(m):
    m.extra = nn.Dropout(0.5)  # in train mode: measured in eval mode only if the probe's walk finds it


def _add_module(m):
    m.extra = nn.Sequential(nn.Identity(), nn.Dropout(0.5))


def _freeze(m):
    m.gpt.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    m.gpt.transformer.h[1].attn.c_proj.weight.requires_grad_(False)  # the probed one too


def _replace_param(m):
    lin = m.gpt.transformer.h[0].mlp.c_fc
    lin.weight = nn.Parameter(lin.weight.detach() * 1.5, requires_grad=False)


def _to_eval(m):
    m.eval()


def _eval_part(m):
    m.gpt.transformer.h[0].eval()


def _hooks(m):
    called = m.called = []
    attn = m.gpt.transformer.h[1].attn
    attn.register_full_backward_hook(lambda *a: called.append("backward"))
    attn.register_full_backward_pre_hook(lambda *a: called.append("backward_pre"))
    attn.c_proj.weight.register_hook(lambda g: called.append("tensor") or g * 0)
    m.extra.register_forward_hook(lambda mod, i, o: o * 2)  # part of the model: runs, and changes the rows


CHANGES = {"module replaced": _replace_extra, "module added": _add_module, "requires_grad toggled": _freeze,
           "parameter replaced": _replace_param, "train/eval toggled": _to_eval, "one block's mode": _eval_part,
           "hooks added": _hooks}


@pytest.mark.parametrize("kw", [{}, {"train_mode": True, "chunk_size": 2}], ids=["resident", "train_mode"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_updates_is_measured_as_a_fresh_probe_measures_it(change, kw):
    """A probe kept across updates measures each update's batch as a fresh probe does on the model as it is
    then (bit-identical rows), and leaves modes, flags, hooks and RNG streams as it found them, after a
    change made by the user between its updates (bounded memory: the next test)."""
    model = _Slot().train()  # a model mid-training: its modes differ from the probe's (eval) ones
    b1, b2 = _batches(2, seed=1)
    probe = PerSampleGradientProbe(model, SW, keep_matrix=True, **kw)
    torch.manual_seed(3)
    before = _state(model)
    probe.update(b1)
    assert _same_state(_state(model), before)
    reference_before = copy.deepcopy(model)
    CHANGES[change](model)
    after_change = copy.deepcopy(model)
    before = _state(model)
    probe.update(b2)
    assert _same_state(_state(model), before), change
    assert getattr(model, "called", []) == []  # the user's backward and tensor hooks are not the probe's
    torch.manual_seed(3)
    expected = torch.cat([_rows(reference_before, b1, **kw), _rows(after_change, b2, **kw)])
    assert torch.equal(probe.matrix(), expected), change


@pytest.mark.parametrize("change", [c for c in CHANGES if c != "parameter replaced"])
def test_bounded_mode_after_a_change_recomputes_as_a_fresh_probe(change):
    """Bounded memory (``max_resident_samples``): the probe kept across a change between updates that leaves
    the parameters' values alone (modes, flags, modules without parameters, hooks) gives the Gram matrix a
    probe of the changed model gives for both batches, bit for bit (its recomputation replays each chunk
    from its own RNG state), and restores everything it touched. (A replaced parameter is refused there:
    the recomputation would mix checkpoints.)"""
    model = _Slot().train()
    b1, b2 = _batches(2, seed=2)
    kw = {"max_resident_samples": 2, "chunk_size": 1, "train_mode": True}  # dropout on: replay must match
    probe = PerSampleGradientProbe(model, SW, **kw)
    torch.manual_seed(4)
    probe.update(b1)
    CHANGES[change](model)
    fresh_model = copy.deepcopy(model)
    state = _state(model)
    probe.update(b2)
    assert _same_state(_state(model), state)
    got = probe.gram()
    assert _same_state(_state(model), state)
    fresh = PerSampleGradientProbe(fresh_model, SW, **kw)
    torch.manual_seed(4)
    fresh.update(b1)
    fresh.update(b2)
    if change in ("module replaced", "module added", "hooks added"):
        # the first batch was measured on the old model (no extra dropout / forward hook), the fresh probe
        # measures it on the new one: only the second batch's block agrees
        assert torch.equal(got[3:, 3:], fresh.gram()[3:, 3:])
    else:
        assert torch.equal(got, fresh.gram()), change


def _count_walks(monkeypatch, model: nn.Module) -> list:
    """Calls of ``named_modules`` on ``model`` itself: every walk over the model goes through it
    (``modules()``, ``parameters()``, ``named_parameters()``, ``train()`` through ``children()`` does not)."""
    walks, real = [], nn.Module.named_modules

    def counting(self, *a, **k):
        if self is model:
            walks.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return walks


@pytest.mark.parametrize("kw", [{}, {"max_resident_samples": 3, "chunk_size": 2}], ids=["resident", "bounded"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_update_walks_the_model_at_most_once(monkeypatch, kw, mode):
    """One ``update`` of a kept probe walks the model's modules at most once through ``named_modules``
    (the old isolation walked it five times per update: modes, parameters, buffers, backward hooks, CUDA
    devices; bounded mode twice more for the parameter versions), for a model in eval mode and one in train
    mode (whose flags are switched and set back without ``nn.Module.train``'s walk). Not a timing."""
    model = TinyGPT(d=16, layers=2, ctx=8).train(mode == "train")
    probe = PerSampleGradientProbe(model, W, **kw)
    b1, b2 = _batches(2, seed=5)
    probe.update(b1)  # the first update decides the head loss, the engines: not a fixed cost
    walks = _count_walks(monkeypatch, model)
    probe.update(b2)
    assert len(walks) <= 1, f"{len(walks)} walks over the model in one update"
    assert [m.training for m in model.modules()] == [mode == "train"] * len(list(model.modules()))


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(2, 2), nn.LayerNorm(2)

    def train(self, mode: bool = True):
        super().train(mode)
        self.norm.training = False
        return self


class _Setattr(nn.Linear):
    def __setattr__(self, name, value):
        if name == "training":
            value = not value  # a perverse override: only model.train() sees it
        super().__setattr__(name, value)


@pytest.mark.parametrize("build", [
    lambda: TinyGPT(d=16, layers=2, ctx=8, tie=True),
    lambda: nn.Sequential(nn.Linear(2, 2), _Frozen(), nn.Sequential(_Frozen())),
    lambda: nn.Sequential(nn.Linear(2, 2), _Setattr(2, 2)),
    lambda: nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Dropout(), None])),
], ids=["tinygpt", "train override", "setattr override", "with a None child"])
@pytest.mark.parametrize("mode", [False, True])
def test_module_list_parameter_list_and_set_training_are_the_torch_ones(build, mode):
    """``module_list`` / ``parameter_list`` give ``list(model.modules())`` / ``list(model.parameters())`` (same
    objects, order, deduplication of shared modules and tied weights); ``set_training`` leaves every flag as
    ``model.train(mode)`` does, from any mix of flags, also where an override decides them."""
    from spectral_lens.gradients._isolation import module_list, parameter_list, set_training

    model = build()
    shared = nn.Linear(2, 2)
    model.add_module("again", nn.Sequential(shared, shared))
    mods = module_list(model)
    assert mods == list(model.modules()) and all(a is b for a, b in zip(mods, model.modules()))
    assert [id(p) for p in parameter_list(mods)] == [id(p) for p in model.parameters()]
    for start in (False, True):
        ref = copy.deepcopy(model)
        model.train(start)
        ref.train(start)
        list(model.modules())[1].train(not start)
        list(ref.modules())[1].train(not start)
        set_training(model, module_list(model), mode)
        ref.train(mode)
        assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]


def test_bounded_mode_takes_a_non_resident_chunks_rng_state_once(monkeypatch):
    """Bounded memory: a chunk that is not kept resident stores the RNG state its pass starts from (for the
    replay in ``compute``), and its pass reuses that state for its engines' rewinds instead of taking every
    stream's state again (numpy's and Python's cost ~0.1 ms a chunk on the CPU; the old code took it twice).
    The replay stays exact: the Gram matrix equals a resident probe's up to the float64 summation order, and
    a second bounded probe's bit for bit."""
    import spectral_lens.gradients.probe as probe_module

    taken, real = [], probe_module.rng_state
    monkeypatch.setattr(probe_module, "rng_state", lambda *a: taken.append(1) or real(*a))
    model = TinyGPT(d=16, layers=2, ctx=8, dropout=0.2)
    batches = _batches(3, seed=6, b=2)
    kw = {"max_resident_samples": 2, "chunk_size": 1, "train_mode": True}
    probe = PerSampleGradientProbe(model, W, **kw)
    torch.manual_seed(5)
    probe.update(batches[0])  # resident: its pass takes the state for its engines' rewinds, once per chunk
    assert len(taken) == 2
    taken.clear()
    probe.update(batches[1])  # two non-resident chunks
    assert len(taken) == 2, f"{len(taken)} RNG states taken for 2 non-resident chunks"
    probe.update(batches[2])
    got = probe.gram()
    again = PerSampleGradientProbe(model, W, **kw)
    torch.manual_seed(5)
    for b in batches:
        again.update(b)
    assert torch.equal(got, again.gram())
    resident = PerSampleGradientProbe(model, W, train_mode=True, chunk_size=1)
    torch.manual_seed(5)
    for b in batches:
        resident.update(b)
    torch.testing.assert_close(got, resident.gram(), rtol=1e-12, atol=1e-12)
