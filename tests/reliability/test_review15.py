"""Review of the day's behaviour changes (parameter hooks around each autograd.grad, measuring inside
torch.inference_mode, parametrize.cached suspended, callbacks holding the trainer weakly, TorchScript and
shared-block errors): the cases that broke them, and the ones that held."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import spectral_lens as sl
from spectral_lens import PerSampleGradientProbe
from spectral_lens.capture import measurement_pass

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.models import Block, TinyGPT, TinyLM, lm_batch, lm_pool  # noqa: E402

W_O = "transformer.h.1.attn.c_proj.weight"


# ---------------------------------------------------------------- 2. measuring inside torch.inference_mode()

def test_spectra_measured_inside_inference_mode_are_normal_tensors():
    """A lens measured in an evaluation loop's ``torch.inference_mode()`` returned spectra whose values were
    inference tensors: kept in ``lens.history``, they could not be written in place later
    (``values.clamp_min_(0)``, which the Spectrum's own error message suggests) nor saved for a backward
    (fitting a power law with autograd), both of which work on a spectrum measured outside."""
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    lens = sl.SpectralLens(model, lm_pool(), params="h.2.attn.c_proj.weight", progress=False)
    with torch.inference_mode():
        inside = lens.measure(0, 0)
    outside = lens.measure(1, 1)
    assert set(inside.spectra) == {"act:h.2", "grad:h.2.attn.c_proj.weight"}
    for name, spec in inside.spectra.items():
        assert not spec.values.is_inference(), name  # before: True for both
        torch.testing.assert_close(spec.values, outside.spectra[name].values, rtol=1e-12, atol=0)
        slope = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        (slope * spec.values.clamp_min(1e-30).log()).sum().backward()  # before: "cannot be saved for backward"
        spec.values.clamp_min_(0)  # before: "Inplace update to inference tensor outside InferenceMode"
    # an activation capture's and a probe's compute() inside inference mode, and a Spectrum built there
    with torch.inference_mode():
        made = sl.Spectrum(values=torch.tensor([2.0, 1.0]), n_rows=3, dim=2)
    assert not made.values.is_inference()


# ---------------------------------------------------------------- 5. TorchScript: traced modules take hooks

class _WithTraced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.jit.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_traced_submodule_is_measured_not_refused_as_scripted():
    """``torch.jit.trace`` returns a ``ScriptModule`` that, unlike a ``torch.jit.script`` one, takes forward hooks
    (they fire when an eager parent calls it): the new TorchScript refusal turned its measurement, which
    worked before, into a ValueError saying it was scripted."""
    torch.manual_seed(0)
    model = _WithTraced()
    x = torch.randn(16, 4)
    cap = sl.attach(model, "a")  # before: ValueError "module 'a' is a TorchScript module"
    try:
        with torch.no_grad():
            model(x)
        got = cap.compute()["a"].values
    finally:
        cap.remove()
    with torch.no_grad():
        h = model.a(x).double()
    ref = torch.linalg.eigvalsh(torch.cov(h.T)).flip(0).clamp_min(0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)  # float32 rows
    # and through the lens, with a probe on the eager head
    y = torch.randint(0, 3, (16,))
    probe = PerSampleGradientProbe(params="b.weight", forward_fn=lambda m, b: m(b[0]),
                                   loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    lens = sl.SpectralLens(model, [(x, y)], layers="a", probe=probe, forward_fn=lambda m, b: m(b[0]),
                           mask_fn=None, progress=False)
    assert set(lens.measure(0, 0).spectra) == {"act:a", "grad:b.weight"}


def test_a_scripted_submodule_is_still_refused_by_name():
    model = _WithTraced()
    model.a = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match=r"module 'a' is a TorchScript module"):
        sl.attach(model, "a")


# ---------------------------------------------------------------- 5. a block registered under several names

class _Looped(nn.Module):
    """A weight-shared (universal) transformer: one block registered three times in ``h``."""

    def __init__(self, vocab: int = 64, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([Block(d, 2, 0.0)] * depth)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("engine", ["vmap", "auto"])
def test_the_vmap_engine_leaves_a_shared_blocks_weight_a_parameter(engine):
    """``torch.func.functional_call`` swaps a tied name once per alias and, for one module object registered
    under several names, restores the wrong one: after a ``vmap`` pass the shared block's probed weight was the
    engine's detached copy (a plain tensor, no longer the optimizer's parameter), so training stopped updating
    it and the probe's next update raised "no longer a parameter". Naming the block's first name (``h.0``)
    must work: rows equal the ``loop`` engine's (the gradient summed over the block's three calls)."""
    torch.manual_seed(0)
    model = _Looped()
    name = "h.0.attn.c_proj.weight"
    weight = model.h[0].attn.c_proj.weight
    state = copy.deepcopy(model.state_dict())
    pool = lm_pool(n_batches=2, batch=3, t=8)
    probe = PerSampleGradientProbe(model, name, engine=engine, keep_matrix=True)
    loop = PerSampleGradientProbe(copy.deepcopy(model), name, engine="loop", keep_matrix=True)
    for batch in pool:
        probe.update(batch)  # before: the second update raised ValueError "no longer a parameter (found Tensor)"
        loop.update(batch)
        assert model.h[2].attn.c_proj._parameters["weight"] is weight  # before: the detached copy
        assert isinstance(model.h[0].attn.c_proj.weight, nn.Parameter)
    assert probe.engines_[name] == "vmap"
    torch.testing.assert_close(probe.matrix(), loop.matrix(), rtol=1e-4, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the lens on the first name of the shared block
    lens = sl.SpectralLens(model, pool, layers="h.0", params=name, progress=False)
    m = lens.measure(0, 0)
    assert set(m.spectra) == {"act:h.0", f"grad:{name}"}
    assert m.spectra["act:h.0"].n_rows == 3 * 2 * 3 * 8  # every call of the shared block: 3 per forward
    assert model.h[1].attn.c_proj._parameters["weight"] is weight


# ---------------------------------------------------------------- 4. the HF callback on a second Trainer

def _lens_logs(trainer) -> list[int]:
    """The steps of the measurements' logs (not of a validation loss kept at a measured step, logged alone)."""
    return [h["step"] for h in trainer.state.log_history
            if any(k.startswith("spectral_lens/") and k != "spectral_lens/val_loss" for k in h)]


