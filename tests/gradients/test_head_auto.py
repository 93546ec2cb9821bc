"""``PerSampleGradientProbe(head_loss="auto")``: the chunked head + loss is chosen only where it is
provably the default loss (the logits *are* an ``nn.Linear`` head's output, the head is not probed),
and then equals the materialized path to float64 rounding; everything else falls back, saying why."""

from __future__ import annotations

import re
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectral_lens.gradients import PerSampleGradientProbe, causal_lm_loss, fused_head, head_loss_fns
from support.dispatch import LargestAllocation
from support.models import TinyGPT, lm_batch
from support.threads import one_intra_op_thread  # noqa: F401

PARAM = "transformer.h.1.attn.c_proj.weight"
CHUNKED = "chunked (lm_head)"


@pytest.fixture(autouse=True)
def _chunked_counts_as_faster(monkeypatch, request):
    """These tests check the soundness of the selection, which runs on CUDA with Triton; on this CPU
    the speed rule alone would keep every model materialized (see test_cpu_auto_keeps_materialized)."""
    if not request.node.name.startswith("test_cpu_auto"):
        monkeypatch.setattr("spectral_lens.gradients.probe.chunked_is_faster", lambda device: True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _run(model, batch, params=PARAM, **kw):
    return PerSampleGradientProbe(model, params, keep_matrix=True, **kw).update(batch)


def _assert_close(got, ref, tol=1e-10):
    """Rows of G, losses and the spectrum of ``got`` equal ``ref``'s to ``tol`` relative."""
    for name in got.params:
        assert _rel(got.matrix(name).double(), ref.matrix(name).double()) <= tol, name
    assert _rel(got.losses_, ref.losses_) <= tol
    a, b = got.compute(), ref.compute()
    for sa, sb in zip(a.values() if isinstance(a, dict) else [a], b.values() if isinstance(b, dict) else [b]):
        assert float((sa.values - sb.values).abs().max()) <= tol * float(sb.values.max())


# ----------------------------------------------------------------------------- auto picks the chunked head


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    engine=st.sampled_from(["auto", "vmap"]),
    tie=st.booleans(),
    vocab=st.integers(2, 90),
    d=st.sampled_from([4, 8]),
    t=st.integers(2, 11),
    m=st.integers(2, 6),
    chunk_size=st.integers(1, 6),
    chunk_rows=st.integers(1, 40),
    ignore=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**16),
)
def test_auto_chunked_equals_materialized_float64(engine, tie, vocab, d, t, m, chunk_size, chunk_rows, ignore, seed):
    """Float64 tiny LMs (tied or not, the fast and the vmap engine, padded targets, any chunking of
    sequences and of tokens): auto picks the chunked head and G, the losses and the spectrum equal the
    materialized path's to 1e-10 relative."""
    torch.manual_seed(seed)
    model = TinyGPT(vocab=vocab, d=d, ctx=12, tie=tie).double().eval()
    x, y = lm_batch(m=m, t=t, vocab=vocab, seed=seed)
    y[:, 1:][torch.rand(m, t - 1, generator=torch.Generator().manual_seed(seed)) < ignore] = -100  # position 0 stays valid
    kw = dict(engine=engine, chunk_size=chunk_size)
    ref = _run(model, (x, y), head_loss="materialized", **kw)
    with mock.patch.object(fused_head, "CHUNK_BYTES", 4 * vocab * chunk_rows):  # chunk_rows tokens per block
        got = _run(model, (x, y), **kw)
    assert got.head_loss_ == CHUNKED and ref.head_loss_ == "materialized: head_loss='materialized'"
    assert got.compute().metadata["head_loss"] == CHUNKED
    _assert_close(got, ref)


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
def test_forced_chunked_with_every_engine(engine):
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    batch = lm_batch()
    params = [PARAM, "transformer.h.0.mlp.c_fc.weight"]
    got = _run(model, batch, params, engine=engine, chunk_size=4, head_loss="chunked")
    ref = _run(model, batch, params, engine=engine, chunk_size=4, head_loss="materialized")
    assert got.head_loss_ == CHUNKED
    _assert_close(got, ref)


