"""Weight-matrix spectra: singular values of a model's weights, stable rank, and a power-law tail fit.

A weight ``W`` (``d_out x d_in``) gives ``Spectrum(kind="weight")`` whose ``values`` are the squared
singular values ``s_j^2``, i.e. the eigenvalues of ``W^T W``, so ranks, trace normalization and the
band alpha mean the same as for activation and gradient spectra. Parameters with more than two
dimensions (convolutions ``out x in x k...``) are reshaped to ``out x (in * prod(k))``: the linear
map on flattened input patches. In a model, a 3-D parameter of an experts module (path or class name
containing ``expert``, no convolution: the fused expert weights of a mixture-of-experts layer, ``experts.down_proj`` of shape ``(E, out, in)``
in ``transformers`` 5, torchtitan's ``w1/w2/w3``) is a stack of ``E`` matrices: :func:`weight_spectra`
gives one spectrum per slice, ``"<name>[e]"``. One-dimensional parameters (biases, norms) are skipped.

Two exponents, two questions (derivation in ``docs/analysis.md``): the band alpha is the slope of
the rank-ordered spectrum, ``lambda_r ~ r^-a``; :func:`powerlaw_fit` is WeightWatcher's
Hill/Clauset maximum-likelihood exponent of the empirical spectral density, ``rho(lambda) ~
lambda^-alpha_ESD`` above ``xmin``. For an exact power law they are tied by
``alpha_ESD = 1 + 1/a`` (:func:`esd_alpha_from_rank_alpha`), but the MLE only sees the
largest eigenvalues (the head of the rank plot), while the paper's tail window sits at ranks 100+.
"""

from __future__ import annotations

import difflib
import gc
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import numpy as np
import torch
from torch import nn

from ._deepspeed import refuse_zero3_placeholders
from ._dtensor import dtensor_module
from ._offload import offloaded_value
from ._peft import has_peft_layers, short_name
from .capture import (
    eager_target,
    name_matcher,
    peft_prefix,
    record_names,
    refuse_parallel_wrapper_names,
    uncompiled_name,
    unwrap_compiled,
)
from .spectrum import Spectrum
from .summaries import stable_rank

__all__ = [
    "ParamTarget",
    "weight_spectrum",
    "weight_spectra",
    "select_parameters",
    "PowerLawFit",
    "powerlaw_fit",
    "esd_alpha_from_rank_alpha",
    "rank_alpha_from_esd_alpha",
    "stable_rank",
]

#: A parameter selector: exact dotted name, glob (``*``/``?`` within a segment, ``**`` across),
#: compiled regex (full match), callable ``(name, parameter) -> bool``, or a list of these.
ParamTarget = Union[str, "re.Pattern[str]", Callable[[str, torch.Tensor], bool], Iterable]


def _is_ao_quantized(mod: nn.Module) -> bool:
    """A ``torch.ao`` quantized module (``quantize_dynamic``, ``convert``): ``weight()`` is a method
    returning its quantized weight; it has no weight parameter."""
    return (type(mod).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                             "torch.ao.nn.intrinsic.quantized"))
            and callable(getattr(mod, "weight", None)))


def _weight_values(weight: torch.Tensor, where: str) -> tuple[torch.Tensor, str | None]:
    """The values a weight stands for, and how they were read (``None``: as they are).

    A quantized weight is dequantized to the matrix its module multiplies with: a ``torch.ao``
    quantized tensor (``quantize_dynamic``'s packed ``qint8`` weight, read with ``module.weight()``),
    bitsandbytes ``Params4bit`` (``dequantize_4bit`` with its quant state) and ``Int8Params`` (the
    int8 rows times their row scales ``SCB / 127``). Float8 and half weights convert exactly to
    float64 later. Any other integer or packed tensor is a ``ValueError``: its scale is unknown here,
    and reading the raw integers would give a spectrum of the wrong matrix."""
    kind = type(weight).__name__
    if kind == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state), "bitsandbytes Params4bit, dequantized"
    if kind == "Int8Params" and weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None:
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(weight.data, weight.SCB), "bitsandbytes Int8Params, dequantized"
    if weight.is_quantized:
        return weight.dequantize(), f"torch.ao {str(weight.dtype).replace('torch.', '')}, dequantized"
    if not (weight.is_floating_point() or weight.is_complex()) or "float4" in str(weight.dtype):
        raise ValueError(
            f"{where}: a {kind} of dtype {weight.dtype} and shape {tuple(weight.shape)} holds quantized or "
            "packed integers whose scale spectral-lens does not know (torch.ao, bitsandbytes Params4bit and "
            "Int8Params are dequantized); dequantize it and pass the float matrix to weight_spectrum, or "
            "measure the model before quantizing it")
    return weight, None


