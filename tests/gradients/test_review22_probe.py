"""Review 22: the probe's fixed per-update cost on the CPU (issue 13) without weakening its isolation.

NumPy's global generator may be another bit generator than MT19937 (``np.random.set_bit_generator``): the
isolation takes and restores its state without a warning, and a draw inside the pass is undone. A cached
Gaussian of the legacy generator (consumed by one ``randn`` inside the pass without touching the MT19937 key)
comes back. The FSDP refusal reads the update's module list: no walk over the model per update, and a model
sharded in place after binding is still refused.
"""

from __future__ import annotations

import importlib
import random
import sys
import warnings
from typing import Callable

import numpy as np
import pytest
import torch
from support.models import TinyGPT
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe

from .test_probe_walks import _count_walks

W = "transformer.h.1.attn.c_proj.weight"


class _NumpyNoise(nn.Module):
    """TinyGPT whose forward adds noise drawn from NumPy's global generator (a data-augmentation style layer)."""

    def __init__(self, gauss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gpt = TinyGPT(d=16, layers=2, ctx=8)
        self.gauss = gauss

    def forward(self, idx):
        out = self.gpt(idx)
        draw = np.random.randn() if self.gauss else np.random.random()
        return out + 1e-3 * float(draw)


def _batch(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 37, (b, 8), generator=g), torch.randint(0, 37, (b, 8), generator=g)


def _np_state():
    st = np.random.get_state(legacy=False)
    inner = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st["state"].items()}
    return st["bit_generator"], inner, st.get("has_gauss"), st.get("gauss"), st.get("has_uint32"), st.get("uinteger")


@pytest.mark.parametrize("bg", ["MT19937", "PCG64", "Philox"])
def test_another_global_bit_generator_is_forked_without_a_warning(global_bit_generator, bg):
    """With ``np.random.set_bit_generator(PCG64())`` the old isolation's ``np.random.get_state()`` (legacy tuple)
    warned ("get_state and legacy can only be used with the MT19937 BitGenerator") at every update: an error
    under ``-W error``. Now no warning, and the pass's own draw from that generator is undone."""
    np.random.set_bit_generator(getattr(np.random, bg)(7))
    model = _NumpyNoise()
    probe = PerSampleGradientProbe(model, "gpt." + W)
    before = _np_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.update(_batch())
    assert _np_state() == before
    assert type(np.random.get_bit_generator()).__name__ == bg


def test_a_cached_gaussian_consumed_inside_the_pass_comes_back(global_bit_generator):
    """One ``np.random.randn()`` inside the pass with a cached Gaussian takes the cache and leaves the MT19937
    key and position as they were: the isolation must restore ``has_gauss`` / ``gauss`` too (a fingerprint of
    the key and position alone would miss it). The user's next Gaussian is the one it would have drawn."""
    np.random.seed(3)
    np.random.randn()  # draws a pair: one returned, one cached
    assert np.random.get_state()[3] == 1
    before = _np_state()
    expected = np.random.get_state()
    np.random.randn()  # what the user's next draw is without a measurement
    want = np.random.randn()
    np.random.set_state(expected)
    probe = PerSampleGradientProbe(_NumpyNoise(gauss=True), "gpt." + W)
    probe.update(_batch())
    assert _np_state() == before
    np.random.randn()
    assert np.random.randn() == want


def test_the_fsdp_refusal_walks_nothing_once_fsdp_is_imported(monkeypatch):
    """Once ``torch.distributed.fsdp`` is imported (by any training script that can shard), the old per-update
    FSDP check walked the model through ``named_modules`` (~30 us an update on this model); now it reads the
    update's module list. Not a timing: the walks are counted."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    importlib.import_module("torch.distributed.fsdp")
    assert "torch.distributed.fsdp" in sys.modules
    model = TinyGPT(d=16, layers=2, ctx=8)
    probe = PerSampleGradientProbe(model, W)
    probe.update(_batch(1))
    walks = _count_walks(monkeypatch, model)
    probe.update(_batch(2))
    assert walks == [], f"{len(walks)} named_modules walks in one update"


def test_an_fsdp_module_added_after_binding_is_still_refused(monkeypatch):
    """The module-list check still finds a module sharded after the probe was bound (here an instance made an
    ``FSDPModule`` by its class, as ``fully_shard`` does in place) and refuses the vmap engine before any pass."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from spectral_lens.gradients import _measurable

    importlib.import_module("torch.distributed.fsdp")
    classes = _measurable._fsdp_classes()
    model = TinyGPT(d=16, layers=2, ctx=8)
    probe = PerSampleGradientProbe(model, W, engine="vmap")
    probe.update(_batch(1))
    block = model.transformer.h[0]
    block.__class__ = type("FSDPBlock", (classes[0], type(block)), {})  # what fully_shard does to the module
    rng = torch.get_rng_state(), random.getstate()
    with pytest.raises(ValueError, match="sharded with FSDP"):
        probe.update(_batch(2))
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert probe.n_samples_ == 3


def _llama_in_train_mode():
    pytest.importorskip("transformers")
    from support.models import tiny_hf_llama

    model = tiny_hf_llama(37).train()
    model.model.layers[0].mlp.train(False)  # frozen by hand: not what model.train() gives
    return model


def _calls_of(code) -> tuple[list, Callable]:
    """A profile function counting the calls of ``code`` (a spy that leaves the method's identity alone)."""
    calls = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code is code:
            calls.append(frame.f_locals.get("mode"))
    return calls, prof


