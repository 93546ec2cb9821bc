"""SpectralLens with its defaults on config-built tiny Hugging Face models of the common families.

Per architecture: the lens picks the deepest block and the final block's attention output projection
by itself, measures padded dict batches, and its spectra equal float64 references computed by hand
(the block's hidden states over the valid positions; one gradient per sequence through a copy of the
model); measuring leaves outputs, parameters, ``.grad``, modes, RNG streams and hooks as they were.
Families the defaults do not fit (encoder-decoder, masked LM) get an error that says what to pass.
No download: every model is built from a tiny config.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

V, L = 97, 10
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
GPT = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)

# name: (config class, config kwargs, expected deepest block, expected gradient parameter)
CAUSAL = {
    "gpt2": ("GPT2Config", GPT, "transformer.h.1", "transformer.h.1.attn.c_proj.weight"),
    "llama": ("LlamaConfig", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "mistral": ("MistralConfig", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "qwen2": ("Qwen2Config", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "qwen3": ("Qwen3Config", {**LLAMA, "head_dim": 8}, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "gemma": ("GemmaConfig", {**LLAMA, "head_dim": 8}, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "gemma2": ("Gemma2Config", {**LLAMA, "head_dim": 8}, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "gemma3_text": ("Gemma3TextConfig", {**LLAMA, "head_dim": 8}, "model.layers.1",
                    "model.layers.1.self_attn.o_proj.weight"),
    "phi": ("PhiConfig", LLAMA, "model.layers.1", "model.layers.1.self_attn.dense.weight"),
    "phi3": ("Phi3Config", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "gpt_neox": ("GPTNeoXConfig", LLAMA, "gpt_neox.layers.1", "gpt_neox.layers.1.attention.dense.weight"),
    "opt": ("OPTConfig", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=64),
            "model.decoder.layers.1", "model.decoder.layers.1.self_attn.out_proj.weight"),
    "falcon": ("FalconConfig", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               "transformer.h.1", "transformer.h.1.self_attention.dense.weight"),
    "bloom": ("BloomConfig", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
              "transformer.h.1", "transformer.h.1.self_attention.dense.weight"),
    "gptj": ("GPTJConfig", {**GPT, "rotary_dim": 4}, "transformer.h.1", "transformer.h.1.attn.out_proj.weight"),
    "gpt_neo": ("GPTNeoConfig", dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
                "transformer.h.1", "transformer.h.1.attn.attention.out_proj.weight"),
    "stablelm": ("StableLmConfig", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "olmo": ("OlmoConfig", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "olmo2": ("Olmo2Config", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "mixtral": ("MixtralConfig", {**LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2}, "model.layers.1",
                "model.layers.1.self_attn.o_proj.weight"),
    "qwen2_moe": ("Qwen2MoeConfig", {**LLAMA, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
                                     "num_experts": 4, "num_experts_per_tok": 2},
                  "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "starcoder2": ("Starcoder2Config", LLAMA, "model.layers.1", "model.layers.1.self_attn.o_proj.weight"),
    "gpt_bigcode": ("GPTBigCodeConfig", GPT, "transformer.h.1", "transformer.h.1.attn.c_proj.weight"),
    "mpt": ("MptConfig", dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
            "transformer.blocks.1", "transformer.blocks.1.attn.out_proj.weight"),
}
# the slowest on the CPU, and families whose code paths others share (Llama's: Mistral, OLMo, Starcoder2)
SLOW = {"mixtral", "qwen2_moe", "bloom", "gpt_neo", "mistral", "olmo", "starcoder2"}
FLOAT32_ONLY = {"mixtral", "qwen2_moe"}  # their experts run torch._grouped_mm, which has no float64 kernel
if int(transformers.__version__.split(".")[0]) < 5:
    FLOAT32_ONLY.add("mpt")  # transformers 4.x builds MPT's additive mask with a value float64 cannot cast to float


def config(cls_name: str, kwargs: dict):
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(**kwargs)


def causal(name: str, dtype=torch.float32):
    cfg = config(*CAUSAL[name][:2])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)


def padded_pool(n_batches=2, m=3, left=False):
    """Padded dict batches: per batch one full sequence and two of 7 and 5 tokens, padded on the right
    (``left=True``: on the left in odd batches). Left padding is used in float32 only: in float64 the
    eager attention of Gemma 2, BLOOM and MPT (transformers 5.24) turns the whole of a left-padded
    sequence into NaN, which the lens reports as a ``NonFiniteError`` naming the block."""
    g = torch.Generator().manual_seed(1)
    pool = []
    for b in range(n_batches):
        ids = torch.randint(3, V, (m, L), generator=g)
        mask = torch.ones_like(ids)
        mask[1, L - 3:] = 0
        mask[2, L - 5:] = 0
        if left and b % 2:
            mask = mask.flip(1)
        pool.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return pool


def hidden_states(output):
    return output[0] if isinstance(output, tuple) else output


def reference_activations(model, block: str, pool) -> np.ndarray:
    rows = []
    module = model.get_submodule(block)
    hook = module.register_forward_hook(lambda mod, a, out: rows.append(hidden_states(out).detach()))
    model.eval()
    with torch.no_grad():
        for batch in pool:
            n = len(rows)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            rows[n] = rows[n][batch["attention_mask"].bool()]
    hook.remove()
    return np.linalg.eigvalsh(np.cov(torch.cat(rows).double().numpy(), rowvar=False))[::-1]


def reference_gradients(model, param: str, pool) -> np.ndarray:
    """One gradient per sequence of its mean next-token loss over valid positions, on a copy."""
    model = copy.deepcopy(model).eval()
    weight = model.get_parameter(param)
    grads = []
    for batch in pool:
        for i in range(batch["input_ids"].shape[0]):
            ids, mask = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
            logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1]
            targets = batch["labels"][i, 1:].masked_fill(mask[0, 1:] == 0, -100)
            (g,) = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=-100), weight)
            grads.append(g.flatten().double())
    G = torch.stack(grads)
    return np.linalg.eigvalsh((G @ G.T).numpy())[::-1]


def state(model):
    hooks = sum(len(getattr(m, a)) for m in model.modules()
                for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    return dict(
        modes=[m.training for m in model.modules()],
        tensors={k: v.clone() for k, v in model.state_dict().items()},
        grads={k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        rng=(torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
        hooks=hooks,
    )


def assert_same_state(before, after):
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert all(torch.equal(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k
    assert torch.equal(before["rng"][0], after["rng"][0])
    assert before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])


def arch_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CAUSAL]


@pytest.mark.parametrize("name", arch_params())
def test_lens_defaults_measure_against_float64_references(name):
    """float64 model and covariance: both spectra equal the hand-made references to 1e-8 (float32
    models of the mixture-of-experts families: 1e-4)."""
    _, _, block, param = CAUSAL[name]
    dtype, tol = (torch.float32, 1e-4) if name in FLOAT32_ONLY else (torch.float64, 1e-8)
    model = causal(name, dtype)
    pool = padded_pool()
    lens = sl.SpectralLens(model, pool, precision="float64", progress=False)
    assert (lens.layers, list(lens.probe.params)) == (block, [param])
    m = lens.measure(step=1, tokens=60)
    act, grad = m.spectra[f"act:{block}"], m.spectra[f"grad:{param}"]
    assert act.n_rows == sum(int(b["attention_mask"].sum()) for b in pool) == 44  # padding left out
    assert grad.n_rows == 6  # one row per sequence
    ref = np.clip(reference_activations(model, block, pool), 0, None)
    assert np.abs(act.values.numpy() - ref).max() <= tol * ref[0]
    ref = np.clip(reference_gradients(model, param, pool), 0, None)
    got = grad.values.numpy()[: len(ref)]
    assert np.abs(got - ref).max() <= tol * ref[0]
    assert np.isfinite(m.scalars["noise_scale"]) or m.scalars["noise_scale"] == float("inf")


@pytest.mark.parametrize("name", arch_params())
def test_lens_defaults_leave_the_model_as_it_was(name):
    """float32 training state (train mode, stale .grad): measuring changes nothing, also in bf16 autocast."""
    _, _, block, param = CAUSAL[name]
    model = causal(name).train()
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
    pool = padded_pool(left=True)
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in pool[0].items() if k != "labels"}).logits
    model.train()
    before = state(model)
    for kw in ({}, {"autocast_dtype": torch.bfloat16}):
        m = sl.SpectralLens(model, pool, progress=False, **kw).measure(step=1, tokens=60)
        assert m.spectra[f"act:{block}"].n_rows == 44 and m.spectra[f"grad:{param}"].n_rows == 6
        assert np.isfinite(m.spectra[f"act:{block}"].values.numpy()).all()
        assert_same_state(before, state(model))
    with torch.no_grad():
        assert torch.equal(out, model.eval()(**{k: v for k, v in pool[0].items() if k != "labels"}).logits)


def test_depth_profile_of_tuple_returning_blocks():
    """layers='all' reads every Falcon block at its hidden states (the blocks return tuples);
    with layers= given, pick=None still asks for a tensor output."""
    model = causal("falcon", torch.float64)
    pool = padded_pool()
    m = sl.SpectralLens(model, pool, layers="all", params=(), precision="float64", progress=False).measure(0, 0)
    for block in ("transformer.h.0", "transformer.h.1"):
        ref = np.clip(reference_activations(model, block, pool), 0, None)
        assert np.abs(m.spectra[f"act:{block}"].values.numpy() - ref).max() <= 1e-8 * ref[0]
    with pytest.raises(TypeError, match="output is tuple, expected a tensor"):
        sl.SpectralLens(model, pool, layers="transformer.h.1", params=(), progress=False).measure(0, 0)


def seq_loss(output, batch):
    """Unshifted per-sequence mean cross-entropy (masked LM, seq2seq): logits[:, t] against labels[:, t]."""
    logits, labels = output.logits, batch["labels"]
    tok = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return tok.view(labels.shape).sum(1) / (labels != -100).sum(1)


def test_masked_lm_default_loss_is_refused_and_a_loss_fn_works():
    cfg = config("BertConfig", dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64))
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(cfg)
    pool = padded_pool()
    with pytest.raises(ValueError, match=r"BertForMaskedLM is not a causal language model.*loss_fn="):
        sl.SpectralLens(model, pool)
    probe = sl.PerSampleGradientProbe(loss_fn=seq_loss)
    m = sl.SpectralLens(model, pool, probe=probe, progress=False).measure(0, 0)
    assert list(probe.params) == ["bert.encoder.layer.1.attention.output.dense.weight"]
    assert m.spectra["act:bert.encoder.layer.1"].n_rows == 44
    assert m.spectra["grad:bert.encoder.layer.1.attention.output.dense.weight"].n_rows == 6


@pytest.mark.parametrize("cls_name, kwargs, block, param", [
    ("T5Config", dict(vocab_size=V, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0),
     "decoder.block.1", "decoder.block.1.layer.0.SelfAttention.o.weight"),
    ("BartConfig", dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
     "model.decoder.layers.1", "model.decoder.layers.1.self_attn.out_proj.weight"),
])
def test_encoder_decoder_defaults_are_refused_and_explicit_choices_work(cls_name, kwargs, block, param):
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config(cls_name, kwargs))
    pool = padded_pool()
    with pytest.raises(ValueError, match=r"encoder-decoder model.*layers=.*forward_fn=.*probe="):
        sl.SpectralLens(model, pool)
    with pytest.raises(ValueError, match=r"encoder-decoder model.*Pass forward_fn= and loss_fn="):
        sl.PerSampleGradientProbe(model, param)

    def forward(m, b):  # labels included: the model builds the decoder's inputs from them
        return m(**b)

    probe = sl.PerSampleGradientProbe(params=param, forward_fn=forward, loss_fn=seq_loss)
    lens = sl.SpectralLens(model, pool, layers=block, pick=hidden_states, forward_fn=forward, probe=probe,
                          progress=False)
    m = lens.measure(0, 0)
    assert m.spectra[f"act:{block}"].n_rows == 44  # decoder positions, masked by the (same) attention_mask
    assert m.spectra[f"grad:{param}"].n_rows == 6


@pytest.mark.parametrize("name", ["falcon", "phi", "qwen2"])
def test_trainer_callback(name, tmp_path):
    """A few Trainer steps with the callback: the lens, built without a model, measures the trained model."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the hf extra installs it)")
    from spectral_lens.integrations import SpectralLensCallback

    _, _, block, param = CAUSAL[name]
    model = causal(name)
    ids = torch.randint(3, V, (16, L), generator=torch.Generator().manual_seed(2))
    train = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    lens = sl.SpectralLens(pool=padded_pool(), schedule=sl.Schedule.every(2), progress=False)
    SpectralLensCallback(lens, tokens_per_step=4 * L).attach(trainer)
    trainer.train()
    assert [m.step for m in lens.history] == [2, 4]
    first, last = (m.spectra for m in lens.history)
    assert first[f"act:{block}"].n_rows == 44 and last[f"grad:{param}"].n_rows == 6
    assert not torch.equal(first[f"act:{block}"].values, last[f"act:{block}"].values)  # the model trained
    assert lens.model is None  # the callback detached the lens it attached
    assert [h["step"] for h in trainer.state.log_history if "spectral_lens/noise_scale" in h] == [2, 4]


def test_causal_loss_can_be_chosen_for_a_model_that_cannot_generate():
    """The refusal keys on can_generate(): naming the causal loss explicitly is accepted."""
    model = causal("llama")
    model.can_generate = lambda: False  # as a remote-code causal LM without GenerationMixin
    with pytest.raises(ValueError, match="causal_lm_loss"):
        sl.PerSampleGradientProbe(model)
    probe = sl.PerSampleGradientProbe(model, loss_fn=sl.gradients.causal_lm_loss)
    for batch in padded_pool():
        probe.update(batch)
    assert probe.compute().n_rows == 6
