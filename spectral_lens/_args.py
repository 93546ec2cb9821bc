"""Type checks of constructor arguments: a wrong type is refused when the object is built, with a
``TypeError`` naming the class, the argument and what it takes, rather than at the first update or
measurement with an error from deep inside (``'str' object is not callable``)."""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["check_callable", "check_dtype", "check_count", "check_window", "as_integer"]


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def check_callable(owner: str, name: str, value: Any, takes: str) -> None:
    """``value`` is ``None`` or a callable ``takes``."""
    if value is not None and not callable(value):
        raise TypeError(f"{owner}: {name} must be a callable {takes}, or None; got {_got(value)}")


#: floating-point dtypes of one byte (float8 in its variants, packed float4): no ``torch.autocast`` runs in
#: them (CPU autocast disables itself with a warning, so a measurement would silently run in the model's
#: precision), and values held in them keep 1 to 3 significant bits
NARROW_FLOATS = tuple(d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point
                      and d.itemsize == 1)

#: why ``autocast_dtype`` refuses :data:`NARROW_FLOATS`
AUTOCAST_WHY = ("torch.autocast runs in float16 or bfloat16 (a float8 or float4 autocast is disabled by torch, so "
                "the measurement would silently run in the model's own precision); use torch.bfloat16 or None")


def check_dtype(owner: str, name: str, value: Any, *, refuse: tuple = (), why: str = "") -> None:
    """``value`` is ``None`` or a floating-point ``torch.dtype`` (``torch.bfloat16``, not ``"bfloat16"``);
    one of ``refuse`` is a ``ValueError`` saying ``why``."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{owner}: {name} must be a floating-point torch.dtype (e.g. torch.bfloat16) or None; "
                        f"got {_got(value)}")
    if value in refuse:
        raise ValueError(f"{owner}: {name}={value} is not supported: {why}")


def check_count(owner: str, name: str, value: Any, minimum: int, none_ok: bool = False) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (any integral type; ``None`` where ``none_ok``)."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}{' or None' if none_ok else ''}; got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}{' or None' if none_ok else ''}, got {value}")
    return int(value)


def check_window(owner: str, name: str, value: Any) -> tuple[int, int] | None:
    """``value`` as a rank window ``(lo, hi)`` of integers, 1 <= lo < hi (1-based, inclusive), or ``None``."""
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) for r in pair):
        raise TypeError(f"{owner}: {name} must be a pair of integer ranks (lo, hi), or None; got {_got(value)}")
    if not 1 <= pair[0] < pair[1]:
        raise ValueError(f"{owner}: {name}={pair}: need 1 <= lo < hi (ranks are 1-based and inclusive)")
    return int(pair[0]), int(pair[1])


def as_integer(value: Any) -> int:
    """``value`` as an ``int``: an integral type, or a real number (a float, a one-element tensor) whose value is
    a whole number (``1e3``, ``torch.tensor(64)``); anything else (``0.5``, ``True``, ``"3"``, ``nan``) is a
    ``TypeError``, never silently truncated."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"expected an integer, got {_got(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise TypeError(f"expected an integer, got {_got(value)}")
