"""Attached measurement against the user's module and process state: hooks called from several
threads, copies and pickles of a hooked model."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens import attach

from support.data import rows_with_spectrum


def test_hook_called_from_threads_loses_no_rows():
    # nn.DataParallel runs its replicas (which share the hooks) in threads; so may a user's own
    # thread pool. Each forward's update must land whole: exact count, float64-exact covariance.
    rng = np.random.default_rng(3)
    d, per, n_threads, per_thread = 48, 16, 4, 60
    rows = rows_with_spectrum(n_threads * per_thread * per, np.arange(1, d + 1) ** -1.0, 50.0, rng)
    chunks = list(torch.from_numpy(rows).split(per))
    model = nn.Sequential(nn.Identity())
    start = threading.Barrier(n_threads)

    def work(part):
        start.wait()
        with torch.no_grad():
            for x in part:
                model(x)

    with attach(model, "0") as capture:
        threads = [threading.Thread(target=work, args=(chunks[i::n_threads],)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    acc = capture.accumulators["0"]
    assert acc.n_rows == rows.shape[0]
    ref = np.cov(rows, rowvar=False)
    np.testing.assert_allclose(acc.covariance().numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_deepcopy_of_hooked_model_is_not_measured():
    # EMA / evaluation copies (copy.deepcopy, torch.optim.swa_utils.AveragedModel) take the hook
    # dictionaries along; their forwards must not add rows to the original's accumulator.

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 6) * 3 + 2
    with torch.no_grad():
        ref, expected = model[0](x).double().numpy(), model(x)
    with attach(model, "0") as capture, torch.no_grad():
        model(x)
        ema, averaged = copy.deepcopy(model), AveragedModel(model)
        for _ in range(3):
            out = ema(x)
            averaged(x)
        acc = capture.accumulators["0"]
        assert acc.n_rows == 5
        np.testing.assert_allclose(acc.covariance().numpy(), np.cov(ref, rowvar=False), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the copy computes what the model does
        model(x)
    assert not model[0]._forward_hooks
    with torch.no_grad():
        ema(x)
    assert acc.n_rows == 10  # 5 (first) + 5 (the model's own last forward), none from the copies


def test_torch_save_of_hooked_model():
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    x = torch.randn(4, 6)
    with attach(model, "*") as capture:
        buf = io.BytesIO()
        torch.save(model, buf)  # whole-module pickling: was "Can't pickle local object"
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert all(acc.n_rows == 4 for acc in capture.accumulators.values())


def _gram_eigs64(model: nn.Module, x: torch.Tensor, param: str) -> np.ndarray:
    m64 = copy.deepcopy(model).double()
    p = m64.get_parameter(param)
    rows = [torch.autograd.grad(m64(x[i : i + 1].double()).pow(2).mean(-1).sum(), [p])[0].flatten() for i in range(len(x))]
    g = torch.stack(rows)
    return np.linalg.eigvalsh((g @ g.T).numpy())[::-1]


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_probe_follows_replaced_parameters(engine):
    # load_state_dict(assign=True), `module.weight = nn.Parameter(...)`, a replaced module: the probe
    # must measure the weights the model computes with. It read the stale tensors: vmap 76% off,
    # loop all-zero gradients.
    from spectral_lens import PerSampleGradientProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 6) * 2 + 1
    probe = PerSampleGradientProbe(model, params="2.weight", loss_fn=lambda out, b: out.pow(2).mean(-1),
                                   forward_fn=lambda m, b: m(b), engine=engine, chunk_size=4)
    model.load_state_dict({k: v * 3 for k, v in model.state_dict().items()}, assign=True)
    probe.update(x)
    np.testing.assert_allclose(probe.compute().values[:6], _gram_eigs64(model, x, "2.weight")[:6], rtol=1e-5)
    probe.reset()
    model[2] = nn.Linear(6, 3)  # a new module at the probed name
    probe.update(x)
    np.testing.assert_allclose(probe.compute().values[:6], _gram_eigs64(model, x, "2.weight")[:6], rtol=1e-5)
    assert probe.params["2.weight"] is model[2].weight
    model[2] = nn.Linear(6, 4)  # a new shape with samples taken: a clear error, the probe unchanged
    with pytest.raises(ValueError, match=r"'2\.weight' was replaced .* shape changed from \(3, 6\) to \(4, 6\)"):
        probe.update(x)
    assert probe.n_samples_ == 8


@pytest.mark.parametrize("engine", ["fast", "vmap"])
def test_a_user_capture_is_not_fed_by_measurements(engine):
    # A capture the user keeps attached (training activations) must not receive the lens's
    # held-out forwards or the probe's passes; under vmap the probe crashed in its hook instead
    # ("Cannot access data pointer of Tensor that doesn't have storage").
    from spectral_lens import PerSampleGradientProbe, SpectralLens

    from support.models import TinyLM, lm_pool

    torch.manual_seed(0)
    model, pool = TinyLM(dropout=0.0), lm_pool()
    alone = SpectralLens(copy.deepcopy(model), pool, layers="h.1", params="h.2.attn.c_proj.weight",
                         progress=False).measure(0, 0)
    with attach(model, ["h.1", "h.2"]) as user:
        with torch.no_grad():
            model(pool[0][0])
        before = {k: a.covariance() for k, a in user.accumulators.items()}
        probe = PerSampleGradientProbe(params="h.2.attn.c_proj.weight", engine=engine)
        lens = SpectralLens(model, pool, layers="h.1", probe=probe, progress=False)
        m = lens.measure(0, 0)
        probe.update(pool[1])
        for name, acc in user.accumulators.items():
            assert acc.n_rows == 48
            torch.testing.assert_close(acc.covariance(), before[name], rtol=0, atol=0)
    for key, spectrum in alone.spectra.items():
        np.testing.assert_allclose(m.spectra[key].values, spectrum.values, rtol=1e-6, atol=1e-12)


def test_probe_refuses_a_replacement_it_cannot_follow():
    from spectral_lens import PerSampleGradientProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, 6)
    kw = dict(params="2.weight", loss_fn=lambda out, b: out.pow(2).mean(-1), forward_fn=lambda m, b: m(b), chunk_size=2)
    bounded = PerSampleGradientProbe(model, max_resident_samples=2, **kw)
    bounded.update(x[:6])  # one resident chunk, two recomputed ones
    model[2].weight = nn.Parameter(model[2].weight.detach() * 2)  # same shape: recomputation would mix the two
    with pytest.raises(RuntimeError, match=r"'2\.weight' was replaced .* bounded-memory mode"):
        bounded.compute()
    with pytest.raises(RuntimeError, match=r"'2\.weight' was replaced .* bounded-memory mode"):
        bounded.update(x[6:])
    probe = PerSampleGradientProbe(model, **kw)
    del model[2].weight
    model[2].weight = torch.ones(3, 6)  # a plain tensor attribute, no longer a parameter
    with pytest.raises(ValueError, match=r"'2\.weight' is no longer a parameter of Sequential \(found Tensor\)"):
        probe.update(x)


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_probe_with_a_user_hook_changing_the_probed_modules_output(engine):
    # The fast engine's hook ran after the user's: it took the hooked output for the weight's own,
    # and its gradient missed the hook's transformation (75% off for x2, 108% for tanh).
    from spectral_lens import PerSampleGradientProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    handle = model[2].register_forward_hook(lambda mod, args, out: torch.tanh(2 * out))
    x = torch.randn(8, 6) * 2
    with torch.no_grad():
        before = model(x)
    probe = PerSampleGradientProbe(model, params="2.weight", loss_fn=lambda out, b: out.pow(2).mean(-1),
                                   forward_fn=lambda m, b: m(b), engine=engine, chunk_size=4)
    probe.update(x)
    np.testing.assert_allclose(probe.compute().values[:6], _gram_eigs64(model, x, "2.weight")[:6], rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert list(model[2]._forward_hooks.values()) and len(model[2]._forward_hooks) == 1
    handle.remove()