def test_chunked_path_never_forms_the_full_logits():
    """After the decision (first update), an update creates no tensor as large as (tokens, vocab)."""
    torch.manual_seed(0)
    v, m, t, rows = 500, 8, 10, 16
    model = TinyGPT(vocab=v).double().eval()
    batch = lm_batch(m=m, t=t, vocab=v)
    with mock.patch.object(fused_head, "CHUNK_BYTES", 4 * v * rows):
        probe = PerSampleGradientProbe(model, PARAM, chunk_size=m).update(batch)
        assert probe.head_loss_ == CHUNKED
        with LargestAllocation() as mode:
            probe.update(batch)
    assert mode.largest <= rows * v < m * t * v
    mat = PerSampleGradientProbe(model, PARAM, chunk_size=m, head_loss="materialized").update(batch)
    with LargestAllocation() as mode:  # the materialized path, for contrast: the check can fail
        mat.update(batch)
    assert mode.largest >= m * t * v


class _DictLM(TinyGPT):
    """Hugging Face calling convention: ``model(input_ids=..., attention_mask=...)``."""

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids)


def test_dict_batches_with_attention_mask_and_labels():
    torch.manual_seed(3)
    model = _DictLM().double().eval()
    ids = lm_batch(m=5)[0]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    got = _run(model, batch, chunk_size=2)
    ref = _run(model, batch, chunk_size=2, head_loss="materialized")
    assert got.head_loss_ == CHUNKED
    _assert_close(got, ref)


def test_tied_embeddings_probe_elsewhere_chunked_probe_head_falls_back():
    torch.manual_seed(1)
    model = TinyGPT(tie=True).double().eval()
    batch = lm_batch()
    got = _run(model, batch)
    assert got.head_loss_ == CHUNKED and got.engines_[PARAM] == "fast"
    _assert_close(got, _run(model, batch, head_loss="materialized"))
    emb = "transformer.wte.weight"  # the same Parameter as lm_head.weight
    got = _run(model, batch, emb)
    assert got.head_loss_.startswith("materialized: the probed parameters include the head's weight")
    _assert_close(got, _run(model, batch, emb, head_loss="materialized"), tol=0.0)


def test_train_mode_dropout_masks_unchanged_by_the_check():
    """The check forward runs on its own forked RNG: with dropout active the measured forwards draw
    the same masks as the materialized path's, so the results still agree to rounding."""
    torch.manual_seed(2)
    model = TinyGPT(dropout=0.3).double()
    batch = lm_batch()
    got = _run(model, batch, train_mode=True, chunk_size=3)
    ref = _run(model, batch, train_mode=True, chunk_size=3, head_loss="materialized")
    assert got.head_loss_ == CHUNKED
    _assert_close(got, ref)


def test_bf16_autocast_bound():
    """Under bf16 autocast (float32 weights) the chunked path meets the materialized path's stated
    bound against float64 (test_gradient_exactness::test_bf16_autocast_agreement): every singular value
    within 1%, the trace-normalized spectrum within 2e-3."""
    torch.manual_seed(0)
    model = TinyGPT(d=32, heads=4, vocab=64, ctx=32).eval()
    batch = lm_batch(m=12, t=32, vocab=64, seed=7)
    exact = PerSampleGradientProbe(model.double(), head_loss="materialized").update(batch).compute()
    model = model.float()
    for engine in ("fast", "vmap"):
        probe = PerSampleGradientProbe(model, engine=engine, autocast_dtype=torch.bfloat16).update(batch)
        assert probe.head_loss_ == CHUNKED
        approx = probe.compute()
        s, s_ref = approx.singular_values.numpy(), exact.singular_values.numpy()
        assert (np.abs(s - s_ref) / s_ref).max() <= 1e-2
        assert np.abs(approx.normalized.numpy() - exact.normalized.numpy()).max() <= 2e-3


# ----------------------------------------------------------------------------- the first chunk decides


