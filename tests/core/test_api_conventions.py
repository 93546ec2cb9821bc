"""The public API against the conventions PyTorch users bring: a hooked model stays usable with
everything a training script does to a model (``torch.func`` transforms as Opacus's functorch mode
and functional training steps use them, ``torch.jit.trace``, ``torch.export``), and every public
callable names the argument it refuses."""

from __future__ import annotations

import copy
import re
import warnings

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


# torch < 2.7 has no torch.compiler.is_exporting (pytorch/pytorch#142425): there the (strict, dynamo) export
# traces into the hook and stops at the ContextVar it reads (torch 2.4; docs/api-core.md; tools/check_floors.sh)
_EXPORT = pytest.param(_export, marks=pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                                                         reason="torch.export of a hooked model needs "
                                                                "torch.compiler.is_exporting (torch >= 2.7)"))


@pytest.mark.parametrize("use", [_vmap, _per_sample_grads, _grad, _jvp, _trace, _EXPORT])
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


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids):
        return self.head(self.proj(self.emb(ids)))


_IDS = torch.randint(0, 11, (4, 5))
_POOL = [(_IDS, _IDS)]


def _probe(**kw):
    return sl.PerSampleGradientProbe(_LM(), "proj.weight", **kw)


def _lens(**kw):
    return sl.SpectralLens(_LM(), **{"pool": _POOL, "layers": "proj", "params": (), "progress": False, **kw})


