"""Mixture-of-experts models with fused expert weights (transformers 5: ``experts.gate_up_proj``
``(E, 2I, d)`` and ``experts.down_proj`` ``(E, d, I)``; torchtitan's ``w1/w2/w3``).

Weight spectra give one spectrum per expert (float64 ``svdvals`` of each slice); the gradient probe
measures the router weight and a fused expert weight exactly (float64 per-sequence reference through
a copy of the model; the experts' ``torch._grouped_mm`` path has no float64 kernel, so it is checked in
float32 against the float64 reference); one expert's rows are a slice of the fused rows, zero for the
sequences none of whose tokens were routed to it; activation capture on the router and on the experts
module reads one row per valid token. Tiny configs, no download.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_lens as sl
from spectral_lens import PerSampleGradientProbe
from spectral_lens.weights import weight_spectra

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

V, L = 61, 8
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=32,
                       num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                       head_dim=8)),
}
DOWN = "model.layers.1.mlp.experts.down_proj"


def moe(family: str = "mixtral", dtype=torch.float64, experts: str = "eager") -> nn.Module:
    """A tiny MoE causal LM; ``experts="eager"``: the per-expert loop (float64 works), ``"grouped_mm"``:
    ``torch._grouped_mm`` (float32 only)."""
    config_cls, model_cls, extra = FAMILIES[family]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**BASE, **extra)).to(dtype).eval()
    model.set_experts_implementation(experts)
    return model


def padded_pool(n_batches=2, m=3, length=L, padded=True):
    """Dict batches; ``padded``: sequences 1 and 2 of each batch end in 2 and 3 padding tokens (else no
    ``attention_mask``: a mask's data-dependent checks in the model keep ``torch.func.vmap`` out)."""
    g = torch.Generator().manual_seed(1)
    pool = []
    for _ in range(n_batches):
        ids = torch.randint(3, V, (m, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 2:] = 0
        mask[2, length - 3:] = 0
        pool.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
                    if padded else {"input_ids": ids, "labels": ids})
    return pool


def reference_rows(model, param: str, pool) -> torch.Tensor:
    """One float64 gradient per sequence (mean next-token loss over its valid positions), through a
    float64 eager copy of the model, one sequence at a time."""
    model = copy.deepcopy(model).double().eval()
    model.set_experts_implementation("eager")
    weight = model.get_parameter(param)
    rows = []
    for batch in pool:
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i:i + 1]
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[i:i + 1]
            logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1]
            targets = batch["labels"][i, 1:]
            (g,) = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=-100), weight)
            rows.append(g.flatten())
    return torch.stack(rows)


def probed(model, param: str, pool, **kw):
    probe = PerSampleGradientProbe(model, params=param, chunk_size=4, keep_matrix=True, **kw)
    for batch in pool:
        probe.update(batch)
    return probe


def routed(model, layer: int, pool) -> torch.Tensor:
    """(M, E) bool: whether a token of sequence m that has a next-token target was routed to expert e in
    ``layer`` (in the last layer a token's expert output reaches only its own position's loss; the last
    valid token has no target)."""
    gate = model.model.layers[layer].mlp.gate
    got = []
    hook = gate.register_forward_hook(lambda mod, a, out: got.append(out[-1]))  # top-k indices (tokens, k)
    out = []
    with torch.no_grad():
        for batch in pool:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            idx = got.pop().view(*batch["input_ids"].shape, -1)  # tokens in (sequence, position) order
            scored = F.pad(batch["labels"][:, 1:] != -100, (0, 1))  # position t predicts token t+1
            out.append((F.one_hot(idx, gate.weight.shape[0]).amax(2) * scored[..., None]).amax(1).bool())
    hook.remove()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- weights


