"""Module selection and scoped forward hooks.

Targets name modules the way ``model.named_modules()`` does. A target is an exact dotted name, a
glob (``"blocks.*.mlp"``: ``*`` and ``?`` stay inside one dotted segment, ``**`` crosses segments),
a compiled regular expression (matched against the full name), a module object of the model
(matched by identity; an ``nn.ModuleList`` stands for its members, also inside a list), a callable
``(name, module) -> bool``, or a list of these (their union, in model order).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import re
import sys
import warnings
from collections.abc import Container, Mapping
from typing import Callable, Iterable, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._dtensor import dtensor_module
from ._peft import base_prefix, has_peft_layers, is_peft, saved_copies, short_name
from ._warnings import CompiledModelWarning

__all__ = ["Target", "glob_to_regex", "name_matcher", "select_modules", "check_pick", "pick_tensor", "check_dense_rows",
           "HookSet",
           "warn_if_compiled", "unwrap_compiled", "eager_target", "unwrap_fabric", "refuse_parallel_wrapper_names", "eager_forwards", "measurement_pass", "transformed_forward",
           "recomputed_forward", "graph_break_for_hook"]

Target = Union[str, "re.Pattern[str]", nn.Module, Callable[[str, nn.Module], bool], Iterable]

_GLOB_CHARS = set("*?[")


@functools.lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> "re.Pattern[str]":
    """Compile a dotted-name glob: ``*``/``?`` match within a segment, ``**`` across segments, ``[..]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise ValueError(f"unclosed '[' in module glob {pattern!r}")
            body = pattern[i + 1 : end].replace("\\", "\\\\")  # ranges like [0-9] keep their meaning
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def name_matcher(target, what: str = "module") -> Callable[[str, object], bool]:
    """A predicate ``(name, obj) -> bool`` for one target: exact name, glob, compiled regex, module
    object (identity) or callable."""
    if isinstance(target, nn.Module):  # callable too: never run its forward as a predicate
        return lambda _name, m: m is target
    if isinstance(target, re.Pattern):
        return lambda name, _m: target.fullmatch(name) is not None
    if isinstance(target, str):
        if _GLOB_CHARS & set(target):  # a glob never selects the root (name ""): only the exact target "" does
            rx = glob_to_regex(target)
            return lambda name, _m: bool(name) and rx.fullmatch(name) is not None
        return lambda name, _m: name == target
    if callable(target):
        return lambda name, m: bool(target(name, m))
    raise TypeError(
        f"{what} target must be a name, glob, compiled regex, module, callable or a list of them; "
        f"got {type(target).__name__}"
    )


_LISTS = (list, tuple, set, frozenset, nn.ModuleList)


def _flatten(target) -> list:
    """The single targets of ``target``: lists (and ``nn.ModuleList``s / ``nn.ModuleDict``s, which have
    no forward of their own and stand for their members) are unpacked, also inside a list."""
    if isinstance(target, nn.ModuleDict):
        return _flatten(list(target.values()))
    if not isinstance(target, _LISTS):
        return [target]
    return [t for item in target for t in _flatten(item)]


