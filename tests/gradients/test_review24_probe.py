"""Review 24 (probe): the engine choice's hints and fallbacks.

* Under FSDP1 (which the probe refuses whatever the engine) the refusal of ``engine='vmap'`` in a LoHa or offloaded
  model said ``use engine='auto' or 'fast' (... exact under FSDP2)``, and the FSDP1 refusal itself ``Instead: probe
  matrices that have a fast path with engine='auto' or 'fast'``: both refused there.
* ``engine='auto'`` with BatchNorm updating its running statistics (``train_mode=True``) took ``vmap``, which cannot
  trace that update, failed in the first pass and fell back to the loop with an ``EngineFallbackWarning`` about a
  choice ``auto`` made itself; it takes the loop at binding now, with the same rows (float64).
* Accelerate's, ZeRO-3's and FSDP2's refusals of an engine other than the fast one suggested ``engine='auto' or
  'fast'`` also where the fast path had just proved unusable (BatchNorm by batch statistics at binding, a
  sequence-first layout found in the first pass); under FSDP2 such a parameter went on to the vmap pass.

FSDP is recognized by its classes (a ``FullyShardedDataParallel`` subclass that only runs its forward; FSDP2's class
swap, as ``fully_shard`` does), ZeRO-3 by the ``ds_*`` attributes it sets (spectral_lens/_deepspeed.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import spectral_lens as sl

from .test_review24_probe_audit import BATCH, KW, outcome, suggested


def _refusal(setting: str, param: str, engine: str) -> str:
    _, message = outcome(setting, param, engine)
    assert message is not None, (setting, param, engine)
    return message


@pytest.mark.parametrize("setting", ["fsdp1+loha", "fsdp1+offload"])
def test_fsdp1_refusals_name_no_engine_and_not_fsdp2s(setting):
    for param in ("o.weight", "emb.weight"):
        refusals = {e: _refusal(setting, param, e) for e in ("auto", "fast", "vmap", "loop")}  # the premise: all
        vmap = refusals["vmap"]
        assert "engine='vmap' impossible" in vmap and suggested(vmap) == [], vmap
        assert "exact under FSDP2" not in vmap and "no engine can measure" in vmap, vmap
        assert "FSDP1's FullyShardedDataParallel" in vmap and "shard with fully_shard (FSDP2)" in vmap, vmap
        # the fast path would measure o.weight under FSDP2; emb.weight has none
        assert ("where engine='auto' or 'fast' measures" in vmap) == (param == "o.weight"), vmap
        for engine in ("auto", "loop"):
            assert "Instead: shard with fully_shard and probe matrices" in refusals[engine], refusals[engine]


def _bn_net(track: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(4, track_running_stats=track), nn.Flatten(),
                         nn.Linear(32, 3)).double().eval()


def _loss(out, batch):
    return out.pow(2).mean(-1)


def test_auto_takes_the_loop_at_binding_under_running_batchnorm():
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = _bn_net()
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.EngineFallbackWarning)
        auto = sl.PerSampleGradientProbe(model, "0.weight", loss_fn=_loss, train_mode=True, keep_matrix=True)
        assert auto.engines_ == {"0.weight": "loop"}  # at binding: no vmap attempt
        auto.update(x)
    loop = sl.PerSampleGradientProbe(_bn_net(), "0.weight", loss_fn=_loss, train_mode=True, keep_matrix=True,
                                     engine="loop").update(x)
    assert torch.equal(auto.matrix(), loop.matrix())
    for k, v in model.state_dict().items():  # running statistics as they were
        assert torch.equal(v, state[k]), k
    ref = []  # float64 per-sample reference: each sequence normalized by its own statistics (train mode)
    for i in range(5):
        m = copy.deepcopy(_bn_net()).train()
        ref.append(torch.autograd.grad(_loss(m(x[i : i + 1]), None).sum(), m[0].weight)[0].reshape(-1))
    torch.testing.assert_close(auto.matrix().double(), torch.stack(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("track, train_mode", [(False, False), (False, True)], ids=["batch-eval", "batch-train"])
def test_auto_keeps_vmap_where_batchnorm_keeps_no_running_statistics(track, train_mode):
    """Unchanged: batch statistics without running ones (vmap traces them) stay on vmap, without a warning."""
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.EngineFallbackWarning)
        probe = sl.PerSampleGradientProbe(_bn_net(track), "0.weight", loss_fn=_loss, train_mode=train_mode).update(x)
    assert probe.engines_ == {"0.weight": "vmap"}


@pytest.mark.parametrize("setting, stage", [("offload+seq_first", "pass"), ("offload+bn_running", "bind"),
                                            ("zero3+seq_first", "pass"), ("zero3+bn_running", "bind"),
                                            ("fsdp2+bn_running", "bind")])
def test_a_fast_path_known_unusable_is_not_suggested(setting, stage):
    got_stage, message = outcome(setting, "o.weight", "auto")
    assert got_stage == stage and message is not None, (setting, got_stage)
    # review 24 (probe2): the reason is o.weight's own (sequence-first), so another matrix is suggested, named
    other = "probe other matrices that have a fast path (such as head.weight;" in message
    assert "engine='auto' or 'fast'" not in message or ("seq_first" in setting and other), message
    assert "the fast path cannot measure" in message, message
    assert ("sample index in dimension 0" if "seq_first" in setting else "BatchNorm layer(s)") in message, message
    assert outcome(setting, "o.weight", "fast")[1] is not None  # the premise: the fast engine is refused too


def test_a_fast_path_found_unusable_under_fsdp2_is_refused_before_the_vmap_pass():
    """Before: ``auto`` moved ``o.weight`` to vmap after the fast pass and ran it on the sharded model (vmap
    cannot trace FSDP's hooks; its fallback loop's gradients are shards)."""
    stage, message = outcome("fsdp2+seq_first", "o.weight", "auto")
    assert stage == "pass" and message is not None and "sharded with FSDP" in message, message
    assert "sample index in dimension 0" in message, message
    # review 24 (probe2): the fast engine suggested for another matrix only (o.weight's reason is its own)
    assert message.count("engine='auto' or 'fast'") == message.count("probe other matrices that have a fast path "
                                                                     "(such as head.weight;") == 1, message


@pytest.mark.parametrize("setting", ["offload", "zero3", "fsdp2"])
def test_a_parameter_the_fast_path_measures_is_still_pointed_to_it(setting):
    """Unchanged: ``engine='loop'`` on an ``nn.Linear`` is refused with the fast engine suggested, which measures it."""
    message = _refusal(setting, "o.weight", "loop")
    assert "with engine='auto' or 'fast'" in message and "the fast path cannot" not in message, message
    assert outcome(setting, "o.weight", "auto") == ("measured", None)


class _InPlace(nn.Module):
    """``o``'s input is modified in place after its call: every engine's backward needs it as the call saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.o, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids))
        y = self.o(h)
        h.mul_(2.0)
        return self.head(torch.tanh(y) + h)


def test_an_input_modified_in_place_suggests_no_engine_that_fails_alike():
    """Before: the fast engine's refusal said ``use engine='vmap'``, which fails in autograd the same way."""
    def run(engine):
        torch.manual_seed(0)
        sl.PerSampleGradientProbe(_InPlace().double(), params="o.weight", engine=engine, **KW).update(BATCH)

    for engine in ("vmap", "loop"):  # the premise
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(engine)
    for engine in ("auto", "fast"):
        with pytest.raises(RuntimeError, match="modified in place after the call") as info:
            run(engine)
        assert "engine='vmap'" not in str(info.value) and "no engine can measure" in str(info.value), info.value
