"""Import an optional framework or raise an ``ImportError`` that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` naming ``feature``, the missing
    ``package`` (default: the first part of ``module``) and ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs the optional package {package or module.split('.')[0]!r} ({exc}): "
            f"pip install 'spectral-lens[{extra}]'"
        ) from exc
