"""The per-sample gradient probe inside the training setups teams use (review 27, probeuse).

Each setup is checked two ways: the probe's rows against an independent float64 reference (one
``torch.autograd.grad`` per sequence, each sequence run alone, on a copy of the model), and a short
training run with the probe called inside the step against the same run without it (losses, ``.grad``,
parameters, optimizer and GradScaler state, every RNG stream: bit-identical). Tiny Hugging Face
GPT-2 / Llama models from configs (no download) and the repo's NanoGPT.

Tolerances: float64 models, 1e-10 relative (Frobenius) to the float64 loop, the library's exactness
claim; float32 rows against float64, 1e-5 (float32 rounding of these tiny models, measured 1e-7 to
3e-7; NanoGPT's Baseline init is worse conditioned: its own float32 loop is 1e-4 off float64, and the
probe's rows equal that loop bit for bit); bfloat16 autocast, 3e-2 (several roundings at 2^-8;
measured 5e-3 for GPT-2 and 1e-2 for NanoGPT).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectral_lens.gradients import (PerSampleGradientProbe, ReentrantCheckpointError, causal_lm_targets,
                                     extract_logits)

transformers = pytest.importorskip("transformers")

V = 41
GPT2_WO = "transformer.h.1.attn.c_proj.weight"
LLAMA_WO = "model.layers.1.self_attn.o_proj.weight"


def gpt2(dropout=0.0):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=32, resid_pdrop=dropout,
                                  embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(dropout=0.0):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=V, max_position_embeddings=64,
                                   attention_dropout=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt2": (gpt2, GPT2_WO, "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"),
          "llama": (llama, LLAMA_WO, "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")}


def ids_batch(M=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (M, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def seq_loss(model, ids, labels=None, smoothing=0.0):
    """Mean next-token cross-entropy of one sequence run alone (``labels`` -100 where ignored)."""
    labels = ids if labels is None else labels
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    return F.cross_entropy(logits, labels[1:], ignore_index=-100, label_smoothing=smoothing)


def loop_rows(model, name, losses):
    """Float64 reference on a copy: one ``torch.autograd.grad`` per sequence; ``losses``: callables of the copy."""
    m = copy.deepcopy(model).double().eval()
    p = m.get_parameter(name)
    p.requires_grad_(True)
    return torch.stack([torch.autograd.grad(f(m), p)[0].reshape(-1) for f in losses])


def plain_refs(batch):
    return [functools.partial(seq_loss, ids=row) for row in batch["input_ids"]]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def probe_rows(model, name, batch, **kw):
    probe = PerSampleGradientProbe(model, name, keep_matrix=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EngineFallbackWarning, transformers' use_cache notice
        probe.update(batch)
    return probe.matrix(name), probe


def save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    saved = (aten.mm.default, aten.addmm.default, aten.bmm.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def hf_checkpointed(make, how):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable: deprecated name in 5.x
        if how == "default":
            model.gradient_checkpointing_enable()
        elif how == "non_reentrant":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif how == "reentrant":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        elif how == "every_2":
            model.activation_checkpointing_enable(every_n_layers=2)
        elif how == "selective":  # torchtitan-style selective checkpointing: matmul outputs saved, the rest recomputed
            context = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, save_matmuls)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                               "context_fn": context})
    return model


# ---------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("how", ["default", "non_reentrant", "every_2", "selective"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_non_reentrant_checkpointing_in_train_mode_equals_float64_loop(arch, how):
    """gradient_checkpointing_enable() (transformers 5: non-reentrant by default; it also makes the embedding
    output require grad; every other layer; selective checkpointing) in a model kept in train mode, measured with train_mode=True so that the checkpointing
    is active: the final and first block's matrices (fast engine) and the embedding (vmap refuses the
    saved-tensor hooks: loop) equal the float64 loop."""
    make, wo, low, emb = MODELS[arch]
    if how == "default" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 checkpoints reentrantly by default")
    if how == "every_2" and not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"):
        pytest.skip("activation_checkpointing_enable(every_n_layers=) is new in transformers 5")
    model = hf_checkpointed(make, how).double().train()
    batch = ids_batch()
    ref = {n: loop_rows(model, n, plain_refs(batch)) for n in (wo, low, emb)}
    for name in (wo, low, emb):
        got, probe = probe_rows(model, name, batch, train_mode=True)
        assert probe.engines_[name] == ("loop" if name == emb else "fast")
        assert rel(got, ref[name]) < 1e-10, (name, rel(got, ref[name]))
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_reentrant_checkpointing_measures_in_eval_mode_and_names_the_cause_in_train_mode(arch):
    """use_reentrant=True: Hugging Face checkpoints only in train mode, so the default train_mode=False measures
    exactly; train_mode=True raises ReentrantCheckpointError naming the parameter and use_reentrant=False."""
    make, wo, _, emb = MODELS[arch]
    model = hf_checkpointed(make, "reentrant").double().train()
    batch = ids_batch()
    got, _ = probe_rows(model, wo, batch)
    assert rel(got, loop_rows(model, wo, plain_refs(batch))) < 1e-10
    for name in (wo, emb):
        with pytest.raises(ReentrantCheckpointError, match="use_reentrant=False"):
            probe_rows(model, name, batch, train_mode=True)
    assert model.training and all(p.grad is None for p in model.parameters())


def nano(**kw):
    from examples.nanogpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, seq_len=16, eot_id=63, **kw))


class Checkpointed(torch.nn.Module):
    """A NanoGPT block run through ``torch.utils.checkpoint`` (what a user adds to save memory)."""

    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=self.reentrant)


def nano_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (4, 12), generator=g), torch.randint(0, 64, (4, 12), generator=g)
    y[1, :5] = -100  # a masked prompt
    return x, y


def nano_refs(x, y, smoothing=0.0):
    return [lambda m, i=i: F.cross_entropy(m(x[i:i + 1])[0], y[i], ignore_index=-100, label_smoothing=smoothing)
            for i in range(len(x))]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiling: ~8 s
def test_nanogpt_with_torch_checkpoint_and_compile_equals_float64_loop(compiled):
    """NanoGPT with every block under torch.utils.checkpoint (non-reentrant), optionally torch.compile'd (eager
    backend): the default matrix and the tied embedding equal the float64 loop in train mode; reentrant
    checkpointing is named."""
    model = nano().double()
    model.blocks = torch.nn.ModuleList(Checkpointed(b, False) for b in model.blocks)
    model.train()
    run = torch.compile(model, backend="eager") if compiled else model
    x, y = nano_batch()
    for name in ("blocks.1.block.attn.c_proj.weight", "wte.weight"):
        got, _ = probe_rows(run, name, (x, y), train_mode=True)
        assert rel(got, loop_rows(model, name, nano_refs(x, y))) < 1e-10, name
    for b in model.blocks:
        b.reentrant = True
    with pytest.raises(ReentrantCheckpointError, match="use_reentrant=False"):
        probe_rows(run, "blocks.1.block.attn.c_proj.weight", (x, y), train_mode=True)


# ------------------------------------------------------------------------------- losses, padding and packing


def smoothed_loss(output, batch, eps):
    """Per-sequence mean label-smoothed cross-entropy with the default loss's target conventions."""
    logits, targets = causal_lm_targets(extract_logits(output), batch)
    tok = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none",
                          label_smoothing=eps).view(targets.shape)
    return tok.sum(1) / (targets != -100).sum(1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_padding_prompt_masking_and_label_smoothing_equal_each_sequence_alone(arch, eps):
    """Right padding with a masked prompt, and left padding with position_ids (as in training): the default loss (eps=0) and a label-smoothing loss_fn built on causal_lm_targets give each
    sequence's own gradient, run alone and unpadded, in float64."""
    make, wo, _, _ = MODELS[arch]
    model = make().double().eval()
    loss_fn = {} if eps == 0 else {"loss_fn": functools.partial(smoothed_loss, eps=eps)}
    ids = ids_batch(M=4, T=10)["input_ids"]
    prompt = 3
    for side in ("right", "left"):
        mask = torch.ones_like(ids)
        if side == "right":
            mask[2:, 7:] = 0
        else:
            mask[2:, :3] = 0
        labels = ids.masked_fill(mask == 0, -100)
        if side == "right":
            labels[:, :prompt] = -100
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if side == "left":
            batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        refs = []
        for i in range(len(ids)):
            keep = mask[i] == 1
            refs.append(functools.partial(seq_loss, ids=ids[i, keep], labels=labels[i, keep], smoothing=eps))
        got, _ = probe_rows(model, wo, batch, **loss_fn)
        ref = loop_rows(model, wo, refs)
        assert rel(got, ref) < 1e-10, side
        if side == "left" and arch == "llama":
            # RoPE without position_ids: positions shifted by the padding, the same function up to the
            # rounding of the rotary angles, which transformers computes in float32 (1.1e-10 measured)
            del batch["position_ids"]
            assert rel(probe_rows(model, wo, batch, **loss_fn)[0], ref) < 1e-8


@pytest.mark.parametrize("collator", [{}, {"return_seq_idx": True}, {"return_flash_attn_kwargs": True}])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_collator_rows_are_documents_alone(arch, collator):
    """DataCollatorWithFlattening's packed rows (position_ids restarting per document, or seq_idx, or the
    flash-attention lengths): one row per document, equal to that document run alone, float64."""
    make, wo, _, _ = MODELS[arch]
    model = make().double().eval()
    docs = [torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 6, 3, 5)]
    batch = dict(transformers.DataCollatorWithFlattening(**collator)([{"input_ids": d.tolist()} for d in docs]))
    got, _ = probe_rows(model, wo, batch)
    assert got.shape[0] == len(docs)
    assert rel(got, loop_rows(model, wo, [functools.partial(seq_loss, ids=d) for d in docs])) < 1e-10


