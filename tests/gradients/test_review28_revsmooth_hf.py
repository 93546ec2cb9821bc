"""Review 28 (revsmooth): the Hugging Face callback with label smoothing and a vocabulary padded by a ``-inf`` head
bias. The trainer's ``LabelSmoother`` loss is ``+inf`` there (the mean of ``-log p`` over the vocabulary), and so is
the probe's smoothed loss, chunked or not: each measurement is skipped with a warning naming the cause (before, the
warning blamed a sequence with no valid target), and the probe has its plain loss back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402
from support.data import RandomTokens  # noqa: E402

VOCAB, PADDED, T = 64, 72, 12
PARAM = "model.layers.1.self_attn.o_proj.weight"


def padded_llama():
    """A tiny Llama whose head has 8 padding classes masked by a ``-inf`` bias (no token uses them)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=PADDED, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    model = transformers.LlamaForCausalLM(cfg).double()
    head = nn.Linear(32, PADDED, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[VOCAB:] = float("-inf")
    model.lm_head = head
    return model


@pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")
@pytest.mark.parametrize("head_loss", ["materialized", "chunked"])
def test_masked_vocabulary_with_smoothing_skips_the_measurement_naming_the_cause(tmp_path, head_loss):
    model = padded_llama()
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(1))
    pool = [{"input_ids": ids, "labels": ids.clone()}]
    probe = sl.PerSampleGradientProbe(model, PARAM, head_loss=head_loss)
    lens = sl.SpectralLens(model, pool, probe=probe, schedule=sl.Schedule.every(2, start=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, label_smoothing_factor=0.1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(8, 0, vocab=VOCAB, length=T))
    SpectralLensCallback(lens).attach(trainer)
    with pytest.warns(sl.SpectralLensWarning, match=r"skipped.*label-smoothed \(eps=0.1, .*a logit of -inf"):
        trainer.train()
    assert not lens.history
    assert probe._label_smoothing == 0.0 and probe.loss_fn.keywords == {"ignore_index": -100}
    probe.update(pool[0])  # the plain loss: finite
    assert torch.isfinite(probe.losses_).all()
