"""Measuring a ``torch.compile``d model: the wrapper (``OptimizedModule``) and ``model.compile()``.

A graph dynamo compiled before the measurement's hooks existed skips them (hook guards are off by
default), so the lens and the probe run their forwards in dynamo's ``force_eager`` stance and bind
to the wrapped module (names without ``_orig_mod.``). The CI tier uses the ``aot_eager`` backend
(dynamo's hook handling is the same as inductor's); the inductor case is marked slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import spectral_lens as sl
from support.models import TinyLM, lm_pool

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

LAYER, PARAM = "h.2", "h.2.attn.c_proj.weight"


def _activation_reference(model, pool) -> torch.Tensor:
    rows = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda m, a, o: rows.append(o.reshape(-1, o.shape[-1])))
    model.eval()
    with torch.no_grad():
        for x, _ in pool:
            model(x)
    handle.remove()
    x = torch.cat(rows).double()
    xc = x - x.mean(0)
    return torch.linalg.eigvalsh(xc.T @ xc / (x.shape[0] - 1)).flip(0).clamp_min(0)


def _gradient_reference(model, pool) -> torch.Tensor:
    model.eval()
    weight = model.get_parameter(PARAM)
    grads = []
    for x, y in pool:
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]).flatten(0, 1), y[i].flatten())
            grads.append(torch.autograd.grad(loss, weight)[0].flatten().double())
    g = torch.stack(grads)
    return torch.linalg.eigvalsh(g @ g.T).flip(0).clamp_min(0)


def _model_pool_reference():
    """A float64 TinyLM without dropout, a pool of 2 batches, and the reference spectrum of ``PARAM``'s
    per-sample gradients over it (:func:`_gradient_reference`, on a copy)."""
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0).double()
    pool = lm_pool(n_batches=2)
    return model, pool, _gradient_reference(copy.deepcopy(model), pool)


def _assert_probe_matches(probe, pool, ref) -> None:
    for batch in pool:
        probe.update(batch)
    s = probe.compute()
    torch.testing.assert_close(s.values, ref[: s.dim], rtol=1e-9, atol=1e-12 * float(ref[0]))


def _compiled(model, how: str, backend: str):
    if how == "wrapper":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


def _train_step(runner, model, opt, batch):
    x, y = batch
    F.cross_entropy(runner(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    opt.zero_grad()


def _check(how: str, backend: str) -> None:
    torch.manual_seed(0)
    base = TinyLM(dropout=0.1).double()
    pool = lm_pool(n_batches=3)
    model = copy.deepcopy(base)
    runner = _compiled(model, how, backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # the training loop's own compiled passes: an evaluation (eval, no_grad) and a training step,
    # so that compiled graphs without the measurement's hooks exist before the lens measures
    model.eval()
    with torch.no_grad():
        for x, _ in pool:
            runner(x)
    model.train()
    _train_step(runner, model, opt, pool[0])
    eager = copy.deepcopy(base)
    eager.load_state_dict(model.state_dict())  # the trained weights, in a model never compiled
    act_ref, grad_ref = _activation_reference(copy.deepcopy(eager), pool), _gradient_reference(eager, pool)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.get_parameter(PARAM).grad = torch.full_like(model.get_parameter(PARAM), 0.5)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    counters.clear()
    lens = sl.SpectralLens(runner, pool, layers=LAYER, params=PARAM, progress=False)
    m = lens.measure(0, 0)
    assert dict(counters["frames"]) == {}, "measuring compiled (or recompiled) a graph"
    assert sorted(m.spectra) == [f"act:{LAYER}", f"grad:{PARAM}"]
    act, grad = m.spectra[f"act:{LAYER}"], m.spectra[f"grad:{PARAM}"]
    assert act.n_rows == 3 * 3 * 16 and grad.n_rows == 9
    torch.testing.assert_close(act.values, act_ref, rtol=1e-9, atol=1e-12 * float(act_ref[0]))
    torch.testing.assert_close(grad.values, grad_ref[: grad.dim], rtol=1e-9, atol=1e-12 * float(grad_ref[0]))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert torch.equal(model.get_parameter(PARAM).grad, torch.full_like(model.get_parameter(PARAM), 0.5))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    model.zero_grad()
    counters.clear()
    for _ in range(2):  # the training loop's compiled graphs are still valid: no recompilation
        _train_step(runner, model, opt, pool[1])
    assert dict(counters["frames"]) == {} or counters["frames"]["total"] == 0


#: torch >= 2.6: dynamo's stances, by which the lens runs a ``model.compile()``d module's forwards eagerly
HAS_STANCES = hasattr(torch.compiler, "set_stance")


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches cleared before and after the test: no graph compiled in another test is reused."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["wrapper", "inplace"])
def test_lens_measures_a_compiled_model_eagerly(how, fresh_dynamo):
    """Old code: the hooks were skipped by the graph compiled in the user's evaluation pass
    ("h.2: need at least 2 rows, have 0"), and on the wrapper every name had an ``_orig_mod.`` prefix."""
    if how == "inplace" and not HAS_STANCES:
        pytest.skip("torch < 2.6 has no compiler stances: a model.compile()d module is measured through its "
                    "uncompiled twin (docs/guide-attach.md)")
    _check(how, "aot_eager")


def test_probe_on_compiled_wrapper_uses_the_wrapped_names(fresh_dynamo):
    """Old code: ``OptimizedModule has no parameter 'h.1.attn.c_proj.weight'``."""
    model, pool, ref = _model_pool_reference()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(pool[0][0])  # compiled before the probe exists
    probe = sl.PerSampleGradientProbe(compiled, PARAM)
    assert probe.model is model and list(probe.params) == [PARAM]
    _assert_probe_matches(probe, pool, ref)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["wrapper", "inplace"])
def test_lens_measures_an_inductor_compiled_model(how, fresh_dynamo):
    _check(how, "inductor")


def test_measuring_works_on_a_torch_without_compiler_stances(monkeypatch):
    """torch < 2.6 (the package allows >= 2.4) has no torch.compiler.set_stance: the eager-forwards
    context must then do nothing instead of raising AttributeError in every measurement."""
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)  # absent already on torch < 2.6
    m = sl.SpectralLens(TinyLM(), lm_pool(n_batches=2), precision="float64", progress=False).measure(1, 1)
    assert all(s.n_rows > 0 for s in m.spectra.values())


def test_the_empty_capture_message_names_no_stance_on_a_torch_without_stances(monkeypatch):
    """Old code: on torch < 2.6 the empty-capture message's remedy was torch.compiler.set_stance,
    which that torch does not have (AttributeError for a user who follows it)."""
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    acc = sl.ActivationCovarianceAccumulator()
    with pytest.raises(ValueError, match=r"have 0 \(no update reached it: .*through the uncompiled module\)$") as info:
        acc.compute()
    assert "set_stance" not in str(info.value)


def test_an_empty_capture_names_the_compiled_graph_as_a_likely_cause(fresh_dynamo):
    """attach() after the compiled model already ran: the cached graph skips the new hook, and compute()
    said only 'need at least 2 rows, have 0'. The message now names this cause and the two remedies."""
    model = TinyLM().eval()
    compiled = torch.compile(model, backend="aot_eager")
    x, _ = next(iter(lm_pool(n_batches=1)))
    with torch.no_grad():
        compiled(x)
        with sl.attach(model, LAYER) as capture:
            compiled(x)
        remedy = r"force_eager" if HAS_STANCES else r"uncompiled module\)$"  # the remedies that torch has
        with pytest.raises(ValueError, match=r"have 0 \(no update reached it: .*torch\.compile'd graph.*" + remedy):
            capture.compute()
        if not HAS_STANCES:
            return
        with sl.attach(model, LAYER) as capture, torch.compiler.set_stance("force_eager"):
            compiled(x)  # the remedy the message names
        assert capture.compute()[LAYER].n_rows == x.numel()


def test_blocks_compiled_one_by_one_are_recorded_under_the_eager_names():
    """Per-block compilation (``model.h[i] = torch.compile(model.h[i])``, as torchtitan compiles each
    block) puts ``_orig_mod`` inside the names: the lens recorded 'grad:h.2._orig_mod.attn.c_proj.weight',
    so a compiled and an eager variant's records named the same matrix differently. Now both record
    the eager names, with the same spectra."""
    torch.manual_seed(0)
    eager = TinyLM(tied=False, dropout=0.0).double()
    compiled = _blocks_compiled(copy.deepcopy(eager))
    pool = [(x, y) for x, y in lm_pool()]
    a = sl.SpectralLens(eager, pool, precision="float64", progress=False).measure(1, 10)
    b = sl.SpectralLens(compiled, pool, precision="float64", progress=False).measure(1, 10)
    assert sorted(a.spectra) == sorted(b.spectra) == [f"act:{LAYER}", f"grad:{PARAM}"]
    assert sorted(a.scalars) == sorted(b.scalars)
    for name in a.spectra:
        assert torch.allclose(a.spectra[name].values, b.spectra[name].values, rtol=1e-10, atol=0), name


def _blocks_compiled(model: torch.nn.Module) -> torch.nn.Module:
    for i in range(len(model.h)):
        model.h[i] = torch.compile(model.h[i], backend="eager")
    return model


def test_blocks_compiled_one_by_one_accept_the_eager_names_as_targets(fresh_dynamo):
    """The records name per-block compiled modules by their eager names, but layers=/params= only took
    the compiled ones: 'TinyLM has no parameter 'h.2.attn.c_proj.weight'', 'no module matches target
    'h.1.attn''. Both spellings are accepted now and measure the same modules, recorded alike."""
    torch.manual_seed(0)
    eager = TinyLM(tied=False, dropout=0.0).double()
    compiled = _blocks_compiled(copy.deepcopy(eager))
    pool = [(x, y) for x, y in lm_pool(n_batches=2)]
    layers = ["h.1.attn", "h.2", "h.0.mlp.c_fc"]
    params = ["h.2.attn.c_proj.weight", "h.1.mlp.c_fc", "h.*.attn.c_attn.weight"]  # name, module, glob
    kw = dict(precision="float64", progress=False)
    ref = sl.SpectralLens(eager, pool, layers=layers, params=params, **kw).measure(1, 10)
    assert sorted(ref.spectra) == sorted(
        ["act:h.1.attn", "act:h.2", "act:h.0.mlp.c_fc", "grad:h.2.attn.c_proj.weight", "grad:h.1.mlp.c_fc.weight"]
        + [f"grad:h.{i}.attn.c_attn.weight" for i in range(3)])
    compiled_names = (["h.1._orig_mod.attn", "h.2", "h.0._orig_mod.mlp.c_fc"],
                      ["h.2._orig_mod.attn.c_proj.weight", "h.1._orig_mod.mlp.c_fc",
                       "h.*._orig_mod.attn.c_attn.weight"])
    for ls, ps in ((layers, params), compiled_names):
        m = sl.SpectralLens(compiled, pool, layers=ls, params=ps, **kw).measure(1, 10)
        assert sorted(m.spectra) == sorted(ref.spectra) and sorted(m.scalars) == sorted(ref.scalars), ls
        for name in ref.spectra:
            torch.testing.assert_close(m.spectra[name].values, ref.spectra[name].values, rtol=1e-10, atol=0)
    # a wrapper and the module it wraps share one eager name: a glob over the blocks measures each once
    m = sl.SpectralLens(compiled, pool, layers="h.*", params=(), **kw).measure(1, 10)
    assert sorted(m.spectra) == ["act:h.0", "act:h.1", "act:h.2"]
    with pytest.raises(ValueError, match=r"no parameter 'h\.2\.attn\.nope\.weight'.*h\.2\._orig_mod\.attn"):
        sl.SpectralLens(compiled, pool, params="h.2.attn.nope.weight", progress=False)