def weight_spectrum(weight: torch.Tensor, name: str | None = None) -> Spectrum:
    """Squared singular values of one weight (float64 SVD on the CPU) as ``Spectrum(kind="weight")``.

    A >2-D weight is reshaped to ``(shape[0], -1)`` (a convolution's map on flattened patches; for one
    expert of a fused ``(E, out, in)`` expert weight pass ``weight[e]``). ``metadata`` records the original shape and the
    matrix shape used. Half-precision and float8 weights convert exactly to float64, complex ones to
    complex128. Quantized weights are dequantized first (``torch.ao`` quantized tensors, bitsandbytes ``Params4bit`` and
    ``Int8Params``; ``metadata["dequantized"]`` says which); other integer tensors raise ``ValueError``. A
    ``DTensor`` (a weight sharded by FSDP2's ``fully_shard`` or tensor parallelism) is gathered whole with
    ``full_tensor()``, a collective over its mesh: call it on every rank of the mesh.
    """
    if weight.device.type == "meta":
        raise ValueError(
            f"{name or 'weight'}: shape {tuple(weight.shape)} is on the meta device (a shape without data: a weight "
            "offloaded by Accelerate, or never loaded); weight_spectra(model, ...) reads an offloaded weight from "
            "Accelerate's offload store"
        )
    dtensor = dtensor_module()
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        # an FSDP2 or tensor-parallel shard: the whole matrix (before, the spectrum's values were a DTensor, which
        # neither .numpy() nor the records read); full_tensor() all-gathers over its mesh, so every rank calls
        weight = weight.detach().full_tensor()
    values, how = _weight_values(weight, name or "weight")
    w = values.detach()
    if w.ndim < 2:
        raise ValueError(f"{name or 'weight'}: shape {tuple(w.shape)} is not a matrix (need >= 2 dims)")
    if w.numel() == 0:  # before: (0, n) was a bare reshape RuntimeError, (n, 0) an empty spectrum
        raise ValueError(f"{name or 'weight'}: shape {tuple(w.shape)} is empty (no entries); it has no spectrum")
    # a complex weight keeps its imaginary parts (complex128: the singular values of the complex matrix)
    mat = w.reshape(w.shape[0], -1).to("cpu", torch.complex128 if w.is_complex() else torch.float64)
    if not bool(torch.isfinite(mat).all()):
        raise ValueError(f"{name or 'weight'}: shape {tuple(w.shape)} contains NaN or Inf")
    s = torch.linalg.svdvals(mat)
    m, n = mat.shape
    return Spectrum(
        values=s * s,
        n_rows=int(m),
        dim=int(min(m, n)),
        kind="weight",
        source=name,
        metadata={"shape": list(w.shape), "matrix_shape": [int(m), int(n)], **({"dequantized": how} if how else {})},
    )


def _weights_module(model: nn.Module) -> nn.Module:
    """The module whose weights are read, as :class:`~spectral_lens.SpectralLens` and the probe bind it: a
    ``torch.compile`` wrapper and Lightning Fabric's ``_FabricModule`` unwrapped (under Fabric's DDP strategy, the
    DDP's module; :func:`~spectral_lens.capture.unwrap_compiled`), so names are the user's model's. A
    ``DistributedDataParallel``/``DataParallel`` wrapper or a DeepSpeed engine is refused, as the lens refuses
    it: its names carry a ``module.`` prefix that the lens's records and ``params=`` lack."""
    refuse_parallel_wrapper_names(model, "weight_spectra")  # the wording of the lens, the probe and sl.attach
    inner = unwrap_compiled(model)
    _refuse_fsdp1_flat(inner)
    return inner


def _refuse_fsdp1_flat(model: nn.Module) -> None:
    """``ValueError`` for FSDP1 weights that are not the matrices: the 1-D ``FlatParameter`` of a
    ``FullyShardedDataParallel(use_orig_params=False)`` (its only parameter outside ``summon_full_params``: before,
    'no matrix parameter matches' with an empty list), or under ``use_orig_params=True`` a parameter that is a
    view of this rank's shard (1-D or empty, not its original shape: before, silently left out as < 2 dims).
    Inside ``FullyShardedDataParallel.summon_full_params(model)`` both are the whole matrices again.

    Only weights whose original shape is a matrix count: a model whose parameters are all 1-D has no matrix to
    gather, and :func:`_chosen` says so (before: 'views of this rank's shard', or 'flat 1-D parameters').

    The original shapes are held by the wrapper's handle. Given the module inside the wrapper
    (``fsdp_model.module``, or a submodule: no handle within reach), they are read from the flat parameter found
    through the views (:func:`_fsdp1_original_shapes`); where it is not found, FSDP1's parameters (marked
    ``_fsdp_flattened``) count as shard views when one is empty or none of them is a matrix: under a sharded
    strategy every one is a 1-D view, under ``NO_SHARD`` they keep their shapes (before: 'no matrix parameter
    matches', the 1-D views silently left out). Under ``use_orig_params=False`` a submodule's weights are plain
    tensors outside ``summon_full_params``, views of the flat parameter (FSDP1 marks the modules it manages
    ``_fsdp_use_orig_params``)."""
    # only weights that are matrices count: a model whose parameters are all 1-D (norms, biases) has no matrix to
    # gather, and is told so by _chosen ("no matrix parameter"), not sent to summon_full_params (review 27)
    flat = [(n, p) for n, p in model.named_parameters() if getattr(p, "_is_flat_param", False)
            and (getattr(p, "_shapes", None) is None or any(len(shape) >= 2 for shape in p._shapes))]
    handles = {id(h): h for m in model.modules() if (h := getattr(m, "_handle", None)) is not None}.values()
    sharded, known = [], set()
    for handle in handles:
        fp = getattr(handle, "flat_param", None)
        views, shapes = getattr(fp, "_params", None), getattr(fp, "_shapes", None)
        if getattr(fp, "_is_flat_param", False) and views is not None and shapes is not None:
            known.update(id(p) for p in views)
            sharded += [p for p, shape in zip(views, shapes) if tuple(p.shape) != tuple(shape) and len(shape) >= 2]
    orphans = [p for _, p in model.named_parameters()
               if getattr(p, "_fsdp_flattened", False) and not getattr(p, "_is_flat_param", False) and id(p) not in known]
    inside = not any(getattr(getattr(h, "flat_param", None), "_is_flat_param", False) for h in handles)
    if orphans and (any(p.numel() == 0 for p in orphans) or all(p.ndim < 2 for p in orphans)):
        # shard views, or a model without matrices: the original shapes tell (two heap scans, ~0.2 s each in a
        # process with 2e5 tracked objects: only here, where a matrix model would be refused anyway)
        originals = _fsdp1_original_shapes(orphans)
        if originals and all(id(p) in originals for p in orphans):  # the wrapper's flat parameter found
            sharded += [p for p in orphans if tuple(p.shape) != originals[id(p)] and len(originals[id(p)]) >= 2]
        else:
            sharded += [p for p in orphans if p.ndim < 2]
    # use_orig_params=False, a submodule given: its weights are plain tensors, views of the flat parameter (a plain
    # tensor attribute of the user's own, a cache, is not one), in their original shapes: refused when one is a matrix
    hidden = {f"{n}.{k}" if n else k: v.ndim for n, m in model.named_modules()
              if getattr(m, "_fsdp_use_orig_params", None) is False
              for k, v in vars(m).items() if isinstance(v, torch.Tensor) and getattr(v._base, "_is_flat_param", False)}
    hidden = list(hidden) if any(ndim >= 2 for ndim in hidden.values()) else []
    if not (flat or sharded or hidden):
        return
    if flat:
        n, p = flat[0]
        what = (f"holds its weights as {len(flat)} flat 1-D parameter(s) ({n!r}, shape {tuple(p.shape)}) of "
                "FullyShardedDataParallel(use_orig_params=False), none of them a matrix")
    elif hidden:
        what = (f"holds the weights of FullyShardedDataParallel(use_orig_params=False) as plain tensors, not "
                f"parameters ({[uncompiled_name(n) for n in hidden[:3]]}: views of the wrapper's flat parameter)")
    else:
        names = {id(p): n for n, p in model.named_parameters()}
        shown = [uncompiled_name(names.get(id(p), "?")) for p in sharded[:3]]
        what = (f"holds {len(sharded)} FullyShardedDataParallel parameter(s) as views of this rank's shard, not the "
                f"matrices ({shown}: shapes {[tuple(p.shape) for p in sharded[:3]]})")
    where = ("FullyShardedDataParallel.summon_full_params(fsdp_model):`, fsdp_model the FullyShardedDataParallel "
             "wrapper this module is inside (summon_full_params of the module itself gathers nothing)" if inside
             else "FullyShardedDataParallel.summon_full_params(model):`")
    raise ValueError(
        f"weight_spectra: {type(model).__name__} {what}; call weight_spectra inside `with {where} (on every rank: it "
        "all-gathers the weights), where they are the whole matrices under the names the lens records (with "
        "use_orig_params=True they are parameters of their own names also outside it, whole only under "
        "ShardingStrategy.NO_SHARD), or pass an unwrapped model of the same architecture holding the full weights "
        "(load its state_dict)")


