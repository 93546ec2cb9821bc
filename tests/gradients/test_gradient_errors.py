"""Bad input gets a clear error naming what was wrong."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_lens import ZeroGradientWarning
import torch
from torch import nn

from spectral_lens import NonFiniteError
from spectral_lens.gradients import NoGradientPathError, PerSampleGradientProbe, default_gradient_param
from spectral_lens.gradients.probe import finite_rows


def test_unknown_parameter_lists_close_names(gpt):
    with pytest.raises(ValueError, match=r"no parameter 'transformer.h.1.attn.c_prj.weight'.*c_proj") as err:
        PerSampleGradientProbe(gpt(), "transformer.h.1.attn.c_prj.weight")
    assert "transformer.h.1.attn.c_proj.weight" in str(err.value)
    with pytest.raises(ValueError, match="no parameter"):
        PerSampleGradientProbe(gpt(), "blocks.*.nothing")
    with pytest.raises(TypeError, match="dotted parameter names"):
        PerSampleGradientProbe(gpt(), [3])


def test_default_param_heuristic(gpt):
    assert default_gradient_param(gpt()) == "transformer.h.1.attn.c_proj.weight"

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Module() for _ in range(11))
            for layer in self.layers:
                layer.self_attn = nn.Module()
                layer.self_attn.o_proj = nn.Linear(4, 4, bias=False)
            self.layers[10].mlp = nn.Linear(4, 4)

    assert default_gradient_param(Llama()) == "layers.10.self_attn.o_proj.weight"  # 10 > 9 numerically

    class CrossAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([nn.Module()])
            self.h[0].attn = nn.Module()
            self.h[0].attn.out_proj = nn.Linear(2, 2)
            self.h[0].cross = nn.Module()
            self.h[0].cross.out_proj = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"ambiguous.*h\.0\.attn\.out_proj\.weight.*h\.0\.cross\.out_proj\.weight"):
        default_gradient_param(CrossAttn())
    with pytest.raises(ValueError, match=r"no attention output projection.*\['0.weight'\]"):
        PerSampleGradientProbe(nn.Sequential(nn.Linear(3, 3)))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.side = nn.Linear(4, 4)  # called, but its output never reaches the loss
        self.ln = nn.LayerNorm(4)  # never called

    def forward(self, x):
        self.side(x)
        return self.used(x)


def _ce(out, batch):
    return nn.functional.cross_entropy(out, batch[1], reduction="none")


def test_no_gradient_path():
    torch.manual_seed(0)
    model = Unused().double()
    batch = (torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))
    with pytest.raises(NoGradientPathError, match=r"side\.weight.*does not reach the loss"):
        PerSampleGradientProbe(model, "side.weight", loss_fn=_ce).update(batch)
    for name, engine in [("side.weight", "vmap"), ("ln.weight", "auto"), ("ln.weight", "loop")]:
        probe = PerSampleGradientProbe(model, name, loss_fn=_ce, engine=engine).update(batch)
        with pytest.warns(ZeroGradientWarning, match=rf"{name}: all 4 per-sample gradients are exactly zero"):
            spectrum = probe.compute()
        assert not bool(spectrum.values.any())


def test_needs_two_samples(gpt, helpers):
    probe = PerSampleGradientProbe(gpt())
    with pytest.raises(ValueError, match="at least 2 samples"):
        probe.compute()
    probe.update(helpers.lm_batch(m=1))
    for call in (probe.compute, probe.noise_scale, probe.gram):
        with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
            call()
    assert len(probe.update(helpers.lm_batch(m=1, seed=1)).compute()) == 2


def test_non_finite_losses_name_the_sample(gpt, helpers):
    model = gpt()
    x, y = helpers.lm_batch(m=5)
    y[3] = -100  # no valid target: 0/0
    probe = PerSampleGradientProbe(model, chunk_size=2)
    probe.update(helpers.lm_batch(m=2, seed=9))
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[5\].*transformer.h.1.attn.c_proj.weight.*ignore_index"):
        probe.update((x, y))
    assert probe.n_samples_ == 2  # rolled back

    def inf_loss(out, batch):
        losses = nn.functional.cross_entropy(out.transpose(1, 2), batch[1], reduction="none").mean(1)
        return losses * torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0][: losses.shape[0]], dtype=losses.dtype)

    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[1\]"):
        PerSampleGradientProbe(model, loss_fn=inf_loss).update(helpers.lm_batch(m=5))


def test_non_finite_gradient_names_parameter(gpt, helpers):
    model = gpt()

    def loss_fn(out, batch):  # finite value, infinite gradient for sample 2
        losses = nn.functional.cross_entropy(out.transpose(1, 2), batch[1], reduction="none").mean(1)
        bad = losses[2:3] + (losses[2:3] - losses[2:3].detach()).abs().sqrt()  # d sqrt(|0|): NaN
        return torch.cat([losses[:2], bad, losses[3:]])

    name = "transformer.h.1.attn.c_proj.weight"
    with pytest.raises(NonFiniteError, match=rf"{name}: non-finite per-sample gradient for sample\(s\) \[2\]"):
        PerSampleGradientProbe(model, name, loss_fn=loss_fn).update(helpers.lm_batch(m=4))


def test_an_overflowing_gram_matrix_names_the_parameters_and_the_huge_weight():
    """A float64 model with a weight of 1e160 has finite losses and per-sample gradients, but their
    Gram matrix overflows: compute() failed inside the eigen-solve with "the 6 x 6 matrix has NaN/Inf
    entries" and noise_scale() with "the Gram matrix holds NaN/Inf", naming no parameter and no cause.
    Now a NonFiniteError naming the parameters, what was finite, the largest weight and the remedy.
    A NaN weight is refused at update(), by its non-finite losses, naming the parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)).double()
    with torch.no_grad():
        model[1].weight[0, 3] = 1e160
    names = ["0.weight", "1.weight"]
    probe = PerSampleGradientProbe(model, names, forward_fn=lambda m, b: m(b), loss_fn=lambda out, b: out.squeeze(-1))
    probe.update(torch.randn(6, 4, dtype=torch.float64))
    assert not torch.isfinite(probe.gram("0.weight")).all()  # the case: 1e160-sized gradients, squares overflow
    for call in (probe.compute, probe.noise_scale):
        with pytest.raises(NonFiniteError, match=r"Gram matrix of \['0.weight'\] holds NaN/Inf: the 6 losses and "
                           r"per-sample gradients were finite.*largest \|weight\| in the model is 1e\+160 "
                           r"\(1.weight\).*scale the loss down"):
            call()
    assert probe.n_samples_ == 6
    with torch.no_grad():
        model[1].weight[0, 3] = math.nan
    with pytest.raises(NonFiniteError, match=r"non-finite per-sample loss .*\['0.weight', '1.weight'\]"):
        PerSampleGradientProbe(model, names, forward_fn=lambda m, b: m(b),
                               loss_fn=lambda out, b: out.squeeze(-1)).update(torch.randn(6, 4, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    p=st.integers(0, 50),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    bad=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 49), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=4),
    huge=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_rows_is_isfinite_all(n, p, dtype, bad, huge, seed):
    """The probe's row check (a row maximum and minimum) flags exactly the rows with a NaN or an
    infinity, also next to the largest finite values (whose sums would overflow)."""
    rows = torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = (rows * (torch.finfo(dtype).max if huge else 1.0)).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    rows = rows.to(dtype)
    for i, j, v in bad:
        if i < n and j < p:
            rows[i, j] = v
    assert torch.equal(finite_rows(rows), rows.isfinite().all(1))


