"""The sparse family (SparseV .. AttnScale) at the tiny (4-layer) and small (6-layer) profiles.

The record (12 layers) reads 3 value tables on layers 0-2 and 9-11, leaves the middle layers without one,
and drops the attention of layer 7: a decoder layer without a value table, not the last layer. The
layer rules written for 12 layers (``min(3, L // 2)`` tables, drop layer ``L // 2 + 1``) gave tiny a
table on every layer (2 tables, as BetterWin) and dropped its last layer's attention (in LSWA its only
long-window decoder layer); small had a table on every layer and dropped a layer that carries one.
"""

import pytest
import torch

from examples.nanogpt.model import GPT, sparse_value_tables
from examples.nanogpt.variants import PROFILES, VARIANTS, build_config

SPARSE_FAMILY = VARIANTS[VARIANTS.index("SparseV"):]


def _meta(variant, profile):
    cfg = build_config(variant, profile)
    with torch.device("meta"):
        return cfg, GPT(cfg)


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("variant", SPARSE_FAMILY)
def test_sparse_family_keeps_the_records_layer_roles_at_every_profile(variant, profile):
    cfg, m = _meta(variant, profile)
    L = cfg.n_layer
    n = len(m.value_embeds)
    assert n == sparse_value_tables(L) and n <= 3
    assert m.ve_of == [i if i < n else i - (L - n) if i >= L - n else None for i in range(L)]
    assert any(v is None for v in m.ve_of[1:-1])  # sparse: middle layers read no value table
    (dropped,) = cfg.no_attn_layers
    assert m.blocks[dropped].attn is None and sum(b.attn is None for b in m.blocks) == 1
    assert m.ve_of[dropped] is None  # no table read by a layer without attention
    assert 0 < dropped < L - 1  # the head's input keeps its attention
    if L <= 12:
        assert dropped >= L // 2  # a decoder layer, as in the record (d36/d48 keep layer 7, the medium track's)


def test_the_records_layout_at_d12_and_the_small_profiles():
    cfg, m = _meta("SparseV", "d12")
    assert cfg.no_attn_layers == (7,)
    assert m.ve_of == [0, 1, 2, None, None, None, None, None, None, 0, 1, 2]
    cfg, m = _meta("SparseV", "tiny")
    assert (cfg.no_attn_layers, m.ve_of) == ((2,), [0, None, None, 0])
    cfg, m = _meta("SparseV", "small")
    assert (cfg.no_attn_layers, m.ve_of) == ((3,), [0, 1, None, None, 0, 1])
    for profile in ("d36", "d48"):
        assert build_config("SparseV", profile).no_attn_layers == (7,)


@pytest.mark.parametrize("profile", ["tiny", "small", "d12"])
def test_lswa_keeps_a_long_window_attention_layer_before_the_head(profile):
    cfg, m = _meta("LSWA", profile)
    long_with_attention = [i for i, b in enumerate(m.blocks) if m.long_layer[i] and b.attn is not None]
    assert long_with_attention[0] == 0 and long_with_attention[-1] == cfg.n_layer - 1