def test_label_smoothing_loss_fn_on_every_engine():
    """The label-smoothing loss_fn is torch.func-compatible: fast, vmap and loop rows of NanoGPT (tied
    embedding: vmap) equal the float64 loop with label_smoothing=0.1."""
    model = nano().double().eval()
    x, y = nano_batch()
    loss_fn = functools.partial(smoothed_loss, eps=0.1)
    for name, engines in (("blocks.1.attn.c_proj.weight", ("fast", "vmap", "loop")), ("wte.weight", ("vmap", "loop"))):
        ref = loop_rows(model, name, nano_refs(x, y, smoothing=0.1))
        for engine in engines:
            got, probe = probe_rows(model, name, (x, y), loss_fn=loss_fn, engine=engine, chunk_size=3)
            assert probe.engines_[name] == engine
            assert rel(got, ref) < 1e-10, (name, engine)


# ---------------------------------------------------------------------------------------- frozen weights, LoRA


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
def test_lora_frozen_base_and_adapters_under_checkpointing_equal_float64_loop():
    """PEFT LoRA (everything frozen but the adapters), HF non-reentrant checkpointing with
    enable_input_require_grads, train mode: a frozen base weight and both adapter factors of the first block
    equal the float64 loop; requires_grad flags and train mode are as before."""
    peft = pytest.importorskip("peft")
    base = hf_checkpointed(llama, "non_reentrant").double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # zero at init: a nonzero B so that lora_A has a gradient
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    batch = ids_batch()
    o = "base_model.model.model.layers.0.self_attn"
    for name in (f"{o}.o_proj.base_layer.weight", f"{o}.q_proj.lora_A.default.weight", f"{o}.q_proj.lora_B.default.weight"):
        got, probe = probe_rows(model, name, batch, train_mode=True)
        assert probe.engines_[name] == "fast"
        assert rel(got, loop_rows(model, name, plain_refs(batch))) < 1e-10, name
    assert flags == [p.requires_grad for p in model.parameters()] and model.training


