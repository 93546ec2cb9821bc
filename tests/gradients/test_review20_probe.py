"""Review of the probe-growth merge (the Gram matrices sized and filled only by ``_complete``, non-resident
chunks' blocks held on the chunk, the rollback snapshot keeping list lengths, ``_isolated`` calling
``train()`` only when a flag differs): guards for what the review tried to break and did not.

- a ``KeyboardInterrupt`` at any point of an update (between the appends to the parallel row, chunk and
  loss lists included) or of a compute leaves the probe exactly as its accepted samples make it;
- bounded memory (``max_resident_samples``) holds ``8 (K + chunk)`` bytes per non-resident sample and
  probed parameter until ``compute()``, and no (M, M) Gram (the old code grew one at every update);
- a module whose ``train()`` override freezes its normalization is measured with the override's modes.
"""

from __future__ import annotations

import pytest
import torch
from support.models import TinyGPT
from support.per_sample import per_sample_grams as _reference
from torch import nn

import spectral_lens.gradients.probe as probe_module
from spectral_lens.gradients import PerSampleGradientProbe

NAMES = ["transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"]


def _model(dtype=torch.float64) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(d=16, layers=2, ctx=8).to(dtype).eval()


def _batch(g: torch.Generator, n: int):
    return torch.randint(0, 37, (n, 8), generator=g), torch.randint(0, 37, (n, 8), generator=g)



CONFIGS = {
    "resident": {"chunk_size": 2},
    "bounded": {"chunk_size": 1, "max_resident_samples": 2},
    "offload": {"chunk_size": 2, "offload_rows": True},
}
INTERRUPTIBLE = ["gram_against", "finite_rows", "fill_gram", "fill_gram_by_columns", "grow_square", "rng_state"]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_an_interrupt_anywhere_in_an_update_or_a_compute_leaves_the_accepted_samples(config, monkeypatch):
    """Ctrl-C at the k-th call of any helper an update or a compute makes (rows appended for one
    parameter and not the other, a chunk appended without its losses, a compute stopped between the
    held blocks, the resident fill and the recomputed panels): the Gram matrices and losses afterwards
    are those of the accepted samples, float64-exact against a per-sample loop."""
    budget = {"n": None}

    def interruptible(f):
        def call(*args, **kwargs):
            if budget["n"] is not None:
                budget["n"] -= 1
                if budget["n"] < 0:
                    budget["n"] = None
                    raise KeyboardInterrupt
            return f(*args, **kwargs)
        return call

    for name in INTERRUPTIBLE:
        monkeypatch.setattr(probe_module, name, interruptible(getattr(probe_module, name)))
    model = _model()
    probe = PerSampleGradientProbe(model, NAMES, **CONFIGS[config])
    g = torch.Generator().manual_seed(5)
    accepted, interrupted = [], {"update": 0, "compute": 0}
    for k in range(8):
        batch = _batch(g, 3)
        budget["n"] = k
        try:
            probe.update(batch)
            accepted.append(batch)
        except KeyboardInterrupt:
            interrupted["update"] += 1
        budget["n"] = None
        batch = _batch(g, 2)
        probe.update(batch)  # new work for the compute
        accepted.append(batch)
        budget["n"] = k % 4
        try:
            probe.compute()
        except KeyboardInterrupt:
            interrupted["compute"] += 1
        budget["n"] = None
        assert probe.n_samples_ == sum(len(x) for x, _ in accepted)
    assert min(interrupted.values()) >= 2 and len(accepted) >= 2, interrupted  # both are interrupted
    ref, ref_losses = _reference(model, accepted, NAMES)
    torch.testing.assert_close(probe.losses_, ref_losses, rtol=1e-12, atol=0)
    for n in NAMES:
        torch.testing.assert_close(probe.gram(n), ref[n], rtol=1e-10, atol=1e-12 * float(ref[n].diagonal().max()))


def test_bounded_memory_holds_no_square_gram_between_updates():
    """max_resident_samples=K, chunk c: after M samples the probe holds, per probed parameter, the
    non-resident chunks' blocks ``8 (M - K)(K + c)`` bytes and no Gram (the old code held the (M, M)
    Gram, 8 M^2 bytes, and grew it into a fresh copy at every update); compute() writes the blocks in
    and frees them."""
    M, K, c = 24, 4, 2
    probe = PerSampleGradientProbe(_model(torch.float32), NAMES, chunk_size=c, max_resident_samples=K)
    g = torch.Generator().manual_seed(6)
    for _ in range(M // c):
        probe.update(_batch(g, c))
    held = lambda: sum(t.nbytes for ch in probe._chunks for pair in (ch.blocks or {}).values()
                       for t in pair if t is not None)
    assert all(k is None for k in probe._gram.values())
    assert held() == len(NAMES) * 8 * (M - K) * (K + c)
    probe.compute()
    assert held() == 0
    assert all(k.shape == (M, M) for k in probe._gram.values())


class _FrozenNorm(nn.Module):
    """An mmdetection-style ``norm_eval`` block: ``train()`` keeps its LayerNorm's flag False, and the
    forward records the flags it ran with."""

    def __init__(self, inner: nn.Module, d: int) -> None:
        super().__init__()
        self.inner, self.norm, self.seen, self.calls = inner, nn.LayerNorm(d), [], 0

    def train(self, mode: bool = True):
        self.calls += 1
        super().train(mode)
        self.norm.training = False
        return self

    def forward(self, x):
        self.seen.append((self.training, self.norm.training))
        return self.inner(x)


@pytest.mark.parametrize("train_mode", [False, True])
def test_a_train_override_decides_the_modes_measured_and_the_flags_come_back(train_mode):
    """The probe calls the model's train(train_mode) when some flag differs (never otherwise), so an
    override that freezes a normalization is measured frozen; every module's flag is set back after."""
    model = _model(torch.float32)
    block = model.transformer.h[1]
    wrapped = _FrozenNorm(block, 16)
    model.transformer.h[1] = wrapped
    model.eval()
    before = [(n, m.training) for n, m in model.named_modules()]
    probe = PerSampleGradientProbe(model, ["transformer.h.1.inner.attn.c_proj.weight"], train_mode=train_mode)
    calls = wrapped.calls
    probe.update(_batch(torch.Generator().manual_seed(7), 2))
    assert wrapped.seen and set(wrapped.seen) == {(train_mode, False)}
    # eval model measured in eval mode: no train(); else there (train_mode) and back (the mode before)
    assert wrapped.calls == calls + (2 if train_mode else 0)
    assert [(n, m.training) for n, m in model.named_modules()] == before
