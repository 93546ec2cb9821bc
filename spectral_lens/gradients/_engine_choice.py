"""Which engine measures a parameter of :class:`~spectral_lens.gradients.PerSampleGradientProbe`.

The fast path (:mod:`.registry`) where one is registered for the module type and its rows are exact (the
weight used once, no BatchNorm mixing a chunk's samples), else the generic ``torch.func`` engine, or the
per-sample loop where ``torch.func`` cannot trace the model (a PEFT LoHa layer, Accelerate's offloading
hooks); ``engine="fast"`` or ``"vmap"`` that cannot run is refused with the reason and what to pass
instead. Pure decisions over the model and the probe's settings: the probe keeps the result per parameter
(``engines_``) and asks again when a parameter or the model's layers change.
"""

from __future__ import annotations

from torch import nn

from .._offload import untied_names
from .registry import fast_path_for

__all__ = ["batch_statistics", "choose_engine", "shared_names"]


def shared_names(model: nn.Module, param: nn.Parameter) -> list[str]:
    """Every name under which ``param`` is registered in ``model`` (more than one: tied weights)."""
    return [n for n, q in model.named_parameters(remove_duplicate=False) if q is param]


def batch_statistics(model: nn.Module, train_mode: bool) -> list[str]:
    """BatchNorm layers that normalize by their batch's statistics while measuring: every one with
    ``train_mode=True``, those without running statistics (``track_running_stats=False``) in eval
    mode too. Per sample (the ``vmap`` and ``loop`` engines, the per-sample reference), each
    sequence is normalized by its own statistics; a fast-path pass by its chunk's."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (train_mode or m.running_mean is None)]


def choose_engine(engine: str, model: nn.Module, name: str, site: tuple[nn.Module, str], param: nn.Parameter, *,
                  train_mode: bool, untraceable: dict[str, str], offloading: list[str]) -> str:
    """The engine of parameter ``name`` (``param``, attribute ``site[1]`` of module ``site[0]``) for the probe's
    ``engine`` setting. In a PEFT model with layers whose forward ``torch.func.vmap`` cannot trace (LoHa:
    ``untraceable``), ``"auto"`` takes the loop where it would take ``vmap`` (no failed attempt, no warning)
    and ``engine="vmap"`` is refused here, before any pass; likewise in a model with modules offloaded by
    Accelerate (``offloading``), where a weight tied to another one before offloading
    (:func:`~spectral_lens._offload.untied_names`) is not given the fast path."""
    if engine == "loop":
        return "loop"
    if engine == "vmap":
        if untraceable:
            _refuse_vmap(model, name, site, param, train_mode, untraceable)
        if offloading:
            _refuse_vmap_offloaded(model, offloading)
        return "vmap"
    mod, local = site
    shared = shared_names(model, param)
    reason = None
    coupled = batch_statistics(model, train_mode)
    untied = untied_names(model, name)
    if len(shared) > 1:
        reason = f"it is shared by {shared} (tied weights: the fast path sees one use only)"
    elif untied:
        reason = (f"it is tied to {untied}, offloaded by Accelerate as separate placeholders (tied weights: the "
                  "fast path sees one use only)")
    elif fast_path_for(mod, local) is None:
        reason = f"no fast path is registered for {type(mod).__name__}.{local}"
    elif coupled:
        reason = (f"BatchNorm layer(s) {coupled[:5]} normalize by the statistics of the pass's batch "
                  f"({'train_mode=True' if train_mode else 'track_running_stats=False'}), which mixes the "
                  "samples of a chunk; the fast path differentiates the chunk's summed loss, so its rows would "
                  "depend on chunk_size")
    if reason is None:
        return "fast"
    if engine == "fast":
        other = "'loop'" if untraceable or offloading else "'vmap'"
        raise ValueError(f"engine='fast' impossible for {name}: {reason}; use engine='auto' or {other}")
    return "loop" if untraceable or offloading else "vmap"


def _refuse_vmap_offloaded(model: nn.Module, offloading: list[str]) -> None:
    """``ValueError`` for ``engine="vmap"`` in a model with modules offloaded by Accelerate."""
    raise ValueError(
        f"PerSampleGradientProbe: engine='vmap' impossible for {type(model).__name__}: Accelerate offloads the "
        f"weights of {offloading[:3]}{' and more' if len(offloading) > 3 else ''} (meta placeholders "
        "that its hooks replace inside each forward), which torch.func.functional_call cannot trace; use "
        "engine='auto' (the fast path where one is registered, the per-sample loop on weights that are not "
        "offloaded) or 'loop' (docs/guide-multi-gpu.md, Models dispatched by Accelerate)"
    )


def _refuse_vmap(model: nn.Module, name: str, site: tuple[nn.Module, str], param: nn.Parameter, train_mode: bool,
                 untraceable: dict[str, str]) -> None:
    """``ValueError`` for ``engine="vmap"`` in a model with a layer whose forward vmap cannot trace."""
    (layer, what), more = next(iter(untraceable.items())), len(untraceable) - 1
    mod, local = site
    fast = (len(shared_names(model, param)) == 1 and fast_path_for(mod, local) is not None
            and not batch_statistics(model, train_mode))
    raise ValueError(
        f"PerSampleGradientProbe: engine='vmap' impossible for {type(model).__name__}: its peft layer {layer!r} "
        f"({what}{f'; {more} more such layer(s)' if more else ''}) runs a torch.autograd.Function without "
        "setup_context or vmap rule in its forward (LoHa), which torch.func.vmap cannot trace; use engine='auto' (the "
        "fast path where one is registered, the per-sample loop elsewhere)"
        + (f", engine='fast' ({name} has a fast path)" if fast else "")
        + " or engine='loop' (the same gradients, one backward per sample)"
    )
