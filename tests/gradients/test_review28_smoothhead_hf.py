"""Review 28 (smoothhead): the Hugging Face callback's label-smoothed loss runs through the chunked head loss where
the probe's ``head_loss`` chunks the plain loss (``"chunked"``; ``"auto"`` on CUDA with Triton, here with the speed
rule patched), and equals HF's ``LabelSmoother`` per sequence in float64. Before, the smoothed loss was an opaque
``loss_fn`` to the probe and always took the materialized logits."""

from __future__ import annotations

import pytest
import torch

import spectral_lens as sl
from spectral_lens.gradients import extract_logits, fused_head

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402
from support.data import RandomTokens  # noqa: E402

VOCAB, T, EPS = 64, 12, 0.1
PARAM = "model.layers.1.self_attn.o_proj.weight"
pytestmark = [pytest.mark.filterwarnings("ignore:SpectralLens. the tail window")]


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(cfg).double()


def pool():
    ids = torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(99))
    labels = ids.clone()
    labels[3, :4] = -100
    mask = torch.ones_like(ids)
    mask[4, -3:] = 0
    labels[4, -3:] = -100
    return [{"input_ids": ids[:2], "labels": ids[:2].clone()},
            {"input_ids": ids[2:], "labels": labels[2:], "attention_mask": mask[2:]}]


def hf_formula_float64(output, batch, eps=EPS):
    """HF's ``LabelSmoother`` per sequence, written out in float64."""
    logits = extract_logits(output)[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    nlp = -torch.log_softmax(logits, -1)
    keep = labels != -100
    tok = (1 - eps) * nlp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] + eps * nlp.mean(-1)
    return (tok * keep).sum(-1) / keep.sum(-1)


@pytest.mark.parametrize("head_loss", ["chunked", "auto"])
def test_callback_chunks_the_smoothed_loss_through_the_head(tmp_path, head_loss, monkeypatch):
    monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)
    seen = []
    original = fused_head.linear_cross_entropy

    def spy(*args, **kw):
        seen.append(kw.get("label_smoothing", 0.0))
        return original(*args, **kw)

    monkeypatch.setattr(fused_head, "linear_cross_entropy", spy)
    model = tiny_llama()
    probe = sl.PerSampleGradientProbe(model, PARAM, head_loss=head_loss)
    lens = sl.SpectralLens(model, pool(), probe=probe, schedule=sl.Schedule.every(2, start=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, label_smoothing_factor=EPS)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(8, 0, vocab=VOCAB, length=T))
    SpectralLensCallback(lens).attach(trainer)
    trainer.train()
    (m,) = lens.history
    got = m.spectra[f"grad:{PARAM}"].values
    assert seen and set(seen) == {EPS}  # the smoothed loss ran chunked, every time
    assert probe.loss_fn.keywords == {"ignore_index": -100} and probe._label_smoothing == 0.0  # plain loss back
    seen.clear()
    ref = sl.PerSampleGradientProbe(model, PARAM, loss_fn=hf_formula_float64)
    for b in pool():
        ref.update(b)
    assert not seen
    torch.testing.assert_close(got, ref.compute().values, rtol=1e-10, atol=1e-18)
