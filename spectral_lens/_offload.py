"""Models dispatched by Hugging Face Accelerate, recognized without importing it (duck typing).

``cpu_offload``, ``disk_offload``, ``dispatch_model`` / ``load_checkpoint_and_dispatch`` and
``from_pretrained(device_map=..., offload_folder=...)`` attach an ``AlignDevicesHook`` to modules (the
module's ``_hf_hook``; its ``forward`` replaced by one that calls the hook around the original,
``_old_forward``). A module whose hook has ``offload=True`` keeps its parameters on the ``meta`` device
(a shape without data) between forwards: the hook's ``weights_map`` (CPU tensors, or a loader of the
files in the offload folder) holds the values, and each forward materializes them on the hook's
``execution_device`` and puts meta placeholders back afterwards, new ``Parameter`` objects each time.
The functions here read ``_hf_hook``, ``hooks`` (a ``SequentialHook``), ``offload``, ``weights_map`` and
``execution_device`` only; a model that Accelerate never touched costs a check of its parameters' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._deepspeed import fast_hint

__all__ = ["execution_device", "execution_devices", "offload_device", "offloaded_names", "offloaded_value", "offloading_modules",
           "refuse_offloaded", "untied_names"]


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _store(model: nn.Module, name: str):
    """``(module name, hook, key)`` of the Accelerate hook whose offload store holds parameter ``name`` of
    ``model`` (the hook of its own module, or of an ancestor that places its submodules), or ``None``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        key = ".".join(parts[i:])
        for hook in _hooks(module):
            store = getattr(hook, "weights_map", None)
            if getattr(hook, "offload", False) and store is not None and _holds(store, key):
                return prefix, hook, key
    return None


def _holds(store, key: str) -> bool:
    """Whether Accelerate's ``weights_map`` holds ``key``, without loading it: a ``PrefixedDataset`` over a
    ``dict`` (``cpu_offload``) or an ``OffloadedWeightsLoader`` (its ``all_keys``; ``key in store`` would read
    the tensor from the offload folder or a safetensors file)."""
    data, full = getattr(store, "dataset", store), f"{getattr(store, 'prefix', '')}{key}"
    keys = getattr(data, "all_keys", None)
    if keys is not None:
        return full in keys
    if isinstance(data, dict):
        return full in data
    try:
        return key in store
    except Exception:  # a store that cannot answer: not readable here
        return False


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor | None:
    """The value of parameter ``name`` of ``model`` read from Accelerate's offload store (CPU memory, or the
    offload folder on disk) when ``name`` is a meta placeholder of an offloading ``AlignDevicesHook``;
    ``None`` otherwise (the parameter holds its own data, or it is meta with no store: never loaded)."""
    if model.get_parameter(name).device.type != "meta":
        return None
    found = _store(model, name)
    if found is None:
        return None
    _, hook, key = found
    return hook.weights_map[key]


def execution_device(model: nn.Module) -> torch.device | None:
    """The device Accelerate runs ``model`` on: the ``execution_device`` of the first ``AlignDevicesHook`` that
    has one, the root's first (``dispatch_model`` gives the root one, where it sends the inputs; ``cpu_offload``
    gives the root none and every module with parameters its own); ``None`` for a model without such hooks."""
    for module in model.modules():
        for hook in _hooks(module):
            dev = getattr(hook, "execution_device", None)
            if dev is not None:
                return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None


def execution_devices(model: nn.Module) -> set[torch.device]:
    """The ``execution_device`` of every Accelerate hook in ``model`` (where offloaded weights are materialized
    and their modules run: the CUDA generators a measurement must fork although no parameter is there)."""
    devs = set()
    for module in model.modules():
        for hook in _hooks(module):
            dev = getattr(hook, "execution_device", None)
            if dev is not None:
                devs.add(torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev))
    return devs


