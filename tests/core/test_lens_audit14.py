"""Fourteenth audit of the attaching/measuring API: what a lens detaches, what reaches a capture from a
tensor-parallel or nested output, and which of the user's own hooks the measuring passes run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator, PerSampleGradientProbe, SpectralLens

from support.models import TinyLM, lm_pool

P = "h.2.attn.c_proj.weight"


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyLM(tied=False, dropout=0.0).double().eval()


def _pool():
    return [tuple(t for t in b) for b in lm_pool()]


def test_lens_detach_leaves_a_probe_the_user_attached_bound():
    model, pool = _model(), _pool()
    probe = PerSampleGradientProbe(params=P)
    mine = probe.attach(model)  # the user's own attachment
    lens = SpectralLens(model, pool, probe=probe, layers="h.1", progress=False)
    m1 = lens.measure(0, 0)
    lens.detach()
    assert probe.model is model and mine.active and list(probe.params) == [P]
    probe.reset().update(pool[0])  # still usable on its own
    assert probe.n_samples_ == pool[0][0].shape[0]
    # a lens built without a model, attached and removed by its handle: the same
    lens2 = SpectralLens(pool=pool, probe=probe, layers="h.1", progress=False)
    with lens2.attach(model):
        m2 = lens2.measure(0, 0)
    assert probe.model is model and mine.active
    np.testing.assert_array_equal(m1.spectra[f"grad:{P}"].values, m2.spectra[f"grad:{P}"].values)
    mine.remove()  # the user's handle still unbinds it
    assert probe.model is None


def test_lens_detach_unbinds_the_probes_it_bound_or_built():
    model, pool = _model(), _pool()
    probe = PerSampleGradientProbe(params=P)  # unattached: the lens attaches it, and detaches it
    lens = SpectralLens(model, pool, probe=probe, layers="h.1", progress=False)
    assert probe.model is model
    lens.detach()
    assert probe.model is None
    handle = lens.attach(model)  # bound again by the lens, so unbound again by its handle
    assert probe.model is model
    handle.remove()
    assert probe.model is None and lens.model is None
    built = SpectralLens(model, pool, params=P, layers="h.1", progress=False)
    own = built.probe
    built.detach()
    assert own.model is None


class _Jagged(nn.Module):
    """A layer run on a jagged batch (torch.nested): sequences of 2, 5 and 3 tokens, width 6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(6, 6).double()

    def forward(self, x):  # x: (3, 5, 6) padded; lengths fixed below
        seqs = [x[0, :2], x[1, :5], x[2, :3]]
        return torch.nested.nested_tensor([self.lin(s) for s in seqs], layout=torch.jagged)


def _jagged_rows(model, x):
    with torch.no_grad():
        return torch.cat([model.lin(s) for s in (x[0, :2], x[1, :5], x[2, :3])]).numpy()


def _reference(rows):
    return np.linalg.eigvalsh(np.cov(rows.T))[::-1]


def _jagged_pads() -> bool:
    """Whether this torch pads a jagged nested tensor: torch 2.4's has no ``to_padded_tensor`` for the jagged
    layout (``NotImplementedError: aten.to_padded_tensor.default``; tools/check_floors.sh), later ones do."""
    try:
        torch.nested.nested_tensor([torch.zeros(1, 2)], layout=torch.jagged).to_padded_tensor(0.0)
    except NotImplementedError:
        return False
    return True


def test_a_nested_output_is_refused_naming_the_module_and_its_remedies_measure_it():
    model = nn.Sequential(_Jagged())
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3 + 1
    with sl.attach(model, "0") as capture, torch.no_grad():
        with pytest.raises(TypeError, match=r"^0: the module output is a nested tensor \(torch.jagged, ragged\).*"
                                            r"pick=lambda out: torch.cat\(out.unbind\(\)\) for the valid rows alone.*to_padded_tensor\(0.0, "
                                            r"\(N, T, d\)\) padded to the input's length, with a mask"):
            model(x)
        assert capture.accumulators["0"].n_rows == 0
    with pytest.raises(TypeError, match=r"^ActivationCovarianceAccumulator: the input is a nested tensor.*"
                                        r"update\(torch.cat\(x.unbind\(\)\)\).*update\(x.to_padded_tensor\(0.0, \(N, T, d\)\), "
                                        r"mask=valid_positions\)"):
        with torch.no_grad():
            ActivationCovarianceAccumulator().update(model(x))
    want = _reference(_jagged_rows(model[0], x))
    lengths = torch.tensor([2, 5, 3])
    valid = torch.arange(5)[None, :] < lengths[:, None]
    # the remedies the error names: the jagged rows alone, or the padded tensor with its mask
    with sl.attach(model, "0", pick=lambda out: torch.cat(out.unbind()), precision="float64") as a, torch.no_grad():
        model(x)
    captures = [a]
    if _jagged_pads():  # torch 2.4: only the jagged rows alone (docs/guide-attach.md)
        padded = sl.attach(model, "0", pick=lambda out: out.to_padded_tensor(0.0), precision="float64")
        with padded, padded.mask(valid), torch.no_grad():
            model(x)
        captures.append(padded)
    for capture in captures:
        got = capture.compute()["0"]
        assert got.n_rows == 10
        np.testing.assert_allclose(got.values.numpy(), want, rtol=1e-10, atol=1e-12 * want[0])
    # the lens: the same error through its activation pass, the model left as it was
    lens = SpectralLens(model, [x], layers="0", params=(), mask_fn=None, progress=False)
    with pytest.raises(TypeError, match="^0: the module output is a nested tensor"):
        lens.measure(0, 0)
    assert not model[0]._forward_hooks
    if not _jagged_pads():
        return
    lens = SpectralLens(model, [x], layers="0", params=(), mask_fn=lambda b: valid, progress=False,
                        pick=lambda out: out.to_padded_tensor(0.0))
    got = lens.measure(0, 0).spectra["act:0"]
    np.testing.assert_allclose(got.values.numpy(), want, rtol=1e-10, atol=1e-12 * want[0])


