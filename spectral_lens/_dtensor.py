"""Where ``DTensor`` lives in the installed torch, found without importing it (an import takes seconds).

The public ``torch.distributed.tensor`` holds ``DTensor`` and its placements from torch 2.5; torch 2.4 has
them in ``torch.distributed._tensor``, and its ``torch.distributed.tensor`` is a package without them (its
``parallel`` only). Where neither module is imported, nothing can be a ``DTensor``."""

from __future__ import annotations

import sys
from types import ModuleType

__all__ = ["dtensor_module"]


def dtensor_module() -> ModuleType | None:
    """The imported module that defines ``DTensor`` and ``Replicate``; ``None`` where none is imported."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        module = sys.modules.get(name)
        if getattr(module, "DTensor", None) is not None:
            return module
    return None
