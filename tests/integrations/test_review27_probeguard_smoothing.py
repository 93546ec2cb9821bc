"""Review 27 (probeguard): ``SpectralLensCallback`` measures the per-sample gradients of the loss the Trainer trains.

With ``TrainingArguments(label_smoothing_factor=eps)`` the Trainer trains on Hugging Face's ``LabelSmoother`` loss;
the callback measured plain cross-entropy. The references here are HF's own ``LabelSmoother`` applied to one sequence
at a time (its per-sequence loss: the mean over that sequence's non-ignored tokens), in float64.
"""

from __future__ import annotations


import pytest
import torch

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
from transformers.trainer_pt_utils import LabelSmoother  # noqa: E402

from spectral_lens.gradients import extract_logits  # noqa: E402
from spectral_lens.integrations import SpectralLensCallback  # noqa: E402
from spectral_lens.integrations.hf import _smoothed_causal_lm_loss  # noqa: E402
from support.data import RandomTokens as _RandomTokens  # noqa: E402

VOCAB, T, EPS = 64, 12, 0.1
PARAM = "model.layers.1.self_attn.o_proj.weight"
pytestmark = [pytest.mark.filterwarnings("ignore:SpectralLens. the tail window"),
              pytest.mark.filterwarnings("error::spectral_lens.MixedWeightsWarning")]


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(cfg).double()



def RandomTokens(n: int, seed: int) -> _RandomTokens:  # noqa: N802 (the dataset class, sized for this file)
    return _RandomTokens(n, seed, vocab=VOCAB, length=T)

def pool():
    """Two batches; the second has -100 labels (masked prompt) and right padding."""
    ids = torch.randint(0, VOCAB, (6, T), generator=torch.Generator().manual_seed(99))
    labels = ids.clone()
    labels[3, :4] = -100
    mask = torch.ones_like(ids)
    mask[4, -3:] = 0
    labels[4, -3:] = -100
    return [{"input_ids": ids[:3], "labels": ids[:3].clone()},
            {"input_ids": ids[3:], "labels": labels[3:], "attention_mask": mask[3:]}]


def hf_per_sequence(output, batch, eps=EPS):
    """HF's LabelSmoother on each sequence alone (shift_labels=True, as the Trainer calls it for a causal LM)."""
    logits = extract_logits(output)
    smoother = LabelSmoother(epsilon=eps)
    return torch.stack([smoother({"logits": logits[m : m + 1]}, batch["labels"][m : m + 1], shift_labels=True)
                        for m in range(logits.shape[0])])


def float64_reference(output, batch, eps=EPS):
    """HF's formula written out in float64 (its smoothed sum is taken in float32)."""
    logits = extract_logits(output)[:, :-1].double()
    labels = batch["labels"][:, 1:]
    nlp = -torch.log_softmax(logits, -1)
    keep = labels != -100
    nll = nlp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    smooth = nlp.sum(-1)
    tok = (1 - eps) * nll + eps * smooth / logits.shape[-1]
    return (tok * keep).sum(-1) / keep.sum(-1)


def test_the_smoothed_loss_is_hf_label_smoother_per_sequence():
    model = tiny_llama().eval()
    for batch in pool():
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        got = _smoothed_causal_lm_loss(out, batch, EPS)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, float64_reference(out, batch), rtol=1e-13, atol=0)
        torch.testing.assert_close(got, hf_per_sequence(out, batch), rtol=1e-6, atol=0)  # HF's float32 sum
        plain = sl.gradients.causal_lm_loss(out, batch)
        assert not torch.allclose(got, plain, rtol=1e-5, atol=0)


def trainer_for(model, tmp_path, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(8, 0))


def reference_values(model, loss_fn):
    probe = sl.PerSampleGradientProbe(model, PARAM, loss_fn=loss_fn)
    for b in pool():
        probe.update(b)
    return probe.compute().values


def measured(tmp_path, attach: bool, lens_probe=None, **trainer_kw):
    model = tiny_llama()
    lens = sl.SpectralLens(model, pool(), params=PARAM if lens_probe is None else None,
                           probe=lens_probe(model) if lens_probe else None, schedule=sl.Schedule.every(2, start=2))
    trainer = trainer_for(model, tmp_path, **trainer_kw)
    cb = SpectralLensCallback(lens)
    if attach:
        cb.attach(trainer)
    else:
        trainer.add_callback(cb)
    trainer.train()
    (m,) = lens.history
    return model, lens, m.spectra[f"grad:{PARAM}"].values


@pytest.mark.parametrize("attach", [True, False], ids=["attached", "plain_callback"])
def test_callback_measures_the_label_smoothed_loss_the_trainer_trains(tmp_path, attach):
    model, lens, got = measured(tmp_path, attach, label_smoothing_factor=EPS)
    torch.testing.assert_close(got, reference_values(model, float64_reference), rtol=1e-10, atol=1e-18)
    plain = reference_values(model, None)
    assert not torch.allclose(got, plain, rtol=1e-4)
    # the lens's probe has its default loss back after the measurement
    assert lens.probe._custom_loss is None and lens.probe.loss_fn.func is sl.gradients.causal_lm_loss


def test_without_smoothing_the_default_loss_is_measured(tmp_path):
    model, _, got = measured(tmp_path, True)
    torch.testing.assert_close(got, reference_values(model, None), rtol=1e-12, atol=1e-18)


def test_a_users_loss_fn_is_left_as_it_is(tmp_path):
    def mine(output, batch):
        return sl.gradients.causal_lm_loss(output, batch) * 2

    model, _, got = measured(tmp_path, True, lens_probe=lambda m: sl.PerSampleGradientProbe(m, PARAM, loss_fn=mine),
                             label_smoothing_factor=EPS)
    torch.testing.assert_close(got, reference_values(model, mine), rtol=1e-12, atol=1e-18)


def test_a_trainers_compute_loss_func_is_not_smoothed(tmp_path):
    """The Trainer ignores its label smoother when it has a compute_loss_func: so does an attached callback."""
    model = tiny_llama()
    lens = sl.SpectralLens(model, pool(), params=PARAM, schedule=sl.Schedule.every(2, start=2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, label_smoothing_factor=EPS)

    def loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(8, 0), compute_loss_func=loss)
    SpectralLensCallback(lens).attach(trainer)
    trainer.train()
    (m,) = lens.history
    torch.testing.assert_close(m.spectra[f"grad:{PARAM}"].values, reference_values(model, None), rtol=1e-12,
                               atol=1e-18)
