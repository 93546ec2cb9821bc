"""Review 27 (revprobeguard): the global optimizer step post-hook that counts fused steps for the probe's
MixedWeightsWarning lives only while some probe holds an accumulation (measurement leaves no hook behind), and
adversarial checks of the warning's false positives / negatives."""

from __future__ import annotations

import copy
import gc
import threading
import warnings

import pytest
import torch
from support.per_sample import MLP_KW, mlp_batches, mlp_model, no_mixed_weights_warning
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks as HOOKS

import spectral_lens as sl
import spectral_lens.gradients._steps as steps_mod
from spectral_lens import MixedWeightsWarning, PerSampleGradientProbe

pytestmark = [pytest.mark.filterwarnings("error::spectral_lens.MixedWeightsWarning"),
              pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")]


def _held() -> int:
    """Accumulations holding the step hook now: other tests' probes still alive and accumulating count too (in
    the whole suite one is), so each test counts from what it found."""
    gc.collect()
    return len(steps_mod._HOLDERS)


def _check(holders: int) -> None:
    """``holders`` accumulations hold the hook, which is registered once while any does and not at all after."""
    ours = sum(h is steps_mod._count_step for h in HOOKS.values())
    assert (len(steps_mod._HOLDERS), ours) == (holders, int(holders > 0))


def _step(model, batch, opt):
    x, y = batch
    opt.zero_grad()
    ((model(x) - y) ** 2).sum().backward()
    opt.step()


def _fused(params):
    try:
        return torch.optim.AdamW(params, lr=0.1, fused=True)
    except RuntimeError as e:  # fused on CPU needs a recent torch
        pytest.skip(str(e))


def test_the_step_hook_lives_only_while_a_probe_holds_rows():
    h0 = _held()
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    _check(h0)  # construction installs nothing
    probe.update(b1)
    _check(h0 + 1)
    probe.update(b2)
    _check(h0 + 1)
    probe.reset()
    _check(h0)
    probe.update(b1)
    _check(h0 + 1)
    probe.detach()
    _check(h0)
    probe.attach(model)
    probe.update(b1)
    del probe
    gc.collect()
    _check(h0)


def test_two_probes_overlapping_share_one_hook_removed_by_the_last():
    h0 = _held()
    model, (b1, b2) = mlp_model(), mlp_batches()
    p1 = PerSampleGradientProbe(model, **MLP_KW)
    p2 = PerSampleGradientProbe(model, **MLP_KW)
    p1.update(b1)
    p2.update(b1)
    _check(h0 + 2)
    p1.reset()
    _check(h0 + 1)  # p2 still accumulates: its fused steps are still counted
    opt = _fused(model.parameters())
    _step(model, b1, opt)
    with pytest.warns(MixedWeightsWarning, match="'2.weight'"):
        p2.update(b2)
    p1.update(b1)
    del p2
    gc.collect()
    _check(h0 + 1)
    p1.reset()
    p1.reset()  # idempotent
    _check(h0)


def test_a_failed_update_holds_no_hook_unless_rows_were_held_before():
    h0 = _held()
    model, (b1, b2) = mlp_model(), mlp_batches()
    calls = [0]

    def forward(m, b):
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("boom")
        return m(b[0])

    probe = PerSampleGradientProbe(model, **{**MLP_KW, "forward_fn": forward})
    with pytest.raises(ValueError, match="boom"):
        probe.update(b1)
    assert probe.n_samples_ == 0
    _check(h0)
    probe.update(b1)
    _check(h0 + 1)
    calls[0] = 0
    with pytest.raises(ValueError, match="boom"):
        probe.update(b2)
    assert probe.n_samples_ == 5
    _check(h0 + 1)  # the rows taken before still hold it
    probe.reset()
    _check(h0)


def test_a_copied_probe_takes_its_own_hold():
    """A model keeping its probe as an attribute is deep-copied whole: a copied finalizer is dead."""
    h0 = _held()
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    model.probe = probe
    probe.update(b1)
    twin = copy.deepcopy(model)
    del model.probe
    probe.reset()
    _check(h0 + 1)  # the copy still accumulates
    opt = _fused(twin.parameters())  # kept alive: the steps are counted per optimizer, weakly (a freed one is not seen)
    _step(twin, b1, opt)
    with pytest.warns(MixedWeightsWarning):
        twin.probe.update(b2)
    twin.probe.reset()
    _check(h0)


def test_holding_and_releasing_from_threads_leaves_no_hook():
    h0 = _held()
    model, (b1, _) = mlp_model(), mlp_batches()
    probes = [PerSampleGradientProbe(model, **MLP_KW) for _ in range(4)]

    def work(p):
        for _ in range(3):
            p.update(b1)
            p.reset()

    threads = [threading.Thread(target=work, args=(p,)) for p in probes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check(h0)


def test_the_lens_leaves_no_hook_after_each_measurement():
    h0 = _held()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 16)).double()
    pool = [torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    lens = sl.SpectralLens(model, pool, layers="1", params="1.weight", forward_fn=lambda m, b: m(b))
    opt = _fused(model.parameters())
    for step in range(2):
        lens.measure(step, step)
        _check(h0)
        opt.zero_grad()
        model(pool[0]).logsumexp(-1).mean().backward()
        opt.step()
    assert len(lens.history) == 2


# ----------------------------------------------------------------------------- false positives
def test_gradient_accumulation_scheduler_and_zero_grad_between_updates_do_not_warn():
    model, (b1, b2) = mlp_model(), mlp_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    for b in (b1, b2):  # micro-batches accumulated, no step
        x, y = b
        ((model(x) - y) ** 2).sum().backward()
    probe.update(b2)
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    probe.update(b1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        sched.step()
    probe.update(b2)
    assert probe.n_samples_ == 20


def test_a_grad_scaler_skipped_step_does_not_warn():
    """Inf gradients: GradScaler.step does not call optimizer.step, the weights are unchanged."""
    model, (b1, b2) = mlp_model(), mlp_batches()
    opt = _fused(model.parameters())
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    except Exception as e:  # noqa: BLE001 - an old torch has no CPU GradScaler
        pytest.skip(str(e))
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    w = model[2].weight.detach().clone()
    opt.zero_grad()
    x, y = b1
    scaler.scale(((model(x) - y) ** 2).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model[2].weight, w)
    probe.update(b2)  # fused: GradScaler called step() with optimizer.found_inf set, the kernel skipped it
    opt.zero_grad()
    scaler.scale(((model(x) - y) ** 2).sum()).backward()
    scaler.step(opt)  # finite: a real step
    scaler.update()
    assert not torch.equal(model[2].weight, w)
    with pytest.warns(MixedWeightsWarning, match="'2.weight'"):
        probe.update(b1)


def test_a_swa_average_of_the_model_and_another_models_optimizer_do_not_warn():
    model, (b1, b2) = mlp_model(), mlp_batches()
    other = mlp_model()
    swa = torch.optim.swa_utils.AveragedModel(model)
    opt = _fused(other.parameters())
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    swa.update_parameters(model)
    swa.update_parameters(model)
    _step(other, b1, opt)
    with no_mixed_weights_warning():
        probe.update(b2)
    assert probe.n_samples_ == 10


# ----------------------------------------------------------------------------- what is and is not seen
def test_a_no_grad_update_is_seen_but_a_write_through_data_is_not():
    """Documented: ``with torch.no_grad(): p -= lr * g`` moves the counter; ``p.data.copy_(...)`` writes a tensor
    with its own counter and is not seen (a known false negative)."""
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    model[2].weight.data.copy_(torch.randn_like(model[2].weight))
    probe.update(b2)  # not seen
    with torch.no_grad():
        model[2].weight -= 0.1
    with pytest.warns(MixedWeightsWarning, match="'2.weight'"):
        probe.update(b1)