def offloading_modules(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose Accelerate hook offloads their weights (``offload=True``)."""
    return [n for n, m in model.named_modules() if any(getattr(h, "offload", False) for h in _hooks(m))]


def _in_memory(model: nn.Module, name: str):
    """The tensor the offload store holds for ``name`` without reading a file: a store over a plain ``dict``
    (``cpu_offload``'s state dict), else ``None``."""
    found = _store(model, name)
    if found is None:
        return None
    store, key = found[1].weights_map, found[2]
    data, prefix = getattr(store, "dataset", store), getattr(store, "prefix", "")
    return data.get(f"{prefix}{key}") if isinstance(data, dict) else None


def untied_names(model: nn.Module, name: str) -> list[str]:
    """The other parameters of ``model`` that the offloaded parameter ``name`` was tied to before Accelerate
    offloaded them: each module's hook materializes its own copy, so the placeholders are different objects
    (the probe's identity check for tied weights does not see it) while the model's gradient is the sum over
    the uses. Read from the transformers model's ``all_tied_weights_keys`` (``{tied: source}``) and from
    stores that hold one tensor under both names (``cpu_offload``)."""
    if model.get_parameter(name).device.type != "meta":
        return []
    out = []
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if name in (tied, source):
            out.append(source if name == tied else tied)
    mine = _in_memory(model, name)
    if mine is not None:
        for other, p in model.named_parameters():
            if other != name and other not in out and p.device.type == "meta" and p.shape == mine.shape:
                theirs = _in_memory(model, other)
                if theirs is not None and theirs.data_ptr() == mine.data_ptr():
                    out.append(other)
    return out


def offloaded_names(model: nn.Module, names) -> list[str]:
    """The names among ``names`` (parameters of ``model``) that are Accelerate offload placeholders now: on the
    meta device, their value in an offloading ``AlignDevicesHook``'s store."""
    return [n for n in names if model.get_parameter(n).device.type == "meta" and _store(model, n) is not None]


def offload_device(model: nn.Module, name: str) -> torch.device | None:
    """The ``execution_device`` of the Accelerate hook that materializes offloaded parameter ``name`` of ``model``
    in its module's forward (where the probe's rows are formed), or ``None`` when ``name`` is not offloaded."""
    found = _store(model, name) if model.get_parameter(name).device.type == "meta" else None
    dev = None if found is None else getattr(found[1], "execution_device", None)
    if dev is None:
        return None
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def refuse_offloaded(model: nn.Module, engines: dict, who: str = "PerSampleGradientProbe",
                     why_not_fast: Callable[[str], str | None] | None = None,
                     other_fast: Callable[[list[str]], str | None] | None = None) -> None:
    """``ValueError`` when any probed parameter (``engines``: name -> engine) is offloaded by Accelerate
    (:func:`offloaded_names`) and its engine is not the fast one.

    The fast engine forms each per-sample row from its module's input and output gradient, read in the
    module's forward hook and the backward, never from the weight, so an offloaded weight (materialized by
    Accelerate inside that forward only) is measured exactly. The ``vmap`` engine swaps the parameters for its
    own tensors (``torch.func.functional_call``), which Accelerate's hook then overwrites with the materialized
    weight, and the ``loop`` engine differentiates the parameter objects, which are meta placeholders that
    Accelerate replaces in every forward: neither can be exact. The message names each parameter, the module
    whose hook holds it and its execution device, and what to do instead. ``why_not_fast``: why the fast path
    cannot measure a parameter (name -> reason, ``None`` where it can; the probe's, also for a fast path found
    unusable in a pass): the message says so for each, and suggests ``engine='auto'`` or ``'fast'`` only for
    parameters whose fast path can run (before: also after the fast path had proved unusable), else for other
    matrices where ``other_fast`` names one (:func:`~spectral_lens._deepspeed.fast_hint`)."""
    bad = [n for n in offloaded_names(model, engines) if engines[n] != "fast"]
    if not bad:
        return
    why = {n: None if why_not_fast is None else why_not_fast(n) for n in bad}
    shown = []
    for n in bad[:3]:
        prefix, hook, _ = _store(model, n)
        tied = untied_names(model, n)
        no_fast = f"; the fast path cannot measure it: {why[n]}" if why[n] and not tied else ""  # tied: said
        shown.append(f"{n} (engine {engines[n]!r}{f'; tied to {tied}' if tied else ''}{no_fast}; in the offload store "
                     f"of the AlignDevicesHook on {prefix or '<the model>'!r}, execution_device {hook.execution_device})")
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    fast = fast_hint(bad, why, other_fast, "exact on offloaded weights")
    fast += ", " if fast else ""
    raise ValueError(
        f"{who}: the parameter(s) {'; '.join(shown)}{more} are offloaded by Accelerate (cpu_offload, disk_offload, "
        "or a device_map with 'cpu'/'disk' entries and an offload_folder) and would use an engine other than the fast "
        "one: outside their module's forward they are meta placeholders (a shape without data), which the vmap and "
        f"loop engines would differentiate. Instead: {fast}probe parameters that are not "
        "offloaded (a device_map or max_memory that keeps their module on the execution device), measure "
        "activations only (SpectralLens(model, pool, params=())), or probe a copy loaded without offloading "
        "(e.g. from_pretrained(path, device_map={'': 'cpu'})) (docs/guide-multi-gpu.md, Models dispatched by "
        "Accelerate)"
    )
