"""NanoGPT variant zoo: the 16 cumulative modded-nanogpt variants behind the spectral-lens paper.

``model.py`` (one model, variant switches as config fields), ``variants.py`` (the chain, profiles,
recipes), ``muon.py``/``optim.py`` (optimizers and schedules), ``data.py`` (shards, bundled corpus),
``train.py`` (trainer), ``params.py`` (Table-4 counts), ``gpu_check.py`` (GPU path checks).
"""
from .model import GPT, GPTConfig, Window, count_params, window_at
from .variants import PROFILES, VARIANTS, build_config, build_recipe

__all__ = ["GPT", "GPTConfig", "Window", "count_params", "window_at", "PROFILES", "VARIANTS",
           "build_config", "build_recipe"]