def _fsdp1_original_shapes(params: list[torch.Tensor]) -> dict[int, tuple[int, ...]]:
    """``{id(p): original shape}`` for FSDP1 parameters (``use_orig_params=True``) whose flat parameter is out of
    reach (given the module inside the wrapper, or a submodule): read from the flat parameter's ``_params`` list that
    holds them and its ``_shapes`` beside it, found through their referrers (two scans of the heap's tracked
    objects, only when such parameters exist: about 0.2 s with 2.4e5 tracked objects, 0.55 s with 5e6, on a
    loaded CPU). Only a flat parameter's own attributes count (``_is_flat_param`` among them). ``{}`` when none is
    found (FSDP1's attributes renamed)."""
    ids = {id(p) for p in params}
    lists = [r for r in gc.get_referrers(*params) if isinstance(r, list) and any(id(q) in ids for q in r)]
    out: dict[int, tuple[int, ...]] = {}
    for owner in gc.get_referrers(*lists) if lists else ():
        attrs = owner if isinstance(owner, dict) else vars(owner) if isinstance(owner, torch.Tensor) else None
        # a flat parameter's own attributes only (FSDP1 sets _is_flat_param on it): an object of the user's own that
        # lists the same parameters and their current 1-D shapes as _params / _shapes is not one (review 27)
        views = attrs.get("_params") if isinstance(attrs, dict) and attrs.get("_is_flat_param") is True else None
        shapes = attrs.get("_shapes") if views is not None else None
        if any(views is r for r in lists) and shapes is not None and len(shapes) == len(views):
            out.update((id(q), tuple(shape)) for q, shape in zip(views, shapes))
    return out


