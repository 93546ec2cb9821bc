"""Which engine measures a parameter of :class:`~spectral_lens.gradients.PerSampleGradientProbe`.

The fast path (:mod:`.registry`) where one is registered for the module type and its rows are exact (the
weight used once, no BatchNorm mixing a chunk's samples), else the generic ``torch.func`` engine, or the
per-sample loop where ``torch.func`` cannot trace the model (a PEFT LoHa layer, Accelerate's offloading
hooks, BatchNorm or InstanceNorm updating its running statistics); ``engine="fast"`` or ``"vmap"`` that cannot
run is refused with the reason and what to pass instead. Pure decisions over the model and the probe's settings: the probe keeps the result per parameter
(``engines_``) and asks again when a parameter or the model's layers change.
"""

from __future__ import annotations

from torch import nn

from .._deepspeed import is_zero3, whole_shape
from .._offload import offloaded_names, untied_names
from ._measurable import _fsdp_classes, fsdp_sharded
from .registry import fast_path_for

__all__ = ["batch_statistics", "choose_engine", "fast_refusal", "general_engine", "other_fast_matrix", "refuse_fast",
           "running_statistics", "shared_names"]


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


def running_statistics(model: nn.Module, train_mode: bool) -> list[str]:
    """Normalization layers of torch that update their running statistics in place while measuring: a write to a
    buffer that ``torch.func`` cannot trace, so the ``vmap`` engine fails in the first pass (``"auto"`` takes the
    per-sample loop there from the start: :func:`general_engine`; its rows are those the fallback gave).
    BatchNorm with ``train_mode=True``, not a layer whose ``track_running_stats`` was switched off after
    construction (its buffers stay but ``F.batch_norm`` gets none, so vmap traces it). InstanceNorm with running
    statistics (``track_running_stats=True``) with ``train_mode=True``, and one whose ``track_running_stats`` was
    switched off after construction in either mode (it normalizes by the input's statistics and still passes
    its buffers to ``F.instance_norm``, which updates them). Other classes with running buffers are not
    recognized (whether their forward writes them cannot be told without running it: a frozen BatchNorm keeps
    them unchanged): there ``"auto"`` tries vmap and falls back with a warning."""
    return [n for n, m in model.named_modules() if _updates_running(m, train_mode)]


def _updates_running(m: nn.Module, train_mode: bool) -> bool:
    """Whether ``m`` (BatchNorm or InstanceNorm) writes its running statistics in a forward (:func:`running_statistics`)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return train_mode and m.track_running_stats and m.running_mean is not None
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):  # use_input_stats = training or not track_running_stats
        return m.running_mean is not None and (train_mode or not m.track_running_stats)
    return False


def fast_refusal(model: nn.Module, name: str, site: tuple[nn.Module, str], param: nn.Parameter,
                 train_mode: bool) -> str | None:
    """Why the fast path cannot give parameter ``name`` its exact rows (``param``, attribute ``site[1]`` of module
    ``site[0]``), or ``None`` where it can: a shared or offload-tied weight (the fast path sees one use only), no
    fast path registered, or BatchNorm mixing a chunk's samples."""
    mod, local = site
    shared = shared_names(model, param)
    untied = untied_names(model, name)
    coupled = batch_statistics(model, train_mode)
    if len(shared) > 1:
        return f"it is shared by {shared} (tied weights: the fast path sees one use only)"
    if untied:
        return (f"it is tied to {untied}, offloaded by Accelerate as separate placeholders (tied weights: the "
                "fast path sees one use only)")
    if fast_path_for(mod, local) is None:
        return f"no fast path is registered for {type(mod).__name__}.{local}"
    if coupled:
        return (f"BatchNorm layer(s) {coupled[:5]} normalize by the statistics of the pass's batch "
                f"({'train_mode=True' if train_mode else 'track_running_stats=False'}), which mixes the "
                "samples of a chunk; the fast path differentiates the chunk's summed loss, so its rows would "
                "depend on chunk_size")
    return None


def general_engine(untraceable: dict[str, str], offloading: list[str], running: list[str] = ()) -> str:
    """The engine ``"auto"`` takes off the fast path: the per-sample loop where ``torch.func`` cannot trace the
    model (a PEFT LoHa layer, Accelerate's offloading hooks, BatchNorm or InstanceNorm layers updating their running
    statistics in place: ``running``, :func:`running_statistics`), ``"vmap"`` elsewhere. Chosen at binding, so "auto" makes
    no attempt that is bound to fail and warns about no fallback of its own choosing (the loop's rows are those
    the fallback gave)."""
    return "loop" if untraceable or offloading or running else "vmap"


