"""all_blocks on hybrid stacks without transformers: a model whose ``config.num_hidden_layers`` counts a
``ModuleList`` of blocks of two classes takes that list as its stack, not a homogeneous list inside a block."""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from spectral_lens.lens import all_blocks, deepest_block


class PretrainedConfig(SimpleNamespace):
    """Stands for ``transformers.PretrainedConfig``: the rule counts a ``transformers`` config only (by class name)."""


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.out_proj = nn.LayerNorm(8), nn.Linear(8, 8)


class Hybrid(nn.Module):  # a shared attention with a homogeneous list of adapters inside (Zamba2)
    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 8)) for _ in range(3))


class HybridLM(nn.Module):
    def __init__(self, n_config=4, extra=None):
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=n_config)
        self.embed = nn.Embedding(11, 8)
        self.layers = nn.ModuleList([Mixer(), Hybrid(), Mixer(), Hybrid()])
        if extra is not None:
            self.extra = extra


def test_a_hybrid_stack_counted_by_the_config_is_the_stack():
    model = HybridLM()
    assert all_blocks(model) == [f"layers.{i}" for i in range(4)]
    assert deepest_block(model) == "layers.3"


def test_without_a_matching_config_the_choice_is_as_before():
    """A config that does not count the list (a truncated model), or no config: homogeneous lists first."""
    for model in (HybridLM(n_config=6), HybridLM(n_config=None)):
        assert all_blocks(model)[0].startswith("layers.1.adapters")


def test_a_list_of_leaf_modules_as_long_as_the_config_is_not_the_stack():
    """Per-layer tables or projections (leaf modules) of config.num_hidden_layers entries beside the blocks."""
    model = HybridLM(extra=nn.ModuleList(nn.Linear(8, 8) for _ in range(4)))
    assert all_blocks(model) == [f"layers.{i}" for i in range(4)]