SLOW_FAMILIES = ["mixtral", pytest.param("qwen2_moe", marks=pytest.mark.slow),
                 pytest.param("qwen3_moe", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_weight_spectra_give_one_spectrum_per_expert(family):
    """Each expert of a fused (E, out, in) weight is its own matrix (before: one E x (out*in) matrix
    whose E singular values mixed the experts); the router stays one matrix."""
    model = moe(family, dtype=torch.float32)
    spectra = weight_spectra(model, ["model.layers.*.mlp.gate.weight", "model.layers.*.mlp.experts.*"])
    experts = [f"model.layers.{i}.mlp.experts.{w}[{e}]" for i in range(2) for w in ("gate_up_proj", "down_proj")
               for e in range(4)]
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert sorted(spectra) == sorted(routers + experts)  # in model order (Qwen3-MoE: experts before the router)
    for name in experts:
        param, e = name[:-3], int(name[-2])
        w = model.get_parameter(param)[e].detach().double()
        ref = torch.linalg.svdvals(w) ** 2
        s = spectra[name]
        assert (s.n_rows, s.dim, s.source) == (w.shape[0], min(w.shape), name)
        assert torch.allclose(s.values, ref, rtol=1e-10, atol=1e-12 * float(ref[0]))
    router = model.get_parameter("model.layers.0.mlp.gate.weight").detach().double()
    assert torch.allclose(spectra["model.layers.0.mlp.gate.weight"].values, torch.linalg.svdvals(router) ** 2,
                          rtol=1e-10)


class GroupedExperts(nn.Module):
    """torchtitan's layout: ``w1``/``w3`` (E, hidden, d), ``w2`` (E, d, hidden)."""

    def __init__(self, e=3, d=8, h=12):
        super().__init__()
        self.num_experts = e
        self.w1 = nn.Parameter(torch.randn(e, h, d))
        self.w2 = nn.Parameter(torch.randn(e, d, h))
        self.w3 = nn.Parameter(torch.randn(e, h, d))


class Embeddings(nn.Module):
    def __init__(self, n=9, d=8):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, n, d))  # a ViT's position embeddings, a stack of one


