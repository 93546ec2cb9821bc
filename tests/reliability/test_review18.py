"""Review of the session's merged changes (reviewB): regressions found and fixed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.gradients._measurable import is_encoder_decoder


class _EncDec(nn.Module):
    """An encoder-decoder shaped like SeamlessM4TForTextToText: ``text_encoder``, ``text_decoder`` (no module
    named ``decoder``), ``config.is_encoder_decoder``."""

    def __init__(self, decoder_name: str = "text_decoder"):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=True)
        self.embed = nn.Embedding(16, 8)
        self.text_encoder = nn.ModuleList([nn.Linear(8, 8)])
        self.add_module(decoder_name, nn.ModuleList([nn.Linear(8, 8)]))
        self.lm_head = nn.Linear(8, 16)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.text_encoder:
            h = layer(h)
        return self.lm_head(h)


@pytest.mark.parametrize("decoder_name", ["decoder", "text_decoder"])
def test_encoder_decoder_with_a_prefixed_decoder_is_still_refused(decoder_name):
    """SeamlessM4TForTextToText names its decoder ``text_decoder``: it was refused with the encoder-decoder
    message before the WhisperEncoder change, then measured with the decoder-only defaults (transformers
    then failed with 'You must specify exactly one of decoder_input_ids or decoder_inputs_embeds')."""
    model = _EncDec(decoder_name)
    assert is_encoder_decoder(model)
    with pytest.raises(ValueError, match="encoder-decoder"):
        sl.SpectralLens(model, [torch.randint(0, 16, (2, 4))], params=())


def test_encoder_alone_is_not_an_encoder_decoder():
    """The encoder alone (WhisperEncoder built from the whole model's config) still fits the defaults."""
    model = _EncDec("text_decoder")
    del model.text_decoder
    assert not is_encoder_decoder(model)
