"""``pyproject.toml`` as the packaging tests read it: ``PYPROJECT`` (a dict, or None where no TOML reader is
installed) and the ``needs_pyproject`` skip mark. Python >= 3.11 reads it with ``tomllib``; 3.10 with ``tomli``,
which pytest requires there."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
try:
    import tomllib  # Python >= 3.11
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8")) if tomllib else None
needs_pyproject = pytest.mark.skipif(PYPROJECT is None, reason="reading pyproject.toml needs tomllib (Python >= 3.11) or tomli")
