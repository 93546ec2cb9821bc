"""Module backward hooks (per module full / full-pre / legacy, and the global ones) belong to the training
backward: the probe's passes switch them off (``_isolation.silenced_module_backward_hooks``), as they do the
parameter hooks. Before, they ran once per chunk (fast engine) or per sample (loop engine), a hook that
changes the gradient changed the rows, ``engine="vmap"`` refused a hooked model and Opacus's
``GradSampleModule`` failed inside the measurement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from spectral_lens import PerSampleGradientProbe

W_O = "transformer.h.1.attn.c_proj.weight"
ENGINES = {"fast": dict(engine="fast"), "vmap": dict(engine="vmap"), "loop": dict(engine="loop"),
           "bounded": dict(engine="fast", max_resident_samples=2)}


class Hooked:
    """A counting full backward hook that reverses the gradient (on ``ln_f``), a pre-hook that scales it (on
    ``lm_head``), a counting full hook on the probed module, a legacy hook, and two global hooks."""

    def __init__(self, model):
        self.calls: dict[str, int] = {}
        self.full_flag = torch_module._global_is_full_backward_hook  # torch keeps it after the hooks are removed
        tr = model.transformer

        def count(what, result=None):
            def hook(*args):
                self.calls[what] = self.calls.get(what, 0) + 1
                return result(*args) if result else None
            return hook

        self.handles = [
            tr.ln_f.register_full_backward_hook(count("reversal", lambda m, gi, go: (-3 * gi[0],))),
            model.lm_head.register_full_backward_pre_hook(count("pre", lambda m, go: (2 * go[0],))),
            tr.h[1].attn.c_proj.register_full_backward_hook(count("probed")),
            tr.h[1].mlp.c_fc.register_backward_hook(count("legacy")),
            torch_module.register_module_full_backward_hook(count("global")),
            torch_module.register_module_full_backward_pre_hook(count("global_pre")),
        ]
        self.dicts = [(m, m._backward_hooks, m._backward_pre_hooks, dict(m._backward_hooks),
                       dict(m._backward_pre_hooks)) for m in model.modules()]
        self.globals = (torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks,
                        dict(torch_module._global_backward_hooks), dict(torch_module._global_backward_pre_hooks))

    def assert_in_place(self):
        for m, full, pre, full_items, pre_items in self.dicts:
            assert m._backward_hooks is full and m._backward_pre_hooks is pre
            assert dict(full) == full_items and dict(pre) == pre_items
            assert "_get_backward_hooks" not in vars(m) and "_get_backward_pre_hooks" not in vars(m)
        full, pre, full_items, pre_items = self.globals
        assert torch_module._global_backward_hooks is full and torch_module._global_backward_pre_hooks is pre
        assert dict(full) == full_items and dict(pre) == pre_items

    def remove(self):
        for h in self.handles:
            h.remove()
        torch_module._global_is_full_backward_hook = self.full_flag


def _train_step(model, x, y):
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()


def _assert_next_private_step_as_twins(gsm, gsm_twin, model, twin, x, y):
    """One private step on the measured model and on its unmeasured twin: identical per-sample and summed
    gradients, so the measurement left nothing in Opacus's state."""
    for g in (gsm, gsm_twin):
        _train_step(g, x, y)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad_sample, q.grad_sample), n
        assert torch.equal(p.grad, q.grad), n
    gsm.remove_hooks()
    gsm_twin.remove_hooks()


@pytest.mark.parametrize("kind", list(ENGINES))
def test_module_backward_hooks_are_not_called_and_the_rows_are_the_losss_own(gpt, helpers, kind):
    model = gpt()
    x, y = helpers.lm_batch(m=5)
    ref = torch.from_numpy(helpers.reference_rows(copy.deepcopy(model), [W_O], (x, y), helpers.lm_sample_loss)[W_O])
    hooked = Hooked(model)
    try:
        probe = PerSampleGradientProbe(model, W_O, chunk_size=2, **ENGINES[kind])
        probe.update((x, y))
        spectrum = probe.compute()
        assert hooked.calls == {}  # before: every hook once per chunk / sample; vmap raised (setup_context)
        assert probe.engines_ == {W_O: ENGINES[kind]["engine"]}
        torch.testing.assert_close(probe.gram(), ref @ ref.T, rtol=1e-10, atol=1e-14)
        assert spectrum.n_rows == 5
        hooked.assert_in_place()
        # the user's own training backward afterwards calls every hook, as before
        _train_step(model, x, y)
        assert set(hooked.calls) == {"reversal", "pre", "probed", "legacy", "global", "global_pre"}
    finally:
        hooked.remove()


