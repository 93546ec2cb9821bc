"""Gaps found by mutation testing of ``_isolation.preserved_buffers``: a buffer attribute the forward
replaces, and a buffer it resizes in place, are both restored (same object, same shape and bits)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spectral_lens.gradients import PerSampleGradientProbe


class _BufferRewriter(nn.Module):
    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, vocab)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.arange(3.0))

    def forward(self, idx):
        self.calls = self.calls + 1  # a new tensor in place of the buffer
        self.seen.resize_(idx.numel()).fill_(-1.0)  # the same tensor, resized in place
        return self.lin(self.emb(idx))


@pytest.mark.parametrize("engine", ["fast", "loop"])
def test_replaced_and_resized_buffers_are_restored(engine):
    torch.manual_seed(0)
    model = _BufferRewriter().double().eval()
    calls, seen = model.calls, model.seen
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    PerSampleGradientProbe(model, "lin.weight", engine=engine).update((ids[:, :-1], ids[:, 1:]))
    assert model.calls is calls and float(calls) == 0.0
    assert model.seen is seen and torch.equal(seen, torch.arange(3.0, dtype=torch.float64))
