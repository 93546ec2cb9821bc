"""The vmap engine falls back to the loop engine, with a warning naming the cause, on models that
``torch.func.vmap`` cannot trace (``engine="auto"``); ``engine="vmap"`` asked for explicitly raises,
naming the likely cause and ``engine="loop"``; other errors still propagate."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from spectral_lens import EngineFallbackWarning, PerSampleGradientProbe
from spectral_lens.gradients.fallback import is_untraceable


class Branchy(nn.Module):
    """Data-dependent Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, idx):
        h = self.emb(idx)
        if h.sum() > 0:  # vmap: data-dependent control flow
            h = torch.tanh(h)
        return self.head(self.lin(h))


class Itemy(Branchy):
    def forward(self, idx):
        h = self.emb(idx)
        return self.head(self.lin(h)) * (1.0 + 0.0 * h.mean().item())  # vmap: .item()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    return ids, torch.randint(0, 11, (5, 7), generator=g)


@pytest.mark.parametrize("cls", [Branchy, Itemy])
def test_fallback_warns_and_equals_the_loop_engine(cls):
    torch.manual_seed(0)
    model = cls().double()
    params = "emb.weight"  # nn.Embedding has no fast path: "auto" picks vmap
    probe = PerSampleGradientProbe(model, params, engine="auto", keep_matrix=True)
    assert probe.engines_[params] == "vmap"
    with pytest.warns(EngineFallbackWarning, match=r"vmap cannot trace (Branchy|Itemy) \(vmap: .*\); using engine='loop'"):
        probe.update(_batch())
    assert probe.engines_[params] == "loop"
    with warnings.catch_warnings():  # later batches go straight to the loop: no second warning
        warnings.simplefilter("error", EngineFallbackWarning)
        probe.update(_batch())
    loop = PerSampleGradientProbe(model, params, engine="loop", keep_matrix=True)
    loop.update(_batch()).update(_batch())
    torch.testing.assert_close(probe.matrix(), loop.matrix(), rtol=0, atol=0)
    assert model.emb.weight.grad is None


@pytest.mark.parametrize("cls", [Branchy, Itemy])
def test_explicit_vmap_raises_naming_the_cause_and_the_loop_engine(cls):
    probe = PerSampleGradientProbe(cls().double(), "emb.weight", engine="vmap")
    with pytest.raises(RuntimeError, match=r"engine='vmap' cannot trace (Branchy|Itemy) \(vmap: .*Likely cause: "
                       r"data-dependent Python control flow or \.item\(\).*Pass engine='loop'"):
        probe.update(_batch())
    assert probe.engines_ == {"emb.weight": "vmap"} and probe.n_samples_ == 0


#: torch's own refusal messages (torch 2.13), one per kind
REFUSALS = [
    "vmap: It looks like you're calling .item() on a Tensor. We don't support vmap over calling .item()",
    "Batching rule not implemented for aten::_fused_moving_avg_obs_fq_helper; the fallback path doesn't work "
    "on out= or view ops.",
    "During a grad (vjp, jvp, grad, etc) transform, the function provided attempted to call in-place operation "
    "(aten::add_.Tensor) that would mutate a captured Tensor. This is not supported",
    "In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, jacrev, ...), it must "
    "override the setup_context staticmethod.",
    "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks. Please open an issue",
    "You are attempting to call Tensor.requires_grad_() (or perhaps using torch.autograd.functional.* APIs) "
    "inside of a function being transformed by a functorch transform.",
    "NYI: querying is_contiguous inside of vmap for memory_format other than torch.contiguous_format",
]


@pytest.mark.parametrize("message", REFUSALS)
def test_functorch_refusals_are_recognized(message):
    assert is_untraceable(RuntimeError(message))
    assert is_untraceable(NotImplementedError("To use autograd.Function with vmap, you must either override"))


