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