def _fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` holds an FSDP1 ``FullyShardedDataParallel`` wrapper, which the probe refuses whatever the
    engine (:func:`~._measurable.refuse_fsdp`)."""
    classes = _fsdp_classes()
    return classes is not None and any(isinstance(m, classes[1]) for m in model.modules())


def choose_engine(engine: str, model: nn.Module, name: str, site: tuple[nn.Module, str], param: nn.Parameter, *,
                  train_mode: bool, untraceable: dict[str, str], offloading: list[str]) -> str:
    """The engine of parameter ``name`` (``param``, attribute ``site[1]`` of module ``site[0]``) for the probe's
    ``engine`` setting. In a PEFT model with layers whose forward ``torch.func.vmap`` cannot trace (LoHa:
    ``untraceable``), ``"auto"`` takes the loop where it would take ``vmap`` (no failed attempt, no warning)
    and ``engine="vmap"`` is refused here, before any pass; likewise in a model with modules offloaded by
    Accelerate (``offloading``), where a weight tied to another one before offloading
    (:func:`~spectral_lens._offload.untied_names`) is not given the fast path. With BatchNorm layers updating
    their running statistics (``train_mode=True``), ``"auto"`` takes the loop too (:func:`general_engine`). A
    refusal suggests only the engines that would be accepted for ``name`` (:func:`_instead`)."""
    if engine == "loop":
        return "loop"
    if engine == "vmap":
        if untraceable or offloading:
            _refuse_vmap(model, name, fast_refusal(model, name, site, param, train_mode), untraceable, offloading,
                         train_mode)
        return "vmap"
    reason = fast_refusal(model, name, site, param, train_mode)
    if reason is None:
        return "fast"
    if engine == "fast":
        refuse_fast(model, name, reason, untraceable, offloading, train_mode=train_mode)
    return general_engine(untraceable, offloading, running_statistics(model, train_mode))


def refuse_fast(model: nn.Module, name: str, why: str, untraceable: dict[str, str], offloading: list[str], *,
                train_mode: bool) -> None:
    """``ValueError`` for ``engine="fast"`` on parameter ``name`` whose fast path cannot run (``why``), suggesting
    only engines that would be accepted (measuring with ``train_mode``)."""
    instead = _instead(model, name, why, untraceable, offloading, train_mode, "or")
    raise ValueError(f"engine='fast' impossible for {name}: {why}; {instead}")


def other_fast_matrix(model: nn.Module, train_mode: bool, names) -> str | None:
    """A matrix of ``model`` (a parameter of 2 or more dimensions by its whole shape: a ZeRO-3 placeholder is 1-D
    outside a forward) in a module other than those of ``names`` whose fast path gives its exact rows as far as
    binding can tell (:func:`fast_refusal` is ``None``: registered, not tied, no BatchNorm by batch statistics),
    or ``None``: the "other matrices" that a refusal of ``names`` may
    suggest (not the bias of a refused weight's module: a reason found in a pass, a sequence-first input or a
    module never called, holds for it too). Walks the modules up to the first one found."""
    if batch_statistics(model, train_mode):  # every matrix of the model: none has exact fast rows
        return None
    refused = {n.rpartition(".")[0] for n in names}
    for prefix, mod in model.named_modules():
        if prefix in refused:
            continue
        for local, p in mod.named_parameters(recurse=False):
            name = f"{prefix}.{local}" if prefix else local
            if (len(whole_shape(p)) >= 2 and fast_path_for(mod, local) is not None
                    and fast_refusal(model, name, (mod, local), p, train_mode) is None):
                return name
    return None


def _other_matrix(model: nn.Module, name: str, train_mode: bool) -> str:
    """The remedy "another matrix with a fast path" where only the fast engine can measure ``name``: naming one
    (:func:`other_fast_matrix`), unless BatchNorm by batch statistics (:func:`batch_statistics`) refuses the fast
    path to every matrix of the model: then ``train_mode=False`` where that lifts it (every such layer has running
    statistics), else nothing (also where no other matrix has a fast path)."""
    other = other_fast_matrix(model, train_mode, [name])
    if other is not None:
        return f"probe another matrix that has a fast path (such as {other}, if its input is batch-first), or "
    if batch_statistics(model, train_mode) and not batch_statistics(model, False):
        return "measure with train_mode=False (BatchNorm then normalizes by its running statistics), or "
    return ""


def _fast_only(model: nn.Module, name: str, general: str, train_mode: bool) -> tuple[str, str, str] | None:
    """Where the fast engine alone could measure parameter ``name`` (its vmap and loop engines are refused before
    any pass): what ``name`` is, what to do instead (:func:`_other_matrix`), and where the fast path is exact. A
    parameter partitioned by DeepSpeed ZeRO-3 (:func:`~spectral_lens._deepspeed.refuse_zero3_params`), a model
    sharded with FSDP (:func:`~._measurable.refuse_fsdp`), a weight offloaded by Accelerate where ``general`` is
    the loop (:func:`~spectral_lens._offload.refuse_offloaded`); ``None`` elsewhere."""
    if is_zero3(model.get_parameter(name)):
        return (("a parameter partitioned by DeepSpeed ZeRO stage 3 (an empty placeholder outside its module's "
                 "forward)"), f"{_other_matrix(model, name, train_mode)}measure activations only (params=())",
                "exact under ZeRO-3")
    if fsdp_sharded(model):
        return (("a model sharded with FSDP (vmap cannot trace FSDP's hooks; the loop engine's gradients are "
                 "shards)"), f"{_other_matrix(model, name, train_mode)}probe an unsharded copy (docs/guide-multi-gpu.md)",
                "exact under FSDP2")
    if general == "loop" and offloaded_names(model, [name]):
        return ("an offloaded weight (a meta placeholder outside its module's forward)",
                (f"{_other_matrix(model, name, train_mode)}probe a parameter that is not offloaded, or a copy of "
                 "the model loaded without offloading (docs/guide-multi-gpu.md, Models dispatched by Accelerate)"),
                "exact on an offloaded weight")
    return None


def _instead(model: nn.Module, name: str, fast_why: str | None, untraceable: dict[str, str], offloading: list[str],
             train_mode: bool, style: str) -> str:
    """What to use instead of a refused engine for parameter ``name``, naming only engines that would be accepted
    for it: ``"fast"`` where the fast path can run (``fast_why`` is ``None``), the per-sample loop or ``"vmap"``
    (where ``torch.func`` can trace the model) unless the fast engine alone may measure ``name`` (:func:`_fast_only`:
    offloaded by Accelerate, partitioned by ZeRO-3, sharded by FSDP), the loop rather than ``"vmap"`` where the
    latter would fail in the pass (:func:`running_statistics`), ``"auto"`` where one of those is its choice.
    ``style="or"``: ``use engine='auto' or 'loop'``; ``"long"``: each engine with what it does. Where none
    would be accepted (such a parameter that the fast path refuses; any parameter under FSDP1, which the probe
    refuses whatever the engine), says so and what to do."""
    if _fsdp1(model):  # not "exact under FSDP2": no engine is accepted under this wrapper
        fsdp2 = f" (where engine='auto' or 'fast' measures {name} exactly)" if fast_why is None else ""
        return (f"no engine can measure {name} in this model: the probe does not measure FSDP1's "
                "FullyShardedDataParallel (outside its forward a parameter is a view of this rank's shard); shard "
                f"with fully_shard (FSDP2){fsdp2}, or probe an unsharded copy (docs/guide-multi-gpu.md, FSDP)")
    general = general_engine(untraceable, offloading, running_statistics(model, train_mode))
    only = _fast_only(model, name, general, train_mode)
    fast, general_ok = fast_why is None, only is None
    if not (fast or general_ok):
        why = f" ({fast_why})" if style == "long" else ""  # style "or": the refusal has just said why
        what, remedy, _ = only
        verb = "differentiate" if what.startswith("an offloaded") else "measure"
        return (f"no engine can measure {name} in this model: the fast path cannot{why} and the vmap and "
                f"loop engines cannot {verb} {what}; {remedy}")
    if style == "or":
        return "use " + " or ".join(["engine='auto'"] + [f"'{e}'" for e in (general,) if general_ok])
    if not general_ok:  # the fast path alone measures it
        return (f"use engine='auto' or 'fast' ({name} has a fast path, {only[2]}, if its module's input is batch-first: "
                "the sample index in dimension 0)")
    parts = ["engine='auto' (the fast path where one is registered, the per-sample loop elsewhere)"]
    if fast:
        parts.append(f"engine='fast' ({name} has a fast path)")
    if general == "loop":
        parts.append("engine='loop' (the same gradients, one backward per sample)")
    return "use " + ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]


def _refuse_vmap(model: nn.Module, name: str, fast_why: str | None, untraceable: dict[str, str],
                 offloading: list[str], train_mode: bool) -> None:
    """``ValueError`` for ``engine="vmap"`` in a model with a layer whose forward vmap cannot trace (``untraceable``)
    or with modules offloaded by Accelerate (``offloading``)."""
    if untraceable:
        (layer, what), more = next(iter(untraceable.items())), len(untraceable) - 1
        why = (f"its peft layer {layer!r} ({what}{f'; {more} more such layer(s)' if more else ''}) runs a "
               "torch.autograd.Function without setup_context or vmap rule in its forward (LoHa), which "
               "torch.func.vmap cannot trace")
    else:
        why = (f"Accelerate offloads the weights of {offloading[:3]}{' and more' if len(offloading) > 3 else ''} "
               "(meta placeholders that its hooks replace inside each forward), which torch.func.functional_call "
               "cannot trace")
    instead = _instead(model, name, fast_why, untraceable, offloading, train_mode, "long")
    if offloading and "docs/guide-multi-gpu.md" not in instead:
        instead += " (docs/guide-multi-gpu.md, Models dispatched by Accelerate)"
    raise ValueError(f"PerSampleGradientProbe: engine='vmap' impossible for {type(model).__name__}: {why}; {instead}")
