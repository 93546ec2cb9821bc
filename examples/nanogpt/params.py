"""Parameter counts of every variant and profile, checked against the paper's Table 4.

Models are built on the meta device, so even d48 (3.57B) costs no memory. Counts are registered
trainable parameters only (Table 4's rule): buffers such as RoPE tables are excluded and a tied
embedding/head tensor counts once.
"""
from __future__ import annotations

import torch

from .model import GPT, count_params
from .variants import PROFILES, VARIANTS, build_config

# (family as named in Table 4, variant, profile, the paper's printed count)
TABLE4 = (
    ("Baseline learned-position tied", "Baseline", "d12", "124.35M"),
    ("RoPE tied", "RoPE", "d12", "123.57M"),
    ("RoPE tied", "Muon", "d12", "123.57M"),
    ("Untied RoPE", "Untied", "d12", "162.20M"),
    ("ValueMix", "ValueMix", "d12", "162.20M"),
    ("U-Net/fixed/flex", "U-Net", "d12", "162.20M"),
    ("U-Net/fixed/flex", "FixedWin", "d12", "162.20M"),
    ("U-Net/fixed/flex", "FlexWin", "d12", "162.20M"),
    ("Full VTE", "VTE", "d12", "625.80M"),
    ("Half VTE / BetterWin", "BetterWin", "d12", "394.00M"),
    *(("Sparse family", v, "d12", "275.74M") for v in ("SparseV", "TruncRoPE", "SoftCap", "FP8Head", "LSWA", "AttnScale")),
    ("Scaled U-Net/flex", "FlexWin", "d36", "836.57M"),
    ("Scaled BetterWin", "BetterWin", "d36", "2.00B"),
    ("Scaled BetterWin", "BetterWin", "d48", "3.57B"),
    ("Scaled sparse family", "SparseV", "d36", "1.02B"),
    ("Scaled sparse family", "SparseV", "d48", "1.87B"),
    ("Scaled sparse family", "AttnScale", "d36", "1.02B"),
)


def fmt_count(n: int) -> str:
    """Table 4's format: two decimals, in M below a billion and B from a billion on."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def param_count(variant: str, profile: str) -> int:
    """Exact trainable-parameter count of ``variant`` at ``profile`` (built on the meta device)."""
    with torch.device("meta"):
        return count_params(GPT(build_config(variant, profile)))


def table4_rows() -> list[dict]:
    """One row per Table-4 entry: our exact count, its printed form, the paper's, and a match flag."""
    rows = []
    for family, variant, profile, paper in TABLE4:
        n = param_count(variant, profile)
        rows.append(dict(family=family, variant=variant, profile=profile, params=n,
                         ours=fmt_count(n), paper=paper, match=fmt_count(n) == paper))
    return rows


def main(show_all: bool = False) -> int:
    """Print the Table-4 check (and every variant x profile with ``show_all``); 0 if all match."""
    rows = table4_rows()
    print(f"{'family':32s} {'variant':10s} {'tier':5s} {'exact':>14s} {'ours':>8s} {'paper':>8s}  match")
    for r in rows:
        print(f"{r['family']:32s} {r['variant']:10s} {r['profile']:5s} {r['params']:14,d} "
              f"{r['ours']:>8s} {r['paper']:>8s}  {'yes' if r['match'] else 'NO'}")
    if show_all:
        print(f"\n{'variant':10s} " + " ".join(f"{p:>14s}" for p in PROFILES))
        for v in VARIANTS:
            print(f"{v:10s} " + " ".join(f"{param_count(v, p):14,d}" for p in PROFILES))
    bad = [r for r in rows if not r["match"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} Table-4 entries match")
    return 1 if bad else 0
