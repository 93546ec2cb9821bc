"""Numbers the prose of README.md and docs/ states, checked against what the code does (review 23).

Each test reads the sentence from the page and runs the code it describes, so a page that drifts from
the code (or code that drifts from the page) fails here, naming the page."""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import spectral_lens as sl

ROOT = Path(__file__).resolve().parents[2]


def _prose(page: str) -> str:
    """The page's text with every run of whitespace (line breaks included) as one space."""
    return re.sub(r"\s+", " ", (ROOT / page).read_text(encoding="utf-8"))


def _stated(page: str, pattern: str) -> re.Match:
    match = re.search(pattern, _prose(page))
    assert match, f"{page} no longer states /{pattern}/; update this test with the page"
    return match


class _Blocks(nn.Module):
    """Two residual blocks of width 256 on continuous rows: full-rank hidden states, so a window fits
    exactly when the sample rank (rows - 1) reaches its upper rank."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _has_alpha_tail(rows: int) -> bool:
    torch.manual_seed(0)
    lens = sl.SpectralLens(_Blocks(), [torch.randn(1, rows, 256)], params=(), tail_window=(100, 200), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sl.SpectralLensWarning)
        return "alpha_tail" in lens.measure(0, 0).summaries["act:blocks.1"]


def test_the_pool_size_the_scale_rule_window_needs():
    # README said "a pool of fewer than 200 token rows" has no alpha_tail in [100, 200]: a pool of
    # exactly 200 rows has none either (199 resolved ranks), as docs/lens.md's "more than 200" says
    readme = _stated("README.md", r"a pool of (?:fewer than (\d+)|(\d+) token rows or fewer)")
    without = int(readme.group(1)) - 1 if readme.group(1) else int(readme.group(2))  # most rows still without it
    more = int(_stated("docs/lens.md", r"The scale rule's `\(100, 200\)` needs layers at least 200 wide and a pool "
                                       r"of more than (\d+) rows").group(1))
    for page, most in (("README.md", without), ("docs/lens.md", more)):
        assert not _has_alpha_tail(most) and _has_alpha_tail(most + 1), (
            f"{page}: a pool of {most} rows is said to be the largest without alpha_tail in (100, 200); measured: "
            f"{most} rows {'with' if _has_alpha_tail(most) else 'without'}, {most + 1} rows "
            f"{'with' if _has_alpha_tail(most + 1) else 'without'}")


_SKIP = r'`nonfinite="skip"`'
_KERNEL_COUNTS = (
    ("docs/concepts.md", rf"dispatches (\d+)-(\d+) kernel-launching ops without a mask, (\d+)-(\d+) with a mask or {_SKIP}"),
    ("docs/performance.md", (rf"dispatches (\d+)-(\d+) kernel-launching operators on CUDA \((\d+)(?:-(\d+))? with a mask "
                             rf"(?:or|and) {_SKIP}\)")),
)


def _ranges(counts: dict) -> tuple[int, int, int, int]:
    """(fewest, most) launching ops of a plain update, then of one with a mask or ``nonfinite="skip"``."""
    plain = sorted(n for (_, masked, nonfinite), n in counts.items() if not masked and nonfinite == "raise")
    other = sorted(n for (_, masked, nonfinite), n in counts.items() if masked or nonfinite == "skip")
    return plain[0], plain[-1], other[0], other[-1]


def _check_kernel_counts(counts: dict, source: str) -> None:
    for page, pattern in _KERNEL_COUNTS:
        lo, hi, masked_lo, masked_hi = _stated(page, pattern).groups()
        stated = (int(lo), int(hi), int(masked_lo), int(masked_hi or masked_lo))
        assert stated == _ranges(counts), f"{page} states {stated} launching ops per update, {source} {_ranges(counts)}"


def test_the_kernel_counts_the_pages_state_are_the_pinned_ones():
    # performance.md said 30 launching ops "with a mask and nonfinite='skip'": those are 33 (exact) and
    # 35 (fast); 30 is the fast mode's masked update without skip. The counts are the ones
    # tests/core/test_update_paths.py pins (its ``most``), read from that file.
    tree = ast.parse((ROOT / "tests/core/test_update_paths.py").read_text(encoding="utf-8"))
    pinned = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["most"])
    assert len(pinned) == 8
    _check_kernel_counts(pinned, "tests/core/test_update_paths.py pins")


@pytest.mark.slow  # the first TorchDispatchMode of a process costs about 2.5 s on the 2-core machine
def test_the_kernel_counts_the_pages_state_are_counted(monkeypatch):
    """As ``bench_covariance.py --fixed-cost`` counts them: 16 x 8 bf16 rows on the generic path."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_covariance  # its op counter and its route onto the generic path (every CUDA update's)

    try:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(16, 8, generator=g) + 3).to(torch.bfloat16)
        mask = torch.rand(16, generator=g) > 0.3
        counts = {}
        for precision in ("exact", "fast"):
            for masked in (False, True):
                for nonfinite in ("raise", "skip"):
                    acc = sl.ActivationCovarianceAccumulator(precision=precision, nonfinite=nonfinite)
                    update = functools.partial(acc.update, x, mask=mask if masked else None)
                    with bench_covariance._route("generic"):
                        for _ in range(3):  # as the benchmark: initialized, the state buffer owned
                            update()
                        counts[precision, masked, nonfinite] = sum(bench_covariance._launching_ops(update).values())
    finally:
        sys.modules.pop("bench_covariance", None)
    _check_kernel_counts(counts, "counted")


