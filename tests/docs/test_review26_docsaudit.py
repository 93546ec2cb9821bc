"""What the user docs state, tied to the code and the tree (review 26, docs audit).

``tests/docs/test_site.py`` builds the site with ``mkdocs build --strict``, which checks the links
between pages of ``docs/``, but only where the ``docs`` extra is installed, and never README.md nor a
link from a page to a file outside ``docs/`` (``../benchmarks/RESULTS.md``). Here, with the standard
library only:

* every relative link and ``#anchor`` of README.md and ``docs/**/*.md`` resolves (anchors as
  Python-Markdown's ``toc`` extension makes them, which is what mkdocs serves);
* every test the prose cites as evidence (``tests/core/test_x.py``, ``test_x.py::test_name``) exists;
* lines the docs quote from the library's output (the divergence note, the cautions) are what the
  code prints.
"""

from __future__ import annotations

import math
import re
import types
import unicodedata
from pathlib import Path

import pytest

from support.pyproject import PYPROJECT

ROOT = Path(__file__).resolve().parents[2]


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code blocks, inline code spans removed."""
    fence = None
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1).startswith(fence[0]) and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if fence is None:
            yield i, line


def slugify(text: str) -> str:
    """Python-Markdown's ``toc`` slug of a heading's text (``markdown.extensions.toc.slugify``)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The ids a page's headings get (duplicates suffixed ``_1``, ``_2``, as ``toc`` does), its
    ``{#id}`` attributes and its HTML ``id=``/``name=`` attributes."""
    out: set[str] = set()
    for _, line in prose_lines(path):
        out.update(re.findall(r"""\b(?:id|name)=["']([^"']+)["']""", line))
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = m.group(2)
        custom = re.search(r"\{\s*#([\w-]+)[^}]*\}\s*$", text)
        if custom:
            out.add(custom.group(1))
            continue
        slug, k = slugify(text), 1
        unique = slug
        while unique in out:
            unique, k = f"{slug}_{k}", k + 1
        out.add(unique)
    return out


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|\b(?:href|src)=\"([^\"]+)\"")


def broken_links(root: Path = ROOT) -> list[str]:
    """``PAGE:LINE: target: why`` for every relative link or anchor of the docs that does not resolve."""
    out, cache = [], {}
    for page in pages(root):
        for i, line in prose_lines(page):
            for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
                url = m.group(1) or m.group(2)
                if re.match(r"^[a-zA-Z][\w+.-]*:", url):  # http:, https:, mailto:
                    continue
                rel, _, frag = url.partition("#")
                target = (page.parent / rel).resolve() if rel else page
                where = f"{page.relative_to(root)}:{i}: {url}"
                if not target.exists():
                    out.append(f"{where}: no such file")
                elif frag and target.suffix == ".md":
                    if target not in cache:
                        cache[target] = anchors(target)
                    if frag not in cache[target]:
                        out.append(f"{where}: no heading or id '{frag}' in {target.relative_to(root)}")
    return out


def test_relative_links_and_anchors_resolve():
    assert not broken_links(), "broken links in README.md / docs:\n" + "\n".join(broken_links())


def test_the_link_check_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\nSee [a](docs/a.md#the-compute_async-path), [b](docs/a.md#nope), [c](docs/missing.md),\n"
        "[d](#top), [e](https://example.org/x.md#y) and `[f](docs/ignored.md)`.\n\n```\n[g](nowhere.md)\n```\n",
        encoding="utf-8")
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## The `compute_async()` path\n\n## Twice\n\n## Twice\n\n[h](a.md#twice_1) [i](../README.md#top)\n"
        "[j](#twice_2)\n", encoding="utf-8")
    assert broken_links(tmp_path) == [
        "README.md:3: docs/a.md#nope: no heading or id 'nope' in docs/a.md",
        "README.md:3: docs/missing.md: no such file",
        "docs/a.md:10: #twice_2: no heading or id 'twice_2' in docs/a.md",
    ]


def test_slugs_are_those_mkdocs_serves():
    # anchors the pages link to today, as mkdocs built them
    assert slugify("Keeping the eigen-solve off the hot path: `compute_async()`") == \
        "keeping-the-eigen-solve-off-the-hot-path-compute_async"
    assert slugify("`torch.save` state dicts and nanoGPT's `ckpt.pt`") == "torchsave-state-dicts-and-nanogpts-ckptpt"
    assert slugify('Automatic selection in the probe (`head_loss="auto"`, the default)') == \
        "automatic-selection-in-the-probe-head_lossauto-the-default"
    assert slugify("Weight spectra (`spectral_lens.weights`)") == "weight-spectra-spectral_lensweights"


CITED_FILE = re.compile(r"(?<![\w./-])(tests/[\w/.-]*\w)")
CITED_TEST = re.compile(r"(?<![\w/.])((?:tests/[\w/]+/)?test_\w+\.py)?::([A-Za-z_]\w*)")
BARE_FILE = re.compile(r"(?<![\w/.-])(test_\w+\.py)\b")


