"""Models that are not GPT-style decoders: a ViT and a Whisper encoder (convolutional front ends), Mamba,
BERT classification with padded dict batches, and (when installed) timm and torchvision models.

Per model: ``attach`` on a channels-first module is refused with the ``pick=`` that measures it, the
blocks are read as rows of their features, and ``SpectralLens`` (activations) plus a per-sample gradient
probe with the model's natural loss equal float64 references computed by hand. Tiny configs, no download.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectral_lens as sl
from support.data import cov_eigs

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

TOL = 1e-8


def assert_spectrum(spec, rows: torch.Tensor) -> None:
    ref = cov_eigs(rows)
    assert spec.n_rows == rows.numel() // rows.shape[-1]
    assert np.abs(spec.values.numpy() - ref).max() <= TOL * ref[0]


def assert_gradients(spec, model, param: str, losses) -> None:
    """``losses``: one scalar loss per sample (callables of the model copy): squared singular values of
    the stacked per-sample gradients, float64."""
    model = copy.deepcopy(model).eval()
    weight = model.get_parameter(param)
    G = torch.stack([torch.autograd.grad(loss(model), weight)[0].flatten() for loss in losses]).double()
    ref = np.clip(np.linalg.svd(G.numpy(), compute_uv=False) ** 2, 0, None)
    assert spec.n_rows == len(losses)
    np.testing.assert_allclose(spec.values.numpy(), ref, rtol=TOL, atol=TOL * ref[0])


def outputs_of(model, name: str, batches, call, select=lambda out, batch: out) -> torch.Tensor:
    """Rows of module ``name`` over ``batches`` (``call(model, batch)`` runs one), by a hook of the test's own."""
    rows, current = [], {}
    module = model.get_submodule(name)
    h = module.register_forward_hook(lambda m, a, out: rows.append(select(out[0] if isinstance(out, tuple) else out,
                                                                       current["batch"])))
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = batch
                call(model, batch)
    finally:
        h.remove()
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_vit_patch_conv_refused_blocks_and_classification_gradients_exact():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).double().eval()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    with sl.attach(model, conv) as cap, pytest.raises(TypeError, match=r"channels-first, shape \(4, 32, 4, 4\) "
                                                                        r".*pick=lambda out: out\.movedim\(1, -1\)"):
        model(x)
    patches = conv.rsplit(".", 1)[0]  # the patch embedding: Conv2d, flattened and transposed: (N, 16, 32)
    with sl.attach(model, patches, precision="float64") as cap:
        model(x)
    assert_spectrum(cap.accumulators[patches].compute(), outputs_of(model, patches, [x], lambda m, b: m(b)))
    with sl.attach(model, conv, pick=lambda out: out.movedim(1, -1), precision="float64") as cap:
        model(x)
    assert_spectrum(cap.accumulators[conv].compute(),
                    outputs_of(model, conv, [x], lambda m, b: m(b), lambda out, b: out.movedim(1, -1)))

    pool = [{"pixel_values": x[:2], "labels": y[:2]}, {"pixel_values": x[2:], "labels": y[2:]}]
    probe = sl.PerSampleGradientProbe(loss_fn=lambda out, b: F.cross_entropy(out.logits, b["labels"], reduction="none"))
    lens = sl.SpectralLens(model, pool, probe=probe, precision="float64", progress=False)
    m = lens.measure(0, 0)
    (param,) = probe.params
    assert lens.layers.endswith("1") and param.startswith(lens.layers + ".")  # the last block and its W_O
    assert_spectrum(m.spectra[f"act:{lens.layers}"], outputs_of(model, lens.layers, pool, lambda m, b: m(**b)))
    assert_gradients(m.spectra[f"grad:{param}"], model, param,
                     [lambda mm, i=i: F.cross_entropy(mm(x[i : i + 1]).logits, y[i : i + 1]) for i in range(4)])
    assert no_hooks(model)