def test_a_hugging_face_model_without_use_kernels_gets_its_flags_set_directly():
    """Every transformers-5 model inherits ``PreTrainedModel.train``, which is ``nn.Module.train`` unless
    ``use_kernels`` is set: the old isolation took it for an override and called ``model.train`` twice per
    switching update (~0.2 ms of this two-layer Llama's ~0.5 ms isolation). Now its flags are set directly,
    the override is not called, and the rows, losses and every flag are those of the old path (bit for bit)."""
    from transformers import PreTrainedModel

    from spectral_lens.gradients import _isolation

    model = _llama_in_train_mode()
    before = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (3, 9), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    name = "model.layers.1.self_attn.o_proj.weight"
    calls, prof = _calls_of(PreTrainedModel.train.__code__)
    probe = PerSampleGradientProbe(model, name, keep_matrix=True)
    was = sys.getprofile()
    sys.setprofile(prof)
    try:
        probe.update(batch)
    finally:
        sys.setprofile(was)
    assert calls == [], f"PreTrainedModel.train called with modes {calls}"
    assert [m.training for m in model.modules()] == before
    ref = PerSampleGradientProbe(model, name, keep_matrix=True)
    saved = _isolation._hf_train
    _isolation._hf_train = lambda: None  # the old path: model.train(False), then model.train(True) and the flags
    try:
        sys.setprofile(prof)
        try:
            ref.update(batch)
        finally:
            sys.setprofile(was)
    finally:
        _isolation._hf_train = saved
    assert calls == [False, False, True, True]  # the model's and its inner LlamaModel's, on entry and exit
    assert [m.training for m in model.modules()] == before
    assert torch.equal(probe.matrix(), ref.matrix()) and torch.equal(probe.losses_, ref.losses_)


def test_a_hugging_face_model_with_use_kernels_still_gets_model_train(monkeypatch):
    """With ``use_kernels`` set the override re-kernelizes on a change of mode: it is still called on entry
    (for the measured mode) and on exit (for the model's own), and the flags come back."""
    model = _llama_in_train_mode()
    before = [m.training for m in model.modules()]
    kernelized = []
    model._use_kernels = True  # what set_use_kernels(True) leaves (the kernels package is not needed here)
    monkeypatch.setattr(model, "set_use_kernels", lambda on: kernelized.append(model.training), raising=False)
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    PerSampleGradientProbe(model, "model.layers.1.self_attn.o_proj.weight").update({"input_ids": ids, "labels": ids})
    assert kernelized == [False, True]
    assert [m.training for m in model.modules()] == before


def test_another_train_method_under_the_same_name_is_an_override(monkeypatch):
    """``_hf_train`` takes ``PreTrainedModel.train`` only where it uses the names of the method it was read
    from; a release whose method does more is an override again (``set_training`` calls ``model.train``)."""
    from spectral_lens.gradients import _isolation

    model = _llama_in_train_mode()
    mods = _isolation.module_list(model)
    assert _isolation.set_training(model, mods, False) is False
    model.train()
    monkeypatch.setattr(_isolation, "_HF_TRAIN", {})
    monkeypatch.setattr(_isolation, "_HF_TRAIN_NAMES", _isolation._HF_TRAIN_NAMES - {"set_use_kernels"})
    assert _isolation.set_training(model, mods, False) is True
    assert not any(m.training for m in model.modules())


def _batches_of_every_form():
    import collections

    x, y = torch.arange(6).view(3, 2), torch.arange(3)
    pair = collections.namedtuple("Pair", "x y")
    return [x, (x, y), [x, y], {"input_ids": x, "labels": y}, collections.UserDict({"input_ids": x, "labels": y}),
            (x, (y, y)), pair(x, y), (x, 3, None, "s"), {"a": x, "b": [y]}, (x, nn.Parameter(y.float())),
            collections.OrderedDict(a=x, b=y), (x, torch.tensor(1.5))]


@pytest.mark.parametrize("i", range(12))
def test_map_tensors_slice_and_size_are_the_pytree_ones_on_every_batch_form(i):
    """The direct path for a plain tensor / ``tuple`` / ``list`` / ``dict`` of plain tensors gives what
    ``torch.utils._pytree`` gives (same container type, keys and order, same leaves), and every other form
    (nested, a named tuple, other leaves, a parameter, an ``OrderedDict``, a mapping) still goes through it."""
    from torch.utils import _pytree as pytree

    from spectral_lens.gradients._batch import batch_size, map_tensors, plain_batch, slice_batch

    batch = _batches_of_every_form()[i]
    ref = pytree.tree_map(lambda t: t * 2 if isinstance(t, torch.Tensor) else t, plain_batch(batch))
    got = map_tensors(lambda t: t * 2, batch)
    assert pytree.tree_structure(got) == pytree.tree_structure(ref) and type(got) is type(ref)
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref)):
        assert type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
    sizes = {t.shape[0] for t in pytree.tree_leaves(plain_batch(batch)) if isinstance(t, torch.Tensor) and t.ndim}
    assert batch_size(batch) == sizes.pop()
    part = slice_batch(batch, 1, 3)
    want = pytree.tree_map(lambda t: t[1:3] if isinstance(t, torch.Tensor) and t.ndim else t, plain_batch(batch))
    assert pytree.tree_structure(part) == pytree.tree_structure(want)
    for a, b in zip(pytree.tree_leaves(part), pytree.tree_leaves(want)):
        assert (torch.equal(a, b) and a.data_ptr() == b.data_ptr()) if isinstance(a, torch.Tensor) else a == b