def test_other_errors_are_not_swallowed():
    assert is_untraceable(RuntimeError("vmap: It looks like you're calling .item() on a Tensor"))
    assert not is_untraceable(RuntimeError("CUDA out of memory"))
    assert not is_untraceable(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x4)"))
    assert not is_untraceable(ValueError("vmap: not a RuntimeError"))

    class Broken(Branchy):
        def forward(self, idx):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    probe = PerSampleGradientProbe(Broken().double(), "emb.weight", engine="vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            probe.update(_batch())
    assert probe.engines_["emb.weight"] == "vmap" and probe.n_samples_ == 0


class TiedLM(nn.Module):
    """Tied embedding and head: engine "auto" probes the shared weight with vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.block(self.emb(idx))))


def _loop_rows(model, params, batch, **kw):
    return PerSampleGradientProbe(model, params, engine="loop", keep_matrix=True, **kw).update(batch).matrix()


class _OldStyleTanh(torch.autograd.Function):
    """A custom kernel written the old way (ctx in forward, no setup_context): torch.func refuses it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OldStyleTiedLM(TiedLM):
    def forward(self, idx):
        return self.head(_OldStyleTanh.apply(self.block(self.emb(idx))))


def test_an_autograd_function_without_setup_context_falls_back_and_is_named():
    torch.manual_seed(0)
    model = OldStyleTiedLM().double()
    probe = PerSampleGradientProbe(model, "head.weight", keep_matrix=True)
    assert probe.engines_ == {"head.weight": "vmap"}
    with pytest.warns(EngineFallbackWarning, match=r"setup_context.*likely cause: .*autograd\.Function"
                      r".*using engine='loop'"):
        probe.update(_batch())
    assert probe.engines_ == {"head.weight": "loop"}
    torch.testing.assert_close(probe.matrix(), _loop_rows(model, "head.weight", _batch()), rtol=0, atol=0)
    explicit = PerSampleGradientProbe(model, "head.weight", engine="vmap")
    with pytest.raises(RuntimeError, match=r"engine='vmap' cannot trace OldStyleTiedLM .*setup_context.*"
                       r"Pass engine='loop'"):
        explicit.update(_batch())
    assert explicit.n_samples_ == 0


def test_a_user_backward_hook_no_longer_makes_vmap_refuse():
    """Before, the BackwardHook a module backward hook installs made torch.func refuse the model (fallback to
    loop); the probe now switches module backward hooks off while it measures, so vmap runs and the hook is
    not called (tests/gradients/test_audit14_backward_hooks.py)."""
    torch.manual_seed(0)
    model = TiedLM().double()
    calls = []
    handle = model.block.register_full_backward_hook(lambda mod, gi, go: calls.append(1))  # gradient monitoring
    try:
        probe = PerSampleGradientProbe(model, "head.weight", keep_matrix=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", EngineFallbackWarning)
            probe.update(_batch())
        assert probe.engines_ == {"head.weight": "vmap"} and calls == []
        torch.testing.assert_close(probe.matrix(), _loop_rows(model, "head.weight", _batch()), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(32, 3)).double().eval()


def _sq(out, batch):
    return out.pow(2).mean(-1)


def test_batchnorm_in_train_mode_falls_back_and_is_named():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = _bn_net()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    probe = PerSampleGradientProbe(model, "0.weight", train_mode=True, loss_fn=_sq, keep_matrix=True)
    assert probe.engines_ == {"0.weight": "loop"}  # review 24: auto takes the loop at binding, vmap would fail
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        probe.update(x)
    torch.testing.assert_close(probe.matrix(), _loop_rows(model, "0.weight", x, train_mode=True, loss_fn=_sq),
                               rtol=0, atol=0)
    explicit = PerSampleGradientProbe(model, "0.weight", engine="vmap", train_mode=True, loss_fn=_sq)
    with pytest.raises(RuntimeError, match=r"Likely cause: BatchNorm in train mode .*train_mode=False.*engine='loop'"):
        explicit.update(x)
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())  # running statistics untouched
    assert not model.training


def test_fake_quantize_without_a_batching_rule_falls_back():
    quant = pytest.importorskip("torch.ao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model.qconfig = quant.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quant.prepare_qat(model.train()).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    probe = PerSampleGradientProbe(model, "0.weight", loss_fn=_sq, keep_matrix=True)
    with pytest.warns(EngineFallbackWarning, match=r"Batching rule not implemented for .*likely cause: an operator "
                      r"without a vmap batching rule"):
        probe.update(x)
    torch.testing.assert_close(probe.matrix(), _loop_rows(model, "0.weight", x, loss_fn=_sq), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"engine='vmap' cannot trace .*Batching rule not implemented.*engine='loop'"):
        PerSampleGradientProbe(model, "0.weight", engine="vmap", loss_fn=_sq).update(x)
