"""Review 27 (probeguard): a probe in its default (all rows resident) mode warns once when the model's weights are
written in place between two ``update`` calls (an optimizer step without ``reset()``: the spectrum would mix
checkpoints), with :class:`~spectral_lens.MixedWeightsWarning`, and never where ``_version`` moves without the
user changing the weights (the probe's own passes, ``model.to`` the same device, tied weights, ``torch.compile``,
a training forward/backward without a step, the lens, which resets per measurement)."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.per_sample import MLP_KW, mlp_batches, mlp_model, no_mixed_weights_warning
from torch import nn

import spectral_lens as sl
from spectral_lens import MixedWeightsWarning, PerSampleGradientProbe

pytestmark = [pytest.mark.filterwarnings("error::spectral_lens.MixedWeightsWarning"),  # any false one fails a test
              pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")]


def _step(model, batch, opt):
    x, y = batch
    opt.zero_grad()
    ((model(x) - y) ** 2).sum().backward()
    opt.step()


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam_foreach", "adamw_fused"])
def test_an_optimizer_step_between_updates_warns_once_naming_the_parameters(engine, optimizer):
    model = mlp_model()
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1),
            "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
            "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)}[optimizer]
    try:
        opt = make(model.parameters())
    except RuntimeError as e:  # fused on CPU needs a recent torch
        pytest.skip(str(e))
    b1, b2 = mlp_batches()
    probe = PerSampleGradientProbe(model, engine=engine, **MLP_KW)
    probe.update(b1)
    _step(model, b1, opt)
    with pytest.warns(MixedWeightsWarning) as got:
        probe.update(b2)
    (w,) = got
    text = str(w.message)
    assert "'2.weight'" in text and "'0.bias'" in text and "reset()" in text and "SpectralLens.measure" in text
    assert "5 samples" in text and w.filename == __file__  # points at the caller's update
    assert probe.n_samples_ == 10  # a warning: the samples are taken
    _step(model, b2, opt)
    probe.update(b1)  # once per accumulation: no second warning (the filter makes one an error)
    probe.reset()
    probe.update(b1)
    _step(model, b1, opt)
    with pytest.warns(MixedWeightsWarning):  # armed again by reset()
        probe.update(b2)


def test_accumulating_across_steps_on_purpose_filters_the_category():
    model, (b1, b2) = mlp_model(), mlp_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    _step(model, b1, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=MixedWeightsWarning)
        probe.update(b2)
    assert probe.n_samples_ == 10


def test_a_write_that_is_turned_into_an_error_leaves_the_probe_as_before():
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    with pytest.raises(MixedWeightsWarning, match=r"1 parameter\(s\): '0.weight'"):
        probe.update(b2)
    assert probe.n_samples_ == 5


def test_load_state_dict_is_a_change_of_weights():
    """``load_state_dict`` copies in place: new values in general, so it warns (also with the same values)."""
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    model.load_state_dict(mlp_model().state_dict())
    with pytest.warns(MixedWeightsWarning):
        probe.update(b2)


def test_bounded_memory_mode_still_raises():
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, max_resident_samples=5, chunk_size=5, **MLP_KW)
    probe.update(b1)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="bounded-memory mode"):
        probe.update(b2)


def _updates_without_a_weight_change(probe, model, batches):
    for b in batches:
        probe.update(b)
    return probe.compute()


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_no_warning_where_versions_move_without_a_weight_change(engine):
    model, (b1, b2) = mlp_model(), mlp_batches()
    probe = PerSampleGradientProbe(model, engine=engine, train_mode=True, **MLP_KW)
    probe.update(b1)
    model.to("cpu")  # the same device: no copy
    model.to(torch.float64)
    model.train().eval()
    model.zero_grad()
    ((model(b1[0]) - b1[1]) ** 2).sum().backward()  # a training forward/backward, no step (gradient accumulation)
    model.requires_grad_(False).requires_grad_(True)
    probe.update(b2)
    probe.update(b1)
    assert probe.n_samples_ == 15


def test_no_warning_with_tied_weights_and_a_renormalizing_embedding():
    """A weight shared by two modules (counted once), and ``nn.Embedding(max_norm=...)`` whose forward renormalizes
    its weight in place (the probe's passes write it, and restore it: re-read after the pass)."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8, max_norm=0.5)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    model = Tied().double()
    ids = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(3))
    for engine in ("fast", "auto", "loop"):  # auto: the loop (vmap cannot trace the renormalization)
        probe = PerSampleGradientProbe(model, "mid.weight", engine=engine)
        with no_mixed_weights_warning():
            probe.update(ids[:3])
            probe.update(ids[3:])
        assert probe.n_samples_ == 6 and probe.compute().values.numel() > 0


def test_no_warning_through_torch_compile():
    model, (b1, b2) = mlp_model(), mlp_batches()
    compiled = torch.compile(model, backend="eager")
    probe = PerSampleGradientProbe(compiled, **MLP_KW)
    probe.update(b1)
    compiled(b1[0])
    probe.update(b2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(compiled, b1, opt)
    with pytest.warns(MixedWeightsWarning):
        probe.update(b1)


def test_a_non_probed_inference_tensor_parameter_does_not_break_the_check():
    """An inference tensor has no version counter (reading it raises): counted as unchanged."""
    model = mlp_model()
    with torch.inference_mode():
        frozen = nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    model.register_parameter("frozen", frozen)
    b1, b2 = mlp_batches()
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    probe.update(b2)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    with pytest.warns(MixedWeightsWarning, match="'2.weight'"):
        probe.update(b1)


def test_the_lens_measures_across_optimizer_steps_without_a_warning():
    """``SpectralLens.measure`` resets its probe for every measurement."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 16)).double()
    pool = [torch.randint(0, 16, (3, 6), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    lens = sl.SpectralLens(model, pool, layers="1", params="1.weight", forward_fn=lambda m, b: m(b))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        lens.measure(step, step)
        opt.zero_grad()
        model(pool[0]).logsumexp(-1).mean().backward()
        opt.step()
    assert len(lens.history) == 3


@pytest.mark.parametrize("bounded", [None, 5], ids=["default", "bounded_memory"])
def test_a_fused_optimizer_step_is_seen_though_it_moves_no_version_counter(bounded):
    """``AdamW(fused=True)`` writes the weights without moving ``_version``: counted by the optimizer step hook, in
    both modes (bounded-memory mode checked only the counters, and recomputed with the new weights)."""
    model, (b1, b2) = mlp_model(), mlp_batches()
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    except RuntimeError as e:
        pytest.skip(str(e))
    version = model[2].weight._version
    probe = PerSampleGradientProbe(model, max_resident_samples=bounded, chunk_size=5, **MLP_KW)
    probe.update(b1)
    _step(model, b1, opt)
    if bounded is None:
        with pytest.warns(MixedWeightsWarning, match="'2.weight'"):
            probe.update(b2)
    else:
        with pytest.raises(RuntimeError, match="bounded-memory mode"):
            probe.update(b2)
    assert model[2].weight._version == version  # what the counters alone could not see


def test_an_optimizer_of_other_tensors_is_not_a_change():
    model, (b1, b2) = mlp_model(), mlp_batches()
    other = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([other], lr=0.1, fused=True)
    probe = PerSampleGradientProbe(model, **MLP_KW)
    probe.update(b1)
    other.sum().backward()
    opt.step()
    with no_mixed_weights_warning():
        probe.update(b2)
    assert probe.n_samples_ == 10
