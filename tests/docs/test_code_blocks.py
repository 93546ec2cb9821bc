"""Every ```python block of README.md and docs/**/*.md runs, so the docs cannot rot.

Per page, the blocks run in order in one namespace, in a fresh temporary working directory. Names
the prose leaves to the reader (``model``, ``heldout_pool``, ``total_steps``, ...) come from
``tests/docs/fixtures.py``, injected only when a block reads a name the page has not defined. A
block directly preceded by the line ``<!-- docs-test: skip -->`` (blank lines and other HTML comment
lines may sit between them) is not run. A block that needs an optional package not installed here skips,
with the page's later blocks. A failure names the page and the block's first line.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_fixtures():
    # by path: a plain ``import docs.fixtures`` could also find the repository's docs/ folder
    spec = importlib.util.spec_from_file_location("spectral_lens_docs_fixtures", Path(__file__).with_name("fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _load_fixtures().FIXTURES
SKIP = "<!-- docs-test: skip -->"
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def blocks(path: Path) -> list[Block]:
    """The fenced python blocks of one Markdown file, with their skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(ROOT))
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang == "python":
            k, skipped = i - 1, False
            while k >= 0 and (not lines[k].strip() or (lines[k].strip().startswith("<!--") and lines[k].strip().endswith("-->"))):
                skipped = skipped or lines[k].strip() == SKIP
                k -= 1
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : j]]
            out.append(Block(rel, i + 1, "\n".join(body) + "\n", skipped))
        i = j + 1
    return out


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def read_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def inject(ns: dict, names: set[str]) -> None:
    for name in sorted(names):
        if name not in ns and name in FIXTURES and name not in dir(__builtins__):
            ns[name] = FIXTURES[name](ns)


PAGES = [p for p in pages() if any(not b.skipped for b in blocks(p))]
# a block that fails to import one of these fails: they are the library, the examples and the core dependencies
NOT_OPTIONAL = {"spectral_lens", "examples", "torch", "numpy", "scipy", "opt_einsum", "tqdm"}


def not_installed(exc: BaseException) -> str | None:
    """The optional package whose absence raised ``exc`` (directly, or as the cause of an error that names an
    extra), when it is not installed here; else None. Such a block skips, as a fixture that needs an extra does:
    the test suite also runs from the sdist with only the core and ``test`` dependencies."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top not in NOT_OPTIONAL and importlib.util.find_spec(top) is None:
                return top
        exc = exc.__cause__ or exc.__context__
    return None


def test_the_parser_sees_fences_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("x\n```python\na = 1\n```\n\n<!-- docs-test: skip -->\n<!-- needs h-stack -->\n```python\nb\n```\n"
                    "```bash\nls\n```\n  ```python\n  c = 2\n  ```\n", encoding="utf-8")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        got = blocks(page)
    finally:
        ROOT = old
    assert [(b.line, b.code, b.skipped) for b in got] == [(2, "a = 1\n", False), (8, "b\n", True), (14, "c = 2\n", False)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_blocks_run(page, tmp_path, monkeypatch):
    from spectral_lens.gradients import FAST_PATHS

    monkeypatch.chdir(tmp_path)
    registered = dict(FAST_PATHS)  # blocks may register fast paths: restored below
    ns: dict = {"__name__": "__docs__"}
    try:
        for block in blocks(page):
            if block.skipped:
                continue
            where = f"{block.page}, block at line {block.line}"
            try:
                tree = ast.parse(block.code, filename=where)
            except SyntaxError as exc:
                pytest.fail(f"{where}: syntax error: {exc}", pytrace=False)
            try:
                inject(ns, read_names(tree))
            except pytest.skip.Exception as exc:
                pytest.skip(f"{where}: {exc.msg}; this block and the page's later blocks were not run")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    exec(compile(tree, where, "exec"), ns)
            except pytest.skip.Exception:
                raise
            except ImportError as exc:
                missing = not_installed(exc)
                if missing is None:
                    pytest.fail(f"{where} failed:\n{traceback.format_exc(limit=-4)}", pytrace=False)
                pytest.skip(f"{where}: needs {missing}, not installed here; this block and the page's later blocks "
                            "were not run")
            except BaseException:  # noqa: BLE001 - reported with the page and line
                pytest.fail(f"{where} failed:\n{traceback.format_exc(limit=-4)}", pytrace=False)
    finally:
        FAST_PATHS.clear()
        FAST_PATHS.update(registered)
        os.chdir(ROOT)
