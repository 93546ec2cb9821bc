"""The 16 cumulative speedrun variants, the size profiles, and each variant's training recipe.

Each entry of :data:`CHAIN` is "previous variant + these changes": ``model`` changes are
:class:`~examples.nanogpt.model.GPTConfig` fields, ``recipe`` changes are :class:`Recipe` fields.
A change may be a function of the :class:`Profile` (e.g. the long context or the layer count).
``docs/examples-zoo.md`` explains every row and where it follows the paper rather than the records.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .model import GPTConfig, sparse_value_tables


@dataclass(frozen=True)
class Profile:
    """Model size and data geometry.

    A micro-batch is always ``long_ctx`` tokens: one packed row for windowed variants, or
    ``long_ctx // short_ctx`` rows of ``short_ctx`` tokens for dense-causal ones.
    """

    name: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    eot_id: int
    short_ctx: int
    long_ctx: int
    attn_block: int


PROFILES = {
    # CPU-sized, byte-level vocabulary (256 bytes + EOT, padded to 320)
    "tiny": Profile("tiny", 4, 2, 128, 320, 256, 128, 512, 16),
    "small": Profile("small", 6, 4, 256, 320, 256, 256, 2048, 32),
    # the paper's tiers (Table 3), GPT-2 vocabulary padded to 50,304
    "d12": Profile("d12", 12, 6, 768, 50304, 50256, 1024, 65536, 128),
    "d36": Profile("d36", 36, 20, 1280, 50304, 50256, 1024, 32768, 128),
    "d48": Profile("d48", 48, 25, 1600, 50304, 50256, 1024, 32768, 128),
}


@dataclass(frozen=True)
class Recipe:
    """Optimizer groups and schedule of a variant (base rates at the reference tier B = 8).

    Groups: ``matrix`` = 2-D weights inside blocks; ``embed`` = token, position and value
    embeddings (plus the LM head when tied); ``head`` = untied LM head; ``scalar`` = parameters
    with ndim < 2. ``embed``/``head``/``scalar`` always use Adam(W) with ``betas``/``eps``;
    ``weight_decay`` (decoupled) applies to 2-D Adam tensors only.
    """

    matrix_optimizer: str = "adamw"   # "adamw" | "muon" (the trainer can switch to "lamb")
    matrix_lr: float = 6e-4
    embed_lr: float = 6e-4
    head_lr: float = 6e-4
    scalar_lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    muon_scale: str = "sqrt_ratio"    # update scale: "none" | "sqrt_max" sqrt(max(r,c)) | "sqrt_ratio" sqrt(max(1,r/c))
    muon_momentum: str = "classical"  # "classical" B=mu*B+G | "ema" B=mu*B+(1-mu)*G
    momentum_warmup_steps: int = 0    # Muon momentum 0.85 -> 0.95 linearly over this many steps
    warmup_frac: float = 0.0          # LR schedule over progress s/N: linear warm-up,
    cooldown_frac: float = 0.0        # then flat (or cosine), then linear cool-down over the last fraction
    final_lr_frac: float = 0.0        # LR multiplier reached at the end
    decay: str = "linear"             # "linear" (warm-up, flat, cool-down) | "cosine" (warm-up, cosine to final)
    record_steps: int = 0             # N of the modded-nanogpt record (at 524,288 tokens/step)


@dataclass(frozen=True)
class Variant:
    """One link of the chain: its name, what it changes, and the changes themselves."""

    name: str
    group: str
    change: str
    model: dict
    recipe: dict


def _long(p: Profile) -> int:
    return p.long_ctx


def _dropped_attention(p: Profile) -> tuple[int, ...]:
    # the record drops layer 7 of 12 (the second decoder layer, without a value table, four attention
    # layers before the head); the 16-layer medium track keeps 7. Shallower models drop the decoder layer
    # nearest that one which has no value table either and is not the last: at 4 and 6 layers the second
    # decoder layer was the last one or carried a value table (4 layers: layer 3, the head's input and in
    # LSWA a long-window layer), so tiny and small dropped another kind of layer than the record
    return (max(1, min(7, p.n_layer // 2 + 1, p.n_layer - 1 - sparse_value_tables(p.n_layer))),)


CHAIN: tuple[Variant, ...] = (
    Variant("Baseline", "reference trunk",
            "GPT-2-small-style decoder: learned absolute positions, tied embedding/head, dense causal "
            "attention, parameter-free RMSNorm, squared-ReLU MLP; AdamW over all parameters",
            dict(), dict(warmup_frac=700 / 19560, decay="cosine", record_steps=19560)),
    Variant("RoPE", "positional control",
            "rotary embeddings replace learned positions; explicit q/k/v projections; q/k RMS-normalized "
            "before rotation",
            dict(pos="rope", qkv_fused=False, qk_norm=True),
            dict(warmup_frac=256 / 9536, cooldown_frac=2048 / 9536, decay="linear", record_steps=9536)),
    Variant("Muon", "optimizer",
            "hidden matrices trained with Muon (update scale sqrt(max(r,c)), lr 3.6e-4); embedding with "
            "Adam 3.6e-3, no weight decay",
            dict(),
            dict(matrix_optimizer="muon", matrix_lr=3.6e-4, embed_lr=3.6e-3, head_lr=3.6e-3, scalar_lr=3.6e-3,
                 weight_decay=0.0, muon_scale="sqrt_max", warmup_frac=0.0, cooldown_frac=1450 / 5100,
                 record_steps=5100)),
    Variant("Untied", "parameterization",
            "separate zero-initialized LM head (own Adam group); RMSNorm after the embedding; zero-init "
            "output projections; no 1/sqrt(2L) attention-branch scale",
            dict(tied_head=False, embed_norm=True, zero_init_proj=True, scaled_attn_branch=False),
            dict(matrix_lr=0.02, embed_lr=0.3, head_lr=0.002, muon_scale="sqrt_ratio",
                 cooldown_frac=1308 / 4578, record_steps=4578)),
    Variant("ValueMix", "value pathway",
            "value residual: v = (1-l)*v + l*v_layer0 with a learned l per layer; embedding shortcut "
            "x = a*x + b*x0 per block; Muon momentum warm-up",
            dict(value_mix="lerp", x0_mix=True),
            dict(scalar_lr=0.02, momentum_warmup_steps=500, cooldown_frac=914 / 3200, record_steps=3200)),
    Variant("U-Net", "depth routing",
            "encoder layer outputs added, with learned weights, into the mirrored decoder layers; "
            "doubled learning rates",
            dict(unet_skips=True),
            dict(matrix_lr=0.04, embed_lr=0.6, head_lr=0.008, scalar_lr=0.04,
                 cooldown_frac=900 / 3000, record_steps=3000)),
    Variant("FixedWin", "attention geometry",
            "document-aware sliding-window attention, 1,024 tokens (FlexAttention); one packed "
            "long-context row per micro-batch",
            dict(attn_mask="window", window="fixed", seq_len=_long),
            dict(cooldown_frac=562 / 1875, record_steps=1875)),
    Variant("FlexWin", "attention geometry",
            "window warm-up 64 -> 1,792 tokens over training; Adam betas (0.8, 0.95); momentum warm-up 300",
            dict(window="token_warmup"),
            dict(betas=(0.8, 0.95), momentum_warmup_steps=300, cooldown_frac=640 / 1750, record_steps=1750)),
    Variant("VTE", "value pathway",
            "one value-token embedding table per layer mixed into the values (replaces the layer-0 value)",
            dict(value_embeds="full"),
            dict(cooldown_frac=600 / 1530, record_steps=1530)),
    Variant("BetterWin", "attention/value geometry",
            "L/2 split value tables reused in U-Net mirror order with two mix scalars (a*v + b*ve); "
            "block sliding window 1 -> 14 blocks of 128; EMA Muon momentum",
            dict(value_embeds="half", value_mix="affine", window="block_v10"),
            dict(muon_momentum="ema", cooldown_frac=600 / 1480, record_steps=1480)),
    Variant("SparseV", "value sparsity",
            "three value tables on the first three and last three layers (fewer below 8 layers, keeping middle "
            "layers without one); one decoder layer without attention nor value table (layer 7 at d12)",
            dict(value_embeds="sparse", no_attn_layers=_dropped_attention),
            dict(cooldown_frac=600 / 1490, record_steps=1490)),
    Variant("TruncRoPE", "positional shaping",
            "RoPE on half of each head: hd/4 frequencies from 1 to 1/1024, hd/4 dims position-free",
            dict(trunc_rope=True), dict()),
    Variant("SoftCap", "output shaping",
            "logit soft-cap 15*tanh(z/15); LR cool-down over the last 40%",
            dict(logit_softcap=15.0, window="block_v13"),
            dict(cooldown_frac=0.4, record_steps=1390)),
    Variant("FP8Head", "output/system path",
            "LM-head matmul in FP8 (e4m3 forward, e5m2 gradients, static scales); LR floor 0.1; "
            "linear init std 0.5/sqrt(fan_in)",
            dict(fp8_head=True, init_std=0.5, window="block_v14"),
            dict(final_lr_frac=0.1, record_steps=1395)),
    Variant("LSWA", "attention geometry",
            "long/short windows by layer: L,S,S,S,... per encoder half, mirrored in the decoder; short = "
            "half the blocks",
            dict(lswa=True), dict(record_steps=1393)),
    Variant("AttnScale", "schedule controls",
            "attention logit scale fixed at 0.12; Adam eps 1e-10",
            dict(attn_scale=0.12), dict(eps=1e-10)),
)

VARIANTS: tuple[str, ...] = tuple(v.name for v in CHAIN)


def _resolve(changes: dict, profile: Profile) -> dict:
    return {k: (v(profile) if callable(v) else v) for k, v in changes.items()}


def _lookup(name: str) -> int:
    names = {v.lower(): i for i, v in enumerate(VARIANTS)}
    aliases = {"unet": "u-net", "sublr": "attnscale", "attnscale/sublr": "attnscale"}
    key = aliases.get(name.lower(), name.lower())
    if key not in names:
        raise KeyError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return names[key]


def get_profile(name: str) -> Profile:
    """The :class:`Profile` called ``name`` (one of ``PROFILES``)."""
    if name not in PROFILES:
        raise KeyError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[name]


def build_config(variant: str, profile: str | Profile = "d12", **overrides) -> GPTConfig:
    """The model config of ``variant`` at ``profile``: base shape, then every change up to the variant.

    ``overrides`` replace config fields last (e.g. ``seq_len=8192`` or ``eot_id=256``).
    """
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    fields = dict(vocab_size=p.vocab_size, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd,
                  seq_len=p.short_ctx, eot_id=p.eot_id, attn_block=p.attn_block)
    for v in CHAIN[: _lookup(variant) + 1]:
        fields.update(_resolve(v.model, p))
    fields.update(overrides)
    return GPTConfig(**fields)


def build_recipe(variant: str, **overrides) -> Recipe:
    """The training recipe of ``variant`` (cumulative, like the model config)."""
    r = Recipe()
    for v in CHAIN[: _lookup(variant) + 1]:
        r = dataclasses.replace(r, **v.recipe)
    return dataclasses.replace(r, **overrides)


def canonical_name(variant: str) -> str:
    """The registry spelling of ``variant`` (case-insensitive; "unet" and "SubLR" are accepted)."""
    return VARIANTS[_lookup(variant)]
