"""Whether spectral-lens's optional Triton kernels may be used (checked once per process).

They are used on CUDA tensors when Triton imports, unless the environment variable
``SPECTRAL_LENS_NO_TRITON`` is set (then the plain-PyTorch paths run; their results are the same up
to the summation order inside a reduction, and bit for bit where the docs say so).
"""

from __future__ import annotations

import os

import torch

_AVAILABLE: bool | None = None


def triton_available() -> bool:
    """True when Triton imports and ``SPECTRAL_LENS_NO_TRITON`` is unset."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if os.environ.get("SPECTRAL_LENS_NO_TRITON"):
            _AVAILABLE = False
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _AVAILABLE = True
            except Exception:  # not installed, or no usable backend
                _AVAILABLE = False
    return _AVAILABLE


def use_kernels(t: torch.Tensor) -> bool:
    """Kernels for this tensor: on CUDA, Triton available, and not a ``torch.func`` wrapper (under
    ``vmap``/``grad`` transforms the plain-PyTorch path runs, which the transforms can trace)."""
    if not (t.is_cuda and triton_available()):
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (wrapped is not None and wrapped(t))