def missing_citations(root: Path = ROOT) -> list[str]:
    """Tests the docs cite that do not exist: a ``tests/...`` path, a bare ``test_x.py`` that no folder
    of ``tests/`` holds, or ``FILE::name`` (``::name`` alone continues the file named before it)."""
    files: dict[str, list[Path]] = {}  # a bare name may stand for files of several folders: any of them
    for p in sorted((root / "tests").rglob("test_*.py")):
        files.setdefault(p.name, []).append(p)
    out = []
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        line = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
        for m in CITED_FILE.finditer(text):
            if not (root / m.group(1)).exists():
                out.append(f"{page.relative_to(root)}:{line(m.start())}: {m.group(1)} does not exist")
        for m in BARE_FILE.finditer(text):
            if m.group(1) not in files:
                out.append(f"{page.relative_to(root)}:{line(m.start())}: no tests/**/{m.group(1)}")
        last = None
        for m in CITED_TEST.finditer(text):
            cited, name = m.group(1) or last, m.group(2)
            last = cited
            if cited is None:
                continue
            paths = [root / cited] if "/" in cited else files.get(cited, [])
            paths = [p for p in paths if p.is_file()]
            if not paths:
                continue  # reported above
            defined = re.compile(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", re.M)
            if not any(defined.search(p.read_text(encoding="utf-8")) for p in paths):
                out.append(f"{page.relative_to(root)}:{line(m.start())}: {cited}::{name} is not defined there")
    return out


def test_cited_tests_exist():
    assert not missing_citations(), "\n".join(missing_citations())


def test_the_citation_check_finds_renamed_tests(tmp_path):
    (tmp_path / "tests" / "core").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "tests" / "core" / "test_a.py").write_text("def test_kept():\n    pass\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "`tests/core/test_a.py::test_kept`, `::test_gone`; `test_a.py`, `test_b.py`, tests/core/test_c.py; "
        "`x[::4]`\n", encoding="utf-8")
    (tmp_path / "docs" / "p.md").write_text("`test_a.py::test_renamed`\n", encoding="utf-8")
    assert missing_citations(tmp_path) == [
        "README.md:1: tests/core/test_c.py does not exist",
        "README.md:1: no tests/**/test_b.py",
        "README.md:1: tests/core/test_a.py::test_gone is not defined there",
        "docs/p.md:1: test_a.py::test_renamed is not defined there",
    ]


def flat(page: str) -> str:
    return " ".join((ROOT / page).read_text(encoding="utf-8").split())


def test_the_quoted_divergence_note_is_what_divergence_prints(tmp_path):
    """docs/guide-batch-sweep.md quotes the note of a run that diverged at step 477, half its budget;
    docs/analysis.md the same line in taxonomy rule 0. It quoted ``5.0e+08 tokens``; the code prints
    token counts in the ``.4g`` form (``5e+08``)."""
    from spectral_lens.analysis import divergence
    from spectral_lens.records import RunInfo, RunRecord, RunWriter

    path = tmp_path / "flexwin-b16"
    with RunWriter(path, RunInfo("flexwin-b16", family="FlexWin", batch_tier=16, total_tokens=10**9), fsync=False) as w:
        w.log(400, 4 * 10**8, val_loss=3.4)
        w.log(477, 5 * 10**8, val_loss=math.nan)
        w.log(500, 520_000_000, val_loss=math.nan)
    line = divergence(RunRecord.open(path))
    assert line == "run 'flexwin-b16' (tier 16) diverged: val_loss nan at step 477 (5e+08 tokens, 50% of its token budget)"
    assert f"note: {line}; left out of the rankings and scores" in flat("docs/guide-batch-sweep.md")
    assert "diverged: val_loss nan at step 477 (5e+08 tokens, 50% of its token budget)" in flat("docs/analysis.md")


def test_the_quoted_cautions_are_what_the_report_prints():
    """docs/analysis.md's "Cautions" paragraph quotes the score's cautions and the toss-up caution; it
    quoted "treat the ranking as a guess", the code says "treat the early α_tail ranking as a guess"."""
    from spectral_lens.analysis import close_call, rank_tiers
    from spectral_lens.analysis.tier_predictor import FamilyScore
    from spectral_lens.report import score_flags

    score = types.SimpleNamespace(within={"F": FamilyScore(rho=-0.5, pvalue=0.5, n=3)})
    flags = " ".join(score_flags(score))
    text = flat("docs/analysis.md")
    cautions = text[text.index("**Cautions**"):text.index("**Progress.**")]
    quoted = re.findall(r'\("([^"]+)"\)', cautions)
    assert len(quoted) >= 2, cautions
    for q in quoted:
        for part in q.split(" ... "):
            assert part in flags, f"docs/analysis.md quotes {q!r}; the caution reads: {flags}"
    toss_up = close_call(rank_tiers("F", [(4, "a", 1.0, 0.1), (8, "b", 1.0, 0.1), (16, "c", 1.0, 0.1)]))
    assert "tiers 4, 8 and 16 are too close to call" in toss_up
    assert '"tiers 4, 8 and 16 are too close to call"' in text


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_install_lines_name_extras_that_exist(page):
    """Every ``pip install ... ".[a,b]"`` / ``"spectral-lens[a,b]"`` of the install pages names extras
    that pyproject.toml declares (an unknown extra only warns in pip, and installs nothing)."""
    if PYPROJECT is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11) or tomli")
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    named = re.findall(r"""(?:\.|spectral-lens|\.whl)\[([\w,-]+)\]""", (ROOT / page).read_text(encoding="utf-8"))
    assert named, page
    unknown = {e for group in named for e in group.split(",")} - extras
    assert not unknown, f"{page} installs extras pyproject.toml does not declare: {sorted(unknown)}"