def test_an_attached_callback_reused_on_another_trainer_logs_there_not_into_the_first(tmp_path):
    """A callback attached to one trainer and then added to a second (``add_callback``) sent the second run's
    scalars through the first trainer's ``log`` (its ``log_history`` and its ``report_to`` loggers) as long as
    the user kept the first trainer; it must log into the running trainer's state, as a plain callback does.
    The first trainer keeps working: ``evaluate()`` after ``train()`` and a second ``train()`` still log there."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    from test_hf_trainer import heldout_pool, tiny_gpt2, trainer_for

    from spectral_lens.integrations import SpectralLensCallback

    lens = sl.SpectralLens(pool=heldout_pool(), params=(), schedule=sl.Schedule.every(2), progress=False)
    first = trainer_for(tiny_gpt2(), tmp_path / "a", max_steps=2)
    cb = SpectralLensCallback(lens, on_evaluate=True).attach(first)
    first.train()
    assert _lens_logs(first) == [2]
    first.evaluate()  # step 2 was measured already: nothing new, and no error after train()
    second = trainer_for(tiny_gpt2(), tmp_path / "b", max_steps=2)
    second.add_callback(cb)
    lens.history.clear()
    second.train()
    assert [m.step for m in lens.history] == [2]
    assert _lens_logs(first) == [2]  # before: [2, 2], the second run's log in the first trainer
    assert _lens_logs(second) == [2]  # before: []
    # attach() to a third trainer: its loggers
    third = trainer_for(tiny_gpt2(), tmp_path / "c", max_steps=2)
    cb.attach(third)
    lens.history.clear()
    third.train()
    assert _lens_logs(third) == [2] and _lens_logs(first) == [2] and _lens_logs(second) == [2]
    assert cb.trainer is third


# ---------------------------------------------------------------- 1. parameter hooks on every engine and head path

class _Checkpointed(TinyGPT):
    """TinyGPT with non-reentrant activation checkpointing: the backward re-runs each block's forward."""

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.lm_head(tr.ln_f(x))


@pytest.mark.parametrize("cls, params, engine, head_loss", [
    *[(TinyGPT, W_O, e, h) for e in ("fast", "vmap", "loop") for h in ("auto", "chunked", "materialized")],
    (TinyGPT, [W_O, "lm_head.weight"], "auto", "materialized"),
    (TinyGPT, "lm_head.weight", "loop", "auto"),
    (_Checkpointed, W_O, "fast", "chunked"),
    (_Checkpointed, [W_O, "transformer.h.0.mlp.c_fc.weight"], "loop", "materialized"),
])
def test_parameter_hooks_on_every_parameter_neither_fire_nor_change_the_rows(cls, params, engine, head_loss):
    """Parameter hooks are switched off only around each engine's ``torch.autograd.grad`` now: no other backward
    of a pass (the chunked head's autograd.Function, the fast engine's checks, a checkpoint's recomputation)
    runs a user's hook on any parameter, probed or not, and the rows are the loss's, not 10x."""
    torch.manual_seed(0)
    model = cls(tie=True).double()
    plain = copy.deepcopy(model)
    calls = []
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: calls.append(n) or 10 * g)
    batch = lm_batch(m=5)
    names = [params] if isinstance(params, str) else params
    got = []
    for m in (plain, model):
        probe = PerSampleGradientProbe(m, params, engine=engine, head_loss=head_loss, keep_matrix=True, chunk_size=3)
        probe.update(batch)
        got.append({n: probe.matrix(n) for n in names})
    assert calls == []
    for n in names:
        assert torch.equal(got[0][n], got[1][n]), n
    # the hooks are all in place for the training backward
    F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()).backward()
    assert sorted(set(calls)) == sorted(n for n, _ in model.named_parameters())


# ---------------------------------------------------------------- 3. parametrize.cached() suspended and restored

