"""The probe's per-update cache of autocast weight casts: same bits, one cast per weight, no trace left."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from spectral_lens.gradients import PerSampleGradientProbe, cast_cache
from spectral_lens.gradients.cast_cache import CastCache, cached_linear_casts, cast_of
from support.models import TinyGPT, lm_batch

NAME = "transformer.h.1.attn.c_proj.weight"


class ParamCasts(TorchDispatchMode):
    """Counts ``aten._to_copy`` calls whose input is one of ``params`` (by storage)."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cache_switch(monkeypatch):
    def set_to(on: bool) -> None:
        monkeypatch.setattr(cast_cache, "ENABLED", on)

    return set_to


def linear_tensors(model) -> list[torch.Tensor]:
    """The distinct weights and biases of the model's nn.Linear modules."""
    out = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for t in (m.weight, m.bias):
                if t is not None:
                    out[id(t)] = t
    return list(out.values())


def no_instance_forward(model) -> bool:
    return not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
@pytest.mark.parametrize("cap", [None, 3])
def test_bit_identical_with_and_without_cache(cache_switch, tie, head_loss, cap):
    torch.manual_seed(0)
    model = TinyGPT(tie=tie)
    batch = lm_batch(m=8)
    out = {}
    for on in (True, False):
        cache_switch(on)
        probe = PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16, head_loss=head_loss,
                                       max_resident_samples=cap)
        probe.update(batch)
        out[on] = (probe.gram(), probe.losses_)
        assert probe.head_loss_.startswith(head_loss)
    assert torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])
    assert no_instance_forward(model)


@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
def test_each_linear_weight_is_cast_once_per_update(cache_switch, head_loss):
    torch.manual_seed(0)
    model = TinyGPT()
    tensors = linear_tensors(model)  # 2 blocks x 4 Linear x (weight, bias) + the head's weight = 17
    assert len(tensors) == 17
    chunks = 4
    counts = {}
    for on in (True, False):
        cache_switch(on)
        probe = PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16, head_loss=head_loss)
        probe.update(lm_batch(m=2))  # the first update decides the head (a check forward of its own)
        with ParamCasts(model.parameters()) as c:
            probe.update(lm_batch(m=2 * chunks, seed=1))
        counts[on] = c.n
    assert counts[False] == chunks * len(tensors)
    assert counts[True] == len(tensors)


def test_one_chunk_update_keeps_no_copies(cache_switch, monkeypatch):
    made = []
    monkeypatch.setattr(cast_cache, "CastCache", lambda *a: made.append(1) or CastCache(*a))
    model = TinyGPT()
    PerSampleGradientProbe(model, NAME, chunk_size=4, autocast_dtype=torch.bfloat16).update(lm_batch(m=4))
    assert made == []
    PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16).update(lm_batch(m=4))
    assert made == [1]


def test_no_instance_forward_left_after_an_exception():
    model = TinyGPT()
    calls = []

    def loss_fn(out, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(out.float().transpose(1, 2), batch[1], reduction="none").mean(1)

    probe = PerSampleGradientProbe(model, NAME, loss_fn=loss_fn, chunk_size=2, autocast_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"):
        probe.update(lm_batch(m=6))
    assert no_instance_forward(model)


def test_user_hooks_still_run_and_see_the_same_output(cache_switch):
    torch.manual_seed(0)
    model = TinyGPT()
    seen = {True: [], False: []}
    state = {"on": True}
    handle = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, a, o: seen[state["on"]].append(o.clone()))
    for on in (True, False):
        cache_switch(on)
        state["on"] = on
        PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16).update(lm_batch(m=6))
    handle.remove()
    assert len(seen[True]) == len(seen[False]) == 3
    assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False]))


def test_cache_recasts_a_changed_tensor():
    cache = CastCache()
    w = torch.randn(5, 3)
    first = cache.cast(w, torch.bfloat16)
    assert cache.cast(w, torch.bfloat16) is first  # kept
    w.add_(1.0)  # an in-place update bumps the version counter
    again = cache.cast(w, torch.bfloat16)
    assert again is not first and torch.equal(again, w.to(torch.bfloat16))
    other = torch.randn(5, 3)
    assert torch.equal(cache.cast(other, torch.bfloat16), other.to(torch.bfloat16))
    assert len(cache) == 2