class _AuxAfterHead(TinyGPT):
    """Another nn.Linear runs after the head (an auxiliary output that does not touch the logits)."""

    def __init__(self):
        super().__init__()
        self.aux = torch.nn.Linear(16, 3)

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = block(x)
        h = tr.ln_f(x)
        return self.lm_head(h), self.aux(h)


def test_head_watch_public_api():
    """``HeadWatch`` around any forward (grad on): the verdict names the head and returns its input (the
    final norm's output here); no hook is left; a forward with another Linear after the head still
    proves the head but returns no hidden states; excluding the head's weight refuses it."""
    torch.manual_seed(0)
    model = TinyGPT().double().eval()
    x, _ = lm_batch()
    before = _hook_counts(model)
    seen = []
    handle = model.transformer.ln_f.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with fused_head.HeadWatch(model) as watch:
            out = model(x)
    finally:
        handle.remove()
    assert _hook_counts(model) == before
    name, reason, hidden = watch.verdict(out)
    assert (name, reason) == ("lm_head", "") and hidden is seen[0]
    assert torch.equal(model.lm_head(hidden), out)
    name, reason, hidden = watch.verdict(out, [model.lm_head.weight])
    assert name is None and hidden is None and "probed parameters include the head's weight" in reason
    aux = _AuxAfterHead().double().eval()
    with fused_head.HeadWatch(aux) as watch:
        out = aux(x)
    assert watch.verdict(out)[0] == "lm_head" and watch.verdict(out)[2] is None


@pytest.mark.parametrize("resident", [None, 2])
def test_first_chunk_decides_with_the_chunked_paths_rows(resident):
    """On the fast engine the first chunk's own forward makes the decision: the rows of a probe still
    deciding are bit for bit those of a probe that has decided (the chunked path), also in
    bounded-memory mode, where the first chunk is recomputed through the chunked path later."""
    torch.manual_seed(8)
    model = TinyGPT().double().eval()
    batch = lm_batch(m=7)
    kw = dict(chunk_size=3, max_resident_samples=resident, keep_matrix=resident is None)
    fresh = PerSampleGradientProbe(model, PARAM, **kw).update(batch)
    assert fresh.head_loss_ == CHUNKED
    decided = PerSampleGradientProbe(model, PARAM, **kw).update(batch).reset().update(batch)
    assert torch.equal(fresh.gram(), decided.gram()) and torch.equal(fresh.losses_, decided.losses_)
    if resident is None:
        assert torch.equal(fresh.matrix(), decided.matrix())
    ref = PerSampleGradientProbe(model, PARAM, head_loss="materialized", **kw).update(batch)
    assert _rel(fresh.gram(), ref.gram()) <= 1e-10


def test_head_not_last_linear_first_chunk_materialized():
    """An nn.Linear after the head: the head is still proved, its input is not kept, so the first chunk
    takes the default loss and the rest the chunked one; all agree with the materialized path to 1e-10."""
    torch.manual_seed(9)
    model = _AuxAfterHead().double().eval()
    batch = lm_batch(m=6)
    got = _run(model, batch, chunk_size=2)
    assert got.head_loss_ == CHUNKED
    _assert_close(got, _run(model, batch, chunk_size=2, head_loss="materialized"))


def test_first_chunk_frees_the_full_logits_before_the_chunked_loss(monkeypatch):
    """The full logits of the deciding forward are released before the chunked loss runs (peak memory
    of the first chunk: the forward's own, not the forward's plus the chunked loss's)."""
    import gc
    import weakref

    class _Tracked(TinyGPT):
        def forward(self, idx):
            z = super().forward(idx)
            self.logits_ref = weakref.ref(z)
            return z

    model = _Tracked().double().eval()
    alive = []
    real = fused_head.linear_cross_entropy

    def spy(*args, **kwargs):
        gc.collect()
        alive.append(model.logits_ref() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_head, "linear_cross_entropy", spy)
    probe = PerSampleGradientProbe(model, PARAM, chunk_size=3).update(lm_batch())
    # the first chunk's forward returned the logits; the second's (head bypassed) the hidden states
    assert probe.head_loss_ == CHUNKED and alive == [False, True]


# ----------------------------------------------------------------------------- falls back, saying why