def _chosen(model: nn.Module, select: ParamTarget | None) -> list[tuple[str, str, torch.Tensor]]:
    """``(own name, record name, weight)`` of the matrix parameters of ``model`` (unwrapped already) that
    ``select`` chooses. The record name is the lens's (:func:`~spectral_lens.capture.record_names`): no
    ``_orig_mod`` segments of a per-block ``torch.compile``, and in a PEFT model the name before
    ``get_peft_model`` (``a.weight`` for ``base_model.model.a.base_layer.weight``). A name, glob or regex
    matches the own name, the one without wrapper segments, or the record name."""
    pairs = _with_quantized_weights(model, list(model.named_parameters()))
    records = record_names(model, [n for n, _ in pairs], params=True)
    named = [(n, records[n], p) for n, p in pairs]
    if select is None:
        refuse_zero3_placeholders({n: p for n, _, p in named}, "weight_spectra")  # empty .data: not the matrix's ndim
        chosen = [item for item in named if item[2].ndim >= 2]
    else:
        targets = list(select) if isinstance(select, (list, tuple, set, frozenset)) else [select]
        if not targets:
            raise ValueError("empty parameter target list")
        matchers = [name_matcher(t, "parameter") for t in targets]
        own = {n for n, _, _ in named}
        # a name that is a parameter as typed selects that one only, not another whose record name it also is
        by_name = [isinstance(t, (str, re.Pattern)) and not (isinstance(t, str) and t in own) for t in targets]
        # per entry, the parameters it matches: each entry of a list must choose a matrix, as it would alone
        # the other names of each parameter (record name, eager name), built once: not per entry and parameter
        others = [tuple({e, uncompiled_name(n)} - {n}) for n, e, _ in named]
        # a name or glob typed with wrapper segments ("_orig_mod.h.1.w.weight", as a compiled model or its saved
        # state dict names it) matches by the eager and record names too (before: no matrix parameter matched)
        # (a name that is a parameter as typed selects that one only: eager_target)
        stripped = [None if (e := eager_target(t, own)) is None else name_matcher(e, "parameter") for t in targets]
        hits = [[item for item, alt in zip(named, others) if f(item[0], item[2]) or (eager and any(
                    f(a, item[2]) for a in alt)) or (g is not None and any(
                    g(a, item[2]) for a in (item[1], uncompiled_name(item[0]))))]
                for f, g, eager in zip(matchers, stripped, by_name)]
        taken = {id(item) for h in hits for item in h}  # the items of named themselves: one entry each
        matched = [item for item in named if id(item) in taken]
        refuse_zero3_placeholders({n: p for n, _, p in matched}, "weight_spectra")
        chosen = [item for item in matched if item[2].ndim >= 2]
        if matched and not chosen:
            raise ValueError(
                f"{type(model).__name__}: target {select!r} matches only parameters with < 2 dims "
                f"({[e for _, e, _ in matched][:5]}); weight spectra need matrices"
            )
        if chosen:
            _refuse_missed_entries(model, select, targets, hits, named, chosen)
    if not chosen:
        _refuse_tied_alias(model, select if isinstance(select, (list, tuple, set, frozenset)) else [select], named)
        _refuse_shared_short_name(model, select, named)
        hints, shown = _closest_params(select if isinstance(select, (list, tuple)) else [select], named)
        if select is None:  # before: "no matrix parameter matches None; matrix parameters: []"
            vectors = [e for _, e, _ in named]
            raise ValueError(
                f"{type(model).__name__} has no matrix parameter (weight spectra need >= 2 dims): its "
                f"{len(vectors)} parameter(s) are 1-D or scalars: {vectors[:8]}")
        raise ValueError(
            f"{type(model).__name__}: no matrix parameter matches {select!r}; "
            f"{'closest names' if hints else 'matrix parameters'}: {shown}"
        )
    by_record: dict[str, str] = {}
    for own, rec, _ in chosen:  # a dict keyed by record name kept the last of them, the other lost silently
        if by_record.setdefault(rec, own) != own:
            raise ValueError(
                f"{type(model).__name__}: parameters {by_record[rec]!r} and {own!r} would both be recorded as {rec!r} "
                "(record names drop the wrapper segments _orig_mod, _fsdp_wrapped_module, _checkpoint_wrapped_module): "
                "select one of them, or rename the submodule")
    return chosen


def _closest_params(targets: list, named: list[tuple[str, str, torch.Tensor]]) -> tuple[list[str], list[str]]:
    """``(hints, shown)`` for an error on ``targets`` that chose no matrix: the matrix names closest to its
    name entries (``hints``, maybe empty), and what to show (the first eight of ``hints``, else of all matrices)."""
    names = [e for _, e, p in named if p.ndim >= 2]
    hints = []
    for t in targets:
        if isinstance(t, str):
            hints += [n for n in difflib.get_close_matches(t, names, n=5, cutoff=0.5) if n not in hints]
    return hints, (hints or names)[:8]


def _refuse_missed_entries(model: nn.Module, select, targets: list, hits: list, named: list, chosen: list) -> None:
    """``ValueError`` naming the entries of the list ``select`` that choose no matrix parameter while others do:
    before, they were dropped silently (a typo in one name of five gave four spectra). An entry matching only
    vectors (a bias) is named as such; a glob or regex entry that matches nothing is refused too (it was written
    to select something; alternatives go in one regex, ``re.compile("a|b")``, or a callable)."""
    missed = [t for t, h in zip(targets, hits) if not any(p.ndim >= 2 for _, _, p in h)]
    if not missed:
        return
    _refuse_tied_alias(model, missed, named)
    _refuse_shared_short_name(model, missed, named)
    vectors = [f"{t!r} matches only {[e for _, e, _ in h][:3]}" for t, h in zip(targets, hits) if h and not any(
        p.ndim >= 2 for _, _, p in h)]
    hints, shown = _closest_params(missed, named)
    one = len(missed) == 1
    raise ValueError(
        f"{type(model).__name__}: {'entry' if one else 'entries'} {', '.join(repr(t) for t in missed)} of target "
        f"{select!r} {'matches' if one else 'match'} no matrix parameter (each entry of a list must choose at least "
        f"one, a glob or regex too; the others chose {[e for _, e, _ in chosen][:8]})"
        + (f"; parameters with < 2 dims: {'; '.join(vectors)}" if vectors else "")
        + f"; {'closest names' if hints else 'matrix parameters'}: {shown}"
    )


def _refuse_tied_alias(model: nn.Module, targets, named: list[tuple[str, str, torch.Tensor]]) -> None:
    """``ValueError`` when a name in ``targets`` is a second name of a tied parameter (``lm_head.weight`` tied to
    ``transformer.wte.weight``): ``named_parameters()`` lists the tensor once, under its first name, so that name
    matched nothing, and the error listed the other matrices without saying why."""
    first = {id(p): e for _, e, p in named}
    own = {n for n, _, _ in named}
    for alias, p in model.named_parameters(remove_duplicate=False):
        if alias in own or id(p) not in first:
            continue
        if any(isinstance(t, str) and t in (alias, uncompiled_name(alias)) for t in targets):
            raise ValueError(
                f"{type(model).__name__}: parameter {uncompiled_name(alias)!r} is the parameter {first[id(p)]!r} again "
                "(tied weights, e.g. an output head tied to the embedding), which weight_spectra lists once, under "
                f"its first name: select {first[id(p)]!r} (the same matrix)")