# each wrong type was accepted when the object was built and failed later from deep inside (or not at
# all): "'str' object is not callable", "Invalid device string: 'bfloat16'", "set_autocast_dtype():
# argument 'dtype' must be torch.dtype", "int() argument must be ... not 'NoneType'", "'str' object has
# no attribute 'model'", "'str' object has no attribute 'log_measurement'" after the whole measurement,
# an integer storage dtype giving an all-zero spectrum, a tensor pool measured one unbatched sequence at
# a time, tail_window="ab" accepted
@pytest.mark.parametrize("build, match", [
    (lambda: _probe(loss_fn="cross_entropy"), r"PerSampleGradientProbe: loss_fn must be a callable .* got str"),
    (lambda: _probe(forward_fn="forward"), r"PerSampleGradientProbe: forward_fn must be a callable .* got str"),
    (lambda: _probe(storage_dtype="bfloat16"), r"PerSampleGradientProbe: storage_dtype must be a floating-point torch\.dtype"),
    (lambda: _probe(storage_dtype=torch.int32), r"PerSampleGradientProbe: storage_dtype must be a floating-point .* torch\.int32"),
    (lambda: _probe(autocast_dtype="bfloat16"), r"PerSampleGradientProbe: autocast_dtype must be a floating-point torch\.dtype"),
    (lambda: _probe(chunk_size=None), r"PerSampleGradientProbe: chunk_size must be an int >= 1; got NoneType"),
    (lambda: _probe(chunk_size=2.5), r"PerSampleGradientProbe: chunk_size must be an int >= 1; got float"),
    (lambda: _probe(max_resident_samples="8"), r"PerSampleGradientProbe: max_resident_samples must be an int >= 1 or None"),
    (lambda: _lens(pool=torch.zeros(4, 5, dtype=torch.long)), r"SpectralLens: pool must be a re-iterable of held-out batches .* Tensor of shape \(4, 5\)"),
    (lambda: _lens(pool="heldout.txt"), r"SpectralLens: pool must be a re-iterable .* got str"),
    (lambda: _lens(gradient_pool=3), r"SpectralLens: gradient_pool must be a re-iterable .* got int"),
    (lambda: _lens(gradient_samples="64"), r"SpectralLens: gradient_samples must be an int"),
    (lambda: _lens(mask_fn="attention_mask"), r"SpectralLens: mask_fn must be a callable .* got str"),
    (lambda: _lens(forward_fn="forward"), r"SpectralLens: forward_fn must be a callable .* got str"),
    (lambda: _lens(autocast_dtype="bf16"), r"SpectralLens: autocast_dtype must be a floating-point torch\.dtype"),
    (lambda: _lens(probe="proj.weight"), r"SpectralLens: probe must be a PerSampleGradientProbe or None, got str"),
    (lambda: _lens(writer="runs/a"), r"SpectralLens: writer must be a RunWriter .* got str .*RunWriter\(path"),
    (lambda: _lens(tail_window=100), r"SpectralLens: tail_window must be a pair of integer ranks .* got int"),
    (lambda: _lens(head_window="ab"), r"SpectralLens: head_window must be a pair of integer ranks .* got str"),
    (lambda: _lens().measure(step="last", tokens=0), r"SpectralLens\.measure: step and tokens must be integers .*'last'"),
    # a fraction was truncated (step 0.5 recorded as step 0)
    (lambda: _lens().measure(step=0.5, tokens=0), r"SpectralLens\.measure: step and tokens must be integers .*step=0\.5"),
    (lambda: _lens().measure(step=1, tokens=float("nan")), r"SpectralLens\.measure: .*tokens=nan"),
    (lambda: _lens().measure(step=True, tokens=0), r"SpectralLens\.measure: .*step=True"),
])
def test_wrong_argument_types_are_refused_naming_the_argument(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_argument_checks_keep_valid_values():
    # what the checks must go on accepting: NumPy integers, dtypes, callables, windows as lists, duck writers
    probe = _probe(chunk_size=np.int64(2), max_resident_samples=np.int32(3), storage_dtype=torch.float64,
                   autocast_dtype=None, loss_fn=None, forward_fn=lambda m, b: m(b[0]))
    assert (probe.chunk_size, probe.max_resident_samples) == (2, 3)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
        _probe(chunk_size=0)
    with pytest.raises(ValueError, match=r"tail_window=\(5, 5\): need 1 <= lo < hi"):
        _lens(tail_window=(5, 5))

    class Writer:
        tail_window = head_window = None

        def log_measurement(self, step, tokens, spectra, **kw):
            self.got = (step, tokens, sorted(spectra))

    writer = Writer()
    lens = _lens(tail_window=[2, 4], writer=writer, gradient_samples=None)
    assert lens.tail_window == (2, 4)
    m = lens.measure(np.int64(3), 7.0)  # a NumPy step and a float token count, as loops produce them
    assert (m.step, m.tokens) == (3, 7) and writer.got == (3, 7, ["act:proj"])
    assert type(writer.got[0]) is int


@pytest.mark.parametrize("summary", [sl.stable_rank, sl.participation_ratio, sl.RankMe()])
def test_summaries_refuse_a_matrix_instead_of_flattening_its_entries(summary):
    # stable_rank(W) for a weight matrix W (the usual meaning of "stable rank of W") returned
    # sum(entries) / max(entry), here 10 / 4 = 2.5, while the stable rank of W is 1.0043; the other
    # summaries flattened the matrix alike. A matrix is refused, pointing at its eigenvalues.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected a 1-D tensor of eigenvalues, got shape \(2, 2\).*svdvals"):
        summary(w)
    with pytest.raises(TypeError, match=r"needs a Spectrum or a 1-D tensor of eigenvalues, got str"):
        summary("spectrum.npz")


def test_stable_rank_of_a_matrix_through_its_eigenvalues_matches_float64():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 24)) * np.logspace(0, -6, 24)  # columns over six decades
    s = np.linalg.svd(w, compute_uv=False)
    expected = np.linalg.norm(w, "fro") ** 2 / s[0] ** 2
    got = sl.stable_rank(torch.linalg.svdvals(torch.from_numpy(w)) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_capture_mask_refuses_a_non_bool_mask_when_set():
    # a list or an integer attention mask was accepted by capture.mask(...) and failed only inside the
    # next forward, from the hook, in the middle of the user's loop
    model = _model()
    x = torch.randn(2, 3, 6)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        ref = model[1](model[0](x))[valid].double().numpy()
    with sl.attach(model, "1", precision="float64") as capture:
        with pytest.raises(TypeError, match=r"ActivationCapture\.mask: mask must be a bool tensor .* got list"):
            with capture.mask([[1, 1, 0], [1, 0, 0]]):
                pass
        with pytest.raises(TypeError, match=r"mask must be a bool tensor .* got a tensor of dtype torch\.int64"):
            with capture.mask(torch.ones(2, 3, dtype=torch.long)):
                pass
        with capture.mask(valid), torch.no_grad():  # the refused masks left nothing behind
            model(x)
        acc = capture.accumulators["1"]
        assert acc.n_rows == 3
        np.testing.assert_allclose(acc.covariance().numpy(), np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)


def _moved_model_rows(device: str) -> tuple[sl.ActivationCapture, np.ndarray]:
    # the torchmetrics pattern: a model (and its metrics) moved between devices mid-run
    model = _model()
    xs = [torch.randn(7, 6) * 3 + 1 for _ in range(4)]
    with torch.no_grad():
        ref = np.concatenate([model[1](model[0](x)).double().numpy() for x in xs])
    capture = sl.attach(model, "1", precision="float64")
    with torch.no_grad():
        model(xs[0])
        model(xs[1])
        model.to(device)
        assert capture.to(device) is capture
        model(xs[2].to(device))
        model.cpu()
        capture.accumulators["1"].to("cpu")
        model(xs[3])
    capture.remove()
    return capture, ref


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_accumulator_follows_the_model_between_devices(device):
    capture, ref = _moved_model_rows(device)
    acc = capture.accumulators["1"]
    assert acc.n_rows == 28 and acc.mean.device.type == "cpu"
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-12)
    if device == "cpu":  # a move to where the state is changes nothing, bit for bit
        rows = torch.from_numpy(ref)
        never = sl.ActivationCovarianceAccumulator().to("cpu")  # no rows yet: nothing to move
        never.update(rows[:10])
        moved = copy.deepcopy(never)
        assert moved.to(torch.device("cpu")) is moved
        for a in (never, moved):
            a.update(rows[10:])
        assert moved.n_rows == 28 and moved._updates == 2
        assert torch.equal(moved.covariance(), never.covariance())