class _SoftCapped(TinyGPT):
    def forward(self, idx):
        return 5.0 * torch.tanh(super().forward(idx) / 5.0)


class _Scaled(TinyGPT):
    def forward(self, idx):
        return super().forward(idx) * 0.5


class _Upcast(TinyGPT):  # float64 model: .float() is a real cast (a new tensor)
    def forward(self, idx):
        return super().forward(idx).float()


class _InPlace(TinyGPT):
    def forward(self, idx):
        z = super().forward(idx)
        z.mul_(0.5)  # the same tensor object, other values
        return z


class _Sliced(TinyGPT):
    def forward(self, idx):
        return super().forward(idx)[..., :30]


class _Tuple(TinyGPT):  # (logits, aux) where aux is computed from the logits: fine, only logits is read
    def forward(self, idx):
        z = super().forward(idx)
        return z, z.sum()


def _hooked():
    model = TinyGPT()
    model.lm_head.register_forward_hook(lambda mod, args, out: None)  # an observer
    return model


def _plain_tensor_weight():
    model = TinyGPT().double()  # first: .double() converts parameters and buffers, not plain attributes
    w = model.lm_head.weight.detach().clone()
    del model.lm_head.weight
    model.lm_head.weight = w  # as a wrapper (FSDP, a parametrization) would set it
    return model


