"""Progress bars: on by default in a terminal, off in CI and when output is not a TTY.

``progress=None`` (the default of every ``progress`` argument) means *auto*: a ``tqdm`` bar when
standard error is a terminal and the ``CI`` environment variable is unset; ``True`` forces a bar,
``False`` none. Without ``tqdm`` installed there is simply no bar.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

__all__ = ["progress_enabled", "progress_bar", "sized_total"]


def progress_enabled(progress: bool | None) -> bool:
    """Resolve ``progress`` (``None`` = auto: stderr is a TTY and ``$CI`` is unset). A standard error that is
    missing (``None``), closed or cannot answer is not a terminal: no bar (its ``isatty`` raised ``ValueError``
    through every measurement)."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI"):
        return False
    stream = sys.stderr
    try:
        return bool(getattr(stream, "isatty", None) and stream.isatty())
    except (ValueError, OSError):  # a closed stream (ValueError), or one whose descriptor is gone
        return False


def progress_bar(total: int | None, desc: str, progress: bool | None, unit: str = "it") -> Any | None:
    """A ``tqdm`` bar with ``total`` (``None`` = unknown), or ``None`` when disabled or unavailable.

    Callers advance it with ``bar.update(k)`` and must ``bar.close()`` it.
    """
    if not progress_enabled(progress):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=False)


def sized_total(items: Iterable[Any]) -> int | None:
    """``len(items)`` when it has one, else ``None``."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