def test_plain_path_without_autocast_or_with_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    cache = CastCache()
    with cached_linear_casts(model, cache):
        ref = model(x)  # no autocast: nothing to cast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)  # weights require grad: autocast's own cache, gradients flow
            out.float().sum().backward()
    assert len(cache) == 0
    assert torch.equal(ref, nn.Sequential(*model)(x))
    assert model[0].weight.grad is not None
    assert no_instance_forward(model)
    # cast_of outside a pass, or of a tensor that requires grad, is a plain cast
    w = model[0].weight
    assert cast_of(w, torch.bfloat16).requires_grad


def test_compiled_model_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 3))
    model.compile()  # lazy: nothing compiles until the first call
    cache = CastCache()
    with cached_linear_casts(model, cache):
        assert no_instance_forward(model)


def test_wrapped_forward_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 3))
    wrapper = lambda x: x * 2  # noqa: E731  (as accelerate's hooks replace module.forward)
    model[0].forward = wrapper
    with cached_linear_casts(model, CastCache()):
        assert model[0].forward is wrapper
    assert model[0].forward is wrapper


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_loss", ["materialized", "auto"])
def test_bit_identical_on_cuda(cache_switch, head_loss):
    torch.manual_seed(0)
    model = TinyGPT(vocab=301, d=64, heads=4).cuda()
    batch = tuple(t.cuda() for t in lm_batch(m=8, vocab=301))
    grams = {}
    for on in (True, False):
        cache_switch(on)
        probe = PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16, head_loss=head_loss)
        with ParamCasts(model.parameters()) as c:
            grams[on] = probe.update(batch).gram()
        grams[on, "casts"] = c.n
    assert torch.equal(grams[True], grams[False])
    assert grams[True, "casts"] < grams[False, "casts"]
    assert no_instance_forward(model)


def test_linear_recasts_after_the_weight_changes_or_is_replaced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).requires_grad_(False)
    x = torch.randn(5, 4)
    lin = model[0]

    def plain():
        return torch.nn.functional.linear(x, lin.weight, lin.bias)

    cache = CastCache(model)
    with cached_linear_casts(model, cache), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), plain())
        lin.weight.mul_(3.0)  # in place: the version counter moves
        assert torch.equal(model(x), plain())
        for _ in range(3):
            lin.bias = nn.Parameter(torch.randn(3), requires_grad=False)  # replaced
            assert torch.equal(model(x), plain())
        lin.weight.data = torch.randn(3, 4)  # new storage, same object and version
        assert torch.equal(model(x), plain())
        assert len(cache) == 1  # one entry per module, replaced: stale casts are not held
        lin.weight.requires_grad_(True)  # now autocast's own path
        assert torch.equal(model(x), plain())


def test_hf_gpt2_conv1d_casts_kept_bit_identical(cache_switch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(1))
    got = {}
    for on in (True, False):
        cache_switch(on)
        probe = PerSampleGradientProbe(model, chunk_size=2, autocast_dtype=torch.bfloat16, head_loss="materialized")
        with ParamCasts(model.parameters()) as c:
            probe.update({"input_ids": ids, "labels": ids})
        got[on] = (probe.gram(), c.n)
    assert torch.equal(got[True][0], got[False][0])
    # 2 blocks x 4 Conv1D x (weight, bias) + the tied head's weight, once per update / once per chunk
    assert (got[True][1], got[False][1]) == (17, 3 * 17)
    assert no_instance_forward(model)


def test_a_conv1d_with_other_source_is_left_alone():
    from spectral_lens.gradients.cast_cache import _cast_keeping_modules

    class Conv1D(nn.Module):  # named like transformers' one, another forward
        def __init__(self) -> None:
            super().__init__()
            self.nf, self.weight, self.bias = 3, nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight * 2)

    Conv1D.__module__, Conv1D.__qualname__ = "transformers.pytorch_utils", "Conv1D"
    model = nn.Sequential(Conv1D(), nn.Linear(3, 2))
    assert [type(m) for m, _ in _cast_keeping_modules(model)] == [nn.Linear]


def test_parametrized_weights_take_the_plain_path(cache_switch):
    """A parametrized weight is computed at each call (no entry in ``_parameters``): not kept."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    model = TinyGPT()
    parametrize.register_parametrization(model.transformer.h[0].mlp.c_fc, "weight", Doubled())
    out = {}
    for on in (True, False):
        cache_switch(on)
        probe = PerSampleGradientProbe(model, NAME, chunk_size=2, autocast_dtype=torch.bfloat16)
        out[on] = probe.update(lm_batch(m=6)).gram()
    assert torch.equal(out[True], out[False])
    assert no_instance_forward(model)