def select_modules(model: nn.Module, target: Target) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` selected by ``target``, as ``(dotted_name, module)`` in model order.

    A name, glob or regex also matches a module by its eager name (:func:`uncompiled_name`: without
    the ``_orig_mod`` segments of a ``torch.compile``d submodule, as the records name it); a compile
    wrapper and the module it wraps have the same eager name, and only the first (the wrapper) is
    selected. A name or glob written with wrapper segments (``"_orig_mod.h.1"``, as a compiled model prints it)
    also matches by eager names (:func:`eager_target`), unless it is a module's name as typed: then that module
    only (``"h.1._orig_mod"`` the block a compile wrapper holds, not the wrapper). In a PEFT ``PeftModel`` a name or glob also matches without
    the ``base_model.model.``
    prefix (:func:`~spectral_lens._peft.short_name`: as the model was before ``get_peft_model``). The
    names returned are the modules' own.

    Raises ``ValueError`` naming the closest module names when nothing matches or an entry of a list
    matches nothing (each entry must match, a glob, regex or callable too), when two different modules of one
    eager name are each selected by their own names (a module of the user's own with a child called ``_orig_mod``:
    their records would collide; a wrapper named twice, ``["a", "a._orig_mod"]``, is selected once), and when a module
    object given as a target is not a submodule of ``model``, and ``TypeError`` when ``model`` is not
    an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected the model as an nn.Module, got {type(model).__name__}"
            + (f" {model!r}" if isinstance(model, str) else "")
            + " (the model comes first, then the target module name: attach(model, target))"
        )
    targets = _flatten(target)
    if not targets:
        raise ValueError("empty module target list")
    matchers = [name_matcher(t) for t in targets]
    named = list(model.named_modules())
    # a name or glob typed with wrapper segments (as a compiled model prints it: "_orig_mod.h.1", "h.1._orig_mod.attn")
    # also matches by the eager names: the same module with or without the wrapper (before: nothing matched); a name
    # that is a module of the model as typed selects that module only (eager_target)
    own = {n for n, _ in named}
    stripped = [None if (e := eager_target(t, own)) is None else name_matcher(e) for t in targets]
    for t in targets:
        if isinstance(t, nn.Module) and not any(m is t for _, m in named):
            raise ValueError(
                f"{type(model).__name__}: the {type(t).__name__} module given as a target is not a submodule "
                "of this model (modules are matched by identity: a copy, or a module of another model, never "
                "matches); pass a module of this model or its dotted name"
            )
    # a name or glob also matches a module's eager name (uncompiled_name: per-block compiled models, whose
    # records use those); a compile wrapper and the module it wraps share one, and only the first is taken
    named_by = [isinstance(t, (str, re.Pattern)) for t in targets]
    # a PeftModel's "base_model.model.": names as typed for the model it wraps (also inside a compile or FSDP1
    # wrapper, whose segments uncompiled_name drops: before, torch.compile(peft_model) and FSDP(peft_model) matched
    # only the long names)
    prefix = peft_prefix(unwrap_compiled(model))
    chosen, seen = [], {}  # eager name -> the first module selected under it
    hit = [False] * len(targets)  # which entries matched a module: each of a list must (not only the list as a whole)
    for name, mod in named:
        plain = uncompiled_name(name)
        short = short_name(plain, prefix, base_layer=False)
        here = [f(name, mod) or (is_name and ((plain != name and f(plain, mod)) or (short != plain and f(short, mod))))
                or (g is not None and (g(plain, mod) or g(short, mod)))
                for f, g, is_name in zip(matchers, stripped, named_by)]
        if any(here):
            hit = [a or b for a, b in zip(hit, here)]
            if plain not in seen:
                seen[plain] = (name, mod)
                chosen.append((name, mod))
            elif _distinct_by_name(*seen[plain], name, mod, matchers):
                raise ValueError(
                    f"{type(model).__name__}: modules {seen[plain][0]!r} and {name!r} are both selected and would both "
                    f"be recorded as {plain!r} (record names drop the wrapper segments "
                    f"{', '.join(sorted(_WRAPPER_SEGMENTS))}), but the first is no wrapper of the second (a wrapper "
                    "holds one child under such a segment and no parameter or buffer of its own): select one of them, "
                    "or rename the submodule")
    if not chosen:
        _refuse_aliases(model, targets, named)
        hints, shown = _closest_modules(targets, named)
        raise ValueError(
            f"{type(model).__name__}: no module matches target {target!r}; "
            f"{'closest names' if hints else 'some module names'}: {shown}"
        )
    missed = [t for t, h in zip(targets, hit) if not h]
    if missed:  # a typo in one entry of five would otherwise give four spectra and no word
        _refuse_aliases(model, missed, named)
        hints, shown = _closest_modules(missed, named)
        raise ValueError(
            f"{type(model).__name__}: {'entry' if len(missed) == 1 else 'entries'} "
            f"{', '.join(repr(t) for t in missed)} of target {target!r} "
            f"{'matches' if len(missed) == 1 else 'match'} no module (each entry of a list must match at least one "
            f"module, a glob or regex too; the others matched {[n for n, _ in chosen][:8]}); "
            f"{'closest names' if hints else 'some module names'}: {shown}"
        )
    for name, mod in chosen:
        # torch.jit.script's modules refuse hooks; torch.jit.trace's (also ScriptModules) take them
        if isinstance(mod, torch.jit.RecursiveScriptModule):
            raise ValueError(
                f"{type(model).__name__}: module {display_name(name, mod)!r} is a TorchScript module "
                f"({type(mod).__name__} from torch.jit.script), which takes no forward hook, so its output cannot "
                "be measured; measure the module before scripting it, or select a module that is not scripted"
            )
    return chosen


def _distinct_by_name(first_name: str, first: nn.Module, name: str, mod: nn.Module, matchers: list) -> bool:
    """Whether ``mod`` (own name ``name``), selected by its own name, is another module than ``first`` (own name
    ``first_name``), selected before under the same eager name: unless ``first`` wraps ``mod``
    (:func:`_wraps`), they compute different outputs that one record name cannot hold (a module of the user's own
    with a child called ``_orig_mod``, or two such modules side by side). A wrapper and the module it wraps are one
    module by two names: selected once, as the wrapper."""
    return mod is not first and not _wraps(first_name, first, name) and any(f(name, mod) for f in matchers)


def _wraps(outer_name: str, outer: nn.Module, name: str) -> bool:
    """Whether the module named ``name`` is reached from ``outer`` (named ``outer_name``) through wrappers only: each
    module on the way (a ``torch.compile`` ``OptimizedModule``, an FSDP1 or checkpoint wrapper) holds one child,
    under a wrapper segment (:data:`_WRAPPER_SEGMENTS`), and no parameter or buffer of its own. Holding no state of
    its own is not enough: a container of the user's own (its layers all in children, one of them called
    ``_orig_mod``) holds none, and neither does a sibling of the module (``a.x`` beside ``a._orig_mod.x``)."""
    if outer_name and not name.startswith(outer_name + "."):
        return False
    m = outer
    for seg in (name[len(outer_name) + 1:] if outer_name else name).split("."):
        children = [k for k, c in m._modules.items() if c is not None]
        if (seg not in _WRAPPER_SEGMENTS or children != [seg] or next(m.parameters(recurse=False), None) is not None
                or next(m.buffers(recurse=False), None) is not None):
            return False
        m = m._modules[seg]
    return True


def _closest_modules(targets: list, named: list) -> tuple[list[str], list[str]]:
    """``(hints, shown)`` for an error on ``targets`` that matched nothing: the module names closest to its
    name and glob entries (``hints``, maybe empty), and what to show (``hints``, else the first names)."""
    names = [n for n, _ in named if n]
    hints = []
    for t in targets:
        if isinstance(t, str):
            # the name under a prefix first ("h.1" -> "transformer.h.1", "layers.1" -> "model.layers.1"):
            # difflib ranks a short name far below a long name that contains it
            under = name_matcher("**." + t) if _GLOB_CHARS & set(t) else (lambda n, _m: n.endswith("." + t))
            hints += [n for n in names if under(n, None) and n not in hints][:5]
            hints += [n for n in difflib.get_close_matches(t, names, n=5, cutoff=0.5) if n not in hints]
    return hints, hints or names[:8]


def _refuse_aliases(model: nn.Module, targets: list, named: list) -> None:
    """``ValueError`` when a target names a module registered a second time under another name (one
    module object shared by several blocks: ALBERT, a looped transformer), which ``named_modules()``
    lists once: a hook on it sees every call, so that name alone cannot be measured."""
    first = {id(m): n for n, m in named}
    for alias, mod in model.named_modules(remove_duplicate=False):
        if alias != first.get(id(mod), alias) and any(isinstance(t, str) and t == alias for t in targets):
            raise ValueError(
                f"{type(model).__name__}: module {alias!r} is the module {first[id(mod)]!r} again (one module object "
                "registered under several names: blocks sharing their weights, as in ALBERT); a forward hook on it "
                f"sees every call of it, so {alias!r} alone cannot be measured: attach to {first[id(mod)]!r} for "
                "the rows of all its calls, or select a module that is not shared"
            )


def display_name(name: str, module: nn.Module) -> str:
    """A module's name for messages: its dotted name, or ``<root: ClassName>`` for the model itself
    (whose ``named_modules()`` name is ``""``)."""
    return name if name else f"<root: {type(module).__name__}>"


def check_pick(pick) -> None:
    """``TypeError`` unless ``pick`` is ``None``, an ``int`` (not a ``bool``), a ``str`` or a callable:
    checked when attaching, not at the first forward."""
    if pick is None or callable(pick) or isinstance(pick, str) or (isinstance(pick, int) and not isinstance(pick, bool)):
        return
    raise TypeError(f"pick must be None, an int index, a str key or a callable, got {pick!r} ({type(pick).__name__})")


def pick_tensor(output, pick, where: str) -> torch.Tensor:
    """The tensor a hook measures from a module output.

    ``pick=None`` requires the output to be a tensor. An ``int`` indexes a tuple/list output or a
    Hugging Face ``ModelOutput`` (its non-``None`` fields in order, as ``output[0]``; an int on a
    tensor output is an error, never a silent index into the batch), a ``str`` keys a mapping (or an
    attribute of a model-output object), a callable receives the output. ``where`` names the module
    in errors.
    """
    if pick is None:
        value = output
    elif callable(pick):
        if torch.is_grad_enabled():  # the rows are only read: a computing pick builds no autograd graph
            with torch.no_grad():
                value = pick(output)
        else:  # the lens's passes run under no_grad already: no mode switch per hook call
            value = pick(output)
    elif isinstance(pick, int) and isinstance(output, torch.Tensor):
        # indexing would silently measure sample `pick` only; say what changed instead
        raise TypeError(
            f"{where}: pick={pick} indexes a tuple output, but this module returns a tensor of shape "
            f"{tuple(output.shape)}: pass pick=None (Hugging Face decoder layers return a tensor since "
            "transformers 5; older versions returned a tuple and needed pick=0)"
        )
    elif isinstance(pick, int) and (isinstance(output, (tuple, list)) or hasattr(output, "to_tuple")):
        items = output.to_tuple() if hasattr(output, "to_tuple") else output
        if not -len(items) <= pick < len(items):
            fields = f" (fields {list(output.keys())})" if isinstance(output, Mapping) else ""
            raise IndexError(
                f"{where}: pick={pick} is out of range: the module returns a {type(output).__name__} of "
                f"{len(items)} element(s){fields}"
            )
        value = items[pick]
    elif isinstance(pick, str) and isinstance(output, Mapping):
        if pick not in output:
            raise KeyError(
                f"{where}: pick={pick!r} is not a key of the module's {type(output).__name__} output; "
                f"its keys: {list(output.keys())}"
            )
        value = output[pick]
    elif isinstance(pick, str) and hasattr(output, pick):
        value = getattr(output, pick)
    else:
        raise TypeError(f"{where}: cannot pick {pick!r} from an output of type {type(output).__name__}"
                        f"{_pick_hint(output)}")
    if not isinstance(value, torch.Tensor):
        hint = "" if pick is not None else _pick_hint(output)
        raise TypeError(f"{where}: module output is {type(value).__name__}, expected a tensor{hint}")
    check_dense_rows(value, where, hook=True)
    return value


def _pick_hint(output) -> str:
    """What ``pick=`` can select from ``output``, for the errors of :func:`pick_tensor`."""
    if isinstance(output, Mapping) and not hasattr(output, "to_tuple"):  # a dict: by key only
        return f" (pass pick='key' with one of its keys {list(output.keys())[:8]}, or a callable)"
    if isinstance(output, Mapping):  # a Hugging Face ModelOutput: by key, or by index as output[0]
        return f" (pass pick='key' with one of its keys {list(output.keys())[:8]}, pick=0 for the first, or a callable)"
    if dataclasses.is_dataclass(output):
        fields = [f.name for f in dataclasses.fields(output)][:8]
        return f" (pass pick='field' with one of its fields {fields}, or a callable)"
    if isinstance(output, (tuple, list)):
        named = f", pick='field' with one of its fields {list(output._fields)[:8]}" if hasattr(output, "_fields") else ""
        return f" (pass pick=0 for the first of its {len(output)} elements{named}, or a callable)"
    return " (pass pick=0 for the first element of a tuple, pick='key' for a dict entry or attribute, or a callable)"


def check_dense_rows(x: torch.Tensor, where: str, *, hook: bool) -> None:
    """``TypeError`` naming ``where`` for a tensor whose rows cannot be read as they are: a nested tensor
    (``torch.nested``: its ragged dimension has no fixed length to flatten) or a ``DTensor``
    (``torch.distributed.tensor``: its local part is one rank's shard, measuring it would be silently
    partial; reading it whole is a collective). ``hook``: the remedy is a ``pick=`` of the capture
    (else an argument of ``update``)."""
    if type(x) is torch.Tensor and not x.is_nested:  # the common case: two attribute reads per hook call
        return
    what = "the module output" if hook else "the input"
    if x.is_nested:
        # torch.cat(x.unbind()): the valid rows of either layout (a strided one's values() is its flat buffer)
        fix = ("pick=lambda out: torch.cat(out.unbind()) for the valid rows alone, or pick=lambda out: "
               "out.to_padded_tensor(0.0, (N, T, d)) padded to the input's length, with a mask of the valid "
               "positions (mask_fn= of SpectralLens, or capture.mask(...))"
               if hook else "update(torch.cat(x.unbind())) for the valid rows alone, or "
               "update(x.to_padded_tensor(0.0, (N, T, d)), mask=valid_positions)")
        raise TypeError(f"{where}: {what} is a nested tensor ({x.layout}, ragged), whose rows cannot be read "
                        f"as a (..., d) tensor; pass its rows as a dense tensor: {fix}")
    dtensor = dtensor_module()
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        fix = ("pick=lambda out: out.full_tensor() (a collective: every rank of the mesh runs the forward), or "
               "measure a layer whose output is a plain (replicated) tensor" if hook else
               "update(x.full_tensor()) (a collective over the mesh), or rows that are a plain tensor")
        raise TypeError(f"{where}: {what} is a DTensor (torch.distributed.tensor, placements {x.placements}), "
                        f"whose local part is this rank's shard (unless replicated): measuring it would be partial; "
                        f"measure the whole tensor: {fix}")


def _is_compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is the ``OptimizedModule`` that ``torch.compile(module)`` returns (``isinstance`` of
    ``torch._dynamo.eval_frame.OptimizedModule``, or a subclass). Before ``torch._dynamo`` is imported nothing can
    be compiled, so it is not imported here (about 2 s). A class of the user's own that happens to
    share the name is a model like any other (unwrapping it would drop its own layers)."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    return (frame is not None and isinstance(model, frame.OptimizedModule)
            and isinstance(getattr(model, "_orig_mod", None), nn.Module))


def warn_if_compiled(model: nn.Module) -> None:
    """Warn when ``model`` is a ``torch.compile`` wrapper (hooks may not fire inside compiled graphs)."""
    if _is_compiled_wrapper(model):
        warnings.warn(
            "model is a torch.compile wrapper: hooks registered after compilation may be skipped or trigger "
            "recompiles. Attach to model._orig_mod and measure with the uncompiled module.",
            CompiledModelWarning,
            stacklevel=3,
        )


def _is_fabric_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is the ``_FabricModule`` that Lightning Fabric's ``fabric.setup(model)`` returns: the class
    of that name defined by Lightning (``lightning.fabric`` or the standalone ``lightning_fabric``), or a subclass.
    A class of the user's own that happens to share the name is a model like any other (unwrapping it would drop
    its own layers)."""
    return (any(c.__name__ == "_FabricModule" and c.__module__.startswith(("lightning.fabric.", "lightning_fabric."))
                for c in type(model).__mro__)
            and isinstance(getattr(model, "_forward_module", None), nn.Module))


def unwrap_fabric(model: nn.Module) -> nn.Module:
    """The module a Lightning Fabric wrapper (``_FabricModule``, what ``fabric.setup`` returns) runs; any other
    module as it is.

    Its names carry a ``_forward_module.`` prefix the user's model lacks, and its forward adds only Fabric's
    precision context and input casts (the lens has its own ``autocast_dtype``; float inputs it does not cast).
    Under Fabric's DDP strategy the forward module is a ``DistributedDataParallel`` (inside a compile wrapper when
    the model given to ``setup`` was compiled), whose passes would start its collectives on one rank: its
    ``.module`` is taken (the user's model, the same parameters; training through Fabric is unaffected). Any
    other forward module (FSDP, a DeepSpeed engine, a compile wrapper) is returned for the usual handling.
    """
    while _is_fabric_wrapper(model):
        model = inner = model._forward_module
        while _is_compiled_wrapper(inner):
            inner = inner._orig_mod
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            model = inner.module
    return model


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps, a Lightning Fabric wrapper
    unwrapped first (:func:`unwrap_fabric`); any other module as it is.

    Its parameter and module names are the uncompiled model's (no ``_orig_mod.`` prefix), so a
    measurement of a compiled model is recorded under the same names as one of the eager model.
    """
    model = unwrap_fabric(model)
    while _is_compiled_wrapper(model):
        model = unwrap_fabric(model._orig_mod)
    return model


def refuse_parallel_wrapper_names(model: nn.Module, who: str) -> None:
    """``ValueError`` for a ``DistributedDataParallel``/``DataParallel`` wrapper or a DeepSpeed engine (also inside a
    ``torch.compile`` wrapper): the one refusal of :func:`spectral_lens.attach`, :class:`~spectral_lens.SpectralLens`,
    the probe and ``weight_spectra``, naming the wrapper's class once and the way out (``model.module``,
    ``engine.module``). Its names carry a ``module.`` prefix that the lens's records lack, and a pass through it
    starts the wrapper's own work on this rank alone; hooks on the wrapped module's layers fire inside the wrapper's
    forward, so passing it measures the same rows and training through the wrapper is unaffected."""
    inner = unwrap_compiled(model)
    cls = type(inner).__name__
    if any(c.__name__ == "DeepSpeedEngine" and c.__module__.startswith("deepspeed.") for c in type(inner).__mro__):
        what, way = f"a DeepSpeed engine ({cls}, from deepspeed.initialize)", "engine.module"
        why = ("its forward scales the loss of any backward through its outputs (gradient accumulation, float16 loss "
               "scaling) and updates its optimizer's bookkeeping, which measuring must not")
    elif isinstance(inner, nn.parallel.DistributedDataParallel):
        what, way = f"a {cls} wrapper", "model.module"
        why = ("a measuring pass through it would start DDP's buffer broadcast and gradient all-reduce on this rank "
               "alone (a hang, or cross-talk with the lens's own collectives)")
    elif isinstance(inner, nn.DataParallel):
        what, way = f"a {cls} wrapper", "model.module"
        why = "a measuring pass through it would replicate the model across devices (hooks would see the replicas)"
    else:
        return
    raise ValueError(
        f"{who}: model is {what}; pass the wrapped module ({way}) instead: {why}, and its names carry a 'module.' "
        f"prefix that the lens's records lack. {way} holds the same parameters under the records' names, and hooks "
        "on its layers fire inside the wrapper's forward, so training through the wrapper is measured the same and "
        "unaffected (docs/guide-multi-gpu.md)")


# the attribute under which a wrapper module holds the module it wraps, a segment of every name inside it:
# torch.compile's OptimizedModule, FSDP1's FullyShardedDataParallel, torch.distributed's activation
# checkpoint (and offload) wrappers
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def uncompiled_name(name: str) -> str:
    """A module or parameter name as the unwrapped (eager) model has it: without the ``_orig_mod``
    segments a ``torch.compile`` wrapper of a submodule inserts (per-block compilation, as torchtitan
    compiles each transformer block), nor the ``_fsdp_wrapped_module`` segments of FSDP1's
    ``FullyShardedDataParallel`` and the ``_checkpoint_wrapped_module`` segments of
    ``torch.distributed``'s activation checkpoint wrappers, so measurements of compiled, wrapped and
    eager models are recorded alike (a name without those segments is returned unchanged)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def eager_target(target, known: Container[str] = ()) -> str | None:
    """A name or glob target as :func:`uncompiled_name` writes names (``"_orig_mod.h.1.w.weight"`` ->
    ``"h.1.w.weight"``: the name a compiled model, a compiled block or an FSDP1 / checkpoint wrapper prints, or a
    state dict saved from one holds), to be matched against eager names; ``None`` for any other target, a name
    without wrapper segments, one that is only wrapper segments (``"_orig_mod"``: the root, kept as typed), a
    glob left with wildcards only (``"**._orig_mod"`` asks for the compiled modules, not for ``"**"``, every one),
    and a name in ``known`` (the model's own module or parameter names): a name that is a module or parameter as
    typed means that one, not what its stripped form names, which may be another (the compile wrapper around the
    block typed, or the parent of a child of the user's own called ``_orig_mod``; review 27)."""
    if not isinstance(target, str) or target in known:
        return None
    plain = uncompiled_name(target)
    if not plain or plain == target or not set(plain) - set("*?."):
        return None
    return plain


def peft_prefix(model: nn.Module) -> str:
    """:func:`~spectral_lens._peft.base_prefix` of the ``PeftModel`` that ``model`` is, or holds under wrapper
    segments only (:data:`_WRAPPER_SEGMENTS`: ``FullyShardedDataParallel(peft_model)``, as Accelerate's FSDP1
    plugin wraps it, a compile or checkpoint wrapper): the prefix as :func:`uncompiled_name` names
    have it. ``""`` for any other model."""
    while not is_peft(model):
        inner = next((m for a in _WRAPPER_SEGMENTS if isinstance(m := model._modules.get(a), nn.Module)), None)
        if inner is None:
            return ""
        model = inner
    return base_prefix(model)


def record_names(model: nn.Module, names: Iterable[str], *, params: bool) -> dict[str, str]:
    """``{name: the name a record carries}`` for module names (``params=False``) or parameter names
    (``params=True``) of ``model``: :func:`uncompiled_name`, and in a PEFT model the name of the model
    before ``get_peft_model`` (:func:`~spectral_lens._peft.short_name`: without ``base_model.model.``; a
    parameter also without ``base_layer`` and, for the copy a ``modules_to_save`` wrapper's forward runs,
    under the wrapper's name: ``lm_head.weight``; ``lora_A``/``lora_B`` keep their adapter segment). A name
    whose short form another module (parameter) of the model also has keeps its eager name, so two
    different matrices never share a record key."""
    eager = {n: uncompiled_name(n) for n in names}
    model = unwrap_compiled(model)
    if not has_peft_layers(model):
        return eager
    # by names without wrapper segments (FSDP1's _fsdp_wrapped_module around the PeftModel: before, its prefix was
    # kept, "base_model.model.a.weight", and a modules_to_save copy kept its long name)
    prefix = peft_prefix(model)
    copies = {uncompiled_name(c): uncompiled_name(w) for c, w in saved_copies(model).items()} if params else {}

    def short(name: str) -> str:
        for copy, wrapper in copies.items():
            name = wrapper + name[len(copy):] if name.startswith(copy) else name
        return short_name(name, prefix, base_layer=params)

    every = model.named_parameters(remove_duplicate=False) if params else model.named_modules(remove_duplicate=False)
    owners: dict[str, set[str]] = {}
    for n, _ in every:
        owners.setdefault(short(uncompiled_name(n)), set()).add(uncompiled_name(n))
    out = {n: e if len(owners.get(short(e), ())) > 1 else short(e) for n, e in eager.items()}
    return out if len(set(out.values())) == len(out) else eager


def eager_forwards():
    """A context in which every ``torch.compile``d module and function runs eagerly (dynamo's
    ``force_eager`` stance): a measurement's forwards then call its hooks, which a graph compiled
    before they were registered skips, and they compile nothing (no recompiles, no cache entries
    that the training loop's compiled graphs would have to share). torch < 2.6 has no stances: there
    the context does nothing (measure through the uncompiled module, as the docs say). So does it
    while ``torch._dynamo`` was never imported: then nothing can be compiled, and entering the stance
    (about 70 us on the project's CPU) is skipped, per probe update included."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return set_stance("force_eager")


def measurement_autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast state of spectral-lens's own passes: ``torch.autocast(device.type, dtype)`` when
    ``dtype`` is given, else autocast switched off on every device type where the caller enabled it,
    so ``autocast_dtype=None`` measures in the model's own precision also when ``measure`` /
    ``update`` is called inside the training step's ``torch.autocast`` block (which otherwise leaked
    into the measurement: bf16 products, relative errors of 1e-3 instead of 1e-8 against float64)."""
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    stack = contextlib.ExitStack()
    for kind in dict.fromkeys((device.type, "cpu", "cuda")):
        if torch.is_autocast_enabled(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


_NOBODY = object()  # the owner inside a probe's passes: no capture is fed
_FEEDING: "contextvars.ContextVar[object | None]" = contextvars.ContextVar("spectral_lens_feeding", default=None)


@contextlib.contextmanager
def measurement_pass(owner: object = None):
    """A context for spectral-lens's own forwards (a lens's activation pass with ``owner`` its
    capture; a probe's gradient passes with no owner): inside it, every other
    :class:`~spectral_lens.ActivationCapture`'s hooks return at once, so a capture the user attached
    (say, to the training forwards) is not fed the held-out pool or the probe's per-sample passes
    (nor, under ``torch.func.vmap``, tensors it cannot read). Per thread and per task
    (a ``ContextVar``).

    A caller's ``torch.nn.utils.parametrize.cached()`` block is suspended inside it (process-wide, as
    the cache is): the measurement's forwards neither read the weights the caller's forward cached
    (whose autograd graph is the caller's: the probe's rows were zero or a backward through a freed
    graph) nor leave their own no-grad ones in the cache (the caller's next backward then reached no
    parametrization parameter). On exit the count saved is added to the count found, so a ``cached()``
    block another thread opens or closes meanwhile stays counted, and the cache is emptied when such a
    block was the last one open (as ``cached()`` itself does when its count reaches 0)."""
    token = _FEEDING.set(_NOBODY if owner is None else owner)
    cached, parametrize._cache_enabled = parametrize._cache_enabled, 0
    try:
        yield
    finally:
        found = parametrize._cache_enabled  # 0 unless another thread's block opened or closed meanwhile
        parametrize._cache_enabled = found + cached
        if found and not parametrize._cache_enabled:  # that block was the last one: its exit saw -1, not 0
            parametrize._cache = {}
        _FEEDING.reset(token)


def transformed_forward() -> bool:
    """Whether the current forward is traced or transformed rather than run on real tensors:
    inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``: Opacus's functorch per-sample
    gradients, a functional training step), ``torch.jit.trace`` or ``torch.export``. A capture's
    hook then reads nothing: its tensors have no storage to read (batched, gradient-tracking or fake
    tensors), and a tracer would record the accumulator's own arithmetic into the user's graph.
    ``torch.compile`` is not such a case (its hooks run, see the docs)."""
    compiler = torch.compiler
    if compiler.is_compiling():
        # the flag torch.export sets, read as it is: Dynamo in torch 2.7 to 2.12 folds a call of
        # is_exporting() to True under torch.compile too (every hook then read nothing, 0 rows);
        # torch 2.4 has neither (no export of a hooked model there)
        flag = getattr(compiler, "_is_exporting_flag", None)
        exporting = bool(getattr(compiler, "is_exporting", lambda: False)() if flag is None else flag)
        # a torch.func transform inside the compiled region (a compiled vmap(grad(...))): Dynamo folds the flag
        # to a constant while tracing; the capture's operator has no functorch rule ("... must override the
        # setup_context staticmethod" failed the user's compiled per-sample gradients)
        return exporting or _functorch_active()
    return torch.jit.is_tracing() or _functorch_active()


def _functorch_active() -> bool:
    return bool(getattr(torch._C, "_are_functorch_transforms_active", lambda: False)())


# read once while Dynamo traces, as a constant (what torch._dynamo.assume_constant_result sets, without importing
# Dynamo here): torch 2.4's Dynamo cannot put the call in a graph ("torch.* op returned non-Tensor bool"), which
# broke the graph at every captured module and failed torch.compile(..., fullgraph=True); newer Dynamo folds it so
_functorch_active._dynamo_marked_constant = True  # type: ignore[attr-defined]


def graph_break_for_hook(where: str) -> None:
    """Under ``torch.compile`` a capture's hook needs a graph break: it reads its tensor on the host
    into an accumulator the compiled graph cannot hold. Asked for here with a message that names the
    module and the remedy, which is what ``torch.compile(..., fullgraph=True)`` (torchtitan's blocks)
    raises; without ``fullgraph`` the hook runs eagerly between the graphs and reads its rows."""
    msg = (f"spectral_lens: the capture hook of {where} reads its rows eagerly, which needs a graph break; "
           "under fullgraph=True run the forwards you capture uncompiled (the module's _orig_mod, or "
           "inside torch.compiler.set_stance('force_eager')), or compile without fullgraph")
    try:
        torch._dynamo.graph_break(msg=msg)
    except TypeError:  # torch < 2.9: no message
        torch._dynamo.graph_break()


def recomputed_forward() -> bool:
    """Whether the current forward runs inside a backward pass: the recomputation of activation
    checkpointing (``torch.utils.checkpoint`` reentrant or not, Hugging Face's
    ``gradient_checkpointing_enable``, ``checkpoint_wrapper``, DeepSpeed's), which repeats a forward
    already seen. A capture's hook then reads nothing: its rows were counted in the first forward
    (before, a checkpointed block's rows were counted twice during training, 64 of 32)."""
    return _graph_task_id() != -1


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class HookSet:
    """Handles of the hooks one attachment registered; removes exactly those, once.

    A context manager: leaving the ``with`` block removes the hooks, also when the body raises.
    Hooks registered by the user or by other attachments are never touched.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def add(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook of this set (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