def test_the_probe_api_block_shows_every_argument_at_its_default():
    """docs/gradients.md's API block lists the probe's constructor as a reader copies it: every argument,
    each at the value the code defaults to (a new argument, or a changed default, must show there)."""
    import importlib.util

    from spectral_lens.gradients import PerSampleGradientProbe

    spec = importlib.util.spec_from_file_location("spectral_lens_docs_blocks_r23", ROOT / "tests/docs/test_code_blocks.py")
    blocks = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, blocks)  # its dataclass looks its module up there
    spec.loader.exec_module(blocks)
    page = ROOT / "docs/gradients.md"
    after = page.read_text(encoding="utf-8").splitlines().index("## API") + 1
    block = next(b for b in blocks.blocks(page) if b.line > after)
    call = next(node for node in ast.walk(ast.parse(block.code))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "PerSampleGradientProbe")
    shown = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    params = dict(inspect.signature(PerSampleGradientProbe).parameters)
    params.pop("model")  # the block's positional argument
    assert list(shown) == list(params), f"docs/gradients.md, block at line {block.line}: shows {list(shown)}, the code takes {list(params)}"
    wrong = {name: (value, params[name].default) for name, value in shown.items() if value != params[name].default}
    assert not wrong, f"docs/gradients.md, block at line {block.line}: (shown, default) {wrong}"


def _count_samples(ran: list[int], module, args) -> None:
    ran.append(args[0].shape[0])


def test_the_recomputation_cost_of_bounded_memory():
    """docs/gradients.md's cost of ``max_resident_samples=K``: the extra per-sample gradients ``compute()``
    recomputes, by its formula and by its two examples, against a count of the samples the model runs.
    The page said ``(M - K)^2 / (2K)`` (8 and 36 at M = 32, K = 16 and 8) beside examples of +50% and +150%,
    which are ``M (M - K) / (2K)``, the count (16 and 48)."""
    from support.models import TinyGPT

    stated = _stated("docs/gradients.md", r"Cost: about `([^`]+)` extra per-sample gradients "
                                          r"\(K = M/2: \+(\d+)%; K = M/4: \+(\d+)%\)")
    formula = re.sub(r"(?<=[\w)])\s*(?=[(A-Za-z])", "*", stated.group(1)).replace("^", "**")  # M (M - K) -> M*(M - K)
    torch.manual_seed(0)
    model = TinyGPT()
    ids = torch.randint(0, 37, (32, 12))
    for k, percent in ((16, int(stated.group(2))), (8, int(stated.group(3)))):
        probe = sl.PerSampleGradientProbe(model, max_resident_samples=k, chunk_size=2, head_loss="materialized")
        for i in range(0, 32, 8):
            probe.update(ids[i:i + 8])
        ran: list[int] = []
        handle = model.register_forward_pre_hook(functools.partial(_count_samples, ran))
        try:
            probe.compute()
        finally:
            handle.remove()
        by_formula = eval(formula, {"__builtins__": {}}, {"M": 32, "K": k})  # the page's arithmetic, M and K only
        assert sum(ran) == by_formula == 32 * percent / 100, (
            f"M = 32, K = {k}: compute() recomputed {sum(ran)} samples; docs/gradients.md's {stated.group(1)!r} "
            f"gives {by_formula:g}, its example +{percent}% gives {32 * percent / 100:g}")


def test_every_warning_class_is_named_where_the_base_is():
    """docs/api-core.md's "Warnings and errors" lists what ``SpectralLensWarning`` is the base of, for
    ``warnings.filterwarnings``; the records' ``RecordWarning`` and the analyses' ``SweepWarning`` were
    missing from it."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(sl.__path__, "spectral_lens."):
        # the integrations need optional extras; __main__ is the command line
        if not module.name.startswith(("spectral_lens.integrations", "spectral_lens.__main__")):
            try:
                importlib.import_module(module.name)
            except ModuleNotFoundError as exc:  # a Triton kernel module without the kernels extra (CI)
                if exc.name != "triton":
                    raise

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    names = {cls.__name__ for cls in subclasses(sl.SpectralLensWarning) if cls.__module__.startswith("spectral_lens")}
    section = _prose("docs/api-core.md").split("## Warnings and errors", 1)[1].split(" ## ", 1)[0]
    assert {"InsufficientRowsWarning", "RecordWarning", "SweepWarning"} <= names
    missing = sorted(name for name in names if f"`{name}`" not in section)
    assert not missing, f"docs/api-core.md, Warnings and errors: SpectralLensWarning is also the base of {missing}"
