"""The documentation site builds with ``mkdocs build --strict`` (broken links, bad docstrings fail)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def missing() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(name)
    return out


def incompatible() -> str:
    """Why the installed mkdocstrings cannot render code with the installed pymdown-extensions, or "".
    pymdown-extensions 12 made ``Highlight(md, ...)``'s ``md`` required; mkdocstrings passes it from 1.0.8
    (checked), which needs Python >= 3.11, so on Python 3.10 pip pairs mkdocstrings 1.0.6 with
    pymdown-extensions 12 and every API page fails ("Highlight.__init__() missing 1 required positional
    argument: 'md'"). Outside this project; pymdown-extensions<12 builds (docs/index.md)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pymdown, mkdocstrings = version("pymdown-extensions"), version("mkdocstrings")
    except PackageNotFoundError:
        return ""
    major, release = (tuple(int(x) for x in re.findall(r"\d+", v)[:3]) for v in (pymdown, mkdocstrings))
    if major >= (12,) and release < (1, 0, 8):
        return (f"mkdocstrings {mkdocstrings} cannot use pymdown-extensions {pymdown} (Highlight needs md from "
                "pymdown-extensions 12; mkdocstrings passes it from 1.0.8, Python >= 3.11): "
                "pip install 'pymdown-extensions<12'")
    return ""


@pytest.mark.skipif(bool(missing()), reason=f"the docs extra is not installed (missing: {missing()}); "
                                            "pip install -e '.[docs]'")
@pytest.mark.skipif(bool(incompatible()), reason=incompatible())
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )
    problems = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or proc.stderr.splitlines()[-30:])
    # the API reference really was generated from the docstrings
    page = (tmp_path / "site" / "reference" / "lens" / "index.html").read_text(encoding="utf-8")
    assert "Measure activation and per-sample gradient spectra" in page
    # every name importable from spectral_lens.lens is rendered, wherever it is defined (Schedule in
    # schedule.py, the pool checks and layer-stack defaults in the private _pools.py and _blocks.py)
    for name in ("SpectralLens", "LensMeasurement", "Schedule", "attention_mask", "unfixed_pool", "sharded_pool",
                 "all_blocks", "deepest_block", "block_hidden_states"):
        assert re.search(rf'id="spectral_lens\.[\w.]+\.{name}"', page), f"docs/reference/lens.md does not render {name}"
    # the same for the gradients page: the names its probe.py section rendered before the probe's
    # model and parameter checks moved to the private _measurable.py (and finite_rows to _validate.py)
    page = (tmp_path / "site" / "reference" / "gradients" / "index.html").read_text(encoding="utf-8")
    for name in ("PerSampleGradientProbe", "ATTENTION_OUTPUT_PATTERNS", "default_gradient_param", "finite_rows",
                 "refuse_parallel_wrapper", "is_encoder_decoder", "refuse_unfit_defaults"):
        assert re.search(rf'id="spectral_lens\.[\w.]+\.{name}"', page), f"docs/reference/gradients.md does not render {name}"
    for md in sorted((ROOT / "docs").rglob("*.md")):
        rel = md.relative_to(ROOT / "docs").with_suffix("")
        built = tmp_path / "site" / ("index.html" if rel.name == "index" and rel.parent == Path(".") else rel / "index.html")
        if rel.name == "index" and rel.parent != Path("."):
            built = tmp_path / "site" / rel.parent / "index.html"
        assert built.is_file(), f"docs/{md.relative_to(ROOT / 'docs')} was not built"
