"""Review of the capture path (forwards inside a backward pass, the compiled-graph operator, channels-first
refusal, low-precision rows): cases a demanding user runs into, against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import spectral_lens as sl

torch._dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Checkpointed(nn.Module):
    """Two blocks, the first run under ``torch.utils.checkpoint`` (``reentrant`` or not, or not at all)."""

    def __init__(self, d: int = 6, how: str = "none") -> None:
        super().__init__()
        self.blk, self.blk2, self.head, self.how = _Block(d), _Block(d), nn.Linear(d, 1), how

    def forward(self, x):
        h = self.blk(x) if self.how == "none" else checkpoint(self.blk, x, use_reentrant=self.how == "reentrant")
        return self.head(self.blk2(h))


def _cov_eigs(rows: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat(rows).double()
    xc = x - x.mean(0)
    return torch.linalg.eigvalsh(xc.T @ xc / (x.shape[0] - 1)).flip(0).clamp_min(0)


@pytest.mark.parametrize("how", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_training_step_with_checkpointing_inside_trains_and_reads_each_row_once(backend, how, fresh_dynamo):
    """A model compiled whole (fullgraph) with activation checkpointing inside the compiled region, trained:
    with the op-by-op ``eager`` backend the step's backward raised "modified by an inplace operation" (the
    operator's token, saved as an input of the checkpointed region, had its version bumped); every backend
    reads each row once (float64 reference of the rows the plain model gives) and trains as the eager loop."""
    targets = ["blk.up", "blk", "blk2"]

    def train(compiled: bool):
        torch.manual_seed(0)
        model = _Checkpointed(how=how if compiled else "none").double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        forward = torch.compile(model, backend=backend, fullgraph=True) if compiled else model

        def run(x):
            opt.zero_grad()
            forward(x).pow(2).mean().backward()
            opt.step()

        refs = {t: [] for t in targets}
        with sl.attach(model, targets) as capture:
            for n in (5, 7, 5):
                x = torch.randn(n, 6, dtype=torch.float64)
                plain = copy.deepcopy(model)  # a copy's hooks are inert: the rows of the plain model
                for t in targets:
                    plain.get_submodule(t).register_forward_hook(lambda m, a, o, t=t: refs[t].append(o.detach()))
                with torch.no_grad():
                    plain(x)
                run(x)
            return capture.compute(), refs, [p.detach().clone() for p in model.parameters()]

    spectra, refs, weights = train(True)
    _, _, eager_weights = train(False)
    for t in targets:
        assert spectra[t].n_rows == 17, t
        torch.testing.assert_close(spectra[t].values, _cov_eigs(refs[t]), rtol=1e-9, atol=1e-12)
    for a, b in zip(weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_torch_func_transform_over_a_captured_module_runs_and_reads_nothing(backend, fresh_dynamo):
    """Per-sample gradients with ``torch.func`` (``vmap(grad(...))``, Opacus-style) compiled while a capture
    is attached: tracing the hook's operator on batched, gradient-tracking rows raised (setup_context); now
    the hook reads nothing there, as in eager, and the gradients equal the uncompiled ones (float64)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 6, dtype=torch.float64)

    def per_sample(p, x):
        return vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))(p, x)

    expected = per_sample(params, x)
    try:  # without a capture: torch 2.4's Dynamo cannot trace functional_call inside vmap(grad(...)) at all
        torch.compile(per_sample, backend=backend, fullgraph=True)(params, x)
    except torch._dynamo.exc.Unsupported as exc:
        pytest.skip(f"torch {torch.__version__}'s Dynamo cannot compile vmap(grad(functional_call(...))) with "
                    f"fullgraph=True, capture or not: {str(exc).splitlines()[0]}")
    torch._dynamo.reset()  # the capture's hook below is traced into a fresh graph
    with sl.attach(model, "0") as capture:
        got = torch.compile(per_sample, backend=backend, fullgraph=True)(params, x)
        assert capture.accumulators["0"].n_rows == 0
        model(x)  # a plain forward still reads its rows
        assert capture.accumulators["0"].n_rows == 5
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_forward_under_inference_mode_reads_its_rows(backend, fresh_dynamo):
    """A graph compiled with a capture attached, run under ``torch.inference_mode()`` (and plainly): every
    row read once, spectrum equal to the float64 one of the same rows, outputs unchanged."""
    torch.manual_seed(0)
    model = _Checkpointed().double().eval()
    xs = [torch.randn(n, 6, dtype=torch.float64) for n in (4, 6, 5)]
    with torch.no_grad():
        rows = [model.blk(x) for x in xs]
        expected = [model(x) for x in xs]
    with sl.attach(model, "blk") as capture:
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        outs = [compiled(xs[0])]
        with torch.inference_mode():
            outs += [compiled(x) for x in xs[1:]]
        spectrum = capture.compute()["blk"]
    assert spectrum.n_rows == 15
    torch.testing.assert_close(spectrum.values, _cov_eigs(rows), rtol=1e-9, atol=1e-12)
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_capture_attached_inside_inference_mode_feeds_compiled_forwards_outside_it(fresh_dynamo):
    """``sl.attach`` called inside ``torch.inference_mode()`` (an evaluation script), the compiled model then
    run outside it, also in a training step: the hook's token was an inference tensor, and the operator's
    declared mutation of it raised "Inplace update to inference tensor outside InferenceMode"; now every
    row is read (float64 reference) and the gradients equal the uncompiled model's."""
    torch.manual_seed(0)
    model = _Checkpointed().double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(n, 6, dtype=torch.float64) for n in (4, 6)]
    with torch.no_grad():
        rows = [plain.blk(x) for x in xs]
    with torch.inference_mode():
        capture = sl.attach(model, "blk")
    with capture:
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            compiled(xs[0])
        compiled(xs[1]).sum().backward()
        plain(xs[1]).sum().backward()
        spectrum = capture.compute()["blk"]
    assert spectrum.n_rows == 10
    torch.testing.assert_close(spectrum.values, _cov_eigs(rows), rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
