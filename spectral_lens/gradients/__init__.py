"""Per-sample gradient spectra (paper Sec. 2, App. C) and the gradient noise scale.

* :class:`PerSampleGradientProbe`: ``update(batch)`` / ``compute()`` / ``noise_scale()`` / ``reset()``.
* Engines (:mod:`.engines`): per-layer fast paths (:mod:`.registry`, ``nn.Linear`` in :mod:`.linear`,
  ``transformers``' ``Conv1D`` in :mod:`.conv1d`),
  the generic ``torch.func`` engine and a per-sample loop.
* Head + loss chunked over tokens, never the full logits: :mod:`.fused_head`.
* Autocast casts of the weights kept for a whole update instead of redone per chunk: :mod:`.cast_cache`.
* Pure math: :mod:`.gram` (float64 Gram blocks), :mod:`.noise_scale`.
"""

from ._batch import default_forward
from .engines import NoGradientPathError, ReentrantCheckpointError, fast_engine, loop_engine, vmap_engine
from .conv1d import conv1d_per_sample_grad  # registers transformers' Conv1D by name (no import)
from .gram import fill_gram, fill_gram_by_columns, gram_against, gram_spectrum
from .linear import linear_per_sample_grad  # importing it registers the nn.Linear fast path
from .fused_head import (
    causal_lm_head_loss,
    chunked_head_fns,
    find_chunkable_head,
    head_loss_fns,
    linear_cross_entropy,
    without_head,
)
from .losses import causal_lm_loss, causal_lm_targets, extract_logits, token_cross_entropy
from .noise_scale import NoiseScale, noise_scale_from_gram
from .fallback import EngineFallbackWarning
from ._measurable import ATTENTION_OUTPUT_PATTERNS, default_gradient_param
from .probe import PerSampleGradientProbe
from .registry import (
    FAST_PATHS,
    FAST_PATHS_BY_NAME,
    FastPath,
    fast_path_for,
    register_fast_path,
    register_fast_path_by_name,
)

__all__ = [
    "ATTENTION_OUTPUT_PATTERNS",
    "FAST_PATHS",
    "FAST_PATHS_BY_NAME",
    "EngineFallbackWarning",
    "FastPath",
    "NoGradientPathError",
    "NoiseScale",
    "PerSampleGradientProbe",
    "ReentrantCheckpointError",
    "causal_lm_head_loss",
    "causal_lm_loss",
    "causal_lm_targets",
    "chunked_head_fns",
    "conv1d_per_sample_grad",
    "default_forward",
    "default_gradient_param",
    "extract_logits",
    "fast_engine",
    "fast_path_for",
    "fill_gram",
    "find_chunkable_head",
    "fill_gram_by_columns",
    "gram_against",
    "gram_spectrum",
    "head_loss_fns",
    "linear_cross_entropy",
    "linear_per_sample_grad",
    "loop_engine",
    "noise_scale_from_gram",
    "register_fast_path",
    "register_fast_path_by_name",
    "token_cross_entropy",
    "vmap_engine",
    "without_head",
]
