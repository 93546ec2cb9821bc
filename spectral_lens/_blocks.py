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


def _names_modules(target: Any) -> bool:
    """Whether a layer target is or lists module objects (resolved to their names when binding)."""
    if isinstance(target, nn.Module):
        return True
    return isinstance(target, (list, tuple, set, frozenset)) and any(isinstance(t, nn.Module) for t in target)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]


def all_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the model's layer stack: the ``ModuleList``/``Sequential`` of same-class,
    parameterized blocks, preferring homogeneous stacks, then stacks that no other homogeneous stack
    contains (the experts of a mixture-of-experts layer, or per-head modules, are lists inside a
    block, never the stack), then ``ModuleList``, then length, then shallowness (``transformer.h``,
    ``model.layers``, ``blocks``). Pass ``layers=`` when this guesses wrong."""
    def homogeneous(blocks) -> bool:
        return len({type(b) for b in blocks}) == 1 and any(True for _ in blocks[0].parameters())

    lists = _block_lists(model)
    if not lists:
        raise ValueError(
            f"{type(model).__name__}: found no ModuleList/Sequential of blocks; pass layers= explicitly"
        )
    stacks = [n for n, m in lists if homogeneous(m)]

    def score(item):
        name, blocks = item
        inside = any(s == "" or name.startswith(s + ".") for s in stacks if s != name)
        return (homogeneous(blocks), not inside, isinstance(blocks, nn.ModuleList), len(blocks), -name.count("."))

    name, blocks = max(lists, key=score)
    return [f"{name}.{i}" if name else str(i) for i in range(len(blocks))]


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
