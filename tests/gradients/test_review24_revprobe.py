"""Review 24 (rev-probe): the fast engine's refusal under ZeRO-3 or FSDP2 with BatchNorm by batch statistics.

There only the fast engine could measure a matrix, and BatchNorm normalizing by the pass's batch statistics refuses
the fast path to every matrix of the model, so the remedy ``probe a matrix that has a fast path`` named an
alternative that is refused too (the audit, test_review24_probe_audit.py, checks only the words ``engine='auto' or
'fast'``). Now: ``train_mode=False`` where every such layer has running statistics (then it normalizes by them and
the fast path is exact), nothing of the kind where one has none; the other remedies (activations only, an unsharded
copy) stay.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import spectral_lens as sl

from .test_review24_probe_audit import BATCH, KW, PARAMS, build, outcome


@pytest.mark.parametrize("setting", ["zero3+bn_running", "fsdp2+bn_running", "zero3+bn_batch", "fsdp2+bn_batch"])
def test_fast_refusal_under_sharding_with_batch_statistics_names_no_refused_matrix(setting):
    for param in PARAMS:
        stage, message = outcome(setting, param, "fast")
        assert stage == "bind" and message is not None, (setting, param, stage)
        where = f"{setting} {param}: {message}"
        assert "probe a matrix that has a fast path" not in message, where
        assert "activations only" in message or "unsharded copy" in message, where
        assert ("train_mode=False" in message) == ("bn_running" in setting), where


@pytest.mark.parametrize("wrapper", ["zero3", "fsdp2"])
def test_the_suggested_train_mode_false_is_accepted(wrapper):
    """The premise of the hint: with train_mode=False BatchNorm uses its running statistics and the fast engine
    measures the matrix in the same (sharded) model; with batch statistics in eval mode too it is refused."""
    model, train_mode = build(f"{wrapper}+bn_running")
    assert train_mode
    probe = sl.PerSampleGradientProbe(model, params="o.weight", engine="fast", train_mode=False, **KW)
    probe.update(BATCH)
    assert probe.n_samples_ == 3 and probe.engines_ == {"o.weight": "fast"}
    model, train_mode = build(f"{wrapper}+bn_batch")
    assert not train_mode
    with pytest.raises(ValueError, match="no engine can measure o.weight"):
        sl.PerSampleGradientProbe(model, params="o.weight", engine="fast", train_mode=False, **KW)


@pytest.mark.parametrize("setting", ["fsdp2+bn_running", "fsdp2+seq_first"])
def test_fsdp2_refusal_says_which_engine_cannot_measure_a_sharded_model(setting):
    """FSDP2's refusal of an engine other than the fast one read "would use an engine other than the fast one; the
    fast path cannot measure o.weight: <why>, which cannot measure a sharded model": the "which" fell on the fast
    path's reason. The reason now follows the clause it explains."""
    stage, message = outcome(setting, "o.weight", "auto")
    assert message is not None, (setting, stage)
    assert "would use an engine other than the fast one, which cannot measure a sharded model" in message, message
    assert "; the fast path cannot measure o.weight: " in message, message
    assert "), which cannot measure a sharded model" not in message, message


class _SeqBN(nn.Module):
    """``fc -> BatchNorm1d over (M, C, T) -> out``, the mean over the sequence: a per-sample loss per sequence."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(4, 4), bn, nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2))).mean(1)


def _probe(model, engine):
    kw = {"forward_fn": lambda m, b: m(b[0]), "loss_fn": lambda out, b: ((out - b[1]) ** 2).sum(-1)}
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, 5, 4, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.EngineFallbackWarning)
        probe = sl.PerSampleGradientProbe(model, params="fc.weight", engine=engine, train_mode=True, chunk_size=4, **kw)
        probe.update(batch)
    return probe


def test_auto_keeps_vmap_for_batchnorm_that_stopped_tracking_running_statistics():
    """``bn.track_running_stats = False`` set after construction (the running buffers stay): in train mode the layer
    no longer updates them (F.batch_norm gets no running statistics), so vmap traces it, as before review 24;
    ``auto`` took the loop at binding (the buffers alone were looked at). Same rows as the loop (float64)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    bn.track_running_stats = False
    model = _SeqBN(bn).double()
    assert bn.running_mean is not None
    auto = _probe(model, "auto")
    assert auto.engines_ == {"fc.weight": "vmap"}
    loop = _probe(model, "loop")
    torch.testing.assert_close(auto.compute().values, loop.compute().values, rtol=1e-12, atol=1e-14)
    torch.manual_seed(0)
    assert _probe(_SeqBN(nn.BatchNorm1d(4)).double(), "auto").engines_ == {"fc.weight": "loop"}  # tracking: the loop