def test_which_of_the_users_own_hooks_each_measuring_pass_runs():
    """What docs/lens.md ("Your own hooks run in the measurement") says, counted on one module."""
    model, pool = _model(), _pool()
    counts: dict[str, int] = {}

    def count(what):
        return lambda *args: counts.__setitem__(what, counts.get(what, 0) + 1)

    mod = model.h[2].attn.c_proj
    hooks = [mod.register_forward_pre_hook(count("forward_pre")), mod.register_forward_hook(count("forward")),
             mod.register_full_backward_pre_hook(count("backward_pre")), mod.register_full_backward_hook(count("backward")),
             mod.weight.register_hook(count("param")), mod.weight.register_post_accumulate_grad_hook(count("post_accumulate"))]
    lens = SpectralLens(model, pool, layers="h.1", params=P, progress=False)
    lens.activation_spectra()
    assert counts == {"forward_pre": len(pool), "forward": len(pool)}  # one forward per batch, no backward
    counts.clear()
    grads = {n: p.grad for n, p in model.named_parameters()}
    lens.gradient_spectra()
    assert counts["forward_pre"] == counts["forward"] >= 1
    assert set(counts) == {"forward_pre", "forward"}  # module backward and parameter hooks switched off;
    # post-accumulate hooks never reached (no .grad is written)
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    counts.clear()
    model(pool[0][0]).sum().backward()  # the training pass runs every hook once, as before
    assert counts == dict.fromkeys(["forward_pre", "forward", "backward_pre", "backward", "param", "post_accumulate"], 1)
    for h in hooks:
        h.remove()


def test_opacus_grad_sample_module_measured_without_switching_its_hooks_off():
    """What docs/lens.md says for Opacus: in eval mode (the default) a measurement of a GradSampleModule's model
    needs no switch (before, Opacus's backward hook failed inside it: ``IndexError: pop from empty list``); it
    leaves every p.grad_sample as it was, and the next private step computes what it would have without it.
    The workaround for ``train_mode=True`` (disable_hooks around measure) still works."""
    opacus = pytest.importorskip("opacus")
    import torch.nn.functional as F

    (model, twin), pool = (_model(), _model()), _pool()
    gsm, gsm_twin = opacus.GradSampleModule(model.train()), opacus.GradSampleModule(twin.train())
    x, y = pool[0]

    def private_step(g):
        F.cross_entropy(g(x).flatten(0, 1), y.flatten()).backward()

    private_step(gsm)
    before = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    lens = SpectralLens(model, pool, layers="h.1", params=P, progress=False)
    m = lens.measure(0, 0)
    assert m.spectra[f"grad:{P}"].n_rows == sum(b[0].shape[0] for b in pool)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad_sample, before[n]), n
    assert not any(getattr(mod, "activations", None) for mod in model.modules())
    private_step(gsm)  # the next private step, against a twin that was never measured
    private_step(gsm_twin)
    private_step(gsm_twin)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert isinstance(p.grad_sample, list) and len(p.grad_sample) == len(q.grad_sample) == 2, n  # one per step
        assert all(torch.equal(a, b) for a, b in zip(p.grad_sample, q.grad_sample)), n
    gsm.disable_hooks()
    try:
        m2 = lens.measure(0, 0)
    finally:
        gsm.enable_hooks()
    np.testing.assert_array_equal(m.spectra[f"grad:{P}"].values, m2.spectra[f"grad:{P}"].values)
    activations_only = SpectralLens(model, pool, layers="h.1", params=(), progress=False)
    activations_only.measure(0, 0)  # no switch needed: Opacus's hooks do nothing under no_grad