# Inline signatures of the prose that state the code's defaults (test_doc_signatures.py checks the
# defaults of signatures in headings only, and only that an inline call's keywords exist): the page,
# the object, and how the signature starts on the page; the values are read from the page.
DOCUMENTED_DEFAULTS = [
    ("docs/analysis.md", "spectral_lens.analysis.tokens_to_target", "`tokens_to_target(run_or_("),
    ("docs/analysis.md", "spectral_lens.analysis.align", "`align(runs, by,"),
    ("docs/analysis.md", "spectral_lens.analysis.transition_evidence", "`transition_evidence(run_a, run_b, target, *,"),
    ("docs/analysis.md", "spectral_lens.analysis.TransitionClassifier", "`TransitionClassifier(gain_threshold="),
    ("docs/analysis.md", "spectral_lens.analysis.TransitionClassifier.from_replicates", "`TransitionClassifier.from_replicates(null,"),
    ("docs/analysis.md", "spectral_lens.weights.powerlaw_fit", "`powerlaw_fit(spectrum, *,"),
    ("docs/analysis.md", "spectral_lens.plot.save_figure", "`save_figure(fig, path,"),
    ("docs/analysis.md", "spectral_lens.report.build_report", "`build_report(..., progress="),
    ("docs/analysis.md", "spectral_lens.analysis.SweepController", "SweepController(keep="),
    ("docs/guide-batch-sweep.md", "spectral_lens.analysis.SweepController", "SweepController(keep="),
    ("docs/api-core.md", "spectral_lens.crossover_rank", "`crossover_rank(spectrum, ranks="),
    ("docs/api-core.md", "spectral_lens.RankMe", "`RankMe(on="),
    ("docs/api-core.md", "spectral_lens.BandAlphaFitter", "`BandAlphaFitter(windows="),
    ("docs/gradients.md", "spectral_lens.gradients.token_cross_entropy", "`token_cross_entropy(logits,"),
    ("docs/gradients.md", "spectral_lens.gradients.linear_cross_entropy", "`linear_cross_entropy(hidden,"),
    ("docs/lens.md", "spectral_lens.Schedule.every", "`Schedule.every(k,"),
    ("docs/records.md", "spectral_lens.records.RunRecord.open", "rec = RunRecord.open("),  # its comment: the defaults
]


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def documented_keywords(page: str, start: str) -> dict[str, str]:
    """``name -> value text`` of the signature that starts with ``start`` on ``page``: an inline code
    span (which may wrap), or a code line whose ``# comment`` lists the defaults."""
    text = (ROOT / page).read_text(encoding="utf-8")
    at = text.find(start)
    assert at >= 0, f"{page} no longer shows {start!r}: update DOCUMENTED_DEFAULTS"
    if start.startswith("`"):
        span = text[at + 1: text.index("`", at + 1)]
    else:
        span = text[at: text.index("\n", at)]
    span = " ".join(span.split())
    call, _, comment = span.partition("#")
    open_at, depth = call.index("("), 0
    for end in range(open_at, len(call)):  # the parenthesis that closes the call's own
        depth += {"(": 1, ")": -1}.get(call[end], 0)
        if depth == 0:
            break
    args = call[open_at + 1: end]
    shown = dict(re.findall(r"(\w+)=(\([^)]*\)|[^,]+)", args))
    shown.update(re.findall(r"(\w+)=([^,\s]+)", comment))
    return {k: v.strip() for k, v in shown.items() if v.strip() != "..."}


@pytest.mark.parametrize("page, dotted, start", DOCUMENTED_DEFAULTS,
                         ids=[f"{p}:{s.strip('`(').split('(')[0]}" for p, _, s in DOCUMENTED_DEFAULTS])
def test_inline_signatures_state_the_code_defaults(page, dotted, start):
    import ast
    import inspect

    import spectral_lens

    shown = documented_keywords(page, start)
    assert shown, (page, start)
    params = inspect.signature(_resolve(dotted)).parameters
    for name, value in shown.items():
        assert name in params, f"{page}: {start}...: {name} is no parameter of {dotted}"
        try:
            documented = ast.literal_eval(value)
        except ValueError:
            documented = getattr(spectral_lens, value)
        assert documented == params[name].default, (
            f"{page}: {start}...: {name}={value}, but {dotted} defaults to {params[name].default!r}")