def _refuse_shared_short_name(model: nn.Module, select: ParamTarget, named: list[tuple[str, str, torch.Tensor]]) -> None:
    """``ValueError`` when a name in ``select`` that matched nothing is the short (pre-``get_peft_model``) name of
    several matrices of a PEFT model, which therefore keep their full names (:func:`~spectral_lens.capture.record_names`,
    e.g. a module of the user's own with a ``base_layer`` submodule): say which, instead of pointing at unrelated
    closest names."""
    if not has_peft_layers(model):
        return
    prefix = peft_prefix(model)
    for t in select if isinstance(select, (list, tuple, set, frozenset)) else [select]:
        owners = [e for n, e, p in named
                  if p.ndim >= 2 and isinstance(t, str) and short_name(uncompiled_name(n), prefix, base_layer=True) == t]
        if len(owners) > 1:
            raise ValueError(
                f"{type(model).__name__}: {t!r} is the name before get_peft_model of {len(owners)} matrices ({owners}), "
                "so each keeps its full name (in the lens's records too): select one by its full name")


def select_parameters(model: nn.Module, select: ParamTarget | None = None) -> list[tuple[str, torch.Tensor]]:
    """Matrix-shaped parameters of ``model`` chosen by ``select`` (default: all with >= 2 dims).

    Parameters with fewer than two dimensions are never returned. The weights of ``torch.ao`` quantized
    modules (``quantize_dynamic``), which are no parameters, are included as ``"<module>.weight"`` (their
    quantized tensor, which :func:`weight_spectrum` dequantizes), in module order. Names are the user's
    model's, as the lens records them: a ``torch.compile`` wrapper and Lightning Fabric's ``fabric.setup``
    wrapper are unwrapped (no ``_orig_mod.`` / ``_forward_module.`` prefix), the ``_orig_mod`` segments of
    per-block compilation left out, and a PEFT model's parameters named as before ``get_peft_model``
    (``a.weight`` for ``base_model.model.a.base_layer.weight``; either spelling selects). A name or glob written
    with wrapper segments, as ``torch.compile(model).named_parameters()`` prints it or a state dict saved from a
    compiled model holds it (``"_orig_mod.a.weight"``), selects the same parameter as the plain name. Raises ``ValueError``
    naming the closest parameter names when nothing matches or an entry of a list chooses no matrix, for DeepSpeed ZeRO-3 placeholders (gather them
    first), for FSDP1 flat parameters or shard views (call it inside ``summon_full_params``), and for a
    ``DistributedDataParallel`` / ``DataParallel`` wrapper or DeepSpeed engine (pass ``model.module``, as to the lens).
    """
    return [(eager, p) for _, eager, p in _chosen(_weights_module(model), select)]


def _with_quantized_weights(model: nn.Module, named: list) -> list:
    """``named`` plus ``("<module>.weight", module.weight())`` of each ``torch.ao`` quantized module,
    ordered by module (a parameter sorts with the module that owns it)."""
    order = {}
    quantized = []
    for i, (mname, mod) in enumerate(model.named_modules()):
        order[mname] = i
        if _is_ao_quantized(mod):
            quantized.append((f"{mname}.weight" if mname else "weight", mod.weight()))
    if not quantized:
        return named
    return sorted(named + quantized, key=lambda item: order.get(item[0].rpartition(".")[0], len(order)))


def _is_conv(module: nn.Module | None) -> bool:
    """A convolution (torch's ``_ConvNd``, or any module with a ``kernel_size``): its >2-D weight is one map."""
    return isinstance(module, nn.modules.conv._ConvNd) or hasattr(module, "kernel_size")