def test_probe_on_blocks_compiled_one_by_one_takes_the_eager_names(fresh_dynamo):
    model, pool, ref = _model_pool_reference()
    compiled = _blocks_compiled(model)
    probe = sl.PerSampleGradientProbe(compiled, PARAM)
    assert list(probe.params) == ["h.2._orig_mod.attn.c_proj.weight"]  # the parameter's own name
    assert probe.params[list(probe.params)[0]] is compiled.h[2]._orig_mod.attn.c_proj.weight
    _assert_probe_matches(probe, pool, ref)
    if HAS_STANCES:  # attach takes them too (its keys are the records' eager names since review 27)
        with sl.attach(compiled, "h.1.attn") as capture, torch.no_grad(), torch.compiler.set_stance("force_eager"):
            compiled(pool[0][0])
        assert list(capture.compute()) == ["h.1.attn"]



@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_capture_feeds_from_a_fullgraph_compiled_forward_without_a_graph_break(backend, fresh_dynamo):
    """``torch.compile(..., fullgraph=True)`` (torchtitan compiles its blocks so) over a module with a
    capture attached: the hook needed a graph break, which fullgraph refused (Dynamo's words about
    ``ContextVar.get``), and which split every other compiled graph at each captured module. The hook
    is now one operator in the graph: no graph break, every row read, equal to the float64 reference;
    a mask set at run time applies; a graph run after the capture was removed feeds nothing."""
    model = TinyLM().double().eval()
    pool = lm_pool(n_batches=2)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    counters.clear()
    with sl.attach(model, LAYER) as capture, torch.no_grad():
        for x, _ in pool:
            compiled(x)
    assert not counters["graph_break"]
    spectrum = capture.compute()[LAYER]
    assert spectrum.n_rows == sum(x.numel() for x, _ in pool)
    torch.testing.assert_close(spectrum.values, _activation_reference(model, pool), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        compiled(x)  # the graph still holds the call; the capture was removed
    assert capture.compute()[LAYER].n_rows == spectrum.n_rows

    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, : x.shape[1] // 2] = True
    masked = {}
    for compile_it in (False, True):
        torch._dynamo.reset()  # a graph compiled before a capture was attached skips its hook (documented)
        with sl.attach(model, LAYER) as capture, torch.no_grad(), capture.mask(mask):
            (torch.compile(model, backend=backend, fullgraph=True) if compile_it else model)(x)
        masked[compile_it] = capture.compute()[LAYER]
    assert masked[True].n_rows == masked[False].n_rows == x.numel() // 2
    torch.testing.assert_close(masked[True].values, masked[False].values, rtol=1e-9, atol=1e-12)


def test_a_capture_in_a_fullgraph_compiled_training_step_matches_eager(fresh_dynamo):
    """A training step compiled whole (forward and backward, aot_eager) with a capture attached:
    the rows are those of the eager steps (float64), and training is unchanged."""
    pool = lm_pool(n_batches=3)

    def train(compile_it):
        torch.manual_seed(0)
        model = TinyLM().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_it else model
        with sl.attach(model, LAYER) as capture:
            for x, y in pool:
                loss = F.cross_entropy(run(x).flatten(0, 1), y.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
        return capture.compute()[LAYER], [p.detach().clone() for p in model.parameters()]

    (eager, w_eager), (compiled, w_compiled) = train(False), train(True)
    assert compiled.n_rows == eager.n_rows == sum(x.numel() for x, _ in pool)
    torch.testing.assert_close(compiled.values, eager.values, rtol=1e-9, atol=1e-12)
    for a, b in zip(w_eager, w_compiled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
