"""The Python versions the package claims are the ones its suite was run on (docs/index.md, "Supported
versions"): ``requires-python``'s floor is the lowest ``Programming Language :: Python :: 3.x``
classifier, the classifiers run without a gap, the docs name each, and no source uses syntax newer
than the floor. CI runs Python 3.11 only, so syntax of a newer Python (``except*`` is 3.11, ``type``
statements and ``def f[T]`` are 3.12) would pass there and break an install on 3.10.

Read without ``tomllib`` (Python >= 3.11), so these checks run on every supported version."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _floor() -> tuple[int, int]:
    """``requires-python = ">=3.X"`` as (3, X)."""
    m = re.search(r'^requires-python\s*=\s*">=\s*3\.(\d+)"\s*$', PYPROJECT, re.MULTILINE)
    assert m, 'pyproject.toml: expected a line requires-python = ">=3.X"'
    return 3, int(m.group(1))


def _classified() -> list[int]:
    """The minor versions of the ``Programming Language :: Python :: 3.X`` classifiers."""
    return sorted(int(v) for v in re.findall(r'"Programming Language :: Python :: 3\.(\d+)"', PYPROJECT))


def test_requires_python_and_the_classifiers_agree():
    minors = _classified()
    assert minors, "pyproject.toml: no 'Programming Language :: Python :: 3.X' classifier"
    assert minors[0] == _floor()[1], f"requires-python floor 3.{_floor()[1]} but lowest classifier 3.{minors[0]}"
    assert minors == list(range(minors[0], minors[-1] + 1)), f"classifiers skip a version: {minors}"


def test_the_install_docs_name_each_classified_version():
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    section = text[text.index("**Supported versions.**"):text.index("## Where to start")]
    missing = [f"3.{m}" for m in _classified() if not re.search(rf"\b3\.{m}\b", section)]
    assert not missing, f"docs/index.md 'Supported versions' does not name Python {missing}"


def test_no_source_uses_syntax_newer_than_requires_python():
    floor = _floor()
    bad = []
    for top in ("spectral_lens", "examples", "tests", "tools", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            try:
                ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=floor)
            except SyntaxError as e:
                bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert not bad, f"syntax newer than Python {floor[0]}.{floor[1]} (requires-python):\n" + "\n".join(bad)