def test_measurement_pass_restores_the_cache_flag_on_errors_interrupts_and_nesting():
    assert parametrize._cache_enabled == 0
    with measurement_pass():  # outside any cached() block: nothing to suspend, nothing left behind
        assert parametrize._cache_enabled == 0
    assert parametrize._cache_enabled == 0
    with parametrize.cached():
        with parametrize.cached():
            assert parametrize._cache_enabled == 2
            for exc in (RuntimeError, KeyboardInterrupt):
                with pytest.raises(exc):
                    with measurement_pass():
                        with measurement_pass():
                            assert parametrize._cache_enabled == 0
                        assert parametrize._cache_enabled == 0
                        raise exc("inside")
                assert parametrize._cache_enabled == 2
            # a forward that enters cached() itself inside the measurement leaves the caller's count alone
            with measurement_pass():
                with parametrize.cached():
                    assert parametrize._cache_enabled == 1
                assert parametrize._cache_enabled == 0
            assert parametrize._cache_enabled == 2
    assert parametrize._cache_enabled == 0 and parametrize._cache == {}


def test_another_threads_cached_block_ending_during_a_measurement_leaves_the_count_right():
    """``cached()`` keeps one process-wide count. Another thread's block that began before a measurement
    and ends during it (simulated here by leaving it inside the measurement) took the count to -1 there;
    putting back the count saved at the start then left caching on for good (count 1, with no block open),
    so every later forward served stale cached weights. The measurement now adds what it saved to what
    it finds, and clears the cache when no block is left."""
    other = parametrize.cached()
    other.__enter__()  # another thread's block, open when the measurement starts
    with measurement_pass():
        other.__exit__(None, None, None)  # ... and closed while it runs
    assert parametrize._cache_enabled == 0 and parametrize._cache == {}
    # nested passes inside a caller's block leave the caller's cached weights in place
    with parametrize.cached():
        parametrize._cache["caller's entry"] = torch.zeros(1)
        with measurement_pass():
            with measurement_pass():
                pass
        assert "caller's entry" in parametrize._cache and parametrize._cache_enabled == 1
    assert parametrize._cache == {}
    # a block another thread opens during the measurement stays counted after it
    with measurement_pass():
        opened = parametrize.cached()
        opened.__enter__()
    assert parametrize._cache_enabled == 1
    opened.__exit__(None, None, None)
    assert parametrize._cache_enabled == 0 and parametrize._cache == {}


def test_a_probe_inside_cached_on_a_parametrized_model_measures_and_leaves_the_cache_working():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(model[0], "weight", Double())
    x, y = torch.randn(6, 4, dtype=torch.double), torch.randint(0, 3, (6,))
    kw = dict(forward_fn=lambda m, b: m(b[0]), loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none"),
              keep_matrix=True)
    name = "0.parametrizations.weight.original"
    ref = PerSampleGradientProbe(copy.deepcopy(model), name, **kw)
    ref.update((x, y))
    with parametrize.cached():
        loss = F.cross_entropy(model(x), y)  # the caller's forward caches the weight with its graph
        probe = PerSampleGradientProbe(model, name, **kw)
        probe.update((x, y))
        loss.backward()  # the caller's graph reaches the parametrization's parameter
    torch.testing.assert_close(probe.matrix(), ref.matrix(), rtol=0, atol=0)
    assert model[0].parametrizations.weight.original.grad is not None
    assert parametrize._cache_enabled == 0


# ---------------------------------------------------------------- 4. Lightning: log / log_dict dropped in teardown

def test_lightning_callback_logs_in_a_second_fit_and_its_self_log_works_in_each_run(tmp_path):
    """The callback drops the ``log`` / ``log_dict`` Lightning sets on it at each run: a second ``fit`` and a
    ``validate`` after ``fit`` still send the lens's scalars to the loggers, and a subclass's own ``self.log``
    (set again by Lightning at every run) still works in each."""
    pl = pytest.importorskip("lightning.pytorch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
    from test_lightning import TinyLit, loader, trainer

    from spectral_lens.integrations import SpectralLensLightningCallback

    class Recorder(pl.loggers.Logger):
        name, version = "rec", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Logs(SpectralLensLightningCallback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.log("own_train", 1.0)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.log("own_val", 2.0)

    lens = sl.SpectralLens(pool=lm_pool(1, batch=4, t=12, vocab=37), params=(), forward_fn=lambda m, b: m(b[0]),
                           schedule=sl.Schedule.every(2), progress=False)
    cb = Logs(lens)
    for run in range(2):
        rec = Recorder()
        t = trainer(tmp_path / str(run), cb, rec, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
                    log_every_n_steps=1)
        t.fit(TinyLit(), loader(4, 0), loader(1, 1))
        assert [s for s, row in rec.rows if any(k.startswith("spectral_lens/") for k in row)] == [2], run
        assert any("own_train" in row for _, row in rec.rows), run
        assert "log" not in vars(cb)
        out = t.validate(t.lightning_module, loader(1, 1), verbose=False)
        assert out[0]["own_val"] == 2.0
