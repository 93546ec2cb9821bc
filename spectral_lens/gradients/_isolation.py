"""Buffer isolation for measurements: every module buffer is bit-identical afterwards.

Forward passes in train mode update buffers in place (BatchNorm's ``running_mean``, ``running_var``
and ``num_batches_tracked``), and custom modules may replace a buffer attribute. :func:`preserved_buffers`
snapshots each buffer (reference and value) on entry and restores both on exit, also on exceptions.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["preserved_buffers"]


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (same tensor object, same bits) when the block exits.

    A buffer whose value changed is copied back in place (tensors aliasing it see the old values
    again); a buffer attribute that was replaced or removed is set back to the original tensor.
    """
    saved = [
        (module, name, buf, None if buf is None else buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, copy in saved:
                if module._buffers.get(name) is not buf:
                    module._buffers[name] = buf
                if buf is None or torch.equal(buf, copy):
                    continue
                if buf.shape == copy.shape and buf.dtype == copy.dtype:
                    buf.copy_(copy)
                else:  # resized or retyped in place
                    buf.data = copy