def _matrix_stack(modules: dict, name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` is a stack of matrices along dim 0: 3-D, owned by a module that is no
    convolution and no ``nn.Bilinear`` (whose ``(out, in1, in2)`` weight is one map on outer products), and
    either a stack of one ``(1, N, d)`` or the fused ``(E, out, in)`` weights of a mixture-of-experts layer:
    the owner's path or class name says ``expert`` (``mlp.experts`` in ``transformers`` 5, torchtitan's
    ``GroupedExperts``). Other 3-D weights stay one ``(shape[0], -1)`` map: XLNet's and Funnel's attention
    projections ``(d_model, n_head, d_head)`` are not ``d_model`` matrices."""
    path = name.rpartition(".")[0]
    owner = modules.get(path)
    if p.ndim != 3 or owner is None or _is_conv(owner) or isinstance(owner, nn.Bilinear):
        return False
    return p.shape[0] == 1 or "expert" in path.lower() or "expert" in type(owner).__name__.lower()


def weight_spectra(model: nn.Module, select: ParamTarget | None = None) -> dict[str, Spectrum]:
    """Weight spectra of the selected parameters, keyed by parameter name (model order).

    A 3-D parameter of a mixture-of-experts layer's experts module (its path or class name contains
    ``expert``; no convolution) is a stack of matrices (the fused expert weights, ``(E, out, in)``): it
    gives one spectrum per expert, keyed
    ``"<name>[e]"`` for ``e = 0 .. E-1`` (``select`` chooses the parameter, i.e. all its experts). Before,
    the stack was read as one ``E x (out * in)`` matrix, whose ``E`` singular values mix the experts.
    A stack of one, ``(1, N, d)`` (a ViT's position embeddings, a single shared expert), is its one
    ``(N, d)`` matrix under the parameter's own name (before: ``(1, N * d)``, a single singular value).
    A convolution's weight stays one matrix ``(out, in * prod(k))``, and so does any other 3-D weight
    (``nn.Bilinear``'s, XLNet's ``(d_model, n_head, d_head)`` projections): ``(shape[0], -1)``.

    A weight offloaded by Hugging Face Accelerate (``cpu_offload``, ``disk_offload``, a ``device_map`` with
    ``"cpu"``/``"disk"`` entries: a meta placeholder between forwards) is read from its hook's offload store
    (CPU memory or the offload folder), exactly; a meta weight in no store raises ``ValueError`` naming it.

    Names are the user's model's, as the lens and the probe take and record them (:func:`select_parameters`):
    a ``torch.compile`` wrapper and Lightning Fabric's wrapper (under its DDP strategy, the DDP's module) are
    unwrapped, a PEFT model's names are the base model's; a ``DistributedDataParallel`` wrapper is refused (pass
    ``model.module``, as to the lens), and so are FSDP1's flat parameters and shard views (call it inside
    ``FullyShardedDataParallel.summon_full_params(model)`` on every rank).

    Example::

        spectra = weight_spectra(model, ["blocks.11.attn.c_proj.weight", "blocks.*.mlp.c_proj.weight"])
        {name: stable_rank(s) for name, s in spectra.items()}
    """
    model = _weights_module(model)
    out = {}
    modules = dict(model.named_modules())  # by own name: the owner of each parameter (its path), exactly
    for own, name, p in _chosen(model, select):
        if p.device.type == "meta":  # an Accelerate offload placeholder: the value in its hook's store
            stored = offloaded_value(model, own)
            if stored is None:
                raise ValueError(
                    f"weight_spectra: {name} (shape {tuple(p.shape)}) is on the meta device and in no Accelerate "
                    "offload store: the model's weights were never loaded (load_state_dict, or accelerate's "
                    "load_checkpoint_and_dispatch after init_empty_weights)"
                )
            p = stored
        if _matrix_stack(modules, own, p) and p.shape[0] == 1:  # (1, N, d): a ViT's position embeddings
            out[name] = weight_spectrum(p[0], name)
        elif _matrix_stack(modules, own, p):
            out.update({f"{name}[{e}]": weight_spectrum(p[e], f"{name}[{e}]") for e in range(p.shape[0])})
        else:
            out[name] = weight_spectrum(p, name)
    return out


# --------------------------------------------------------------------------------------------------
# power-law tail of the ESD (Hill / Clauset-Shalizi-Newman, as in WeightWatcher)


@dataclass(frozen=True)
class PowerLawFit:
    """Maximum-likelihood power-law fit of the eigenvalue density above ``xmin``.

    Attributes:
        alpha: density exponent, ``rho(lambda) ~ lambda^-alpha`` for ``lambda >= xmin``.
        xmin: lower cutoff of the tail (chosen by minimum KS distance unless given).
        n_tail: eigenvalues ``>= xmin`` used by the fit.
        n_total: positive eigenvalues available.
        ks_distance: Kolmogorov-Smirnov distance between the tail and the fitted law.
        stderr: asymptotic standard error ``(alpha - 1) / sqrt(n_tail)``.
    """

    alpha: float
    xmin: float
    n_tail: int
    n_total: int
    ks_distance: float
    stderr: float


def _mle_at(x: np.ndarray, xmin: float, k: int, tol: float) -> tuple[float, float]:
    """MLE and two-sided KS distance of the tail ``x[k:]`` (sorted, all ``>= xmin``) above ``xmin``.

    ``sum log(x_i / xmin)`` is summed directly: the difference of running sums of ``log x`` lost
    digits to cancellation (relative error 1e-4 on a tail near 1e30). A tail spread no wider than
    ``tol`` (the eigenvalues' float64 round-off) is degenerate, ``(nan, inf)``: all equal but for
    round-off, as an orthogonal weight's, whose MLE would be ~1e15 fitted to noise."""
    tail = x[k:]
    n = tail.size
    denom = float(np.sum(np.log(tail / xmin)))
    if not (denom > 0 and tail[-1] - xmin > tol):
        return math.nan, math.inf
    alpha = 1.0 + n / denom
    cdf = 1.0 - (tail / xmin) ** (1.0 - alpha)
    i = np.arange(1, n + 1)
    # both sides of each step of the empirical CDF (S jumps from (i-1)/n to i/n at the i-th value)
    ks = float(max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n)))
    return alpha, ks


def _roundoff_floor(values: Spectrum | torch.Tensor | np.ndarray, v: np.ndarray) -> float:
    """The largest eigenvalue that is round-off of an exact zero, from what ``values`` says it is: values
    ``<= floor`` are no data.

    A weight spectrum holds the squared singular values of a float64 SVD of an ``m x n`` matrix, whose
    singular values of an exact zero come out below ``max(m, n) * eps * s_max`` (LAPACK's backward error;
    NumPy's ``matrix_rank`` tolerance): squared, ``(max(m, n) * eps)^2 * lambda_max``, 8e-25 of the largest
    at 4,096 (measured: 3e-31 to 1e-30 of the largest for rank-16 to 100 products of 256 to 2,000 columns). The
    eigenvalues of another ``Spectrum`` (a covariance's, a Gram matrix's) are an eigensolver's, round-off
    ``sqrt(N) * eps * lambda_max`` for ``N`` of them, as the library's numerical rank
    (``spectra.fit._numerical_rank``). A bare array or tensor says nothing of where it came from (a
    synthetic sample may span 60 decades): ``0.0``, only zeros and negatives are left out (a ``Spectrum``
    holds float64 values: ``eps`` is float64's). WeightWatcher drops eigenvalues below a fixed
    ``EVALS_THRESH = 1e-5``, which is not scale-free (a weight scaled by 1e-3 would lose genuine ones)."""
    top = float(v.max()) if v.size else 0.0
    if not (isinstance(values, Spectrum) and top > 0):
        return 0.0
    eps = float(np.finfo(np.float64).eps)
    if values.kind == "weight":
        shape = values.metadata.get("matrix_shape") if isinstance(values.metadata, dict) else None
        big = max(shape) if isinstance(shape, (list, tuple)) and len(shape) == 2 else max(values.n_rows, values.dim)
        return (big * eps) ** 2 * top
    return math.sqrt(v.size) * eps * top


#: Points of each candidate's tail at which its KS distance is bounded from below, level by level, before the
#: surviving candidates are evaluated by :func:`_mle_at` (:func:`_ks_search`).
_KS_LEVELS = (32, 256, 2048)
#: A candidate is pruned when its bound exceeds a distance reached by more than this plus ``(alpha - 1) * eps``:
#: above the difference between the bound's distances and :func:`_mle_at`'s, whose alphas differ
#: (:func:`_tail_alphas`' sums are exact to ~n eps; :func:`_mle_at`'s ``log(x_i / xmin)`` loses digits when the
#: ratio is near 1, so its alpha is off by up to ~(alpha - 1)^2 eps and its distance by ~(alpha - 1) eps / 5:
#: 1e-8 measured for a tail of spread 1e-9 near 1e30, alpha 1.8e9), so none that :func:`_mle_at` would choose
#: is pruned.
_KS_MARGIN = 1e-9
#: Elements per block of the vectorized bounds (bounded memory: a few arrays of 8 MiB each).
_KS_BLOCK = 1 << 20


def _tail_alphas(x: np.ndarray, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLE ``alpha`` and ``sum_{i >= k} log(x_i / x_k)`` of the tails ``x[k:]`` for all ``k`` in ``ks``, in O(n).

    The sums run over ``D_k = D_{k+1} + (n - k - 1) log(x_{k+1} / x_k)``: nonnegative terms only (``x`` is
    sorted), so no cancellation, unlike ``sum log x_i - m log x_k`` (relative error 1e-4 on a tail near 1e30);
    the gaps are ``log1p((x_{k+1} - x_k) / x_k)``, exact to a few ulp however close the values (``log x_{k+1} -
    log x_k`` where the ratio overflows float64, 1e-300 to 1e300)."""
    n = x.size
    with np.errstate(over="ignore"):
        ratio = np.diff(x) / x[:-1]
    gaps = np.where(np.isfinite(ratio), np.log1p(np.minimum(ratio, np.finfo(np.float64).max)),
                    np.log(x[1:]) - np.log(x[:-1]))
    gaps *= n - np.arange(1, n)  # (n - j) * log(x_j / x_{j-1}), j = 1..n-1
    d = np.zeros(n)
    d[:-1] = np.cumsum(gaps[::-1])[::-1]  # D_k = sum_{j > k} (n - j) g_j
    denom = d[ks]
    with np.errstate(divide="ignore"):
        return 1.0 + (n - ks) / denom, denom


def _ks_bound(x: np.ndarray, ks: np.ndarray, alphas: np.ndarray, points: int) -> np.ndarray:
    """A lower bound of the KS distance of each tail ``x[k:]`` under its ``alpha``: the distance at ``points``
    ranks evenly spread over the tail (all of them in a shorter tail), a max over some of its points.

    The same two-sided formula as :func:`_mle_at` at each point (a point inside a run of ties gives less than
    the run's step: still a lower bound), vectorized over candidates in blocks of :data:`_KS_BLOCK` elements."""
    n = x.size
    out = np.empty(ks.size)
    step = max(1, _KS_BLOCK // points)
    j = np.arange(points)[None, :]
    for s in range(0, ks.size, step):
        k, a = ks[s:s + step, None], alphas[s:s + step, None]
        m = n - k
        r = np.where(m > points, (j * (m - 1)) // (points - 1), np.minimum(j, m - 1))  # past its end: the last again
        with np.errstate(over="ignore"):  # a ratio past 1e308: inf, as in _mle_at
            cdf = 1.0 - (x[k + r] / x[k]) ** (1.0 - a)
        out[s:s + step] = np.maximum((r + 1) / m - cdf, cdf - r / m).max(axis=1)
    return out


def _ks_search(x: np.ndarray, cands: np.ndarray, tol: float) -> tuple[float, float, int]:
    """``(ks, alpha, k)`` of the candidate ``x[k]`` (``k`` in ``cands``, ascending) of least KS distance, exactly
    as the loop of :func:`_mle_at` over every candidate finds it (the first of equal distances); ``k = -1`` if
    every tail is degenerate.

    Branch and bound: the KS distance at some of a tail's points is a lower bound of its distance, so a
    candidate whose bound exceeds a distance already reached cannot win. Level by level (:data:`_KS_LEVELS`
    points per tail) the survivors' bounds are computed, the 4 of least bound evaluated by :func:`_mle_at` (a
    distance reached), and those bounded above it by more than :data:`_KS_MARGIN` pruned; the last survivors go through
    the exhaustive loop itself. At n = 16,384 eigenvalues this evaluates 0.6-3% of the loop's n^2/2 points
    (0.02-0.11 s, the loop over all candidates 1.2 s); where nothing can be pruned it is that loop plus the bounds."""
    alphas, denom = _tail_alphas(x, cands)
    live = (denom > 0) & (x[-1] - x[cands] > tol)  # _mle_at's degenerate tails (its own sums decide below)
    cands, alphas = cands[live], alphas[live]
    best = math.inf
    for points in _KS_LEVELS:
        if cands.size <= 16:
            break
        bound = _ks_bound(x, cands, alphas, points)
        for k in cands[np.argsort(bound, kind="stable")[:4]]:
            best = min(best, _mle_at(x, float(x[k]), int(k), tol)[1])
        keep = bound <= best + _KS_MARGIN + (alphas - 1.0) * np.finfo(np.float64).eps
        cands, alphas = cands[keep], alphas[keep]
    out = (math.inf, math.nan, -1)
    for k in cands:  # ascending, as the exhaustive loop: the first of equal distances wins
        alpha, ks = _mle_at(x, float(x[k]), int(k), tol)
        if ks < out[0]:
            out = (ks, alpha, int(k))
    return out


def powerlaw_fit(
    values: Spectrum | torch.Tensor | np.ndarray,
    *,
    xmin: float | None = None,
    min_tail: int = 10,
    max_candidates: int | None = None,
) -> PowerLawFit:
    """Hill/Clauset MLE of the power-law exponent of the eigenvalue density (WeightWatcher's alpha).

    ``alpha = 1 + n / sum_i log(x_i / xmin)`` over the ``n`` eigenvalues ``x_i >= xmin``. Unless
    ``xmin`` is given, it is the candidate (a distinct eigenvalue, leaving at least ``min_tail`` at or above
    it) that minimizes the KS distance between the empirical tail and the fitted law, over all candidates
    (exactly the exhaustive search's choice, by branch and bound: :func:`_ks_search`). ``max_candidates``
    (default ``None``: all) bounds the work: with more candidate ranks than that, an evenly spaced subset (in
    rank) is searched, as before review 29 (the default was 512, which missed the best ``xmin`` in 16 of 70
    spectra).

    Zeros and negatives are left out, and so, for a ``Spectrum``, are eigenvalues at or below the round-off
    of an exact zero (:func:`_roundoff_floor`: for a weight spectrum ``(max(m, n) * eps)^2 * lambda_max``,
    the SVD's bound; for other kinds ``sqrt(N) * eps * lambda_max``, an eigensolver's): they count in neither
    ``n_total`` nor the candidates (a rank-``r`` weight has ``n_total = r``; before, its ~1e-31 round-off
    values counted). A bare array or tensor is taken as it is (only zeros and negatives left out): pass the
    ``Spectrum``.

    For a weight spectrum pass the ``Spectrum`` (its values are eigenvalues of ``W^T W``). Values
    must be a 1-D array of finite numbers; ``xmin``, if given, a finite number > 0.
    """
    v = values.values.numpy() if isinstance(values, Spectrum) else (
        values.detach().to("cpu", torch.float64).numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    )
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"powerlaw_fit: expected a 1-D array of eigenvalues, got shape {v.shape} "
                         "(for a weight matrix W pass weight_spectrum(W))")
    if not np.isfinite(v).all():
        bad = v[~np.isfinite(v)]
        raise ValueError(f"powerlaw_fit: {bad.size} of {v.size} eigenvalues are NaN or Inf (first: {bad[0]})")
    if xmin is not None and not (math.isfinite(xmin) and xmin > 0):
        raise ValueError(f"powerlaw_fit: xmin must be a finite number > 0, got {xmin}")
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"powerlaw_fit: max_candidates must be >= 1, got {max_candidates} (None: all candidates)")
    x = np.sort(v[v > 0])
    # float64 round-off of the eigenvalues (an SVD's is ~ dim * eps * lambda_max): a tail spread within it is
    # degenerate (all equal but for round-off)
    tol = 4.0 * x.size * np.finfo(np.float64).eps * (x[-1] if x.size else 0.0)
    floor = _roundoff_floor(values, v)
    x = x[x > floor]  # round-off of exact zeros (a rank-deficient weight's ~1e-31): no data
    n_total = x.size
    if min_tail < 2:
        raise ValueError(f"min_tail must be >= 2, got {min_tail}")
    if n_total < min_tail:
        left = f"zeros, negatives and round-off of zeros (<= {floor:.3g})" if floor > 0 else "zeros and negatives"
        raise ValueError(f"powerlaw_fit: need at least min_tail={min_tail} positive eigenvalues, got {n_total} "
                         f"(of {v.size}; {left} are left out)")
    if xmin is not None:
        k = int(np.searchsorted(x, xmin, side="left"))
        if x.size - k < min_tail:
            raise ValueError(f"powerlaw_fit: only {x.size - k} eigenvalues >= xmin={xmin}; need {min_tail}")
        # the MLE uses the given xmin, not the smallest eigenvalue above it
        n = x.size - k
        alpha, ks = _mle_at(x, float(xmin), k, tol)
        if math.isnan(alpha):
            raise ValueError(f"powerlaw_fit: degenerate tail above xmin={xmin}: its {n} eigenvalues are all equal "
                             f"up to float64 round-off ({tol:.3g}), an orthogonal or scaled-orthogonal weight")
        return PowerLawFit(float(alpha), float(xmin), n, n_total, ks, float((alpha - 1) / math.sqrt(n)))
    last = x.size - min_tail
    cands = np.arange(0, last + 1)
    if max_candidates is not None and cands.size > max_candidates:
        cands = np.unique(np.linspace(0, last, max_candidates).round().astype(int))
    cands = cands[(cands == 0) | (x[cands] != x[cands - 1])]  # a tie is one candidate: its first rank
    ks, alpha, k = _ks_search(x, cands, tol)
    if k < 0:
        raise ValueError("powerlaw_fit: every candidate tail is degenerate (its eigenvalues all equal up to float64 "
                         f"round-off, {tol:.3g}: an orthogonal or scaled-orthogonal weight)")
    n = x.size - k
    return PowerLawFit(float(alpha), float(x[k]), n, n_total, float(ks), float((alpha - 1) / math.sqrt(n)))


def esd_alpha_from_rank_alpha(rank_alpha: float) -> float:
    """Density exponent of an exact rank power law ``lambda_r ~ r^-a``: ``alpha_ESD = 1 + 1/a``."""
    # inf (a flat spectrum) would give 1.0, an unnormalizable density rank_alpha_from_esd_alpha refuses
    if not (math.isfinite(rank_alpha) and rank_alpha > 0):
        raise ValueError(f"esd_alpha_from_rank_alpha: rank_alpha must be > 0 and finite, got {rank_alpha}")
    out = 1.0 + 1.0 / rank_alpha
    if not (math.isfinite(out) and out > 1):  # 1/a overflows (a < 1e-308) or 1 + 1/a rounds to 1 (a > 1e16)
        raise ValueError(f"esd_alpha_from_rank_alpha: rank_alpha={rank_alpha} gives alpha_ESD={out}, "
                         "outside (1, inf) in float64")
    return out


def rank_alpha_from_esd_alpha(esd_alpha: float) -> float:
    """Inverse of :func:`esd_alpha_from_rank_alpha`: ``a = 1 / (alpha_ESD - 1)``."""
    # inf would give 0.0, a rank slope esd_alpha_from_rank_alpha refuses
    if not (math.isfinite(esd_alpha) and esd_alpha > 1):
        raise ValueError(f"rank_alpha_from_esd_alpha: esd_alpha must be > 1 and finite, got {esd_alpha}")
    return 1.0 / (esd_alpha - 1.0)
