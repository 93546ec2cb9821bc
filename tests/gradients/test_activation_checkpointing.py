"""Activation checkpointing: non-reentrant checkpointing (``use_reentrant=False``, torch's
``apply_activation_checkpointing``, Hugging Face's ``gradient_checkpointing_enable``) gives the same
per-sample gradients as the model without it; reentrant checkpointing, through which
``torch.autograd.grad`` cannot differentiate, raises an error naming the cause and the remedy instead
of a wrong "no gradient path" or an all-zero spectrum."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spectral_lens import EngineFallbackWarning
from spectral_lens.gradients import PerSampleGradientProbe, ReentrantCheckpointError


class Net(nn.Module):
    """Embedding, two residual blocks (Linear, Tanh, Dropout), a head; ``ckpt``: None (no
    checkpointing), False (non-reentrant) or True (reentrant) for the blocks in ``where``."""

    def __init__(self, ckpt=None, where=(0, 1), dropout=0.0) -> None:
        super().__init__()
        self.ckpt, self.where = ckpt, where
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(dropout)) for _ in range(2))
        self.head = nn.Linear(16, 32)

    def forward(self, x):
        h = self.emb(x)
        for i, b in enumerate(self.blocks):
            if self.ckpt is None or i not in self.where:
                h = h + b(h)
            else:
                h = h + checkpoint(b, h, use_reentrant=self.ckpt)
        return self.head(h)


def _net(ckpt=None, where=(0, 1), dropout=0.0):
    torch.manual_seed(0)
    return Net(ckpt, where, dropout).double().eval()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (6, 7), generator=g)
    return x, x.roll(-1, 1)


def _rows(model, params, engine, train_mode=False):
    probe = PerSampleGradientProbe(model, params, engine=engine, keep_matrix=True, chunk_size=4, train_mode=train_mode)
    torch.manual_seed(5)  # same dropout masks for the model with and without checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)
        probe.update(_batch())
    return {k: probe.matrix(k) for k in probe.params}, probe


FAST = ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.1.0.bias", "head.weight"]


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("engine, params", [("auto", FAST), ("loop", FAST), ("auto", ["emb.weight"])])
def test_non_reentrant_checkpointing_gives_the_same_rows(engine, params, train_mode):
    # emb.weight: "auto" picks vmap, which refuses checkpointing's saved-tensor hooks and falls back to
    # the loop (whose dropout masks are not vmap's): compare with the loop engine there
    ref_engine = "loop" if params == ["emb.weight"] else engine
    ref, _ = _rows(_net(dropout=0.3), params, ref_engine, train_mode)
    model = _net(ckpt=False, dropout=0.3)
    got, probe = _rows(model, params, engine, train_mode)
    if engine == "auto":
        assert set(probe.engines_.values()) == ({"fast"} if params == FAST else {"loop"})
    for k in params:
        assert got[k].abs().max() > 0
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_apply_activation_checkpointing_gives_the_same_rows():
    wrapper = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    ref, _ = _rows(_net(), FAST, "auto")
    model = _net()
    wrapper.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Sequential))
    wrapped = [n.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.").replace(
        "blocks.1.", "blocks.1._checkpoint_wrapped_module.") for n in FAST]
    got, probe = _rows(model, wrapped, "auto")
    assert set(probe.engines_.values()) == {"fast"}
    for k, w in zip(FAST, wrapped):
        torch.testing.assert_close(got[w], ref[k], rtol=0, atol=1e-10)


def test_hugging_face_gradient_checkpointing_in_train_mode():
    transformers = pytest.importorskip("transformers")

    def gpt2(ckpt):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=41, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg).double()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # transformers also makes the embedding output require grad (enable_input_require_grads),
            # which hides a recomputation that differs from the forward; without it (older versions,
            # other code bases) only an identical recomputation gives the right rows
            model.disable_input_require_grads()
        return model.eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 41, (4, 9), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    params = ["transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight"]
    out = []
    for ckpt in (False, True):
        model = gpt2(ckpt)
        probe = PerSampleGradientProbe(model, params, keep_matrix=True, train_mode=True)  # dropout 0.1 active
        torch.manual_seed(3)
        probe.update(batch)
        assert probe.engines_ == {k: "fast" for k in params}
        out.append({k: probe.matrix(k) for k in params})
        assert not model.training
    for k in params:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("engine", ["auto", "fast", "loop"])
def test_reentrant_checkpointing_inside_the_segment_raises(engine):
    model = _net(ckpt=True)
    probe = PerSampleGradientProbe(model, "blocks.1.0.weight", engine=engine)
    with pytest.raises(ReentrantCheckpointError, match=r"blocks\.1\.0\.weight: Linear runs inside a reentrant") as err:
        probe.update(_batch())
    assert "use_reentrant=False" in str(err.value) and "torch.autograd.grad" in str(err.value)
    assert probe.n_samples_ == 0
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine, param", [("auto", "blocks.0.0.weight"), ("loop", "blocks.0.0.weight"),
                                           ("auto", "emb.weight")])
def test_reentrant_checkpointing_above_the_parameter_raises(engine, param):
    model = _net(ckpt=True, where=(1,))  # block 1 checkpointed, the probed parameter below it
    probe = PerSampleGradientProbe(model, param, engine=engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineFallbackWarning)  # emb.weight: vmap refuses the segment
        with pytest.raises(ReentrantCheckpointError, match=r"reentrant activation-checkpoint segment lies between"):
            probe.update(_batch())
    assert probe.n_samples_ == 0
