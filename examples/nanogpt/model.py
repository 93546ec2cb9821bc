"""One compact GPT whose speedrun variants are fields of a frozen config.

Every switch that separates the 16 named variants (see ``variants.py``) is a field of
:class:`GPTConfig`; this file is the whole model. Read the config first: each field says which
variant turns it on. Shapes: ``B`` batch rows, ``T`` tokens, ``H`` heads, ``hd`` head dim.

Attention runs on one of three paths, chosen per forward pass:

* dense causal SDPA (``attn_mask="causal"``: Baseline .. U-Net),
* FlexAttention with block masks (windowed variants on CUDA),
* an exact dense boolean mask with SDPA (windowed variants anywhere else, or on request).

The two windowed paths compute the same function; ``gpu_check.py`` measures their agreement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

WINDOW_SCHEDULES = ("none", "fixed", "token_warmup", "block_v10", "block_v13", "block_v14")


@dataclass(frozen=True)
class GPTConfig:
    """Shape plus every variant switch. Defaults describe the Baseline at d12.

    Fields after ``eot_id`` are the variant switches, grouped by the paper's mechanism groups
    (Table 2); the comment names the first variant that changes each one.
    """

    vocab_size: int = 50304         # rows of every token table (padded; GPT-2 has 50,257 ids)
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    seq_len: int = 1024             # longest row the model accepts (learned-position rows, RoPE cache)
    eot_id: int = 50256             # document separator; document ids = running count of it
    # positional control
    pos: str = "learned"            # "learned" absolute table (Baseline) | "rope" (RoPE)
    rope_base: float = 10000.0
    trunc_rope: bool = False        # TruncRoPE: hd/4 log-spaced frequencies (1 .. 1/1024) + hd/4 zeros
    qk_norm: bool = False           # RoPE: RMS-normalize q and k per head, before rotation
    qkv_fused: bool = True          # Baseline: one c_attn; RoPE: explicit c_q / c_k / c_v
    # parameterization
    tied_head: bool = True          # Untied: separate lm_head (zero-initialized)
    embed_norm: bool = False        # Untied: RMSNorm right after the token embedding
    zero_init_proj: bool = False    # Untied: attention and MLP output projections start at zero
    scaled_attn_branch: bool = True  # Baseline..Muon: attention output times 1/sqrt(2L); off from Untied
    activation: str = "relu2"       # "relu2" (paper's Baseline) | "gelu" (tanh GELU, the records' baseline)
    init_std: float = 1 / math.sqrt(3)  # linear weights ~ U(-a, a), a = init_std*sqrt(3/fan_in); FP8Head: 0.5
    # value pathway and depth routing
    value_mix: str = "none"         # ValueMix: "lerp" v=(1-l)v+l*s ; BetterWin: "affine" v=a*v+b*s
    value_embeds: str = "none"      # source s: "none" -> layer-0 value (ValueMix); VTE: "full" (L tables);
                                    # BetterWin: "half" (L/2 tables, mirrored); SparseV: "sparse" (3 tables, sparse_value_tables)
    x0_mix: bool = False            # ValueMix: each block starts with x = a*x + b*x0 (x0 = embedding)
    unet_skips: bool = False        # U-Net: encoder outputs added (learned weight) into mirrored decoder layers
    no_attn_layers: tuple[int, ...] = ()  # SparseV: blocks that keep their MLP but have no attention
    # attention geometry
    attn_mask: str = "causal"       # "causal" (dense) | "window" (FixedWin: causal & same document & window)
    window: str = "none"            # window schedule over training progress, one of WINDOW_SCHEDULES
    attn_block: int = 128           # block granularity of block windows (tokens)
    lswa: bool = False              # LSWA: long/short windows assigned per layer (short = half the blocks)
    attn_scale: float | None = None  # None -> 1/sqrt(hd); AttnScale: 0.12
    # output / system path
    logit_softcap: float | None = None  # SoftCap: logits = c * tanh(logits / c), c = 15
    fp8_head: bool = False          # FP8Head: LM-head matmul in float8 (training, capable GPUs only)

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"GPTConfig: {what}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "seq_len"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("logit_softcap", "attn_scale"):  # 0 or NaN would make every logit NaN
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), f"{name}={v!r} must be None or a finite number > 0")
        need(math.isfinite(self.rope_base) and self.rope_base > 1, f"rope_base={self.rope_base!r} must be > 1")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        need((self.n_embd // self.n_head) % 4 == 0, f"head dim {self.n_embd // self.n_head} must be a multiple of 4")
        need(self.pos in ("learned", "rope"), f"pos={self.pos!r}, expected 'learned' or 'rope'")
        need(not self.trunc_rope or self.pos == "rope", "trunc_rope needs pos='rope'")
        need(self.activation in ("relu2", "gelu"), f"activation={self.activation!r}, expected 'relu2' or 'gelu'")
        need(self.value_mix in ("none", "lerp", "affine"), f"value_mix={self.value_mix!r}")
        need(self.value_embeds in ("none", "full", "half", "sparse"), f"value_embeds={self.value_embeds!r}")
        need(self.value_embeds == "none" or self.value_mix != "none", "value_embeds need a value_mix")
        need(self.attn_mask in ("causal", "window"), f"attn_mask={self.attn_mask!r}, expected 'causal' or 'window'")
        need(self.window in WINDOW_SCHEDULES, f"window={self.window!r}, expected one of {WINDOW_SCHEDULES}")
        need((self.attn_mask == "window") == (self.window != "none"), "attn_mask='window' needs a window schedule")
        need(self.attn_block >= 2 and self.attn_block % 2 == 0, f"attn_block={self.attn_block} must be even")
        need(not self.unet_skips or self.n_layer % 2 == 0, f"unet_skips needs an even n_layer, got {self.n_layer}")
        need(all(0 < i < self.n_layer for i in self.no_attn_layers),
             f"no_attn_layers={self.no_attn_layers} must lie in 1..{self.n_layer - 1} (layer 0 feeds the value mix)")
        need(self.eot_id < self.vocab_size, f"eot_id={self.eot_id} >= vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# ------------------------------------------------------------------------------------------------
# windows and masks


@dataclass(frozen=True)
class Window:
    """Attention window at one point of training: ``long``/``short`` sizes in ``unit`` s.

    ``unit="token"``: key j is visible to query i iff i - j < size.
    ``unit="block"``: iff i // attn_block - j // attn_block < size. Always also causal and same-document.
    """

    long: int
    short: int
    unit: str


def sparse_value_tables(n_layer: int) -> int:
    """How many value tables ``value_embeds="sparse"`` has: 3 (read by the first 3 and the last 3
    layers, as the record's 12 layers), fewer where a model is too shallow to keep a middle layer
    without one (4 layers: 1, on layers 0 and 3; 6 layers: 2). ``min(3, L // 2)`` put a table on
    every layer of the tiny (4) and small (6) profiles, so SparseV was not sparse there."""
    return max(1, min(3, (n_layer - 1) // 2))


def window_at(cfg: GPTConfig, frac: float) -> Window | None:
    """The window of ``cfg.window`` at training progress ``frac`` in [0, 1] (None for dense causal).

    Written with b = attn_block and h = b/2 so the records' numbers (b = 128) read directly:
    fixed 1024 = 8b tokens; warm-up 64 -> 1792 tokens = h -> 14b; blocks 1 -> 14.
    """
    if cfg.attn_mask == "causal":
        return None
    b, h, f = cfg.attn_block, cfg.attn_block // 2, min(max(float(frac), 0.0), 1.0)
    if cfg.window == "fixed":                      # FixedWin
        return Window(8 * b, 8 * b, "token")
    if cfg.window == "token_warmup":               # FlexWin, VTE
        w = h * int((h + (14 * b - h) * f) // h)
        return Window(w, w, "token")
    if cfg.window == "block_v10":                  # BetterWin, SparseV, TruncRoPE
        n = int(((1 - f) * h + f * 14 * b + h) // b)
    elif cfg.window == "block_v13":                # SoftCap
        n = int(((1 - f) * b + f * (14 * b + h)) // b)
    else:                                          # block_v14: FP8Head onward
        n = max(1, math.ceil((14 * b - h) * f / b))
    return Window(n, max(n // 2, 1) if cfg.lswa else n, "block")


def dense_window_mask(docs: torch.Tensor, size: int, unit: str, block: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, T), True = attend: causal & same document & inside the window."""
    T = docs.size(1)
    i = torch.arange(T, device=docs.device)
    q, k = i[:, None], i[None, :]
    near = (q - k < size) if unit == "token" else (q // block - k // block < size)
    return ((k <= q) & near)[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])


def flex_window_mask(docs: torch.Tensor, size: int, unit: str, block: int):
    """The same mask as :func:`dense_window_mask`, as a FlexAttention ``BlockMask``.

    Mask construction is compiled on CUDA (the records' ``_compile=True``) and eager elsewhere.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    size_t = torch.tensor(size, device=docs.device)  # a tensor, so a new size does not recompile

    def mask_mod(b, h, q, kv):
        near = (q - kv < size_t) if unit == "token" else (q // block - kv // block < size_t)
        return (kv <= q) & (docs[b, q] == docs[b, kv]) & near

    B, T = docs.shape
    return create_block_mask(mask_mod, B, None, T, T, device=docs.device, _compile=docs.is_cuda)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention on (B, H, T, hd) tensors. ``mask``: None (causal), a bool tensor, or a BlockMask."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)


# ------------------------------------------------------------------------------------------------
# FP8 LM head


def fp8_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` FP8 GEMMs run: CUDA with compute capability >= 8.9."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "_scaled_mm")
            and hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Matmul(torch.autograd.Function):
    """y = x @ w.T with x, w in float8 e4m3 (static scales) and the gradient in e5m2 (FP8Head).

    Forward output is bf16 (fast accumulation); grad_x is bf16, grad_w fp32, both without fast
    accumulation, as in the record. x and w use the record's constant scales. The gradient scale is
    the record's ``g_s`` capped by ``0.5 * 57344 / amax(grad)`` (computed on device, no sync): the
    record's constant 2^29 assumes per-logit gradients below ~1e-4, i.e. its token count per step,
    and overflows e5m2 (inf -> NaN gradients) with fewer tokens per step (measured on an H100).
    """

    @staticmethod
    def forward(ctx, x, w, x_s: float, w_s: float, g_s: float):
        f32 = dict(dtype=torch.float32, device=x.device)
        x8 = (x * x_s).to(torch.float8_e4m3fn)
        w8 = (w * w_s).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, w8.t(), out_dtype=torch.bfloat16, scale_a=torch.tensor(1 / x_s, **f32),
                             scale_b=torch.tensor(1 / w_s, **f32), use_fast_accum=True)
        ctx.save_for_backward(x8, w8)
        ctx.scales, ctx.x_dtype = (x_s, w_s, g_s), x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x8, w8 = ctx.saved_tensors
        x_s, w_s, g_s = ctx.scales
        f32 = dict(dtype=torch.float32, device=g.device)
        amax = g.detach().abs().amax().float().clamp_min(1e-30)
        scale = torch.clamp(0.5 * torch.finfo(torch.float8_e5m2).max / amax, max=g_s)  # 0-dim fp32
        g8 = (g.contiguous() * scale).to(torch.float8_e5m2)   # _scaled_mm wants a row-major first operand
        inv = scale.reciprocal()
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), out_dtype=torch.bfloat16,
                                  scale_a=inv, scale_b=torch.tensor(1 / w_s, **f32))
        grad_w = torch._scaled_mm(x8.t().contiguous(), g8.t().contiguous().t(), out_dtype=torch.float32,
                                  scale_a=torch.tensor(1 / x_s, **f32), scale_b=inv).t()
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None


FP8_SCALES = (2.0, 32.0, 2.0**29)  # x, w, grad scales of the 01-13 record


# ------------------------------------------------------------------------------------------------
# modules


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (eps = dtype's machine epsilon)."""
    return F.rms_norm(x, (x.size(-1),))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept in fp64 (``.float()`` would round an fp64 model's activations)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Rotary(nn.Module):
    """Rotate-half RoPE on (B, T, H, hd); cos/sin cached as non-persistent fp32 buffers."""

    def __init__(self, head_dim: int, seq_len: int, base: float, truncate: bool):
        super().__init__()
        if truncate:  # TruncRoPE: hd/4 frequencies from 1 down to 1/1024, then hd/4 unrotated pairs
            q = head_dim // 4
            freqs = torch.cat([(1 / 1024) ** torch.linspace(0, 1, q), torch.zeros(head_dim // 2 - q)])
        else:
            freqs = base ** (-torch.arange(0, head_dim // 2, dtype=torch.float32) * 2 / head_dim)
        theta = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(1)
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = _at_least_fp32(x).chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head attention; optionally mixes a value source s into the values (ValueMix/VTE)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.n_embd
        self.cfg = cfg
        if cfg.qkv_fused:
            self.c_attn = nn.Linear(d, 3 * d, bias=False)
        else:
            self.c_q, self.c_k, self.c_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.c_proj = nn.Linear(d, d, bias=False)
        init = {"none": None, "lerp": [0.5], "affine": [0.5, 0.5]}[cfg.value_mix]
        self.value_lambdas = nn.Parameter(torch.tensor(init)) if init else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5

    def forward(self, x, vsrc, mask, rotary):
        B, T, d = x.shape
        if self.cfg.qkv_fused:
            q, k, v = self.c_attn(x).split(d, dim=-1)
        else:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        q, k, v = (t.view(B, T, self.cfg.n_head, -1) for t in (q, k, v))
        v_raw, dtype = v, v.dtype                  # dtype: the projections' (bf16 under autocast)
        if self.value_lambdas is not None:
            lam = self.value_lambdas.to(dtype)
            src = v if vsrc is None else vsrc.view_as(v).to(dtype)
            if self.cfg.value_mix == "lerp":      # layer 0 of ValueMix mixes with itself (a no-op)
                v = torch.lerp(v, src, lam[0])
            else:                                  # affine; layers without a value embedding keep a*v
                v = lam[0] * v if vsrc is None else lam[0] * v + lam[1] * src
        if self.cfg.qk_norm:
            q, k = norm(q), norm(k)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        q, k = q.to(dtype), k.to(dtype)            # autocast may have run the norm in fp32
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d)), v_raw


class MLP(nn.Module):
    """d -> 4d -> d with squared ReLU (or tanh-GELU)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.relu2 = cfg.activation == "relu2"

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")
        return self.c_proj(x)


class Block(nn.Module):
    """Pre-norm block: optional x/x0 mix, attention (absent in ``no_attn_layers``), MLP."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = None if layer in cfg.no_attn_layers else Attention(cfg)
        self.mlp = MLP(cfg)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.x0_mix else None
        self.branch_scale = 1 / math.sqrt(2 * cfg.n_layer) if cfg.scaled_attn_branch else 1.0

    def forward(self, x, x0, vsrc, mask, rotary):
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        v = None
        if self.attn is not None:
            a, v = self.attn(norm(x), vsrc, mask, rotary)
            x = x + self.branch_scale * a
        return x + self.mlp(norm(x)), v


class GPT(nn.Module):
    """The variant zoo's model. ``forward(idx, targets=None, window=None)``.

    Returns the mean cross-entropy over all positions (fp32 logits, over the padded vocabulary)
    when ``targets`` is given, else the logits. ``window`` is the current :class:`Window`
    (``window_at(config, step / steps)``); None means the final window. Set ``attn_impl`` to
    "dense" or "flex" to force an attention path ("auto": flex on CUDA, dense elsewhere).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config, L, d, V = cfg, cfg.n_layer, cfg.n_embd, cfg.vocab_size
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(cfg.seq_len, d) if cfg.pos == "learned" else None
        self.rotary = Rotary(cfg.head_dim, cfg.seq_len, cfg.rope_base, cfg.trunc_rope) if cfg.pos == "rope" else None
        # which value-embedding table each layer reads (None: none)
        if cfg.value_embeds == "full":
            ve_of = list(range(L))
        elif cfg.value_embeds == "half":      # U-Net mirror: 0 1 .. n-1 n-1 .. 1 0
            ve_of = [min(i, L - 1 - i) for i in range(L)]
        elif cfg.value_embeds == "sparse":    # first n and last n layers: 0 1 2 ... 0 1 2
            n = sparse_value_tables(L)
            ve_of = [i if i < n else i - (L - n) if i >= L - n else None for i in range(L)]
        else:
            ve_of = [None] * L
        self.ve_of = ve_of
        n_tables = max((i for i in ve_of if i is not None), default=-1) + 1
        self.value_embeds = nn.ModuleList(nn.Embedding(V, d) for _ in range(n_tables))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.skip_weights = nn.Parameter(torch.ones(L // 2)) if cfg.unet_skips else None
        self.lm_head = None if cfg.tied_head else nn.Linear(d, V, bias=False)
        # LSWA: encoder layer i is long iff i % 4 == 0 (L,S,S,S,L,S for 6); the decoder mirrors it
        self.long_layer = [((i if i < L // 2 else L - 1 - i) % 4 == 0) if cfg.lswa else True for i in range(L)]
        self.attn_impl = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Initialize as the records do for this configuration (see the config comments)."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                a = cfg.init_std * math.sqrt(3 / m.in_features)
                m.weight.uniform_(-a, a)
        self.wte.weight.normal_(std=0.02 if cfg.tied_head else 1.0)
        if self.wpe is not None:
            self.wpe.weight.normal_(std=0.02)
        for e in self.value_embeds:
            e.weight.normal_(std=1.0)
        if cfg.zero_init_proj:
            for b in self.blocks:
                b.mlp.c_proj.weight.zero_()
                if b.attn is not None:
                    b.attn.c_proj.weight.zero_()
        if self.lm_head is not None:
            self.lm_head.weight.zero_()

    def masks(self, idx: torch.Tensor, window: Window | None):
        """(short, long) masks for this batch on the chosen attention path."""
        cfg = self.config
        if cfg.attn_mask == "causal":
            return None, None
        window = window or window_at(cfg, 1.0)
        if self.attn_impl not in ("auto", "dense", "flex"):
            raise ValueError(f"GPT.attn_impl={self.attn_impl!r}, expected 'auto', 'dense' or 'flex'")
        flex = self.attn_impl == "flex" or (self.attn_impl == "auto" and idx.is_cuda)
        build = flex_window_mask if flex else dense_window_mask
        docs = (idx == cfg.eot_id).cumsum(1)
        long = build(docs, window.long, window.unit, cfg.attn_block)
        short = long if window.short == window.long else build(docs, window.short, window.unit, cfg.attn_block)
        return short, long

    def forward(self, idx, targets=None, window: Window | None = None):
        cfg = self.config
        B, T = idx.shape
        if T > cfg.seq_len:
            raise ValueError(f"GPT: input has {T} tokens per row but the model was built for seq_len={cfg.seq_len}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[:T]
        if cfg.embed_norm:
            x = norm(x)
        x0, ve = x, [e(idx) for e in self.value_embeds]
        masks = self.masks(idx, window)
        v1, skips, half = None, [], cfg.n_layer // 2
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            vsrc = ve[self.ve_of[i]] if self.ve_of[i] is not None else v1
            x, v = block(x, x0, vsrc, masks[self.long_layer[i]], self.rotary)
            if i == 0 and not ve:
                v1 = v
            if self.skip_weights is not None and i < half:
                skips.append(x)
        logits = self.head(norm(x))
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits (fp64 for an fp64 model); FP8 matmul while training when ``fp8_head`` and the GPU supports it."""
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        if self.fp8_head_active(x):
            y = FP8Matmul.apply(x.reshape(-1, x.size(-1)), w, *FP8_SCALES)
            return y.view(*x.shape[:-1], -1).float()
        return _at_least_fp32(F.linear(x, w))

    def fp8_head_active(self, x: torch.Tensor) -> bool:
        """Whether :meth:`head` takes the FP8 path for activations ``x`` (else a plain matmul)."""
        rows = x.numel() // x.size(-1)
        return (self.config.fp8_head and self.training and fp8_supported(x.device)
                and rows % 16 == 0 and x.size(-1) % 16 == 0 and self.config.vocab_size % 16 == 0)


def count_params(model: nn.Module) -> int:
    """Registered trainable parameters (shared tensors counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
