"""The default layer stack (``all_blocks``) is the stack of blocks, not a same-length list of leaf modules
registered before it (per-layer value-embedding tables, as the zoo's VTE variant has: the speedrun's GPU presets
measured ``value_embeds.*`` instead of the residual stream)."""

from __future__ import annotations

import torch
from torch import nn

from spectral_lens._blocks import all_blocks


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class TablesFirst(nn.Module):
    """One embedding table per layer, registered before the blocks, as many as the blocks."""

    def __init__(self, n: int = 3, d: int = 4):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(10, d) for _ in range(n))
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))


def test_a_stack_of_blocks_wins_over_a_same_length_list_of_leaf_tables_registered_first():
    assert all_blocks(TablesFirst()) == ["blocks.0", "blocks.1", "blocks.2"]


def test_a_plain_list_of_leaf_layers_is_still_the_stack_when_it_is_the_only_one():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert all_blocks(model) == ["0", "1"]


def test_every_zoo_variant_measures_its_blocks():
    from examples.nanogpt.model import GPT
    from examples.nanogpt.variants import VARIANTS, build_config

    for variant in VARIANTS:
        torch.manual_seed(0)
        model = GPT(build_config(variant, "tiny"))
        names = all_blocks(model)
        assert names == [f"blocks.{i}" for i in range(len(model.blocks))], (variant, names)
