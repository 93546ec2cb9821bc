"""Review 23 (tidy): an engine refusal names only engines that would be accepted for the parameter.

A tiny float64 Llama (tied head) with a PEFT LoHa layer (whose forward ``torch.func.vmap`` cannot trace) and
Accelerate's ``cpu_offload`` (every weight a meta placeholder between forwards, the tied head and embedding
separate placeholders): the per-sample loop cannot differentiate an offloaded weight, and the fast path refuses
a weight tied before offloading. Before: the LoHa refusal of ``engine='vmap'`` suggested ``engine='fast'`` for
the tied head (refused: tied) and ``engine='loop'`` for every offloaded weight (refused: offloaded), the
refusal of ``engine='fast'`` suggested ``'auto'`` and ``'loop'`` (both refused), and the offloading refusal of
``engine='vmap'`` suggested ``'loop'``.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import spectral_lens as sl

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
peft = pytest.importorskip("peft", reason="the hf extra installs peft")
accelerate = pytest.importorskip("accelerate", reason="the hf extra installs accelerate")

V = 61
HEAD = "lm_head.weight"  # tied to the embedding; offloaded as a separate placeholder
PROJ = "model.layers.1.self_attn.o_proj.weight"  # an untied nn.Linear, offloaded: the fast path measures it


def offloaded(loha: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).double()
    if loha:
        model = peft.get_peft_model(model, peft.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accelerate.cpu_offload(model.double(), execution_device="cpu")


def suggested(message: str) -> list[str]:
    """The engines a refusal suggests: those named after its last '; use '."""
    _, use, tail = message.rpartition("; use ")
    return re.findall(r"'(auto|fast|vmap|loop)'", tail) if use else []


def refusal(model, param: str, engine: str) -> str:
    with pytest.raises(ValueError) as info:
        sl.PerSampleGradientProbe(model, params=param, engine=engine)
    return str(info.value)


@pytest.mark.parametrize("loha", [True, False], ids=["loha", "plain"])
def test_refusals_suggest_only_accepted_engines(loha):
    model = offloaded(loha)
    cases = [(HEAD, "vmap"), (HEAD, "fast"), (PROJ, "vmap")]
    for param, engine in cases:
        message = refusal(model, param, engine)
        assert f"engine='{engine}' impossible" in message, message
        for other in suggested(message):
            probe = sl.PerSampleGradientProbe(model, params=param, engine=other)  # accepted: no ValueError
            assert list(probe.engines_.values()) == ["fast"], (param, engine, other, message)
    head = refusal(model, HEAD, "vmap")
    assert suggested(head) == [] and "no engine can measure" in head and "tied to" in head, head
    assert "no engine can measure" in refusal(model, HEAD, "fast")
    proj = refusal(model, PROJ, "vmap")
    assert set(suggested(proj)) == {"auto", "fast"}, proj


class _SeqFirst(torch.nn.Module):
    """``o`` sees (T, M, d): its fast path is not called (samples are not in dimension 0), found in the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.o, self.head = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 11)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(torch.cumsum(torch.tanh(self.o(h.transpose(0, 1))), 0).transpose(0, 1))


def test_fast_path_found_unusable_in_a_loha_model_takes_the_loop():
    """In a LoHa model (``head`` a LoHa layer) the fast path of ``o.weight`` turns out unusable in the first pass.
    ``"auto"`` then takes the per-sample loop at once, as its engine choice does in such a model (before: vmap, a
    failed trace and an EngineFallbackWarning), and ``engine='fast'`` suggests ``'loop'`` (before: ``'vmap'``,
    refused in a LoHa model)."""
    torch.manual_seed(0)
    base = _SeqFirst().double()
    model = peft.get_peft_model(base, peft.LoHaConfig(r=2, target_modules=["head"], init_weights=False)).double()
    batch = (torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sl.EngineFallbackWarning)
        probe = sl.PerSampleGradientProbe(model, params="o.weight", keep_matrix=True).update(batch)
    assert list(probe.engines_.values()) == ["loop"]
    with pytest.raises(ValueError, match=r"engine='fast' impossible for .*o\.weight: .*; use engine='auto' or 'loop'$"):
        sl.PerSampleGradientProbe(model, params="o.weight", engine="fast").update(batch)


def test_a_refused_attach_leaves_the_probe_unbound():
    """A probe whose ``attach`` is refused (``engine='fast'`` on a weight of a module registered twice) stays
    unbound: it attaches to another model afterwards, and a lens attaching it likewise. Before: the refused
    model stayed bound (``probe.model`` set, no handle to remove), so the next ``attach`` raised "attached to
    another Sequential"."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))

    shared = net()
    shared.add_module("3", shared[0])  # the same Linear under two names: its weight is shared
    kw = dict(engine="fast", loss_fn=lambda out, batch: out.pow(2).sum(1), forward_fn=lambda m, batch: m(batch))
    probe = sl.PerSampleGradientProbe(params="0.weight", **kw)
    with pytest.raises(ValueError, match=r"engine='fast' impossible for 0\.weight: it is shared by"):
        probe.attach(shared)
    assert probe.model is None and probe.params == {} and probe.engines_ == {}
    fine = net()
    with probe.attach(fine):
        assert probe.model is fine and probe.engines_ == {"0.weight": "fast"}
        assert probe.update(torch.randn(4, 3, dtype=torch.float32)).n_samples_ == 4
    assert probe.model is None
    lens_probe = sl.PerSampleGradientProbe(params="0.weight", **kw)
    lens = sl.SpectralLens(pool=[torch.randn(4, 3)], layers="0", probe=lens_probe, forward_fn=lambda m, b: m(b),
                           progress=False)
    with pytest.raises(ValueError, match=r"it is shared by"):
        lens.attach(shared)
    assert lens.model is None and lens_probe.model is None
    with lens.attach(fine):
        assert lens.model is fine and lens_probe.model is fine
