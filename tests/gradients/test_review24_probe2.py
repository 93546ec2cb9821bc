"""Review 24 (probe2): the probe's remaining refusal hints and choices at binding.

1. The ZeRO-3, FSDP2 and offloading refusals dropped "probe matrices that have a fast path with engine='auto' or
   'fast'" whenever every refused parameter had a reason against its own fast path, also where that reason is the
   parameter's own (an Embedding without a fast path, a tied weight) and another matrix of the model measures: now
   "probe other matrices that have a fast path (such as o.weight; ...)", dropped only where no matrix can (BatchNorm
   by batch statistics, no fast path anywhere).
2. (see test_review24_probe2_norms.py)
3. ``torch.distributed._composable.replicate(linear)`` swaps the class for ``DDPLinear`` (``(DDP, Linear)``, no
   forward of its own), as ``fully_shard`` does: the layer had no fast path (``auto`` chose vmap, which failed in
   the pass inside replicate's hooks and left its lazy state half-built). Now unwrapped like FSDP2's class.
4. A refusal at binding cannot see a sequence-first input (found in the first pass): its fast-engine hint says the
   fast path needs a batch-first input.

The models are those of the review's audit (test_review24_probe_audit.py): ``emb`` (no fast path), ``o`` and
``head`` (``nn.Linear``), ZeRO-3 recognized by its ``ds_*`` attributes, FSDP2 by its class.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.gradients.registry import fast_path_for, fsdp2_base


def _audit():
    """The review's audit module (its models, ``outcome``), loaded from its file (pytest imports tests by path)."""
    spec = importlib.util.spec_from_file_location("review24_probe_audit", Path(__file__).with_name(
        "test_review24_probe_audit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


AUDIT = _audit()
KW, outcome = AUDIT.KW, AUDIT.outcome
OTHER = "probe other matrices that have a fast path (such as o.weight;"


@pytest.mark.parametrize("setting, param, engine", [
    ("zero3", "emb.weight", "auto"), ("zero3", "emb.weight", "loop"), ("zero3+tied", "head.weight", "auto"),
    ("fsdp2", "emb.weight", "auto"), ("fsdp2", "emb.weight", "loop"), ("fsdp2+tied", "head.weight", "vmap")])
def test_a_parameters_own_reason_keeps_the_hint_for_other_matrices(setting, param, engine):
    stage, message = outcome(setting, param, engine)
    assert stage == "bind" and OTHER in message, message
    assert "with engine='auto' or 'fast'" in message, message
    assert outcome(setting, "o.weight", "auto") == outcome(setting, "o.weight", "fast") == ("measured", None)


def test_offloading_refusal_keeps_the_hint_for_other_matrices():
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    for setting, param in (("offload", "emb.weight"), ("offload+tied", "head.weight")):
        stage, message = outcome(setting, param, "auto")
        assert stage == "bind" and OTHER in message, message
    assert outcome("offload", "o.weight", "fast") == ("measured", None)


@pytest.mark.parametrize("setting", ["zero3+bn_batch", "fsdp2+bn_batch"])
def test_batch_statistics_drop_the_hint_for_every_matrix(setting):
    _, message = outcome(setting, "emb.weight", "auto")
    assert "probe other matrices" not in message and "engine='auto' or 'fast'" not in message, message
    assert outcome(setting, "o.weight", "fast")[0] != "measured"


class _Bag(nn.Module):
    """Only matrices without a fast path (two Embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Embedding(5, 4), nn.Embedding(5, 4)

    def forward(self, ids):
        return self.b(ids) + self.a(ids)


def test_no_other_matrix_no_hint():
    from spectral_lens.gradients._engine_choice import other_fast_matrix

    model = _Bag().double()
    assert other_fast_matrix(model, False, ["a.weight"]) is None
    for i, p in enumerate(model.parameters()):  # ZeRO-3, as the audit recognizes it
        p.ds_id, p.ds_shape, p.ds_numel, p.ds_status = i, p.shape, p.numel(), "AVAILABLE"
    with pytest.raises(ValueError, match="ZeRO stage 3") as got:
        sl.PerSampleGradientProbe(model, params="a.weight", **KW)
    assert "fast path (" not in str(got.value), got.value
    lin = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    assert other_fast_matrix(lin, False, ["0.weight"]) == "1.weight"
    assert other_fast_matrix(lin, False, ["0.weight", "1.weight"]) is None  # not its bias (nor a matrix)


@pytest.mark.parametrize("setting, engine", [("zero3+seq_first", "loop"), ("fsdp2+seq_first", "vmap")])
def test_a_bind_time_fast_hint_says_batch_first(setting, engine):
    stage, message = outcome(setting, "o.weight", engine)
    assert stage == "bind" and "with engine='auto' or 'fast'" in message, message
    assert "batch-first" in message, message
    assert outcome(setting, "o.weight", "fast")[0] == "pass"  # what binding could not see


def test_an_offloaded_fast_hint_says_batch_first():
    pytest.importorskip("accelerate", reason="the hf extra installs accelerate")
    for engine in ("vmap", "loop"):
        stage, message = outcome("offload+seq_first", "o.weight", engine)
        assert stage == "bind" and "'fast'" in message and "batch-first" in message, message


def test_a_replicated_linear_has_the_linear_fast_path():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed._composable import replicate

    lin = replicate(nn.Linear(3, 2))  # no process group needed until its first forward
    assert type(lin).__name__ == "DDPLinear"
    assert fsdp2_base(type(lin)) is nn.Linear
    assert fast_path_for(lin, "weight") is fast_path_for(nn.Linear(3, 2), "weight") is not None
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    replicate(model[2])
    probe = sl.PerSampleGradientProbe(model, params="2.weight", forward_fn=lambda m, b: m(b),
                                      loss_fn=lambda out, b: out.pow(2).sum(-1))
    assert probe.engines_ == {"2.weight": "fast"}  # chosen at binding (it was vmap): no forward here


def test_the_fsdp2_based_replicate_class_is_unwrapped_and_only_it():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    # its class swap needs a device mesh: done here as replicate_with_fsdp's _apply_to_module does it
    mixin = pytest.importorskip("torch.distributed._composable.replicate_with_fsdp").ReplicateModule
    lin = nn.Linear(3, 2)
    lin.__class__ = type("ReplicateLinear", (mixin, nn.Linear), {"__deepcopy__": None})
    assert fast_path_for(lin, "weight") is fast_path_for(nn.Linear(3, 2), "weight") is not None

    class DDP:  # a user's class of that name: not torch's mixin
        pass

    for cls in (type("DDPLinear", (DDP, nn.Linear), {}), type("ReplicateLinear", (mixin, nn.Linear),
                                                             {"forward": lambda self, x: x})):
        assert fsdp2_base(cls) is cls, cls
