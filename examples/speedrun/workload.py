"""The NanoGPT zoo as a replication :class:`~examples.replicate.workload.Workload`.

A measured run trains one family at one batch tier with its tuned rates while
:class:`spectral_lens.SpectralLens` measures every block's activation spectrum and the final
attention output projection's per-sample gradient spectrum on a fixed held-out pool at every
validation point (every ``preset.measure_every`` of the budget, so 10-50% progress is resolved). The
record is a ``RunWriter`` directory; ``run.json``'s ``extras.status == "complete"`` marks it finished.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch

import spectral_lens as sl
from examples.nanogpt.data import heldout_pool, load_data
from examples.nanogpt.train import train
from examples.nanogpt.variants import build_config, build_recipe, canonical_name, get_profile
from spectral_lens.records import RunInfo, RunWriter

from .presets import Preset
from .trainable import ZooTrainable, lr_scale_of

__all__ = ["ZooWorkload", "run_id", "is_complete", "LR_GROUPS"]

LR_GROUPS = ("matrix", "embed", "head", "scalar")
COMPLETE = "complete"


def run_id(family: str, tier: int) -> str:
    """The run id (and directory name) of ``family`` at ``tier``, e.g. ``"rope-b4"``."""
    return f"{family.lower().replace('/', '-')}-b{tier}"


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished measured run (``run.json`` with ``extras.status == "complete"``)."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return False
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (header.get("extras") or {}).get("status") == COMPLETE


class ZooWorkload:
    """The zoo's speedrun for one :class:`~examples.speedrun.presets.Preset`.

    Args:
        preset: what to train.
        verbose: print one line per finished run.

    Besides the ``Workload`` attributes it has ``fraction`` (the early checkpoint) and ``window`` (the
    alpha_tail rank window), the optional attributes the shared pipeline reads.
    """

    unit = "tokens"

    def __init__(self, preset: Preset, *, verbose: bool = True):
        self.preset = preset
        self.lr_factor = preset.lr_factor
        self.verbose = verbose
        self.name = f"speedrun-{preset.name}"
        self.families = tuple(canonical_name(f) for f in preset.families)
        self.tiers = tuple(preset.tiers)
        self.reference_tier = preset.reference_tier
        self.target_loss = preset.target_loss
        self.budget = preset.budget
        self.fraction = preset.fraction  # the early checkpoint and tail window, read by the report
        self.window = tuple(preset.tail_window)
        self._pool = None

    # ---- Workload protocol -------------------------------------------------------------------
    def reference_lrs(self, family: str) -> Mapping[str, float]:
        """The family's rate per optimizer group at ``reference_tier`` (recipe rate x ``preset.lr_factor``)."""
        r = build_recipe(canonical_name(family))
        rates = dict(matrix=r.matrix_lr, embed=r.embed_lr, head=r.head_lr, scalar=r.scalar_lr)
        return {g: rates[g] * self.lr_factor for g in LR_GROUPS}

    def trainable(self) -> ZooTrainable:
        """The tuner's callable (trains candidates without measurements)."""
        refs = {f: self.reference_lrs(f) for f in self.families}
        return ZooTrainable(self.preset, refs, self.lr_factor)

    def run(self, family: str, tier: int, lrs: Mapping[str, float], run_dir: Path) -> Path:
        """Train ``family`` at ``tier`` with ``lrs`` and measure; returns the finished record directory.

        An unfinished directory (interrupted run) is removed and the run starts again.
        """
        p = self.preset
        family = canonical_name(family)
        run_dir = Path(run_dir)
        if is_complete(run_dir):
            return run_dir
        if run_dir.exists():
            shutil.rmtree(run_dir)
        scale = lr_scale_of(lrs, self.reference_lrs(family), self.lr_factor)
        cfg = build_config(family, get_profile(p.profile))
        seq_len = p.seq_len or cfg.seq_len
        rows = p.rows or (1 if cfg.attn_mask == "window" else max(1, get_profile(p.profile).long_ctx // seq_len))
        info = RunInfo(run_id(family, tier), family=family, batch_tier=tier, tokens_per_step=tier * rows * seq_len,
                       seed=p.seed, n_layer=cfg.n_layer, total_tokens=p.budget, batch_size=tier * rows,
                       primary_spectrum=f"act:blocks.{cfg.n_layer - 1}",
                       extras=dict(preset=p.name, profile=p.profile, data=p.data, lrs=dict(lrs), lr_scale=scale,
                                   target_loss=p.target_loss, status="running"))
        writer = RunWriter(run_dir, info, tail_window=p.tail_window, head_window=p.head_window)
        device = torch.device(p.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pool = self.pool(device)
        state: dict = {}

        def on_eval(model: torch.nn.Module, step: int, tokens: int, val_loss: float) -> None:
            if "lens" not in state:  # zoo blocks return (x, v): pick=0 takes the residual stream
                state["lens"] = sl.SpectralLens(
                    model, pool, layers="all", pick=0, gradient_samples=p.gradient_samples, writer=writer,
                    autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
            state["lens"].measure(step, tokens, val_loss=val_loss, progress=tokens / p.budget)
            writer.log(step, tokens, val_loss=val_loss)

        try:
            result = train(variant=family, profile=p.profile, data=p.data, run_dir=run_dir / "train",
                           tokens=p.budget, batch_tier=tier, seq_len=p.seq_len, rows=p.rows, lr_scale=scale,
                           eval_every_tokens=max(1, int(p.measure_every * p.budget)), val_tokens=p.val_tokens,
                           save_final=False, seed=p.seed, device=str(device), compile=p.compile,
                           attn_impl=p.attn_impl, on_eval=on_eval, verbose=False)
            reached = min(r["val_loss"] for r in result.history) <= p.target_loss
            writer.update_info(throughput=result.tokens_per_s, final_val_loss=result.final_val_loss,
                               reached_target=bool(reached), device=str(device), status=COMPLETE)
        finally:
            writer.close()
        if self.verbose:
            print(f"  {info.run_id}: {result.steps} steps, final val loss {result.final_val_loss:.3f}"
                  f"{'' if reached else ' (target not reached)'}, {result.tokens_per_s:,.0f} tokens/s", flush=True)
        return run_dir

    # ---- helpers ---------------------------------------------------------------------------
    def pool(self, device: torch.device) -> list:
        """The fixed held-out measurement pool (the same sequences for every run and checkpoint)."""
        if self._pool is None or self._pool[0] != device:
            data = load_data(self.preset.data)
            batches = list(heldout_pool(data.val, self.preset.pool_seq_len, self.preset.pool_seqs,
                                        batch_size=8, device=device))
            self._pool = (device, batches)
        return self._pool[1]