def test_rows_on_another_device_say_how_to_move_the_state():
    acc = sl.ActivationCovarianceAccumulator(name="h.3")
    acc.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"h\.3: input on meta, accumulator state on cpu; .*acc\.to\('meta'\)"):
        acc.update(torch.empty(4, 5, device="meta"))
    with pytest.raises(TypeError, match=r"h\.3\.to: expected a device .* got dtype torch\.bfloat16; the state is float64"):
        acc.to(torch.bfloat16)  # as model.to(torch.bfloat16) would be written
    assert acc.n_rows == 4 and acc.mean.dtype == torch.float64


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_probe_on_an_unbatched_sequence_says_it_needs_a_batch_dimension(engine):
    # probe.update((ids[0], ids[0])), one sequence without its batch dimension, said only "loss_fn must
    # return per-sample losses of shape (5,), got ()" (fast engine; (1,) per sample on vmap and loop)
    probe = sl.PerSampleGradientProbe(_LM(), "proj.weight", engine=engine)
    with pytest.raises(ValueError, match=r"shape \(\d,\), got \(\).*single sequence needs a batch dimension"):
        probe.update((_IDS[0], _IDS[0]))
    assert probe.n_samples_ == 0
    probe.update((_IDS[:1], _IDS[:1]))  # a batch of 1 is one sample
    assert probe.n_samples_ == 1


class _Holder(nn.Module):  # at module level: torch.save pickles the class by reference
    def __init__(self):
        super().__init__()
        self.net = _LM()

    def forward(self, ids):
        return self.net(ids)


def test_a_model_holding_a_probe_or_lens_can_be_saved_whole():
    # a LightningModule-style model keeping its lens as an attribute: torch.save(model) (or any pickle of
    # the probe) failed with "Can't pickle local object 'PerSampleGradientProbe.__init__.<locals>.<lambda>'"
    # (the default loss was a lambda), breaking the user's whole-model checkpoint
    import io
    import pickle

    model = _Holder()
    model.lens = sl.SpectralLens(model, _POOL, layers="net.proj", params="net.proj.weight", progress=False)
    model.lens.probe.update((_IDS, _IDS))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.lens.model is loaded and loaded.lens.probe.model is loaded  # one object graph
    assert np.array_equal(loaded.lens.probe.compute().values, model.lens.probe.compute().values)
    probe = pickle.loads(pickle.dumps(sl.PerSampleGradientProbe(params="net.proj.weight", ignore_index=3)))
    assert probe.loss_fn.keywords == {"ignore_index": 3}


