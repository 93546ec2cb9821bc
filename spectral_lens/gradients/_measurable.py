"""Which models and parameters :class:`~spectral_lens.gradients.PerSampleGradientProbe` can measure.

The default parameter (:func:`default_gradient_param`, the final block's attention output projection
found by :data:`ATTENTION_OUTPUT_PATTERNS`), the resolution of ``params=`` (names, globs, module names,
eager names of ``torch.compile``d blocks), and the refusals that say what to pass instead: a
``DistributedDataParallel``/``DataParallel`` wrapper, an FSDP-sharded model it cannot measure (FSDP1, or an
engine other than the fast one), a TorchScript module, default forward/loss that do
not fit a Hugging Face model, a computed weight (``parametrize``, pruning, hook-based ``weight_norm`` /
``spectral_norm``), a plain tensor attribute, a quantized module, enabled Opacus hooks in train mode.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._deepspeed import fast_hint, refuse_zero3_params
from .._peft import base_prefix, has_peft_layers, saved_copies, short_name
from ..capture import eager_target, glob_to_regex, refuse_parallel_wrapper_names, uncompiled_name, unwrap_compiled
from ._validate import param_names

__all__ = ["ATTENTION_OUTPUT_PATTERNS", "bindable", "default_gradient_param", "fsdp_sharded", "is_encoder_decoder",
           "refuse_fsdp", "refuse_parallel_wrapper", "refuse_unfit_defaults"]

ATTENTION_OUTPUT_PATTERNS = (
    "**.attn.c_proj.weight",  # GPT-2, nanoGPT, modded-nanogpt
    "**.self_attn.o_proj.weight",  # Llama, Mistral, Qwen, Gemma
    "**.attn.o_proj.weight",
    "**.attn.proj.weight",
    "**.attention.wo.weight",  # Meta's Llama reference code
    "**.attention.dense.weight",  # GPT-NeoX / Pythia
    "**.self_attention.dense.weight",  # Falcon, BLOOM
    "**.self_attn.dense.weight",  # Phi-1/1.5/2
    "**.attention.output.dense.weight",  # BERT family
    "**.attention.o_proj.weight",  # ViT (transformers 5)
    "**.temporal_block.o_proj.weight",  # RecurrentGemma's local-attention blocks
    "**.out_proj.weight",  # OPT, GPT-Neo/J, nn.MultiheadAttention
)
"""Globs (``**`` crosses dotted segments) naming attention output projections W_O in common code bases;
the default probe is the match in the deepest block (largest block index in the name)."""


def refuse_parallel_wrapper(model: Any, who: str) -> None:
    """``ValueError`` for a ``DistributedDataParallel``/``DataParallel`` wrapper or a ``DeepSpeedEngine``: measure
    ``model.module`` (``engine.module``). A forward/backward through the wrapper starts the wrapper's own work on
    this rank alone (DDP's buffer broadcast per forward and gradient all-reduce per backward; DataParallel's
    replication; the engine's loss scaling), which the other ranks never match. The wording is shared with
    ``sl.attach`` and ``weight_spectra`` (:func:`~spectral_lens.capture.refuse_parallel_wrapper_names`)."""
    refuse_parallel_wrapper_names(model, who)


def bindable(model: Any, who: str, needs: str) -> nn.Module:
    """The module ``who`` (the probe, the lens) binds to when given ``model``: ``TypeError`` ``"<needs>, got <type>"``
    for anything but an ``nn.Module``, ``ValueError`` for a parallel wrapper (:func:`refuse_parallel_wrapper`),
    and a ``torch.compile`` wrapper and Lightning Fabric's ``_FabricModule`` unwrapped (names as in the user's model).
    The wrappers are unwrapped before the refusal: a compiled DDP (``torch.compile(DDP(model))``, PyTorch's own
    recipe) was bound as the DDP, its passes starting DDP's work on one rank."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{needs}, got {type(model).__name__}")
    model = unwrap_compiled(model)  # compile and Fabric wrappers (Fabric's DDP: its module); any other DDP refused
    refuse_parallel_wrapper(model, who)
    return model


