"""Mutation audit of the lens's default choices: which stack ``all_blocks`` picks (each criterion of its
ranking decides a case on its own), and which probed matrix ``noise_scale`` comes from."""

from __future__ import annotations

import math

import torch
from torch import nn

from spectral_lens import SpectralLens
from spectral_lens.lens import all_blocks, deepest_block

from support.models import TinyLM, lm_pool


class _Stacks(nn.Module):
    """Two candidate stacks; ``forward`` is never called."""

    def __init__(self, **stacks):
        super().__init__()
        for name, stack in stacks.items():
            setattr(self, name, stack)


def _lin(k):
    return [nn.Linear(2, 2) for _ in range(k)]


def test_a_homogeneous_stack_beats_a_longer_mixed_or_parameterless_list():
    mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)])
    model = _Stacks(heads=mixed, blocks=nn.ModuleList(_lin(3)))
    assert all_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]
    # one class but no parameters is not a stack of blocks either
    model = _Stacks(acts=nn.ModuleList(nn.ReLU() for _ in range(6)), blocks=nn.ModuleList(_lin(2)))
    assert deepest_block(model) == "blocks.1"


def test_a_module_list_beats_a_longer_sequential_and_length_beats_depth():
    model = _Stacks(seq=nn.Sequential(*_lin(4)), blocks=nn.ModuleList(_lin(3)))
    assert all_blocks(model) == ["blocks.0", "blocks.1", "blocks.2"]
    inner = _Stacks(layers=nn.ModuleList(_lin(5)))
    model = _Stacks(outer=inner, blocks=nn.ModuleList(_lin(3)))
    assert deepest_block(model) == "outer.layers.4"  # longer, although deeper
    model = _Stacks(outer=_Stacks(layers=nn.ModuleList(_lin(3))), blocks=nn.ModuleList(_lin(3)))
    assert deepest_block(model) == "blocks.2"  # same length: the shallower one


def test_noise_scale_is_the_first_probed_matrix_in_model_order():
    torch.manual_seed(0)
    model = TinyLM(tied=False, dropout=0.0).double()
    first, last = "h.0.attn.c_attn.weight", "h.2.attn.c_proj.weight"
    lens = SpectralLens(model, lm_pool(), params=[first, last], layers="h.0", progress=False)
    m = lens.measure(0, 0)
    a, b = m.scalars[f"noise_scale:{first}"], m.scalars[f"noise_scale:{last}"]
    assert math.isfinite(a) and a != b  # the two matrices' noise scales differ (b is inf here), so the choice shows
    assert m.scalars["noise_scale"] == a


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(2, 2)


class _MoEBlock(nn.Module):
    def __init__(self, n_experts):
        super().__init__()
        self.attn = nn.Linear(2, 2)
        self.experts = nn.ModuleList(_Expert() for _ in range(n_experts))


def test_lists_inside_a_block_are_not_the_stack():
    """A mixture-of-experts layer keeps its experts in a ModuleList (Mixtral and Qwen2-MoE in
    transformers 4.x): with more experts than layers, length alone picked ``layers.0.experts``, and
    the lens measured one expert of the first layer (then failed on its routed token count)."""
    model = _Stacks(layers=nn.ModuleList(_MoEBlock(8) for _ in range(2)))
    assert all_blocks(model) == ["layers.0", "layers.1"]
    assert deepest_block(model) == "layers.1"
    # a bare ModuleList as the whole model is the stack too (the root's name is "")
    stack = nn.ModuleList(_MoEBlock(4) for _ in range(3))
    assert deepest_block(stack) == "2"
    # a Sequential stack of such blocks: not being inside another stack counts before being a ModuleList
    model = _Stacks(seq=nn.Sequential(*(_MoEBlock(3) for _ in range(2))))
    assert deepest_block(model) == "seq.1"
