"""How ``SpectralLens`` finds and reads a model's layer stack when it chooses the layers itself:
the stack (:func:`all_blocks`), its last block (:func:`deepest_block`, the default probe), the hidden
states of a block's output (:func:`block_hidden_states`), and whether a ``layers=`` target names module
objects (resolved to their names when the lens binds). Import the public ones from
:mod:`spectral_lens.lens`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .capture import unwrap_compiled


def _names_modules(target: Any) -> bool:
    """Whether a layer target is or lists module objects (resolved to their names when binding)."""
    if isinstance(target, nn.Module):
        return True
    return isinstance(target, (list, tuple, set, frozenset)) and any(isinstance(t, nn.Module) for t in target)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """Every non-empty ``ModuleList``/``Sequential``/``ModuleDict``: (name, container, its keys in order)."""
    return [(n, m, list(m.keys()) if isinstance(m, nn.ModuleDict) else [str(i) for i in range(len(m))])
            for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) and len(m)]


def _hf_depth(model: nn.Module) -> tuple[int | None, list[str] | None]:
    """``model.config.num_hidden_layers`` where ``config`` is a ``transformers`` config (told by its class name,
    without importing ``transformers``), with ``None`` for where the stack may lie (anywhere); a multimodal
    model's root config has none: its text config's, with the names of the modules built from it (the language
    model, whose stack this counts, not a vision or audio tower as deep). ``(None, None)`` for any other config."""
    config = getattr(model, "config", None)
    if not any(c.__name__ in ("PretrainedConfig", "PreTrainedConfig") for c in type(config).__mro__):
        return None, None
    depth, owners = getattr(config, "num_hidden_layers", None), None
    if depth is None:
        if getattr(config, "is_encoder_decoder", False):  # two stacks, as before (EncoderDecoderModel, T5Gemma)
            return None, None
        try:
            text = config.get_text_config()
        except (AttributeError, TypeError, ValueError):  # transformers < 4.44, or several text configs
            return None, None
        if text is config:
            return None, None
        depth = getattr(text, "num_hidden_layers", None)
        owners = [n for n, m in model.named_modules() if getattr(m, "config", None) is text] or None
    return (depth, owners) if isinstance(depth, int) and not isinstance(depth, bool) else (None, None)


def _unwrapped(block: nn.Module) -> nn.Module:
    """The module a wrapper around one block runs: ``torch.compile``'s (per-block compilation), FSDP1's
    ``FullyShardedDataParallel`` and ``torch.distributed``'s checkpoint wrapper (per-block auto-wrapping); any
    other block as it is. A stack whose blocks are wrapped one by one, or only some of them, is still one stack
    of one class (before: a stack with one compiled block was not homogeneous, and the lens's default chose a
    list of per-layer embeddings beside it)."""
    while True:
        inner = unwrap_compiled(block)
        if inner is block and type(block).__module__.startswith("torch.distributed"):
            inner = next((m for a in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
                          if isinstance(m := block._modules.get(a), nn.Module)), block)
        if inner is block:
            return block
        block = inner


def _without_leaves_around(keys: list[str], blocks: list[nn.Module]) -> tuple[list[str], list[nn.Module]]:
    """A container's blocks without the leaf modules before and after them, when two or more blocks (modules
    with submodules) of one class lie between those leaves: ``nn.Sequential(*blocks, nn.LayerNorm(d))``, or a
    whole model as ``nn.Sequential(embedding, *blocks, norm, head)``, is a stack of its blocks, the norm not
    one of them (before: two classes, not a stack, and a list of attention heads inside a block was chosen).
    Any other container (leaf layers only, blocks of two classes, a leaf between blocks) keeps every element."""
    inner = [i for i, b in enumerate(blocks) if any(True for _ in b.children())]
    if len(inner) < 2 or inner[-1] - inner[0] + 1 != len(inner) or len(inner) == len(blocks):
        return keys, blocks
    if len({type(blocks[i]) for i in inner}) != 1:
        return keys, blocks
    return keys[inner[0]:inner[-1] + 1], blocks[inner[0]:inner[-1] + 1]


def all_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's layer stack, one of its ``ModuleList``/``Sequential``/``ModuleDict``
    containers (a ``ModuleDict`` in key order: torchtitan's ``layers``), chosen in this order:

    1. a Hugging Face model's ``ModuleList`` of ``config.num_hidden_layers`` blocks with submodules, of one
       class or not (hybrid models: Zamba2's Mamba and hybrid layers, Jamba's; a homogeneous list inside one of
       them, Zamba2's adapters, is not the stack). Only a ``transformers`` config counts (another config's
       ``num_hidden_layers`` may count anything, an MLP's hidden layers), never for a list inside a homogeneous
       stack (a T5 block's sublayers, in a stack grown or truncated without updating the config). An
       encoder-decoder's config counts its encoder's layers; a multimodal model's (Llava, PaliGemma, Qwen2-VL)
       is its text config's, for a stack inside the language model built from it, not a vision tower as long
       (an encoder-decoder built from two configs, ``EncoderDecoderModel``, T5Gemma: scored as without one);
    2. then blocks of one class with parameters (blocks wrapped one by one compared by the module they wrap,
       leaf modules before or after them left out: a final norm inside the ``Sequential``), in a container
       no other such container holds (the experts of a mixture-of-experts layer, per-head modules or a PEFT
       adapter's ``ModuleDict`` are containers inside a block, never the stack);
    3. then blocks that have submodules over a list of leaf modules as long (per-layer embedding tables or
       projections beside the blocks, as value embeddings), then ``ModuleList``, then length, then
       shallowness (``transformer.h``, ``model.layers``, ``blocks``), then registration order.

    Containers without parameters are never the stack (except under FSDP1's flat parameters, where no block holds
    its own); ``ValueError`` naming the model's modules when no container is left. Pass ``layers=`` when this guesses wrong."""
    def homogeneous(blocks: list) -> bool:
        return len({type(b) for b in blocks}) == 1 and any(True for _ in blocks[0].parameters())

    lists = [(name, container, *_without_leaves_around(keys, [
        _unwrapped(container[k] if isinstance(container, nn.ModuleDict) else container[int(k)]) for k in keys]))
        for name, container, keys in _block_lists(model)]
    # FSDP1 without use_orig_params: every weight lives in flat parameters and the blocks hold none of their own,
    # so holding parameters tells nothing there (review 27's filter refused such a model: the slow FSDP1 test)
    if not any(getattr(p, "_is_flat_param", False) for p in model.parameters()):
        lists = [item for item in lists if any(True for b in item[3] for _ in b.parameters())]
    if not lists:
        children = ", ".join(f"{n} ({type(m).__name__})" for n, m in list(model.named_children())[:8])
        raise ValueError(
            f"{type(model).__name__}: found no ModuleList/Sequential/ModuleDict of blocks with parameters (the "
            f"layer stack the lens measures by default); its modules: {children or 'none'}; pass layers= "
            "explicitly: the names, globs or module objects of the blocks to measure"
        )
    stacks = [name for name, _, _, blocks in lists if homogeneous(blocks)]
    depth, owners = _hf_depth(model)

    def score(item):
        name, container, _, blocks = item
        inside = any(s == "" or name.startswith(s + ".") for s in stacks if s != name)
        composite = any(True for _ in blocks[0].children())   # blocks, not a list of tables or projections
        configured = (depth is not None and len(blocks) == depth and isinstance(container, nn.ModuleList)
                      and not inside and (owners is None or any(name.startswith(o + ".") for o in owners))
                      and all(any(True for _ in b.children()) and any(True for _ in b.parameters()) for b in blocks))
        return (configured, homogeneous(blocks), not inside, composite, isinstance(container, nn.ModuleList),
                len(blocks), -name.count("."))

    name, _, keys, _ = max(lists, key=score)
    return [f"{name}.{k}" if name else k for k in keys]


def deepest_block(model: nn.Module) -> str:
    """The last block of the layer stack: the paper's default activation probe (App. E.3)."""
    return all_blocks(model)[-1]


def block_hidden_states(output: Any) -> Any:
    """How the lens reads the blocks it chose itself (``layers=None`` or ``"all"``) when ``pick=None``:
    a tensor output as it is, a tuple/list output at its first element when that is a tensor (the
    hidden states, by the Hugging Face convention: Falcon, BLOOM, GPT-Neo and MPT layers still return
    tuples in ``transformers`` 5). Anything else is returned unchanged (and refused by the capture
    with an error asking for ``pick=``)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output