def test_the_hooks_change_the_training_gradient_so_calling_them_would_change_the_rows(gpt, helpers):
    """The reversal and the scaling are real: with them the training gradient of W_O is -6 times the plain one
    (so rows that ran them would differ from the reference above)."""
    model = gpt()
    x, y = helpers.lm_batch(m=5)
    plain = copy.deepcopy(model)
    _train_step(plain, x, y)
    hooked = Hooked(model)
    try:
        _train_step(model, x, y)
    finally:
        hooked.remove()
    w = dict(model.named_parameters())[W_O]
    torch.testing.assert_close(w.grad, -6 * dict(plain.named_parameters())[W_O].grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_exception_inside_a_pass_leaves_the_hooks_in_place(gpt, helpers, error):
    model = gpt()
    x, y = helpers.lm_batch(m=4)
    hooked = Hooked(model)
    seen = []

    def loss_fn(out, batch):
        # inside the pass the hooks are off for the forward that just ran
        seen.append("_get_backward_hooks" in vars(model.transformer.ln_f))
        raise error("boom")

    try:
        probe = PerSampleGradientProbe(model, W_O, loss_fn=loss_fn, engine="loop")
        with pytest.raises(error, match="boom"):
            probe.update((x, y))
        assert seen == [True]
        hooked.assert_in_place()
        _train_step(model, x, y)
        assert set(hooked.calls) == {"reversal", "pre", "probed", "legacy", "global", "global_pre"}
    finally:
        hooked.remove()


def test_nested_use_and_hooks_registered_or_removed_inside_the_block():
    from spectral_lens.gradients._isolation import silenced_module_backward_hooks

    lin = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    calls = []
    first = lin[0].register_full_backward_hook(lambda *a: calls.append("first"))
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    with silenced_module_backward_hooks(lin):
        with silenced_module_backward_hooks(lin):
            lin(x).sum().backward()
        later = lin[2].register_full_backward_pre_hook(lambda *a: calls.append("later"))  # registered inside
        lin(x).sum().backward()
        first.remove()  # removed inside: stays removed
    assert calls == []
    assert all("_get_backward_hooks" not in vars(m) for m in lin.modules())
    lin(x).sum().backward()
    assert calls == ["later"]
    later.remove()
    assert not lin[0]._backward_hooks and not lin[2]._backward_pre_hooks


def test_forward_hooks_still_run_and_other_models_keep_their_hooks(gpt, helpers):
    model, other = gpt(), nn.Linear(2, 1)
    x, y = helpers.lm_batch(m=3)
    calls = []
    handles = [model.transformer.ln_f.register_forward_hook(lambda *a: calls.append("forward")),
               other.register_full_backward_hook(lambda *a: calls.append("other"))]

    def loss_fn(out, batch):  # another model trained inside the measurement keeps its hooks
        other(torch.ones(1, 2)).sum().backward()
        return F.cross_entropy(out.flatten(0, 1), batch[1].flatten(), reduction="none").view(out.shape[:2]).mean(1)

    try:
        PerSampleGradientProbe(model, W_O, loss_fn=loss_fn, engine="fast").update((x, y))
        assert calls.count("forward") >= 1 and calls.count("other") >= 1
    finally:
        for h in handles:
            h.remove()


def test_opacus_grad_sample_module_measured_without_switching_its_hooks_off(gpt, helpers):
    """Opacus 1.6: before, its backward hook failed inside the probe (``IndexError: pop from empty list``)
    unless ``gsm.disable_hooks()`` was called around the measurement."""
    opacus = pytest.importorskip("opacus")
    x, y = helpers.lm_batch(m=4)

    model, twin = gpt(), gpt()  # the same weights: twin is never measured
    gsm, gsm_twin = opacus.GradSampleModule(model.train()), opacus.GradSampleModule(twin.train())
    probe = PerSampleGradientProbe(model, W_O)  # eval mode (train_mode=False)
    probe.update((x, y))
    probe.update((x, y))
    assert probe.compute().n_rows == 8
    assert model.training and not any(getattr(m, "activations", None) for m in model.modules())
    _assert_next_private_step_as_twins(gsm, gsm_twin, model, twin, x, y)


def test_a_global_legacy_backward_hook_is_not_called(gpt, helpers, monkeypatch):
    monkeypatch.setattr(torch_module, "_global_is_full_backward_hook", None)  # torch refuses mixing the kinds
    model = gpt()
    x, y = helpers.lm_batch(m=3)
    calls = []
    handle = torch_module.register_module_backward_hook(lambda *a: calls.append(1))
    try:
        PerSampleGradientProbe(model, W_O, engine="loop").update((x, y))
        assert calls == []
        _train_step(model, x, y)
        assert calls
    finally:
        handle.remove()


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_opacus_hooks_with_train_mode_are_a_clear_error_and_disable_hooks_works(gpt, helpers, engine):
    """With ``train_mode=True`` Opacus's forward hooks record the probe's layer inputs (``module.activations``)
    and count its forwards (``p._forward_counter``): before, the measurement went through (``fast``, ``loop``)
    and the next private step failed or computed other per-sample gradients, or the vmap engine failed inside
    Opacus (``AttributeError: ... _forward_counter``). The probe cannot switch that off without changing
    Opacus's state, so it refuses with the remedy; the remedy, ``disable_hooks()`` around the measurement,
    leaves the next private step as the twin's."""
    opacus = pytest.importorskip("opacus")
    x, y = helpers.lm_batch(m=4)
    model, twin = gpt(), gpt()
    gsm, gsm_twin = opacus.GradSampleModule(model.train()), opacus.GradSampleModule(twin.train())
    probe = PerSampleGradientProbe(model, W_O, train_mode=True, engine=engine)
    with pytest.raises(RuntimeError, match=r"train_mode=True\): Opacus's GradSampleModule hooks are enabled on "
                                           r"transformer\.wte.*gsm\.disable_hooks\(\)"):
        probe.update((x, y))
    assert probe.n_samples_ == 0 and gsm.hooks_enabled
    assert not any(getattr(m, "activations", None) for m in model.modules())
    gsm.disable_hooks()
    try:
        probe.update((x, y))
    finally:
        gsm.enable_hooks()
    assert probe.compute().n_rows == 4 and model.training
    _assert_next_private_step_as_twins(gsm, gsm_twin, model, twin, x, y)
