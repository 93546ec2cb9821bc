"""The package as a user or a downstream packager gets it (review 25): the sdist carries the test suite,
the ``kernels`` extra installs Triton on every platform PyPI has Triton wheels for, and the documented code
runs from the wheel alone, outside the checkout and without any optional package.

tests/core/test_packaging.py checks the metadata, the wheel's file list (slow) and the imports of a fresh
interpreter; this file adds what a walk through the new-user path found."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import spectral_lens
from support.pyproject import PYPROJECT, needs_pyproject

ROOT = Path(__file__).resolve().parents[2]

# what the tests read or import besides the package: the sdist must carry them (MANIFEST.in)
SUITE = ("tests", "docs", "examples", "benchmarks", "tools")
# left behind by builds, test runs and tools in a checkout; none is source
_JUNK = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "runs",
                               "reports", "site", ".hypothesis", ".pytest_cache", ".ruff_cache", ".whl", ".gl",
                               "gpu_session_out")


def _copy_checkout(dest: Path) -> Path:
    """A copy of the checkout's sources: setuptools writes build/ and an .egg-info into the tree it builds."""
    return Path(shutil.copytree(ROOT, dest, ignore=_JUNK))


# ------------------------------------------------------------------------------------------- the sdist
def test_sdist_carries_the_test_suite(tmp_path):
    """The sdist held the package, README, LICENSE and pyproject.toml only: a downstream packager (conda-forge,
    a distribution) who builds from it could not run a single test (tests/ missing, and with it docs/,
    examples/ and benchmarks/, which the tests read or import). Built with setuptools' build_meta (~2 s)."""
    src = _copy_checkout(tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
                          capture_output=True, text=True, cwd=src, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = out / proc.stdout.strip().splitlines()[-1]
    top = f"spectral_lens-{spectral_lens.__version__}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tf:
        names = {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile() and "/" in m.name}
    source = {str(p.relative_to(src)) for d in ("spectral_lens", *SUITE) for p in (src / d).rglob("*") if p.is_file()}
    wanted = source | {"pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "mkdocs.yml"}
    assert not wanted - names, sorted(wanted - names)[:20]
    assert "tests/conftest.py" in names and "tests/docs/fixtures.py" in names
    extra = {n for n in names - wanted if not n.startswith("spectral_lens.egg-info/")} - {"PKG-INFO", "setup.cfg"}
    assert not extra, sorted(extra)[:20]  # nothing else: no build output, runs or caches


# ----------------------------------------------------------------------------------------- the extras
@needs_pyproject
def test_kernels_extra_installs_triton_on_linux_x86_64_and_aarch64():
    """The ``kernels`` extra's marker was ``platform_machine == 'x86_64'``: on Linux aarch64 (GH200, DGX
    Spark), where PyPI has Triton wheels (triton 3.9.0: manylinux_2_28_aarch64), ``pip install
    'spectral-lens[kernels]'`` installed nothing. Triton ships no macOS or Windows wheels on PyPI."""
    from packaging.requirements import Requirement

    (req,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["kernels"]]
    assert req.name == "triton" and req.marker is not None

    def installs(system: str, machine: str) -> bool:
        return req.marker.evaluate({"platform_system": system, "platform_machine": machine, "extra": "kernels"})

    assert installs("Linux", "x86_64") and installs("Linux", "aarch64")
    assert not installs("Darwin", "arm64") and not installs("Windows", "AMD64") and not installs("Linux", "ppc64le")


# ----------------------------------------------------------------------------- the docs, from the wheel
OPTIONAL = ("matplotlib", "transformers", "accelerate", "lightning", "pytorch_lightning", "tensorboard", "wandb",
            "optuna", "pandas", "triton", "peft", "opacus")
PAGES = ("README.md", "docs/guide-attach.md", "docs/lens.md", "docs/gradients.md", "docs/guide-gradients.md",
         "docs/records.md", "docs/analysis.md")

# run in a fresh interpreter from a directory outside the checkout, with the unpacked wheel first on the path and
# the checkout's tests/ (the docs fixtures' helpers) after it; every optional package missing
_RUN_PAGES = r"""
import ast, importlib.util, json, os, sys, tempfile, traceback, warnings
for name in OPTIONAL:
    sys.modules[name] = None  # `import name` raises ImportError, as after a plain `pip install spectral-lens`
# an editable install of a checkout (``pip install -e .``) answers for any spectral_lens module the wheel lacks
# (its finder sits on sys.meta_path after the path finder): the wheel alone must answer
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if p == SITE or not os.path.isdir(os.path.join(p or ".", "spectral_lens"))]
import spectral_lens
assert spectral_lens.__file__.startswith(SITE), spectral_lens.__file__

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

code_blocks = load("review25_code_blocks", os.path.join(ROOT, "tests", "docs", "test_code_blocks.py"))
import pytest
from pathlib import Path
out = {}
for page in PAGES:
    ns, ran, note = {"__name__": "__docs__"}, 0, None
    os.chdir(tempfile.mkdtemp(dir=WORK))
    for block in code_blocks.blocks(Path(ROOT) / page):
        if block.skipped:
            continue
        tree = ast.parse(block.code)
        try:
            code_blocks.inject(ns, code_blocks.read_names(tree))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(tree, f"{page}:{block.line}", "exec"), ns)
        except pytest.skip.Exception as exc:  # a block that needs an optional package: this page's rest too
            note = f"line {block.line}: {exc.msg}"
            break
        except BaseException:
            note = f"FAILED at line {block.line}:\n" + traceback.format_exc(limit=-4)
            break
        ran += 1
    out[page] = [ran, note]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_docs_blocks_run_from_the_wheel_alone(tmp_path):
    """The python blocks of README.md and the API pages, run against the built wheel (unpacked, no checkout
    on the path) with every optional package missing, from a directory outside the checkout: each documented
    import path exists in the wheel and needs no file the wheel leaves out. Blocks that need an extra skip
    through the docs fixtures, as in tests/docs/test_code_blocks.py (which runs them against the checkout)."""
    src = _copy_checkout(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("spectral_lens-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    head = "".join(f"{k} = {v!r}\n" for k, v in dict(OPTIONAL=OPTIONAL, PAGES=PAGES, SITE=str(site), ROOT=str(ROOT),
                                                       WORK=str(work)).items())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "tests")]))
    run = subprocess.run([sys.executable, "-c", head + _RUN_PAGES], capture_output=True, text=True, env=env,
                         cwd=work, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.splitlines()[-1])
    failed = {page: note for page, (ran, note) in result.items() if note and "FAILED" in note}
    assert not failed, "\n".join(f"{page}: {note}" for page, note in failed.items())
    assert all(ran >= 1 for ran, _ in result.values()), result
    assert sum(ran for ran, _ in result.values()) >= 20, result  # 20 need no extra (2026-11-28)


# ------------------------------------------------------------------- the docs test without the extras
def test_docs_blocks_skip_where_an_extra_is_missing(tmp_path, monkeypatch):
    """With the test suite in the sdist, a packager runs it with the core and ``test`` dependencies only: the
    blocks of docs/guide-checkpoints.md (``import transformers``) and docs/tuning.md (``examples.tune``'s
    one-line error naming the ``tune`` extra) failed there instead of skipping as the fixtures' blocks do."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("review25_code_blocks", ROOT / "tests" / "docs" / "test_code_blocks.py")
    code_blocks = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, code_blocks)
    spec.loader.exec_module(code_blocks)
    for name in ("transformers", "optuna"):
        monkeypatch.setitem(sys.modules, name, None)  # not installed: `import name` raises ModuleNotFoundError
    for name in [m for m in sys.modules if m == "examples.tune" or m.startswith("examples.tune.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, so its import of optuna runs again
    for page, missing in (("docs/guide-checkpoints.md", "transformers"), ("docs/tuning.md", "optuna")):
        with pytest.raises(pytest.skip.Exception, match=rf"{page}, block at line \d+: needs {missing}, not installed"):
            code_blocks.test_page_blocks_run(ROOT / page, tmp_path, monkeypatch)
    # a module that is installed but fails to import is a failure, not a skip
    page = tmp_path / "page.md"
    page.write_text("```python\nraise ModuleNotFoundError('No module named numpy', name='numpy')\n```\n", encoding="utf-8")
    monkeypatch.setattr(code_blocks, "ROOT", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="page.md, block at line 1 failed"):
        code_blocks.test_page_blocks_run(page, tmp_path, monkeypatch)


def test_tuner_tests_skip_without_optuna(monkeypatch):
    """Without the ``tune`` extra, five files of tests/tune raised examples.tune's ImportError at collection,
    and the collection errors interrupted the whole run (``pytest`` from the sdist with core + test dependencies).
    Each test file of tests/tune now imports or skips, in-process with Optuna missing."""
    import importlib.util

    def tune_modules():
        return {m for m in sys.modules if m == "examples.tune" or m.startswith("examples.tune.")}

    before = {m: sys.modules[m] for m in tune_modules()}
    monkeypatch.setitem(sys.modules, "optuna", None)
    for name in before:
        del sys.modules[name]  # imported afresh below, so their import of optuna runs again
    skipped, failed = [], {}
    try:
        for path in sorted((ROOT / "tests" / "tune").glob("test_*.py")):
            spec = importlib.util.spec_from_file_location(f"review25_tune_{path.stem}", path)
            try:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            except pytest.skip.Exception as exc:
                skipped.append(path.name)
                assert "pip install -e '.[tune]'" in exc.msg
            except ImportError as exc:
                failed[path.name] = str(exc)
    finally:
        for name in tune_modules():
            del sys.modules[name]
        sys.modules.update(before)
    assert not failed, failed
    assert len(skipped) >= 5, skipped
