"""The API facts the prose and tables of the docs state, checked against the code.

``tests/docs/test_code_blocks.py`` runs the code blocks; nothing else reads the inline signatures
(`` `RunWriter(path, info, resume=True)` ``), the defaults in the API headings of
``docs/api-core.md`` or the options shown for the ``spectral-lens`` command line. Here:

* every inline `` `name(arg=..., ...)` `` whose ``name`` is a public function or class of
  spectral-lens (or ``Class.method`` of one) names only keyword arguments it accepts;
* a heading such as ``## `attach(model, target, *, pick=None, ...)` `` states the code's defaults;
* every ``--option`` of a ``spectral-lens COMMAND ...`` line in a code block is an option of that
  command's parser.

Names the docs use for other libraries (``torch.load``, ``trainer.fit``) or that do not resolve
are skipped, so the checks only fail on a real mismatch.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
MODULES = (
    "spectral_lens",
    "spectral_lens.analysis",
    "spectral_lens.records",
    "spectral_lens.gradients",
    "spectral_lens.spectra",
    "spectral_lens.weights",
    "spectral_lens.plot",
    "spectral_lens.report",
    "spectral_lens.lens",
)
INLINE = re.compile(r"`([A-Za-z_][\w.]*)\(([^`]*)\)(?:\s*->[^`]*)?`")


def _public() -> dict[str, object]:
    names: dict[str, object] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if callable(obj):
                names.setdefault(name, obj)
    return names


PUBLIC = _public()


def _resolve(name: str):
    """The object ``name`` stands for, or None: ``X``, ``X.method``, ``sl.X``, ``spectral_lens.a.X``."""
    parts = name.split(".")
    if parts[0] in ("sl", "spectral_lens"):
        obj = importlib.import_module("spectral_lens")
        for i, part in enumerate(parts[1:], start=1):
            nxt = getattr(obj, part, None)
            if nxt is None and inspect.ismodule(obj):
                try:
                    nxt = importlib.import_module(".".join(["spectral_lens", *parts[1 : i + 1]]))
                except ImportError:
                    return None
            if nxt is None:
                return None
            obj = nxt
        return obj if callable(obj) else None
    obj = PUBLIC.get(parts[0])
    if obj is None or (len(parts) > 1 and not inspect.isclass(obj)):
        return None
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if callable(obj) else None


def _facts():
    """(page, line, text, name, object, call) for every inline call of a public object."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in INLINE.finditer(text):
            name, args = match.group(1), match.group(2)
            obj = _resolve(name)
            if obj is None:
                continue
            # a bare ``*`` marks keyword-only parameters in a signature: drop it to parse as a call
            source = re.sub(r"(^|,)\s*\*\s*(?=,|$)", r"\1", args.replace("\n", " "))
            source = re.sub(r",\s*,", ",", source).strip(" ,")
            try:
                call = ast.parse(f"f({source})", mode="eval").body
            except SyntaxError:
                continue
            if not isinstance(call, ast.Call):
                continue
            line = text.count("\n", 0, match.start()) + 1
            heading = text[text.rfind("\n", 0, match.start()) + 1 : match.start()].lstrip().startswith("#")
            yield page.relative_to(ROOT), line, match.group(0), obj, call, heading


FACTS = list(_facts())


def test_the_scan_finds_the_documented_signatures():
    # guards the checks below against a regex or resolution change that silently finds nothing
    assert len(FACTS) > 60
    texts = {fact[2] for fact in FACTS}
    assert any(t.startswith("`ActivationCovarianceAccumulator(dim=None") for t in texts)
    assert any(t.startswith("`linear_cross_entropy(") for t in texts)


def _params(facts):
    return [pytest.param(*fact, id=f"{fact[0].name}:{fact[1]}") for fact in facts]


@pytest.mark.parametrize("page, line, text, obj, call, heading", _params(FACTS))
def test_inline_keywords_exist(page, line, text, obj, call, heading):
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        pytest.skip("no signature")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [kw.arg for kw in call.keywords if kw.arg is not None and kw.arg not in params]
    assert not unknown, f"{page}:{line}: {text} names {unknown}, not parameters of {inspect.signature(obj)}"


HEADINGS = [fact for fact in FACTS if fact[5]]


def test_headings_are_found():
    assert len(HEADINGS) >= 5


@pytest.mark.parametrize("page, line, text, obj, call, heading", _params(HEADINGS))
def test_heading_defaults_match_the_code(page, line, text, obj, call, heading):
    params = inspect.signature(obj).parameters
    for kw in call.keywords:
        if kw.arg is None or kw.arg not in params:
            continue
        try:
            documented = ast.literal_eval(kw.value)
        except ValueError:
            documented = getattr(importlib.import_module("spectral_lens"), ast.unparse(kw.value), None)
            if documented is None:
                continue
        actual = params[kw.arg].default
        assert documented == actual, f"{page}:{line}: {text}: {kw.arg} defaults to {actual!r} in the code"


def _cli_lines():
    fence = re.compile(r"^(`{3,}|~{3,})")
    for page in PAGES:
        inside = False
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, raw in enumerate(lines, 1):
            if fence.match(raw.strip()):
                inside = not inside
                continue
            if not inside:
                continue
            code = raw.split("#")[0] if not raw.lstrip().startswith("#") else raw.lstrip().lstrip("#")
            commands = list(re.finditer(r"spectral-lens\s+(report|predict|inspect)\b", code))
            for k, m in enumerate(commands):  # one line may show two commands
                rest = code[m.end() : commands[k + 1].start() if k + 1 < len(commands) else len(code)]
                j = i  # continuation lines of a usage block are indented and start with an option
                while k + 1 == len(commands) and j < len(lines) and re.match(r"^\s+\[?--", lines[j]):
                    rest += " " + lines[j].split("#")[0]
                    j += 1
                yield page.relative_to(ROOT), i, m.group(1), rest


CLI_LINES = list(_cli_lines())


def test_cli_options_in_the_docs_exist():
    import argparse

    from spectral_lens.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(CLI_LINES) >= 3
    problems = []
    for page, line, command, rest in CLI_LINES:
        options = set()
        for action in sub.choices[command]._actions:
            options.update(action.option_strings)
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            if option not in options:
                problems.append(f"{page}:{line}: spectral-lens {command} has no option {option}")
    assert not problems, "\n".join(problems)