def test_an_accumulator_reused_for_another_module_names_it_and_takes_its_width():
    # one accumulator moved from module to module (remove, compute, reset, attach again): its spectra
    # all carried the first module's name (Spectrum.source "0" for the rows of "2"), and after reset()
    # the width inferred from the first module's rows refused the next one's ("expected last dim d=8")
    model = _model()
    x = torch.randn(9, 6)
    acc = sl.ActivationCovarianceAccumulator(precision="float64")
    spectra = {}
    for name, width in (("0", 8), ("2", 3)):
        with acc.attach(model, name), torch.no_grad():
            out = model.get_submodule(name)
            rows = []
            handle = out.register_forward_hook(lambda m, a, o: rows.append(o.double()))
            model(x)
            handle.remove()
        spectra[name] = acc.compute()
        assert (spectra[name].source, spectra[name].dim, acc.name) == (name, width, name)
        ref = np.linalg.eigvalsh(np.cov(rows[0].numpy(), rowvar=False))[::-1]
        np.testing.assert_allclose(spectra[name].values, np.clip(ref, 0, None), rtol=1e-9, atol=1e-12 * ref[0])
        acc.reset()
        assert acc.dim is None
    named = sl.ActivationCovarianceAccumulator(8, name="mine")
    with named.attach(model, "0"):
        pass
    with named.attach(model, "0"):
        pass
    named.reset()
    assert (named.name, named.dim) == ("mine", 8)  # a name and a width given by the user are kept


def test_schedule_every_takes_integer_steps_only():
    # Schedule.every(2.5) was accepted and matched the steps that are multiples of 2.5 (0, 5, 10, ...),
    # every("2") failed with "'<' not supported between instances of 'str' and 'int'"
    with pytest.raises(TypeError, match=r"Schedule\.every: k must be an int >= 1; got float 2\.5"):
        sl.Schedule.every(2.5)
    with pytest.raises(TypeError, match=r"Schedule\.every: k must be an int >= 1; got str '2'"):
        sl.Schedule.every("2")
    with pytest.raises(TypeError, match=r"Schedule\.every: start must be an int >= 0; got float 0\.5"):
        sl.Schedule.every(2, start=0.5)
    with pytest.raises(ValueError, match=r"Schedule\.every: k must be >= 1, got 0"):
        sl.Schedule.every(0)
    every = sl.Schedule.every(1e3, start=np.int64(10))  # integral values of other types are what they say
    assert [s for s in range(0, 3100) if s in every] == [10, 1010, 2010, 3010]
    assert type(every.period) is int and type(every.start) is int


def test_measure_takes_whole_numbers_in_any_integral_form():
    # what users pass for step and tokens: NumPy integers, a float token count (1e6), a 0-dim tensor
    lens = _lens(tail_window=(1, 3))
    m = lens.measure(step=np.int64(3), tokens=1e6)
    assert (m.step, m.tokens) == (3, 1_000_000) and type(m.step) is int and type(m.tokens) is int
    m = lens.measure(step=torch.tensor(4), tokens=torch.tensor(2048.0))
    assert (m.step, m.tokens) == (4, 2048)


def test_a_tail_window_wider_than_the_model_is_said_once():
    # the default tail window (100, 200) on a 4-wide layer: alpha_tail was left out of every measurement without a
    # word, and `spectral-lens predict` refused the run only at the end of the sweep
    lens = _lens()
    with pytest.warns(sl.SpectralLensWarning, match=r"tail window \(100, 200\) does not fit act:proj .*hi <= ") as got:
        m = lens.measure(step=0, tokens=0)
    assert "alpha_tail" not in m.summaries["act:proj"] and "rankme" in m.summaries["act:proj"]
    # the example it gives fits (it said "(10, 40) for a small model" whatever the limit it had just named)
    example = re.search(r"hi <= (\d+) \(e\.g\. \((\d+), (\d+)\)\)", str(got[0].message))
    assert example and int(example[3]) <= int(example[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suggested = _lens(tail_window=(int(example[2]), int(example[3])))
        assert "alpha_tail" in suggested.measure(step=0, tokens=0).summaries["act:proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lens.measure(step=1, tokens=1)  # said once per lens
    fitted = _lens(tail_window=(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "alpha_tail" in fitted.measure(step=0, tokens=0).summaries["act:proj"]
