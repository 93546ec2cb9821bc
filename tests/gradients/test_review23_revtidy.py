"""Review 23 (rev-tidy): an ``engine='fast'`` refusal under DeepSpeed ZeRO-3 names no engine that is refused.

Under ZeRO stage 3 (as under FSDP2 and for a weight offloaded by Accelerate) the fast engine alone can measure a
parameter: the vmap and loop engines are refused before any pass (``refuse_zero3_params``). Before: the refusal
of ``engine='fast'`` (at binding, or when the fast path turned out unusable in the first pass) suggested
``engine='auto' or 'vmap'``, and both were refused. ZeRO-3 is recognized by the ``ds_*`` attributes it sets on
every parameter it partitions (``spectral_lens/_deepspeed.py``); set here on gathered weights (a
``GatheredParameters`` state, also refused for vmap and loop).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import spectral_lens as sl


class _Net(nn.Module):
    """``emb`` (no fast path), ``o`` (an ``nn.Linear``, run by ``head`` functionally when ``functional``: its
    forward never runs, found in the first pass) and ``head``."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.emb, self.o, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)
        self.functional = functional

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.nn.functional.linear(h, self.o.weight, self.o.bias) if self.functional else self.o(h)
        return self.head(torch.tanh(h))


def _net(zero3: bool, functional: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _Net(functional).double()
    if zero3:
        for i, p in enumerate(model.parameters()):
            p.ds_id, p.ds_shape, p.ds_numel, p.ds_status = i, p.shape, p.numel(), "AVAILABLE"
    return model


KW = {"forward_fn": lambda m, b: m(b), "loss_fn": lambda out, b: out.pow(2).sum((1, 2))}
BATCH = torch.randint(0, 11, (3, 5))


def _suggested(message: str) -> list[str]:
    """The engines a refusal suggests: those named after its last '; use '."""
    _, use, tail = message.rpartition("; use ")
    return re.findall(r"'(auto|fast|vmap|loop)'", tail) if use else []


def _accepted(model, param: str, engine: str) -> bool:
    try:
        sl.PerSampleGradientProbe(model, params=param, engine=engine, **KW).update(BATCH)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("zero3", [True, False], ids=["zero3", "plain"])
def test_fast_refusal_at_binding_suggests_only_accepted_engines(zero3):
    model = _net(zero3)
    with pytest.raises(ValueError, match=r"engine='fast' impossible for emb\.weight: no fast path") as info:
        sl.PerSampleGradientProbe(model, params="emb.weight", engine="fast", **KW)
    message = str(info.value)
    for other in _suggested(message):
        assert _accepted(model, "emb.weight", other), (other, message)
    if zero3:  # the premise: every engine is refused for this weight under ZeRO-3
        assert not any(_accepted(model, "emb.weight", e) for e in ("auto", "vmap", "loop"))
        assert _suggested(message) == [] and "no engine can measure emb.weight" in message, message
        assert "ZeRO stage 3" in message, message
    else:  # unchanged
        assert message.endswith("; use engine='auto' or 'vmap'"), message


@pytest.mark.parametrize("zero3", [True, False], ids=["zero3", "plain"])
def test_fast_path_found_unusable_in_the_pass_suggests_only_accepted_engines(zero3):
    model = _net(zero3, functional=True)
    probe = sl.PerSampleGradientProbe(model, params="o.weight", engine="fast", **KW)
    assert probe.engines_ == {"o.weight": "fast"}
    with pytest.raises(ValueError, match=r"engine='fast' impossible for o\.weight: its module never ran") as info:
        probe.update(BATCH)
    message = str(info.value)
    assert probe.n_samples_ == 0
    if zero3:
        assert not _accepted(model, "o.weight", "auto")  # the premise: auto falls back to vmap, refused
        assert _suggested(message) == [] and "no engine can measure o.weight" in message, message
    else:
        assert message.endswith("; use engine='auto' or 'vmap'"), message
        assert _accepted(model, "o.weight", "auto") and _accepted(model, "o.weight", "vmap")


def _bn_net(track: bool) -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, track_running_stats=track)
    return nn.Sequential(nn.Linear(8, 8), bn, nn.Flatten(), nn.Linear(32, 3)).double().eval()


@pytest.mark.parametrize("track, train_mode", [(True, True), (False, False)], ids=["running", "batch"])
def test_fast_refusal_for_batch_statistics_suggests_an_engine_that_runs(track, train_mode):
    """A BatchNorm normalizing by the pass's batch keeps ``0.weight`` off the fast path. With ``train_mode=True``
    it also updates its running statistics in place, which ``torch.func`` cannot trace: ``engine='vmap'`` fails
    in the first update (``auto`` falls back to the loop). Before: the refusal suggested ``'vmap'`` there too."""
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = {"loss_fn": lambda out, b: out.pow(2).mean(-1), "train_mode": train_mode}
    with pytest.raises(ValueError, match=r"engine='fast' impossible for 0\.weight: BatchNorm") as info:
        sl.PerSampleGradientProbe(_bn_net(track), "0.weight", engine="fast", **kw)
    message = str(info.value)
    assert _suggested(message) == ["auto", "loop" if train_mode else "vmap"], message
    for other in _suggested(message):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sl.EngineFallbackWarning)  # auto: vmap, then the loop
            probe = sl.PerSampleGradientProbe(_bn_net(track), "0.weight", engine=other, **kw).update(x)
        assert probe.n_samples_ == 5, other
    if train_mode:  # the premise: vmap cannot trace the running-statistics update
        with pytest.raises(RuntimeError, match="engine='vmap' cannot trace"):
            sl.PerSampleGradientProbe(_bn_net(track), "0.weight", engine="vmap", **kw).update(x)


def test_a_refused_lens_attach_leaves_the_users_attached_probe_alone():
    """``attach_once`` detaches an owner whose bind was refused; for a lens that must not reach a ``probe=`` the
    user attached (the lens never owned it): its handle stays active and its samples are kept, whether the lens
    is refused before the probe is looked at (``layers`` matching nothing) or because of it (another model)."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))

    model, other = net(), net()
    probe = sl.PerSampleGradientProbe(params="0.weight", loss_fn=lambda out, b: out.pow(2).sum(1),
                                      forward_fn=lambda m, b: m(b))
    handle = probe.attach(model)
    probe.update(torch.randn(4, 3))
    for target, layers, match in ((model, "nope", "no module matches"), (other, "0", "built for another model")):
        lens = sl.SpectralLens(pool=[torch.randn(4, 3)], layers=layers, probe=probe, forward_fn=lambda m, b: m(b),
                               progress=False)
        with pytest.raises(ValueError, match=match):
            lens.attach(target)
        assert lens.model is None and probe.model is model and handle.active and probe.n_samples_ == 4
    with pytest.raises(ValueError, match="already attached to this Sequential"):
        probe.attach(model)  # refused before binding: nothing detached
    assert handle.active and probe.n_samples_ == 4