def _fsdp_classes() -> tuple[type, type] | None:
    """FSDP2's ``FSDPModule`` (the class ``fully_shard`` mixes in) and FSDP1's ``FullyShardedDataParallel``;
    ``None`` where FSDP was never imported (no model can be sharded then; importing it takes a second)."""
    if not torch.distributed.is_available() or not any(
            m in sys.modules for m in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # torch 2.4, 2.5
        except ImportError:
            FSDPModule = FullyShardedDataParallel
    return FSDPModule, FullyShardedDataParallel


def fsdp_sharded(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules (``""`` for the model itself) sharded by FSDP: FSDP2's ``fully_shard``
    (an ``FSDPModule``) or FSDP1's ``FullyShardedDataParallel`` wrapper. Their forwards (and backwards)
    all-gather the weights (and reduce-scatter the gradients) over the FSDP mesh: collectives that every
    rank must run together."""
    classes = _fsdp_classes()
    return [] if classes is None else [name for name, m in model.named_modules() if isinstance(m, classes)]


@contextlib.contextmanager
def kept_sharded(model: nn.Module):
    """Reshard on exit the FSDP2 modules of ``model`` that were sharded on entry (every parameter they manage
    a ``DTensor``; ``FSDPModule.reshard``, local, no collective): a forward of a module built with
    ``reshard_after_forward=False`` (and of the root, which FSDP2 may keep unsharded) leaves its full weights
    registered, and one with ``reshard_after_forward=<int>`` the post-forward shards (new ``DTensor``s),
    which a measurement must not (the memory, and weights the next optimizer step would not update): a
    module whose registered parameters are other objects than on entry is resharded."""
    classes = _fsdp_classes()
    if classes is None:
        yield
        return
    fsdp2 = classes[0]

    def managed(m):  # the parameters m manages: those of its subtree outside nested FSDP2 modules
        stack, params = [m], []
        while stack:
            mod = stack.pop()
            params += [p for p in mod._parameters.values() if p is not None]
            stack += [c for c in mod.children() if not isinstance(c, fsdp2)]
        return params

    was = [(m, ps) for m in model.modules() if isinstance(m, fsdp2)
           for ps in [managed(m)] if ps and all(hasattr(p, "to_local") for p in ps)]  # DTensors (its shards)
    try:
        yield
    finally:
        for m, ps in was:
            # other objects registered now: the full weights, or (reshard_after_forward=<int>) the
            # post-forward shards, DTensors too but not the parameters the optimizer updates
            if any(a is not b for a, b in zip(managed(m), ps)):
                m.reshard()


def refuse_fsdp(model: nn.Module, engines: dict[str, str], modules: list[nn.Module] | None = None,
                params: dict | None = None, why_not_fast: Callable[[str], str | None] | None = None,
                other_fast: Callable[[list[str]], str | None] | None = None) -> None:
    """``ValueError`` for an FSDP-sharded model (:func:`fsdp_sharded`) whose probed matrices do not all use
    the fast engine (``engines``: parameter name -> engine), raised before any pass.

    The fast engine reads each module's whole input and output gradient inside FSDP's own unshard (its
    hooks see the full weight's computation), so its per-sample gradients are those of the full weight,
    on every rank that runs the same passes; it takes ``torch.autograd.grad`` of the module outputs, not
    of the parameters, so FSDP accumulates and reduce-scatters nothing into ``.grad``. The ``vmap``
    engine cannot trace FSDP's hooks (``requires_grad_`` under ``torch.func``), and the ``loop`` engine's
    gradients are sharded ``DTensor``s. Parameters partitioned by DeepSpeed ZeRO-3 on an engine other than the
    fast one are refused here too (:func:`~spectral_lens._deepspeed.refuse_zero3_params`; also when partitioned
    after the probe was bound).

    ``modules`` (``list(model.modules())``) and ``params`` (name -> the model's probed parameter), where the
    caller has them (the probe at every update): then no walk over the model and no ``get_parameter`` unless
    some module is sharded (the walk with names cost ~30 us an update on a 2-block GPT once FSDP is imported).
    ``why_not_fast``: why the fast path cannot measure a parameter (``None`` where it can): under FSDP2 the
    fast engine is suggested only where some fast path can run, for other matrices where ``other_fast`` names one
    (as by ZeRO-3's refusal: :func:`~spectral_lens._deepspeed.fast_hint`)."""
    refuse_zero3_params({n: model.get_parameter(n) for n in engines} if params is None else params, engines,
                        why_not_fast=why_not_fast, other_fast=other_fast)
    if modules is not None:
        classes = _fsdp_classes()
        if classes is None or not any(isinstance(m, classes) for m in modules):
            return
    sharded = fsdp_sharded(model)
    if not sharded:
        return
    shown = [n or "<the model>" for n in sharded[:4]] + ([f"and {len(sharded) - 4} more"] if len(sharded) > 4 else [])
    fsdp1 = any(isinstance(m, _fsdp_classes()[1]) for m in model.modules())  # not None: sharded is not empty
    slow = {n: e for n, e in engines.items() if e != "fast"}
    if not fsdp1 and not slow:
        return
    why_fast = {n: why_not_fast(n) for n in slow} if why_not_fast is not None and not fsdp1 else {}
    no_fast = "".join(f"; the fast path cannot measure {n}: {why_fast[n]}" for n in list(slow)[:3] if why_fast.get(n))
    if fsdp1:  # no reasons asked: every matrix is refused under FSDP1, the fast engine too
        fast = ("probe matrices that have a fast path (nn.Linear, transformers' Conv1D; not tied) with engine='auto' "
                "or 'fast' there (exact under FSDP2, where every rank runs every pass), or ")
    else:
        fast = fast_hint(list(slow), why_fast, other_fast, "exact under FSDP2, where every rank runs every pass")
        fast += ", or " if fast else ""
    why = ("the probe does not measure FSDP1's FullyShardedDataParallel: outside its forward a parameter is a view "
           "of this rank's shard (empty where the shard holds none of a matrix), which the probe would size and read "
           "wrongly; shard with FSDP2's fully_shard (there the fast engine measures exactly)" if fsdp1 else
           f"the probed matrices {slow} would use an engine other than the fast one, which cannot measure a sharded "
           f"model (vmap cannot trace FSDP's hooks; the loop engine's gradients are shards){no_fast}")
    raise ValueError(
        f"PerSampleGradientProbe: {type(model).__name__} is sharded with FSDP (fully_shard or FullyShardedDataParallel "
        f"on {', '.join(shown)}): {why}. Instead: {'shard with fully_shard and ' if fsdp1 else ''}{fast}"
        + "measure activations only (SpectralLens(model, pool, params=())), or probe an unsharded copy: on every rank, "
        "full = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
        "full_state_dict=True)); load it into a plain model of the same architecture and probe that "
        "(docs/guide-multi-gpu.md, FSDP)"
    )


def _refuse_scripted(model: nn.Module) -> None:
    """``TypeError`` for a TorchScript model (``torch.jit.script`` or ``torch.jit.trace`` of the whole model):
    ``get_submodule``, hooks and ``torch.func`` refuse it."""
    if isinstance(model, torch.jit.ScriptModule):
        how = "torch.jit.script" if isinstance(model, torch.jit.RecursiveScriptModule) else "torch.jit.trace"
        raise TypeError(
            f"PerSampleGradientProbe: the model is a TorchScript module ({type(model).__name__} from "
            f"{how}), which the probe does not support (its submodules cannot be looked up or hooked); "
            "probe the eager model (keep it before scripting or tracing; a TorchScript submodule inside an eager "
            "model is fine)"
        )


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face encoder-decoder model (``config.is_encoder_decoder``: T5, BART)
    that holds its decoder: the encoder alone (a ``WhisperEncoder`` built from the whole model's config)
    is an encoder-only model, which the defaults fit. The decoder is a module whose name has a segment
    containing ``decoder`` (``decoder``; SeamlessM4T's ``text_decoder``)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is not True:
        return False
    return any("decoder" in part for name, _ in model.named_modules() for part in name.split("."))


def refuse_unfit_defaults(model: nn.Module, *, forward: bool, loss: bool) -> None:
    """``ValueError`` when the probe's default ``forward_fn`` (``forward``) or default next-token loss
    (``loss``) does not fit a Hugging Face model, saying what to pass instead.

    * An encoder-decoder model (``config.is_encoder_decoder``: T5, BART): ``model(**batch)`` without
      ``labels`` gives the decoder no input, and its logits at ``t`` predict ``labels[:, t]`` (no shift).
    * A model whose ``can_generate()`` is ``False`` (a masked LM such as BERT, a classifier, a base
      model without a head): its logits are not next-token predictions, so the default loss would
      silently measure the gradient of a meaningless loss.
    """
    name = type(model).__name__
    if is_encoder_decoder(model) and (forward or loss):
        missing = " and ".join(n for n, used in (("forward_fn=", forward), ("loss_fn=", loss)) if used)
        raise ValueError(
            f"{name} is an encoder-decoder model (config.is_encoder_decoder), which the default forward and loss "
            "do not fit: the default forward calls model(**batch) without 'labels' (the decoder gets no input) "
            "and the default loss is shifted next-token cross-entropy (a seq2seq model's logits at t predict "
            f"labels[:, t]). Pass {missing}: e.g. forward_fn=lambda m, b: m(**b) (labels included, so the model "
            "builds decoder_input_ids from them) and a loss_fn giving each sequence's mean cross-entropy of "
            "logits[:, t] against labels[:, t] over labels != -100; and params= naming a matrix"
        )
    can_generate = getattr(model, "can_generate", None)
    if loss and callable(can_generate) and not can_generate():
        raise ValueError(
            f"{name} is not a causal language model (its can_generate() is False: a masked LM such as BERT, a "
            "classifier, or a base model without a head), and the default loss is next-token cross-entropy of "
            "causal-LM logits. Pass loss_fn=: for a masked LM, each sequence's mean cross-entropy of logits[:, t] "
            "against labels[:, t] (unshifted) over labels != -100 (to a SpectralLens: probe=PerSampleGradientProbe("
            "loss_fn=...), or params=() to measure activations only). A causal LM that does not inherit "
            "GenerationMixin (remote code): pass loss_fn=spectral_lens.gradients.causal_lm_loss"
        )


def _refuse_recording_opacus_hooks(model: nn.Module) -> None:
    """Raise where Opacus's ``GradSampleModule`` forward hooks are enabled on ``model``'s modules: in train mode
    they record every forward's layer inputs (``module.activations``) and count the forwards on the parameters
    (``p._forward_counter``), Opacus's state for its next backward, which a measurement's passes would spoil
    (and the ``vmap`` engine's parameters lack the counter). The probe does not switch them off itself: it
    would have to change Opacus's state (``hooks_enabled``)."""
    where = [name or type(model).__name__ for name, m in model.named_modules()
             for hook in m._forward_hooks.values()
             if type(getattr(hook, "__self__", None)).__module__.startswith("opacus.")
             and getattr(hook.__self__, "hooks_enabled", False) is True]
    if where:
        shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        raise RuntimeError(
            f"PerSampleGradientProbe(train_mode=True): Opacus's GradSampleModule hooks are enabled on {shown}; in "
            "train mode they record the probe's layer inputs (module.activations) and count its forwards "
            "(param._forward_counter), which would spoil your next private step. Call gsm.disable_hooks() before "
            "the measurement and gsm.enable_hooks() after it (try/finally), or measure with train_mode=False"
        )


def _block_index(name: str) -> int:
    nums = re.findall(r"(?:^|\.)(\d+)(?=\.)", name)
    return int(nums[-1]) if nums else -1


def default_gradient_param(model: nn.Module) -> str:
    """Dotted name of the final block's attention output projection weight (the paper's default).

    Candidates are parameters matching :data:`ATTENTION_OUTPUT_PATTERNS`; the one with the largest
    block index (the last integer segment of its name) wins. Raises ``ValueError`` listing the
    candidates when none matches or when several share the deepest block (e.g. self- and
    cross-attention), so the caller can pass ``params=`` explicitly. A projection whose ``weight`` is
    computed (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``, ``orthogonal``,
    ``spectral_norm``; the hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``) is a candidate
    too: when it is the deepest, the ``ValueError`` names it and the parameters it is computed from,
    rather than silently taking an earlier block's plain projection.
    """
    computed = _computed_weights(model)
    names = [n for n, _ in model.named_parameters()] + list(computed)
    aliases = _aliases(model, names)  # a PEFT model's wrapped W_O is <module>.base_layer.weight
    found = [n for n in names if any(glob_to_regex(p).fullmatch(a) for p in ATTENTION_OUTPUT_PATTERNS for a in aliases[n])]
    if not found:
        mats = [n for n, p in model.named_parameters() if p.ndim == 2][:12]
        quantized = [n for n, m in model.named_modules() if _is_quantized(m)][:5]
        raise ValueError(
            f"{type(model).__name__}: no attention output projection found by the default heuristic "
            f"(patterns {list(ATTENTION_OUTPUT_PATTERNS)}); pass params=... explicitly. Weight matrices: {mats}"
            + (f". Quantized modules {quantized} have packed integer weights with no gradient: probe the "
               "floating-point model before quantizing it (SpectralLens(..., params=()) measures the quantized "
               "model's activations only)" if quantized else "")
        )
    deepest = max(_block_index(n) for n in found)
    best = [n for n in found if _block_index(n) == deepest]
    if len(best) > 1:
        raise ValueError(
            f"{type(model).__name__}: the default attention-output heuristic is ambiguous, candidates in the "
            f"deepest block: {best}; pass params=... explicitly"
        )
    if best[0] in computed:
        raise ValueError(
            f"{type(model).__name__}: the default matrix, the final block's attention output projection "
            f"{best[0]!r}, is computed from other parameters (a parametrization or weight hook such as weight_norm, "
            f"spectral_norm or torch.nn.utils.prune), not a parameter itself; pass params= explicitly: the parameters it is computed "
            f"from, {computed[best[0]] or '(none found on its module)'} (their per-sample gradients are taken through the computation), or "
            "another matrix"
        )
    return best[0]


def _computed_weights(model: nn.Module) -> dict[str, list[str]]:
    """``{"<module>.weight": [parameter names it is computed from]}`` for every module whose ``weight``
    is computed rather than a parameter: registered with ``torch.nn.utils.parametrize`` (read without
    evaluating the parametrization), or a plain tensor attribute recomputed by a forward pre-hook (the
    hook-based ``torch.nn.utils.weight_norm`` and ``spectral_norm``: ``weight_g``/``weight_v``,
    ``weight_orig``)."""
    out = {}
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        if parametrize.is_parametrized(mod, "weight"):
            out[prefix + "weight"] = [prefix + f"parametrizations.weight.{n}"
                                      for n, _ in mod.parametrizations["weight"].named_parameters()]
        elif isinstance(mod.__dict__.get("weight"), torch.Tensor) and "weight" not in mod._parameters:
            out[prefix + "weight"] = [prefix + n for n in mod._parameters if n.startswith("weight")]
    return out


def _aliases(model: nn.Module, names) -> dict[str, list[str]]:
    """Every name a user may type for each of ``names`` (parameter names): its own, its eager name (without
    the ``_orig_mod`` segments of per-block ``torch.compile``), and in a PEFT model the names without the
    ``PeftModel``'s ``base_model.model.`` prefix and/or the ``base_layer`` segment of a wrapped layer (the
    names of the model before ``get_peft_model``, and of ``merge_and_unload()``'s), with a ``modules_to_save``
    module's name for its active trained copy (``lm_head.weight`` for ``lm_head.modules_to_save.default.weight``)."""
    peft, prefix = has_peft_layers(model), base_prefix(model)
    copies = saved_copies(model) if peft else {}
    out = {}
    for n in names:
        plain = uncompiled_name(n)
        forms = [n, plain]
        if peft:
            for copy, wrapper in copies.items():
                plain = wrapper + plain[len(copy):] if plain.startswith(copy) else plain
            forms += [plain, short_name(plain, prefix, base_layer=False), short_name(plain, "", base_layer=True),
                      short_name(plain, prefix, base_layer=True)]
        out[n] = list(dict.fromkeys(forms))
    return out


def _resolve_params(model: nn.Module, params) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    # the names a user may type (eager names without the _orig_mod segments of per-block torch.compile, as
    # the records name the parameters; a PEFT model's names as the model before wrapping had them) -> the
    # parameters' own names
    aliases = _aliases(model, named)
    eager: dict[str, str] = {}
    for n in named:
        for a in aliases[n]:
            eager.setdefault(a, n)
    wanted = param_names(params)
    wanted = [default_gradient_param(model)] if wanted is None else wanted
    if not wanted:
        raise ValueError("params is empty: name at least one parameter")
    out: dict[str, nn.Parameter] = {}
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"params must be dotted parameter names (str), got {type(w).__name__}")
        typed = w  # for messages: the name as typed
        if w not in named and w not in eager and w not in modules and eager_target(w) is not None:
            w = eager_target(w)  # typed with wrapper segments ("_orig_mod.h.1.w.weight", a compiled model's name)
        weight = f"{w}.weight" if w else "weight"
        if w in named or w in eager:
            hits = [w]
        elif set("*?[") & set(w):
            rx = glob_to_regex(w)
            hits = [n for n, _ in model.named_parameters() if any(rx.fullmatch(a) for a in aliases[n])]
        elif (w in modules and isinstance(getattr(modules[w], "weight", None), nn.Parameter)) or weight in eager:
            hits = [weight]  # a module name (its own or eager): its weight
        else:
            hits = []
        hits = [n if n in named else eager[n] for n in hits]
        if not hits:
            _refuse_parametrized(model, w, modules, named)
            _refuse_expert_slice(model, w, named)
            flat = [n for n, p in named.items() if getattr(p, "_is_flat_param", False)][:3]
            if flat:
                raise ValueError(
                    f"{type(model).__name__} has no parameter {typed!r}: FullyShardedDataParallel(use_orig_params=False) "
                    f"flattened the parameters into {flat}, which the probe cannot name a matrix of (and it does not "
                    "measure under FSDP1 at all); shard with FSDP2's fully_shard, or probe an unsharded copy gathered "
                    "with get_model_state_dict(full_state_dict=True), or measure activations only (params=())"
                )
            close = difflib.get_close_matches(w, list(named), n=5, cutoff=0.4)
            raise ValueError(
                f"{type(model).__name__} has no parameter {typed!r}"
                + (f" (nor {w!r}, its name without wrapper segments)" if w != typed else "")
                + f"; closest names: {close or list(named)[:8]}"
            )
        for n in hits:
            out[n] = named[n]
    for n, p in out.items():
        _refuse_quantized_param(model, n, p)
    return out


def _refuse_expert_slice(model: nn.Module, w: str, named: dict) -> None:
    """``ValueError`` for ``"<name>[e]"``, one expert of a fused ``(E, out, in)`` expert weight (as
    ``weight_spectra`` names it): the probe measures whole parameters, so say what to pass instead."""
    hit = re.fullmatch(r"(.+)\[(\d+)\]", w)
    base = named.get(hit.group(1)) if hit else None
    if base is None or base.ndim < 3:
        return
    raise ValueError(
        f"{type(model).__name__}: {w!r} is one slice along dim 0 of parameter {hit.group(1)!r} of shape "
        f"{tuple(base.shape)} (for a mixture-of-experts layer's fused weights, one expert); the probe measures whole "
        f"parameters: pass params={hit.group(1)!r} (one row per sequence of all experts' gradients together) with "
        f"keep_matrix=True and read slice {hit.group(2)}'s rows as probe.matrix(name).view(M, {base.shape[0]}, -1)"
        f"[:, {hit.group(2)}], or probe the router weight or an attention matrix"
    )


def _refuse_quantized_param(model: nn.Module, name: str, p: torch.Tensor) -> None:
    """``ValueError`` for a probed parameter holding quantized or packed integers (bitsandbytes
    ``Params4bit``/``Int8Params`` of ``Linear4bit``/``Linear8bitLt``, any integer or float4 tensor):
    autograd has no gradient for it, and its entries are not the weight's values."""
    if p.is_floating_point() and "float4" not in str(p.dtype) and not p.is_quantized:
        return
    if p.is_complex():  # its rows were cast to real storage, the imaginary parts dropped (torch's warning only)
        raise ValueError(
            f"{type(model).__name__}: parameter {name!r} is complex ({p.dtype}, shape {tuple(p.shape)}); the probe "
            "measures real per-sample gradients (its rows would keep the real parts only). Store it as a real "
            "parameter of its real and imaginary parts (torch.view_as_complex(param) in the forward) and probe that, "
            "or measure activations only (SpectralLens(..., params=()))"
        )
    raise ValueError(
        f"{type(model).__name__}: parameter {name!r} is a {type(p).__name__} of dtype {p.dtype} and shape "
        f"{tuple(p.shape)}: a quantized weight (e.g. bitsandbytes Linear4bit/Linear8bitLt) has no per-sample "
        "gradient to measure. Probe the floating-point model before quantizing it, or the float parameters "
        "of a LoRA adapter on top of it (PEFT: its lora_A/lora_B weights, see docs/guide-attach.md, PEFT / LoRA); "
        "activation capture works on the quantized model (SpectralLens(..., params=()) measures activations only)"
    )


def _is_quantized(mod: nn.Module) -> bool:
    """A ``torch.ao`` quantized module (``quantize_dynamic``, ``convert``): its weight is packed integers."""
    return type(mod).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                            "torch.ao.nn.intrinsic.quantized"))


def _refuse_parametrized(model: nn.Module, w: str, modules: dict, named: dict) -> None:
    """``ValueError`` when ``w`` names a tensor computed by ``torch.nn.utils.parametrize`` (``lin.weight``
    after ``register_parametrization(lin, "weight", ...)`` or ``parametrizations.weight_norm``), or a
    module whose ``weight`` is one: it is not a parameter, so say which parameters it is computed from."""
    path, _, local = w.rpartition(".")
    if w in modules:
        path, local = w, "weight"
    mod = modules.get(path)
    if mod is None:
        return
    here = f"{type(model).__name__}: {path + '.' if path else ''}{local}"
    if _is_quantized(mod):
        raise ValueError(
            f"{here} belongs to a quantized module ({type(mod).__module__}.{type(mod).__name__}, e.g. from "
            "torch.ao.quantization.quantize_dynamic), whose weight is a packed integer tensor with no gradient; "
            "probe the floating-point model before quantizing it (activation capture works on the quantized model: "
            "SpectralLens(..., params=()) measures activations only)"
        )
    computed = mod.__dict__.get(local)
    hooks = sorted({type(h).__name__ for h in mod._forward_pre_hooks.values()})
    if isinstance(computed, torch.Tensor) and local not in mod._parameters and not hooks:
        raise ValueError(f"{here} is a plain tensor attribute of {type(mod).__name__}, not a parameter (nn.Parameter); "
                         "only parameters have gradients to probe")
    if isinstance(computed, torch.Tensor) and local not in mod._parameters:
        sources = [f"{path + '.' if path else ''}{n}" for n in mod._parameters if n.startswith(local)]
        raise ValueError(
            f"{here} is not a parameter: it is recomputed before every forward by a forward pre-hook "
            f"({', '.join(hooks)}: torch.nn.utils.prune, the hook-based weight_norm or spectral_norm) "
            f"from {sources or 'other tensors'}; probe {'those' if sources else 'a parameter'}: their per-sample "
            "gradients are taken through the computation"
        )
    if not parametrize.is_parametrized(mod, local):
        return
    prefix = f"{path}.parametrizations.{local}." if path else f"parametrizations.{local}."
    sources = [n for n in named if n.startswith(prefix)]
    raise ValueError(
        f"{here} is computed by a parametrization "
        f"(torch.nn.utils.parametrize: {type(mod).__name__}), not a parameter; probe the parameters it is computed "
        f"from, e.g. {sources}: their per-sample gradients are taken through the parametrization"
    )
