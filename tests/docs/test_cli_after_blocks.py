"""A guide's ``spectral-lens`` commands run on the records its own Python blocks wrote, as a reader who
copies both into one directory would run them (tests/docs/test_code_blocks.py runs the Python alone).

Found by following the docs from a wheel installed in a fresh venv: the batch-sweep guide wrote its
synthetic sweep into a ``tempfile.mkdtemp()`` directory and then told the reader to run
``spectral-lens predict runs/toy``, a directory nothing had written ('no such file or directory'); the
Hugging Face example of the attach guide recorded a run without ``RunInfo.total_tokens``, which
``spectral-lens predict`` refuses ('the training progress ... is unknown')."""

from __future__ import annotations

import ast
import importlib.util
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _code_blocks():
    # by path, as test_code_blocks.py loads its fixtures: ``import docs...`` could find the repository's docs/
    spec = importlib.util.spec_from_file_location("spectral_lens_docs_code_blocks",
                                                  Path(__file__).with_name("test_code_blocks.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _run_block_after(page: str, heading: str) -> None:
    """Run the page's first Python block after the line ``heading``, in the current directory (names the
    prose leaves out come from the docs fixtures, as in test_code_blocks.py)."""
    cb = _code_blocks()
    path = ROOT / page
    after = path.read_text(encoding="utf-8").splitlines().index(heading) + 1  # 1-based line of the heading
    block = next(b for b in cb.blocks(path) if b.line > after)
    assert not block.skipped, f"{page}, block at line {block.line} is marked skip"
    ns: dict = {"__name__": "__docs__"}
    tree = ast.parse(block.code)
    cb.inject(ns, cb.read_names(tree))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(tree, f"{page}, block at line {block.line}", "exec"), ns)


def _page_commands(page: str, heading: str) -> list[list[str]]:
    """The ``spectral-lens`` lines of the first fenced block without a language after ``heading``, as
    argument lists."""
    fence = _code_blocks().FENCE
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    i = lines.index(heading) + 1
    while i < len(lines):
        m = fence.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].strip().startswith(m.group(2)):
            j += 1
        if not m.group(3):
            return [shlex.split(line)[1:] for line in lines[i + 1 : j] if line.startswith("spectral-lens ")]
        i = j + 1
    raise AssertionError(f"{page}: no plain fenced block after {heading!r}")


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from spectral_lens.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_batch_sweep_guide_commands_read_the_sweep_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run_block_after("docs/guide-batch-sweep.md", "## Try it without training")
    commands = _page_commands("docs/guide-batch-sweep.md", "## Try it without training")
    assert [c[0] for c in commands] == ["predict", "report"]
    for args in commands:
        code, out = _cli(args, capsys)
        assert code == 0, (args, out)
    code, out = _cli(commands[0], capsys)
    assert "family toy: recommended tier 4" in out  # the guide's claim about the synthetic sweep
    assert (tmp_path / "toy-report" / "report.md").is_file()


def test_hf_trainer_example_writes_a_record_predict_reads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers", reason="the Hugging Face example needs the hf extra")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (hf extra)")
    monkeypatch.chdir(tmp_path)
    _run_block_after("docs/guide-attach.md", "## Hugging Face `Trainer`")
    assert (tmp_path / "runs" / "llama-b1" / "run.json").is_file()
    # the fixture's Llama is 32 wide (a window inside it) and measured at steps 2 and 4 of 4 (progress 0.5, 1)
    code, out = _cli(["predict", "runs/llama-b1", "--fraction", "0.5", "--window", "2", "8"], capsys)
    assert code == 0, out
    assert "family llama: one tier (1): nothing to rank" in out  # one run: no ranking


@pytest.mark.slow
def test_checkpoints_guide_commands_read_the_record_its_scripts_wrote(tmp_path, monkeypatch, capsys):
    """Review 23: the guide's Trainer run, its measuring script (run on its own, twice) and its commands; the
    run's first checkpoint was at 33% of its budget, and the guide's ``predict`` line refused it (exit 2).
    (tests/integrations/test_review23_ckpt.py runs the same script fast, on checkpoints saved without training.)"""
    pytest.importorskip("transformers", reason="the Trainer example needs the hf extra")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (hf extra)")
    page = "docs/guide-checkpoints.md"
    monkeypatch.chdir(tmp_path)
    _run_block_after(page, "## Hugging Face `Trainer` checkpoints")
    for _ in range(2):  # a second run measures nothing new
        _run_block_after(page, "training and evaluation losses so far. Measure every checkpoint into one run record:")
    from spectral_lens.records import RunRecord

    assert [m.step for m in RunRecord.open("runs/gpt2-b4").measurements] == [2, 4, 6, 8, 10]
    commands = _page_commands(page, "Then, as for a record written during training:")
    assert [c[0] for c in commands] == ["report", "predict"]
    for args in commands:
        code, out = _cli(args, capsys)
        assert code == 0, (args, out)
    assert "family gpt2-tiny: one tier (4): nothing to rank" in out  # as the guide says
    assert (tmp_path / "report" / "report.md").is_file()
