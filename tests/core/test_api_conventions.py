"""The public API against the conventions PyTorch users bring: a hooked model stays usable with
everything a training script does to a model (``torch.func`` transforms as Opacus's functorch mode
and functional training steps use them, ``torch.jit.trace``, ``torch.export``), and every public
callable names the argument it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def _vmap(model, x):
    return torch.func.vmap(model)(x)


def _per_sample_grads(model, x):  # Opacus's functorch grad sampler, or a hand-written DP-SGD step
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, row):
        return torch.func.functional_call(model, p, (row[None],)).pow(2).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)["2.weight"]


def _grad(model, x):  # a functional training step
    params = {k: v.detach() for k, v in model.named_parameters()}
    return torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).pow(2).sum())(params)["2.weight"]


def _jvp(model, x):
    return torch.func.jvp(model, (x,), (torch.ones_like(x),))[1]


def _trace(model, x):
    return torch.jit.trace(model, x, check_trace=False)(x)


def _export(model, x):
    return torch.export.export(model, (x,)).module()(x)


@pytest.mark.parametrize("use", [_vmap, _per_sample_grads, _grad, _jvp, _trace, _export])
def test_transformed_or_traced_forwards_of_a_hooked_model_work_and_add_no_rows(use):
    # Each of these raised from inside the capture's hook ("Cannot access data pointer of Tensor that
    # doesn't have storage", "'Tensor' object has no attribute 'astype'", ".numpy() is not supported
    # for tensor subclasses"): attaching a capture broke the user's own per-sample gradients, a
    # functional step, tracing or exporting the model.
    model = _model()
    x = torch.randn(5, 6, dtype=torch.float32) * 2 + 1
    plain = _model()  # the same weights, never hooked
    expected = use(plain, x)
    with torch.no_grad():
        ref = plain[1](plain[0](x)).double().numpy()  # the fp32 rows the hook reads, in float64
    with sl.attach(model, "1", precision="float64") as capture:
        got = use(model, x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        acc = capture.accumulators["1"]
        assert acc.n_rows == 0  # no rows read from batched / fake / traced tensors
        with torch.no_grad():
            model(x)  # the plain forward is still measured, exactly
        assert acc.n_rows == 5
        np.testing.assert_allclose(acc.covariance().numpy(), np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)
    assert not model[1]._forward_hooks


def test_traced_graph_holds_no_accumulator_arithmetic():
    # a tracer records every tensor op a hook runs: the traced model of a hooked one must be the
    # model's own graph, not one that also recomputes the accumulator's sums on every call
    x = torch.randn(4, 6)
    plain = torch.jit.trace(_model(), x, check_trace=False)
    model = _model()
    with sl.attach(model, ["0", "1"]):
        traced = torch.jit.trace(model, x, check_trace=False)
    kinds = lambda g: sorted(n.kind() for n in g.inlined_graph.nodes())  # noqa: E731
    assert kinds(traced) == kinds(plain)