def test_whisper_encoder_conv_front_end_refused_and_encoder_alone_measured_with_defaults():
    """A bare ``WhisperEncoder`` has ``config.is_encoder_decoder`` (the whole model's config) but no
    decoder: the lens's defaults fit it (an encoder-only model)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                                     num_mel_bins=8, max_source_positions=10)
    model = WhisperEncoder(cfg).double().eval()
    x = torch.randn(3, 8, 20, dtype=torch.float64)
    target = torch.randn(3, 10, 32, dtype=torch.float64)
    for name, shape in (("conv1", r"\(3, 32, 20\)"), ("conv2", r"\(3, 32, 10\)")):
        with sl.attach(model, name), pytest.raises(TypeError, match=rf"{name}: .*channels-first, shape {shape}"):
            model(x)

    def loss_fn(out, batch):  # regression of the encoder states: the natural loss of a bare encoder
        return (out.last_hidden_state - batch[1]).pow(2).mean((1, 2))

    pool = [(x, target)]
    probe = sl.PerSampleGradientProbe(loss_fn=loss_fn)
    lens = sl.SpectralLens(model, pool, probe=probe, precision="float64", progress=False)
    m = lens.measure(0, 0)
    (param,) = probe.params
    assert lens.layers == "layers.1" and param == "layers.1.self_attn.out_proj.weight"
    assert_spectrum(m.spectra["act:layers.1"], outputs_of(model, "layers.1", pool, lambda m, b: m(b[0])))
    assert_gradients(m.spectra[f"grad:{param}"], model, param,
                     [lambda mm, i=i: loss_fn(mm(x[i : i + 1]), (None, target[i : i + 1]))[0] for i in range(3)])


def test_mamba_lens_defaults_match_float64_references():
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=4,
                                   intermediate_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.MambaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 40, (3, 9))
    pool = [{"input_ids": ids, "labels": ids}]
    lens = sl.SpectralLens(model, pool, precision="float64", progress=False)
    m = lens.measure(0, 0)
    param = "backbone.layers.1.mixer.out_proj.weight"  # the SSM's output projection (**.out_proj.weight)
    assert lens.layers == "backbone.layers.1" and list(lens.probe.params) == [param]
    # the block's output is channels-last although its mixer holds a Conv1d: read as it is
    assert_spectrum(m.spectra["act:backbone.layers.1"],
                    outputs_of(model, "backbone.layers.1", pool, lambda m, b: m(input_ids=b["input_ids"])))
    assert_gradients(m.spectra[f"grad:{param}"], model, param,
                     [lambda mm, i=i: F.cross_entropy(mm(input_ids=ids[i : i + 1]).logits[0, :-1], ids[i, 1:])
                      for i in range(3)])


def test_bert_classifier_padded_dict_batches_masked_rows_and_gradients():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=32)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:], mask[2, 3:] = 0, 0
    labels = torch.tensor([0, 1, 2, 1])
    pool = [{"input_ids": ids[:2], "attention_mask": mask[:2], "labels": labels[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": labels[2:]}]

    def loss_fn(out, batch):
        return F.cross_entropy(out.logits, batch["labels"], reduction="none")

    probe = sl.PerSampleGradientProbe(loss_fn=loss_fn)
    m = sl.SpectralLens(model, pool, probe=probe, precision="float64", progress=False).measure(0, 0)
    param = "bert.encoder.layer.1.attention.output.dense.weight"
    assert list(probe.params) == [param]
    rows = outputs_of(model, "bert.encoder.layer.1", pool, lambda m, b: m(**b),
                      lambda out, b: out[b["attention_mask"].bool()])
    assert rows.shape[0] == int(mask.sum()) == m.spectra["act:bert.encoder.layer.1"].n_rows
    assert_spectrum(m.spectra["act:bert.encoder.layer.1"], rows)
    assert_gradients(m.spectra[f"grad:{param}"], model, param, [
        lambda mm, i=i: F.cross_entropy(mm(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits,
                                        labels[i : i + 1]) for i in range(4)])


def optional(name: str):
    """Import ``name`` or skip: also when it is installed but does not load (a torchvision wheel built
    for another torch raises a ``RuntimeError`` at import)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{name} is not usable here: {type(e).__name__}: {e}")


def test_timm_vit_patch_conv_refused_and_blocks_measured():
    timm = optional("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                              num_classes=5).double().eval()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 4])
    with sl.attach(model, "patch_embed.proj") as cap, pytest.raises(TypeError, match=r"movedim\(1, -1\)"):
        model(x)
    with sl.attach(model, ["patch_embed", "blocks.1"], precision="float64") as cap:  # channels-last: as they are
        model(x)
    for name in ("patch_embed", "blocks.1"):
        assert_spectrum(cap.accumulators[name].compute(), outputs_of(model, name, [x], lambda m, b: m(b)))
    probe = sl.PerSampleGradientProbe(model, "blocks.1.attn.proj.weight",
                                      loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    probe.update((x, y))
    assert_gradients(probe.compute(), model, "blocks.1.attn.proj.weight",
                     [lambda mm, i=i: F.cross_entropy(mm(x[i : i + 1]), y[i : i + 1]) for i in range(3)])


def test_torchvision_resnet_stages_refused_and_classifier_read():
    models = optional("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for name in ("layer4", "layer4.1", "avgpool"):
        with sl.attach(model, name) as cap, pytest.raises(TypeError, match=rf"^{name}: .*movedim\(1, -1\)"):
            model(x)
    with sl.attach(model, "layer4", pick=lambda out: out.movedim(1, -1), precision="float64") as cap:
        model(x)
    assert_spectrum(cap.accumulators["layer4"].compute(),
                    outputs_of(model, "layer4", [x], lambda m, b: m(b), lambda out, b: out.movedim(1, -1)))
    assert no_hooks(model)


def test_a_conv_block_ending_in_a_hugging_face_activation_is_refused_and_its_pick_measures_it():
    """Wav2Vec2's feature-extractor blocks are a Conv1d then ``GELUActivation`` (transformers' own
    activation module, not torch's): the block's (N, C, L) output was read silently as rows of L. The
    activation is now passed over like torch's, so the block is refused; the pick it names measures the
    channels (float64 reference)."""
    cfg = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(cfg).double().eval()
    x = torch.randn(2, 400, dtype=torch.float64)
    block = "feature_extractor.conv_layers.1"
    with sl.attach(model, block), torch.no_grad(), pytest.raises(TypeError, match=r"channels-first Conv1d.*movedim"):
        model(x)
    rows = []
    hook = model.get_submodule(block).register_forward_hook(lambda m, a, out: rows.append(out.movedim(1, -1)))
    with sl.attach(model, block, pick=lambda out: out.movedim(1, -1), precision="float64") as cap, torch.no_grad():
        model(x)
    hook.remove()
    assert_spectrum(cap.compute()[block], torch.cat(rows))