# ------------------------------------------------------------------------------- dropout and the RNG stream


def test_fast_engine_dropout_masks_are_the_training_forwards():
    """train_mode=True on the fast engine, the batch in one chunk, called where the training forward would
    start: the probe draws the masks that forward draws (the mean of its rows is the training step's gradient
    of the mean loss, float64) and leaves the stream where it was, so the training forward still draws them."""
    model = gpt2(dropout=0.2).double().train()
    batch = ids_batch()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    got, _ = probe_rows(model, GPT2_WO, batch, train_mode=True)
    assert torch.equal(torch.get_rng_state(), before)
    # equal lengths, nothing ignored: the token mean is the mean of the sequence means (taken here in float64:
    # transformers' own loss casts the logits to float32)
    logits = model(input_ids=batch["input_ids"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    g = torch.autograd.grad(loss, model.get_parameter(GPT2_WO))[0].reshape(-1)
    assert rel(got.mean(0), g) < 1e-10
    torch.manual_seed(123)  # another state: other masks, other rows
    assert rel(probe_rows(model, GPT2_WO, batch, train_mode=True)[0], got) > 1e-3


# ---------------------------------------------------------------- the training step is unchanged by the probe


def train_run(make, batches, probe=None, *, ac=None, scaler=False, accum=1, compiled=False, mid=True, steps=2):
    """``steps`` optimizer steps of ``accum`` micro-batches; ``probe(model, batch)`` after each micro-batch's
    forward (``mid``, inside the autocast block, the graph alive) or after its backward. Returns everything a
    step leaves behind."""
    model = make().train()
    run = torch.compile(model, backend="eager") if compiled else model
    hooks = hook_counts(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    losses, grads = [], []
    for s in range(steps):
        for k in range(accum):
            b = batches[(s * accum + k) % len(batches)]
            with torch.autocast("cpu", dtype=ac) if ac else contextlib.nullcontext():
                loss = run(**b).loss / accum
                if probe is not None and mid:
                    probe(run, b)
            (sc.scale(loss) if sc else loss).backward()
            if probe is not None and not mid:
                probe(run, b)
            losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if sc:
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        opt.zero_grad()
    return dict(losses=losses, grads=grads, params=[p.detach().clone() for p in model.parameters()],
                opt=opt.state_dict()["state"], scaler=sc.state_dict() if sc else None, torch_rng=torch.get_rng_state(),
                py_rng=random.getstate(), np_rng=np.random.get_state()[1].copy(), training=model.training,
                hooks_kept=hook_counts(model) == hooks)


def hook_counts(model):
    """Every module's hook dictionaries and every parameter's tensor hooks, by size."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return ([tuple(len(getattr(m, k)) for k in kinds) for m in model.modules()]
            + [len(p._backward_hooks or {}) for p in model.parameters()])


def assert_identical(a, b):
    assert len(a["losses"]) == len(b["losses"]) and all(torch.equal(x, y) for x, y in zip(a["losses"], b["losses"]))
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    for k in a["opt"]:
        assert all(torch.equal(torch.as_tensor(a["opt"][k][f]), torch.as_tensor(b["opt"][k][f])) for f in a["opt"][k])
    assert a["scaler"] == b["scaler"] and torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"] and np.array_equal(a["np_rng"], b["np_rng"]) and a["training"] == b["training"]
    assert a["hooks_kept"] and b["hooks_kept"]


def measuring(name, rows, **kw):
    def probe(model, batch):
        got, p = probe_rows(model, name, batch, **kw)
        rows.append(got)
    return probe


STEPS = {
    "dropout, eval-mode probe": dict(make=lambda: gpt2(0.1)),
    "dropout, train_mode probe": dict(make=lambda: gpt2(0.1), probe=dict(train_mode=True)),
    "bf16 autocast, probe in the model's precision": dict(ac=torch.bfloat16),
    "bf16 autocast, bf16 probe": dict(ac=torch.bfloat16, probe=dict(autocast_dtype=torch.bfloat16)),
    "fp16 autocast + GradScaler": dict(ac=torch.float16, scaler=True),
    "fp16 autocast + GradScaler, fp16 probe after backward": dict(ac=torch.float16, scaler=True, mid=False,
                                                                  probe=dict(autocast_dtype=torch.float16)),
    "3 micro-batches, probe per micro-batch after backward": dict(accum=3, mid=False),
    "HF checkpointing, dropout": dict(make=lambda: hf_checkpointed(functools.partial(llama, 0.1), "non_reentrant"),
                                      name=LLAMA_WO, probe=dict(train_mode=True)),
}


COMPILED = {"torch.compile (eager)": dict(compiled=True, make=lambda: gpt2(0.1), probe=dict(train_mode=True))}


@pytest.mark.parametrize("case", list(STEPS) + [pytest.param(c, marks=pytest.mark.slow) for c in COMPILED])
def test_training_step_is_bit_identical_with_the_probe(case):
    """Losses, .grad (mid-accumulation included), parameters, AdamW and GradScaler state, the torch / Python /
    numpy RNG streams, the train mode and the hooks after two optimizer steps are bit for bit those of the same run
    without the probe, which measures inside the step (between forward and backward, in the caller's
    autocast block, or between a micro-batch's backward and the next)."""
    c = dict({**STEPS, **COMPILED}[case])
    make, name, kw = c.pop("make", gpt2), c.pop("name", GPT2_WO), c.pop("probe", {})
    batches = [ids_batch(seed=s) for s in range(3)]
    rows = []
    assert_identical(train_run(make, batches, **c), train_run(make, batches, measuring(name, rows, **kw), **c))
    assert rows and all(torch.isfinite(r).all() and r.abs().max() > 0 for r in rows)


def test_gradscaler_loop_rows_are_the_unscaled_gradients():
    """Inside an fp16 autocast + GradScaler step (scale 2^10) the probe measures the model in its own precision
    (the caller's autocast switched off) and never sees the scale: its rows are the float32 per-sample
    gradients of the unscaled loss, bit-identical to a probe outside the loop, within float32 rounding of the
    float64 loop; with autocast_dtype=float16 its own loss scaling keeps them within 5e-3."""
    batch = ids_batch()
    outside, _ = probe_rows(gpt2(), GPT2_WO, batch)
    ref = loop_rows(gpt2(), GPT2_WO, plain_refs(batch))
    for kw, tol in (({}, 1e-5), ({"autocast_dtype": torch.float16}, 5e-3)):
        rows = []
        train_run(gpt2, [batch], measuring(GPT2_WO, rows, **kw), ac=torch.float16, scaler=True, steps=1)
        assert rel(rows[0], ref) < tol, kw
        if not kw:
            assert torch.equal(rows[0], outside)


def test_bf16_autocast_rows_against_float64():
    """autocast_dtype=torch.bfloat16 (on the CPU) on GPT-2 and NanoGPT: within 3e-2 of the float64 loop."""
    batch = ids_batch()
    got, _ = probe_rows(gpt2(), GPT2_WO, batch, autocast_dtype=torch.bfloat16)
    assert rel(got, loop_rows(gpt2(), GPT2_WO, plain_refs(batch))) < 3e-2
    model = nano().eval()
    x, y = nano_batch()
    got, _ = probe_rows(model, "blocks.1.attn.c_proj.weight", (x, y), autocast_dtype=torch.bfloat16)
    assert rel(got, loop_rows(model, "blocks.1.attn.c_proj.weight", nano_refs(x, y))) < 3e-2


@pytest.mark.slow  # compiling: ~8 s
@pytest.mark.parametrize("how", ["wrapper", "module.compile"])
def test_compiled_model_rows_and_no_recompile(how):
    """torch.compile (eager backend; the wrapper, or nn.Module.compile in place) trained for a step: the probe's
    rows equal the uncompiled model's bit for bit, and the compiled training step that follows compiles no
    new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = gpt2().train()
    if how == "wrapper":
        run = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
        run = model
    batch = ids_batch()
    run(**batch).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    got, _ = probe_rows(run, GPT2_WO, batch)
    assert torch.equal(got, probe_rows(gpt2(), GPT2_WO, batch)[0])
    run(**ids_batch(seed=1)).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs
