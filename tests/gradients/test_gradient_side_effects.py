"""Measuring leaves the model, its optimizer and the RNG exactly as they were, also on exceptions."""

from __future__ import annotations

import pytest
import torch

from spectral_lens.gradients import PerSampleGradientProbe

NAMES = ["transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.ln_f.weight"]


def snapshot(model, opt):
    params = dict(model.named_parameters())
    return {
        "grad": {n: None if p.grad is None else (id(p.grad), p.grad.clone()) for n, p in params.items()},
        "requires_grad": {n: p.requires_grad for n, p in params.items()},
        "values": {n: (p._version, p.detach().clone()) for n, p in params.items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: tuple(len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                  "_backward_pre_hooks", "_forward_hooks_with_kwargs"))
            for n, m in model.named_modules()
        },
        "tensor_hooks": {n: (p._backward_hooks, getattr(p, "_post_accumulate_grad_hooks", None)) for n, p in params.items()},
        "opt": {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in st.items()} for k, st in opt.state_dict()["state"].items()},
        "rng": torch.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
        # instance attributes (the probe sets an instance forward on nn.Linear modules during a pass)
        "attributes": {n: frozenset(vars(m)) for n, m in model.named_modules()},
    }


def assert_same(before, after):
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["tensor_hooks"] == after["tensor_hooks"]
    assert before["grad_enabled"] == after["grad_enabled"]
    assert before["attributes"] == after["attributes"]
    assert torch.equal(before["rng"], after["rng"])
    for n, g in before["grad"].items():
        if g is None:
            assert after["grad"][n] is None, n
        else:
            assert after["grad"][n][0] == g[0] and torch.equal(after["grad"][n][1], g[1]), n
    for n, (v, t) in before["values"].items():
        assert after["values"][n][0] == v and torch.equal(after["values"][n][1], t), n
    assert before["opt"].keys() == after["opt"].keys()
    for k in before["opt"]:
        for kk, vv in before["opt"][k].items():
            other = after["opt"][k][kk]
            assert torch.equal(vv, other) if torch.is_tensor(vv) else vv == other


@pytest.fixture
def trained(helpers):
    """A model in a messy caller state: mixed train/eval, frozen params, live .grad, Adam state, user hooks."""
    torch.manual_seed(0)
    model = helpers.TinyGPT(dropout=0.2).double()
    x, y = helpers.lm_batch(m=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()  # live .grad
    model.train()
    model.transformer.h[0].eval()
    model.transformer.wpe.weight.requires_grad_(False)
    model.transformer.h[1].mlp.c_fc.weight.grad = None
    model.transformer.h[1].attn.c_proj.register_forward_hook(lambda *a: None)
    model.transformer.ln_f.register_forward_pre_hook(lambda *a: None)
    return model, opt


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("cap", [None, 2])
def test_no_side_effects(trained, helpers, engine, cap):
    model, opt = trained
    before = snapshot(model, opt)
    probe = PerSampleGradientProbe(model, NAMES, engine=engine, chunk_size=2, max_resident_samples=cap)
    probe.update(helpers.lm_batch(m=5)).compute()
    probe.noise_scale()
    after = snapshot(model, opt)
    assert_same(before, after)
    draw = torch.rand(3)
    torch.set_rng_state(before["rng"])
    assert torch.equal(torch.rand(3), draw)  # the next random draw is what it would have been


def test_train_mode_measurement_restores_rng(trained, helpers):
    model, opt = trained
    before = snapshot(model, opt)
    PerSampleGradientProbe(model, NAMES[:1], train_mode=True).update(helpers.lm_batch(m=3)).compute()
    assert_same(before, snapshot(model, opt))


def test_no_side_effects_when_loss_raises(trained, helpers):
    model, opt = trained
    calls = []

    def loss_fn(out, batch):
        calls.append(1)
        if len(calls) == 3:  # fail in the middle of the second update's chunks
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(out.transpose(1, 2), batch[1], reduction="none").mean(1)

    before = snapshot(model, opt)
    probe = PerSampleGradientProbe(model, NAMES[:2], loss_fn=loss_fn, chunk_size=2)
    probe.update(helpers.lm_batch(m=2))
    gram = probe.gram(NAMES[0])
    with pytest.raises(RuntimeError, match="boom"):
        probe.update(helpers.lm_batch(m=4, seed=1))
    assert_same(before, snapshot(model, opt))
    assert probe.n_samples_ == 2 and len(probe._chunks) == 1  # the failed update left no trace
    assert torch.equal(probe.gram(NAMES[0]), gram)


def test_inside_no_grad_and_ambient_autocast_state(gpt, helpers):
    model = gpt()
    with torch.no_grad():
        spec = PerSampleGradientProbe(model).update(helpers.lm_batch()).compute()
        assert not torch.is_grad_enabled()
    assert spec.values[0] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_untouched_and_engines_agree(helpers):
    torch.manual_seed(0)
    model = helpers.TinyGPT(dropout=0.2).double().cuda()
    batch = tuple(t.cuda() for t in helpers.lm_batch(m=6))
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    names = ["transformer.h.1.attn.c_proj.weight", "transformer.ln_f.weight"]
    fast = PerSampleGradientProbe(model, names, chunk_size=4).update(batch)
    slow = PerSampleGradientProbe(model, names, chunk_size=4, engine="loop").update(batch)
    PerSampleGradientProbe(model.float(), names[:1], train_mode=True, autocast_dtype=torch.bfloat16).update(batch).compute()
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), cuda)
    assert model.training  # the caller's mode
    for n in names:
        ref = slow.gram(n)
        assert float((fast.gram(n) - ref).abs().max() / ref.abs().max()) <= 1e-10