def test_bad_configuration_and_batches(gpt, helpers):
    model = gpt()
    with pytest.raises(ValueError, match="engine must be one of"):
        PerSampleGradientProbe(model, engine="opacus")
    with pytest.raises(ValueError, match="chunk_size"):
        PerSampleGradientProbe(model, chunk_size=0)
    with pytest.raises(ValueError, match="keep_matrix"):
        PerSampleGradientProbe(model, keep_matrix=True, max_resident_samples=4)
    with pytest.raises(ValueError, match="engine='fast' impossible for transformer.ln_f.weight"):
        PerSampleGradientProbe(model, "transformer.ln_f.weight", engine="fast")
    x, y = helpers.lm_batch(m=4)
    probe = PerSampleGradientProbe(model)
    with pytest.raises(ValueError, match="share dimension 0"):
        probe.update((x, y[:3]))
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(\)"):
        PerSampleGradientProbe(model, loss_fn=lambda out, b: out.sum()).update((x, y))
    with pytest.raises(RuntimeError, match="keep_matrix=True"):
        probe.matrix()
    with pytest.raises(KeyError, match="not probed"):
        probe.gram("lm_head.weight")
    # inside torch.inference_mode() the probe measures, as inside no_grad (tests/gradients/test_audit15_user_state.py);
    # a model built inside it has inference-tensor parameters, which cannot be differentiated: a clear error
    with torch.inference_mode():
        built_inside = helpers.TinyGPT()
    with pytest.raises(RuntimeError, match=r"inference tensors \(the model was built"):
        PerSampleGradientProbe(built_inside).update((x, y))
    assert probe.n_samples_ == 0


def test_bounded_mode_refuses_a_changed_model(gpt, helpers):
    model = gpt()
    probe = PerSampleGradientProbe(model, chunk_size=2, max_resident_samples=2)
    probe.update(helpers.lm_batch(m=6))  # chunks 2 and 3 are recomputed against each other
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="modified in place since the first update"):
        probe.compute()
    assert probe.reset().update(helpers.lm_batch(m=6)).compute().n_rows == 6
