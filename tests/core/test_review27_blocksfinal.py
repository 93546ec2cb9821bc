"""``all_blocks`` on user models the other tests do not build: blocks in an ``nn.Sequential`` with a final norm
(or the embedding and head) inside it, and a model whose only containers hold no parameters (nothing fits)."""

from __future__ import annotations

import pytest
from torch import nn

from spectral_lens.lens import all_blocks, deepest_block

D = 8


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.key, self.query, self.value = nn.Linear(D, 2), nn.Linear(D, 2), nn.Linear(D, 2)


class MultiHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(Head() for _ in range(4))
        self.proj = nn.Linear(8, D)


class Block(nn.Module):
    """The block of Karpathy's "Let's build GPT" lecture: its attention a ``ModuleList`` of per-head modules."""

    def __init__(self):
        super().__init__()
        self.sa, self.ln1, self.ln2 = MultiHead(), nn.LayerNorm(D), nn.LayerNorm(D)
        self.ffwd = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))


class LectureGPT(nn.Module):
    """The lecture's model: ``blocks = nn.Sequential(Block(), Block(), Block(), nn.LayerNorm(d))``."""

    def __init__(self, n=3):
        super().__init__()
        self.tok = nn.Embedding(11, D)
        self.blocks = nn.Sequential(*[Block() for _ in range(n)], nn.LayerNorm(D))
        self.lm_head = nn.Linear(D, 11)


def test_a_sequential_of_blocks_with_a_final_norm_inside_is_the_stack_without_the_norm():
    """Before: the final norm made the Sequential two classes, and the first block's list of heads was chosen
    (the default probe one attention head of block 0)."""
    assert all_blocks(LectureGPT()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert deepest_block(LectureGPT()) == "blocks.2"


def test_a_whole_model_as_one_sequential_takes_the_blocks_between_embedding_and_head():
    model = nn.Sequential(nn.Embedding(11, D), *[Block() for _ in range(3)], nn.LayerNorm(D), nn.Linear(D, 11))
    assert all_blocks(model) == ["1", "2", "3"]


def test_leaf_modules_among_the_blocks_or_blocks_of_two_classes_keep_the_whole_container():
    """Only leaf modules before or after one class of blocks are left out: a list of leaf layers, blocks of two
    classes (a hybrid stack) and a leaf between blocks keep every element, as before."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

    class Another(Other):
        pass

    assert all_blocks(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))) == ["0", "1", "2"]
    hybrid = nn.Sequential(Other(), Another(), Other(), nn.LayerNorm(D))
    assert all_blocks(hybrid) == ["0", "1", "2", "3"]
    spaced = nn.Sequential(Other(), nn.Dropout(), Other(), nn.LayerNorm(D))
    assert all_blocks(spaced) == ["0", "1", "2", "3"]


def test_a_model_whose_containers_hold_no_parameters_is_refused_with_its_modules_named():
    """Before: the Sequential of activations was the stack (a ReLU the default probe)."""

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1, self.block2 = Unit(), Unit()
            self.acts = nn.Sequential(nn.ReLU(), nn.GELU())

    with pytest.raises(ValueError, match=r"Plain: found no ModuleList/Sequential/ModuleDict of blocks with "
                                         r"parameters.*block1 \(Unit\).*pass layers="):
        all_blocks(Plain())


# ------------------------------------------------- what docs/lens.md says of other user models (pinned)

class Unit(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)


def test_two_stacks_as_long_without_a_config_the_first_registered_and_groups_of_blocks_the_groups():
    encdec = nn.Module()
    encdec.encoder, encdec.decoder = nn.ModuleList(Unit() for _ in range(3)), nn.ModuleList(Unit() for _ in range(3))
    assert all_blocks(encdec) == ["encoder.0", "encoder.1", "encoder.2"]
    groups = nn.Module()
    groups.groups = nn.ModuleList(nn.ModuleDict({"a": Unit(), "b": Unit()}) for _ in range(3))
    assert all_blocks(groups) == ["groups.0", "groups.1", "groups.2"]
    keyed = nn.Module()
    keyed.layers = nn.ModuleDict({k: Unit() for k in ("first", "second", "third")})
    assert all_blocks(keyed) == ["layers.first", "layers.second", "layers.third"]


@pytest.mark.slow  # importing peft and transformers: about 7 s on a loaded CPU
def test_peft_and_torch_compile_together_measure_the_decoder_layers():
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    peft = pytest.importorskip("peft", reason="peft is not installed")
    import torch

    from spectral_lens.lens import SpectralLens

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(model)
    names = [f"base_model.model.model.layers.{i}" for i in range(2)]
    assert all_blocks(compiled) == [f"_orig_mod.{n}" for n in names]
    assert SpectralLens(compiled, [{"input_ids": torch.ones(1, 3, dtype=torch.long)}], layers="all",
                        params=()).layers == names


def test_a_looped_stack_all_measures_the_shared_block_once_and_none_is_refused():
    import torch

    from spectral_lens.lens import SpectralLens

    looped = nn.Module()
    looped.layers = nn.ModuleList([Unit()] * 3)
    pool = [torch.zeros(1, D)]
    assert SpectralLens(looped, pool, layers="all", params=()).layers == ["layers.0"]
    with pytest.raises(ValueError, match=r"'layers.2' is the module 'layers.0' again"):
        SpectralLens(looped, pool, params=())