FALLBACKS = {
    "soft-capped": (_SoftCapped, PARAM, "are not the tensor an nn.Linear head returned (nn.Linear with out_features=37: ['lm_head'])"),
    "scaled": (_Scaled, PARAM, "are not the tensor an nn.Linear head returned"),
    "upcast": (_Upcast, PARAM, "logits (float32, 37 classes) are not the tensor"),
    "in-place": (_InPlace, PARAM, "modified in place after the head"),
    "sliced": (_Sliced, PARAM, "no nn.Linear has out_features=30"),
    "probed head": (TinyGPT, "lm_head.weight", "probed parameters include the head's weight (lm_head.weight"),
    "hooked head": (_hooked, PARAM, "'lm_head' has forward hooks"),
    "plain-tensor weight": (_plain_tensor_weight, PARAM, "the weight or bias of 'lm_head' is not a plain nn.Parameter"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_falls_back_with_reason_and_equals_materialized(case):
    make, param, reason = FALLBACKS[case]
    torch.manual_seed(4)
    model = make().double().eval()
    batch = lm_batch(vocab=30)
    got = _run(model, batch, param)
    assert got.head_loss_.startswith("materialized: "), got.head_loss_
    assert reason in got.head_loss_, got.head_loss_
    # bit for bit: the fallback is the materialized path (a wrong chunked choice would differ)
    _assert_close(got, _run(model, batch, param, head_loss="materialized"), tol=0.0)
    with pytest.raises(ValueError, match=r"head_loss='chunked' impossible for \w+: .*" + re.escape(reason)):
        _run(model, batch, param, head_loss="chunked")


def test_transformed_logits_would_differ_if_chunked():
    """The fallback matters: on the soft-capped model the chunked loss (of the uncapped head) differs."""
    torch.manual_seed(4)
    model = _SoftCapped().double().eval()
    batch = lm_batch(vocab=30)
    fns = fused_head.chunked_head_fns(model, "lm_head", forward=lambda m, b: m(b[0]))
    with torch.no_grad():
        wrong = fns["loss_fn"](fns["forward_fn"](model, batch), batch)
        right = causal_lm_loss(model(batch[0]), batch)
    assert float((wrong - right).abs().max()) > 1e-3


def test_tuple_output_and_float_noop_still_chunked():
    """Identity, not syntax: a tuple output whose first element is the head's output, and ``.float()``
    on float32 logits (it returns the same tensor), are the head's output."""
    torch.manual_seed(5)
    batch = lm_batch()
    model = _Tuple().double().eval()
    got = _run(model, batch)
    assert got.head_loss_ == CHUNKED
    _assert_close(got, _run(model, batch, head_loss="materialized"))
    upcast32 = _Upcast().eval()  # float32 weights: .float() is a no-op
    got = _run(upcast32, batch)
    assert got.head_loss_ == CHUNKED
    _assert_close(got, _run(upcast32, batch, head_loss="materialized"), tol=1e-4)


def test_global_forward_hook_falls_back():
    model = TinyGPT().double().eval()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        got = _run(model, lm_batch())
    finally:
        handle.remove()
    assert got.head_loss_ == "materialized: a global module forward hook is registered (it could change the head's output)"


def test_user_loss_or_forward_is_never_replaced_and_costs_no_check_forward():
    model = TinyGPT().double().eval()
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    batch = lm_batch()  # 6 sequences, chunk_size 3: 2 forwards per update
    loss = lambda out, b: causal_lm_loss(out, b)  # noqa: E731
    for kw in ({"loss_fn": loss}, {"forward_fn": lambda m, b: m(b[0])}, head_loss_fns(model)):
        calls.clear()
        probe = PerSampleGradientProbe(model, PARAM, chunk_size=3, **kw)
        assert probe.head_loss_.startswith("custom: loss_fn/forward_fn given")
        probe.update(batch)
        assert len(calls) == 2 and probe.head_loss_.startswith("custom:")
    calls.clear()
    probe = PerSampleGradientProbe(model, PARAM, chunk_size=3).update(batch)  # fast engine: the first chunk decides
    assert probe.head_loss_ == CHUNKED and len(calls) == 2
    probe.update(batch)
    assert len(calls) == 4
    calls.clear()
    probe = PerSampleGradientProbe(model, PARAM, chunk_size=3, engine="loop").update(batch)
    assert probe.head_loss_ == CHUNKED and len(calls) == 1 + 6  # one check forward, then one per sequence


def test_bad_head_loss_values_are_clear():
    model = TinyGPT()
    with pytest.raises(ValueError, match=r"head_loss must be one of \('auto', 'chunked', 'materialized'\), got 'fused'"):
        PerSampleGradientProbe(model, PARAM, head_loss="fused")
    with pytest.raises(ValueError, match="head_loss='chunked' .* cannot be combined with loss_fn/forward_fn"):
        PerSampleGradientProbe(model, PARAM, head_loss="chunked", loss_fn=causal_lm_loss)


# ----------------------------------------------------------------------------- isolation and hooks


def _hook_counts(model):
    mods = {
        n: tuple(len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                                              "_backward_hooks", "_backward_pre_hooks"))
        for n, m in model.named_modules()
    }
    glob = torch.nn.modules.module
    return mods, len(glob._global_forward_hooks), len(glob._global_forward_pre_hooks)


class _Boom(TinyGPT):
    def __init__(self, fail_on):
        super().__init__()
        self.fail_on, self.n = fail_on, 0

    def forward(self, idx):
        self.n += 1
        if self.n in self.fail_on:
            raise RuntimeError("boom")
        return super().forward(idx)


@pytest.mark.parametrize("fail_on", [{1}, {2}])  # in the check forward / in the first measured forward
def test_no_hooks_left_and_state_restored_when_the_forward_raises(fail_on):
    model = _Boom(fail_on).double().eval()
    before = _hook_counts(model)
    probe = PerSampleGradientProbe(model, PARAM, chunk_size=3)
    with pytest.raises(RuntimeError, match="boom"):
        probe.update(lm_batch())
    assert _hook_counts(model) == before
    assert probe.head_loss_ is None and probe.n_samples_ == 0  # undecided, as before the call
    assert "forward" not in vars(model.lm_head)
    probe.update(lm_batch())  # decided on the next update
    assert probe.head_loss_ == CHUNKED and _hook_counts(model) == before


def test_measuring_changes_no_output_grad_buffer_mode_or_rng():
    torch.manual_seed(6)
    model = TinyGPT(dropout=0.2).double()
    model.register_buffer("seen", torch.zeros(3, dtype=torch.float64))
    model.lm_head.register_forward_pre_hook(lambda mod, args: [model.seen.add_(1.0)] and None)  # a buffer written in forward
    x, y = lm_batch()
    model.eval()
    out = model(x).detach().clone()
    model.seen.zero_()
    model.train()
    model.transformer.h[0].eval()
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    model.seen.zero_()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    rng, hooks = torch.get_rng_state(), _hook_counts(model)
    probe = PerSampleGradientProbe(model, PARAM).update((x, y))
    assert probe.head_loss_ == CHUNKED
    assert torch.equal(torch.get_rng_state(), rng) and _hook_counts(model) == hooks
    assert {n: m.training for n, m in model.named_modules()} == training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert torch.equal(model.seen, torch.zeros(3, dtype=torch.float64))
    model.eval()
    assert torch.equal(model(x), out)


def test_decision_is_per_attached_model():
    probe = PerSampleGradientProbe(params=PARAM)
    assert probe.head_loss_ is None
    plain, capped = TinyGPT().double(), _SoftCapped().double()
    with probe.attach(plain):
        probe.update(lm_batch())
        assert probe.head_loss_ == CHUNKED
    assert probe.head_loss_ is None
    probe.attach(capped)
    probe.update(lm_batch())
    assert probe.head_loss_.startswith("materialized: ")
    assert "head_loss=\"materialized: " in repr(probe)


# ----------------------------------------------------------------------------- Hugging Face GPT-2


def test_hf_gpt2_logits_are_the_lm_head_output():
    """transformers' GPT2LMHeadModel returns ``lm_head(hidden)`` as ``.logits`` unchanged (no upcast,
    no slicing with the default ``logits_to_keep=0``), so auto chunks it; padded dict batches agree
    with the materialized path to 1e-10 (Conv1D fast path; the loop engine for the tied embedding)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=61, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 61, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    param = "transformer.h.1.attn.c_proj.weight"
    got = _run(model, batch, param, chunk_size=3)
    assert got.head_loss_ == CHUNKED and got.engines_[param] == "fast"
    _assert_close(got, _run(model, batch, param, chunk_size=3, head_loss="materialized"))
    got = _run(model, batch, param, engine="loop", chunk_size=3)
    assert got.head_loss_ == CHUNKED
    _assert_close(got, _run(model, batch, param, engine="loop", chunk_size=3, head_loss="materialized"))
    emb = _run(model, batch, "transformer.wte.weight", engine="loop", chunk_size=3)  # tied to lm_head.weight
    assert emb.head_loss_.startswith("materialized: the probed parameters include the head's weight")


@pytest.mark.parametrize("arch", ["llama", "qwen2-tied"])
def test_hf_llama_family_logits_are_the_lm_head_output(arch):
    """Llama and Qwen2 (tied embeddings) in transformers: ``lm_head`` reads a slice view of the hidden
    states (``logits_to_keep``) and its output is ``.logits`` unchanged, so the first chunk proves the
    head; padded dict batches agree with the materialized path to 1e-10 (float64)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cls, config = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                   else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    cfg = config(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=arch == "qwen2-tied")
    model = cls(cfg).double().eval()
    ids = torch.randint(0, 53, (5, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    got = PerSampleGradientProbe(model, chunk_size=2, keep_matrix=True).update(batch)
    assert got.head_loss_ == CHUNKED and set(got.engines_.values()) == {"fast"}
    _assert_close(got, PerSampleGradientProbe(model, chunk_size=2, keep_matrix=True, head_loss="materialized").update(batch))


def test_cpu_auto_keeps_materialized_without_a_check_forward():
    """Without the Triton kernels (this CPU) the chunked body is the slower path: "auto" keeps the
    materialized logits, says why, and spends no check forward; "chunked" still forces it."""
    from spectral_lens.gradients.fused_head import chunked_is_faster

    assert not chunked_is_faster("cpu")
    model, batch = TinyGPT().double().eval(), lm_batch()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        probe = PerSampleGradientProbe(model, PARAM)
        probe.update(batch)
    finally:
        handle.remove()
    assert probe.head_loss_.startswith("materialized: the chunked head + loss is slower without its Triton kernels")
    assert len(calls) == 1  # the measurement's own forward only
    forced = PerSampleGradientProbe(model, PARAM, head_loss="chunked")
    forced.update(batch)
    assert forced.head_loss_ == CHUNKED