def test_custom_expert_stacks_split_and_convolutions_do_not():
    """An experts module's 3-D parameter (path or class name with "expert") is a stack; a stack of one (1, N, d) is its (N, d)
    matrix under its own name (before: one (1, N*d) row, a single singular value); a Conv1d weight
    (out, in, k), also 3-D, stays the one map on flattened patches (out, in*k)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"experts": GroupedExperts(), "conv": nn.Conv1d(4, 6, 3), "emb": Embeddings()})
    spectra = weight_spectra(model)
    assert list(spectra) == ([f"experts.{w}[{e}]" for w in ("w1", "w2", "w3") for e in range(3)]
                             + ["conv.weight", "emb.pos_embed"])
    pos = model["emb"].pos_embed.detach().double()[0]
    assert spectra["emb.pos_embed"].n_rows == 9
    assert torch.allclose(spectra["emb.pos_embed"].values, torch.linalg.svdvals(pos) ** 2, rtol=1e-10)
    w2 = model["experts"].w2.detach().double()
    for e in range(3):
        assert torch.allclose(spectra[f"experts.w2[{e}]"].values, torch.linalg.svdvals(w2[e]) ** 2, rtol=1e-10)
    conv = model["conv"].weight.detach().double().reshape(6, -1)
    assert spectra["conv.weight"].metadata["matrix_shape"] == [6, 12]
    assert torch.allclose(spectra["conv.weight"].values, torch.linalg.svdvals(conv) ** 2, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("param", ["model.layers.1.mlp.gate.weight", DOWN])
@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_probe_router_and_fused_experts_match_float64_reference(family, param):
    """The router weight (a plain (E, d) parameter of a custom module, not nn.Linear) and a fused expert
    weight: one row per sequence, equal to the float64 per-sequence gradients (the eager experts loop,
    which torch.func.vmap cannot trace: the probe measures it sequence by sequence)."""
    model, pool = moe(family), padded_pool()
    with pytest.warns(sl.EngineFallbackWarning):
        probe = probed(model, param, pool)
    ref = reference_rows(model, param, pool)
    assert probe.engines_ == {param: "loop"}
    assert torch.allclose(probe.matrix(param).double(), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    want = torch.linalg.svdvals(ref) ** 2
    assert torch.allclose(probe.compute().values, want, rtol=1e-9, atol=1e-12 * float(want[0]))


def test_probe_grouped_mm_experts_in_float32():
    """transformers' default experts path (torch._grouped_mm, float32 only) through torch.func.vmap:
    within 1e-4 of the largest entry of the float64 reference (same weights, eager loop)."""
    model, pool = moe(dtype=torch.float32, experts="grouped_mm"), padded_pool(padded=False)
    probe = probed(model, DOWN, pool)
    ref = reference_rows(model, DOWN, pool)
    assert probe.engines_ == {DOWN: "vmap"}
    assert (probe.matrix(DOWN).double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_one_expert_is_a_slice_zero_where_no_token_was_routed():
    """Expert e's per-sequence gradients are the fused rows' slice e; in the last layer a sequence none of
    whose scored tokens went to expert e has an exactly zero row there, the others a nonzero one (every
    sequence stays a sample: M counts them all)."""
    model, pool = moe(), padded_pool(n_batches=2, m=4, length=5)
    with pytest.warns(sl.EngineFallbackWarning):
        probe = probed(model, DOWN, pool)
    G = probe.matrix(DOWN).view(8, 4, -1)
    hit = routed(model, 1, pool)
    assert not hit.all() and hit.any()  # this pool leaves some (sequence, expert) pairs unrouted
    assert torch.equal(G.abs().amax(-1) > 0, hit)
    ref = reference_rows(model, DOWN, pool).view(8, 4, -1)
    for e in range(4):
        assert torch.allclose(G[:, e].double(), ref[:, e], rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_probe_refuses_one_expert_by_index_saying_what_to_pass():
    model = moe(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"down_proj\[3\]' is one slice along dim 0 of parameter .*\(4, 32, 48\).*keep_matrix"):
        PerSampleGradientProbe(model, params=f"{DOWN}[3]")


# ---------------------------------------------------------------------------------------------- lens


@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_lens_defaults_and_router_and_experts_capture(family):
    """Defaults: the deepest block and its o_proj. The router's logits (pick=0) and the experts module's
    output are (B*T, .) token rows: the (B, T) padding mask applies to them flattened (before: a
    ValueError), every valid token is one row (top-k routing sends each token somewhere), and the
    spectra equal float64 covariance references over the valid tokens."""
    model, pool = moe(family), padded_pool()
    lens = sl.SpectralLens(model, pool, progress=False)
    assert (lens.layers, list(lens.probe.params)) == ("model.layers.1", ["model.layers.1.self_attn.o_proj.weight"])
    lens.detach()
    n_valid = sum(int(b["attention_mask"].sum()) for b in pool)
    for module, pick in [("model.layers.1.mlp.gate", 0), ("model.layers.1.mlp.experts", None)]:
        rows = []
        hook = model.get_submodule(module).register_forward_hook(
            lambda mod, a, out: rows.append((out[0] if isinstance(out, tuple) else out).detach()))
        with torch.no_grad():
            for b in pool:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                rows[-1] = rows[-1][b["attention_mask"].flatten().bool()]
        hook.remove()
        ref = np.linalg.eigvalsh(np.cov(torch.cat(rows).numpy(), rowvar=False))[::-1].copy()
        lens = sl.SpectralLens(model, pool, layers=module, pick=pick, params=(), progress=False)
        spec = lens.measure(step=1, tokens=1).spectra[f"act:{module}"]
        lens.detach()
        assert spec.n_rows == n_valid
        assert np.abs(spec.values.numpy() - np.clip(ref, 0, None)).max() <= 1e-8 * ref[0]
