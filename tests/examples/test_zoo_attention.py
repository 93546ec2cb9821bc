"""CPU attention path: the dense-mask path equals a naive reference for every mask kind."""
import pytest
import torch
import torch.nn.functional as F

from examples.nanogpt.model import GPT, Window, dense_window_mask, flex_window_mask, window_at
from examples.nanogpt.variants import build_config

KINDS = [("causal", 0.0, None, "token"), ("doc_causal", 0.05, None, "token"),
         ("sliding_token", 0.03, 7, "token"), ("block", 0.03, 2, "block"), ("block_diag", 0.0, 1, "block")]


def naive_attention(q, k, v, docs, size, unit, block, scale):
    """Per-query loop in float64 with the mask predicate spelled out."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            keys = [j for j in range(i + 1) if docs[b, j] == docs[b, i]
                    and (size is None or (i - j < size if unit == "token" else i // block - j // block < size))]
            s = (q[b, :, i:i + 1].double() @ k[b, :, keys].double().transpose(-1, -2)) * scale
            out[b, :, i] = (s.softmax(-1) @ v[b, :, keys].double())[:, 0]
    return out


def make_inputs(T=40, p_eot=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(3))
    docs = (torch.rand(2, T, generator=g) < p_eot).long().cumsum(1)
    return q, k, v, docs


@pytest.mark.parametrize("name,p_eot,size,unit", KINDS, ids=[k[0] for k in KINDS])
def test_dense_path_matches_naive(name, p_eot, size, unit):
    T, block, scale = 40, 8, 0.3
    q, k, v, docs = make_inputs(T, p_eot)
    ref = naive_attention(q, k, v, docs, size, unit, block, scale)
    mask = dense_window_mask(docs, T if size is None else size, unit, block)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    assert (y.double() - ref).abs().max() < 1e-5
    if name == "causal":  # the dense-era path (is_causal) is the same function
        y2 = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        assert (y2.double() - ref).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name,p_eot,size,unit", KINDS, ids=[k[0] for k in KINDS])
def test_flex_mask_mod_matches_dense_mask(name, p_eot, size, unit):
    """The BlockMask's mask_mod encodes the same predicate (eager FlexAttention forward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    T, block = 256, 16
    q, k, v, docs = make_inputs(T, p_eot / 4, seed=1)
    size = T if size is None else size * 4
    bm = flex_window_mask(docs, size, unit, block)
    y = flex_attention(q, k, v, block_mask=bm, scale=0.25)
    yd = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_window_mask(docs, size, unit, block), scale=0.25)
    assert (y - yd).abs().max() < 1e-5


def test_window_schedules_match_the_records():
    def at(variant, f):
        return window_at(build_config(variant, "d12"), f)
    assert at("U-Net", 0.5) is None
    assert at("FixedWin", 0.3) == Window(1024, 1024, "token")
    assert at("FlexWin", 0.0).long == 64 and at("FlexWin", 1.0).long == 1792 and at("FlexWin", 0.5).long == 896
    assert (at("BetterWin", 0.0).long, at("BetterWin", 0.5).long, at("BetterWin", 1.0).long) == (1, 7, 14)
    assert (at("SoftCap", 0.0).long, at("SoftCap", 1.0).long) == (1, 14)
    assert (at("FP8Head", 0.0).long, at("FP8Head", 0.5).long, at("FP8Head", 1.0).long) == (1, 7, 14)
    assert at("LSWA", 1.0) == Window(14, 7, "block") and at("LSWA", 0.0) == Window(1, 1, "block")


def test_wide_window_single_document_equals_causal():
    """A windowed model whose window covers the row and whose row is one document is plain causal."""
    torch.manual_seed(0)
    cfg_w = build_config("FixedWin", "tiny", seq_len=64, eot_id=319)
    model = GPT(cfg_w).eval()
    idx = torch.randint(0, 256, (2, 64))
    wide = Window(64, 64, "token")
    y_window = model(idx, window=wide)
    model.config = build_config("U-Net", "tiny", seq_len=64, eot_id=319)  # same weights, dense causal
    y_causal = model(idx)
    assert (y_window - y_causal).abs().max() < 1e-4


def test_documents_do_not_leak():
    """Changing tokens of an earlier document does not change logits of a later one."""
    torch.manual_seed(0)
    model = GPT(build_config("LSWA", "tiny", seq_len=96)).eval()
    with torch.no_grad():  # zero-initialized projections/head would make the check vacuous
        for w in model.parameters():
            if w.ndim == 2:
                w.normal_(std=0.1)
    eot = model.config.eot_id
    idx = torch.randint(0, 256, (1, 96))
    idx[0, 0], idx[0, 50] = eot, eot
    idx2 = idx.clone()
    idx2[0, 1:50] = torch.randint(0, 256, (49,))
    a, b = model(idx), model(idx2)
    assert (a[0, 50:] - b[0, 50:]).abs().max() < 1e-5
    assert (a[0, 1:50] - b[0, 1:50]).abs().max() > 1e-3


def test_seq_len_error_names_the_limit():
    model = GPT(build_config("RoPE", "tiny"))
    with pytest.raises(ValueError, match="seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
