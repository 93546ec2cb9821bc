"""A new user with only the core install (review 27): each feature that needs an extra says which, in one
exception, and every optional package the library or the examples import is installed by an extra."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from support.pyproject import PYPROJECT, needs_pyproject

ROOT = Path(__file__).resolve().parents[2]


def test_tensorboard_sink_without_tensorboard_or_matplotlib_names_the_tensorboard_extra(monkeypatch, tmp_path):
    """With neither installed, ``TensorBoardSink(log_dir)`` said ``pip install 'spectral-lens[plot]'``; a user who
    did so got a second ImportError, now for tensorboard. The ``tensorboard`` extra installs both: name it."""
    from spectral_lens.integrations import TensorBoardSink

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'spectral-lens\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_sink_given_a_writer_without_matplotlib_names_the_plot_extra(monkeypatch):
    """A writer passed in needs no tensorboard import here: only the figures' matplotlib is missing."""
    from spectral_lens.integrations import TensorBoardSink

    class Writer:
        def add_scalar(self, *args, **kwargs):
            pass

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'spectral-lens\[plot\]'"):
        TensorBoardSink(Writer())
    assert TensorBoardSink(Writer(), figures=False).figures is False


@pytest.mark.parametrize("fn", ["center_cast", "fast_chunk_moments"])
def test_triton_path_asked_for_without_triton_names_the_kernels_extra(monkeypatch, fn):
    """``use_triton=True`` without Triton was a bare ``ModuleNotFoundError: No module named 'triton'`` raised
    from the private kernel module (spectral_lens.spectra.fast_moments is in the API reference)."""
    from spectral_lens.spectra import fast_moments

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "spectral_lens.spectra._center_kernel", raising=False)
    x, shift = torch.randn(8, 4), torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ImportError, match=r"needs Triton .*pip install 'spectral-lens\[kernels\]'"):
        getattr(fast_moments, fn)(x, shift, use_triton=True)
    m, _ = fast_moments.fast_chunk_moments(x, shift)  # the default still takes the torch path
    assert m.shape == (4,)


# ----------------------------------------------------------------------- every optional import has an extra
CORE = {"spectral_lens", "examples", "torch", "numpy", "scipy", "opt_einsum", "tqdm", "__future__"}
# top-level module -> (extra, the distribution that extra lists and that provides the module)
EXTRA_OF = {
    "matplotlib": ("plot", "matplotlib"),
    "transformers": ("hf", "transformers"),
    "lightning": ("lightning", "lightning"),
    "pytorch_lightning": ("lightning", "lightning"),  # the lightning distribution requires pytorch-lightning
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "optuna": ("tune", "optuna"),
    "sqlalchemy": ("tune", "optuna"),  # an Optuna dependency, used only beside it (examples/tune/storage.py)
    "triton": ("kernels", "triton"),
    "torch_optimizer": ("examples", "torch-optimizer"),
}
# imported but deliberately in no extra, each with the reason its error or docs give
NO_EXTRA = {
    "pandas": "RunRecord.to_dataframe only; its ImportError says spectral-lens does not install it: pip install pandas",
    "bitsandbytes": "read only from a weight that already is a bitsandbytes Params4bit / Int8Params",
}


def _imported_packages() -> dict[str, set[str]]:
    """Top-level packages that spectral_lens/ and examples/ import (at any depth, and through ``require``)."""
    found: dict[str, set[str]] = {}
    for folder in ("spectral_lens", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                      and isinstance(node.args[0], ast.Constant)):  # integrations/_require.py
                    package = node.args[3] if len(node.args) > 3 else next(
                        (k.value for k in node.keywords if k.arg == "package"), None)
                    names = [node.args[0].value] + ([package.value] if isinstance(package, ast.Constant) else [])
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in CORE and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@needs_pyproject
def test_every_optional_import_is_installed_by_an_extra():
    """A feature importing a package that no extra lists leaves its user no ``pip install 'spectral-lens[X]'``
    that works. Found by scanning the sources, so a new optional import must be placed here too."""
    from packaging.requirements import Requirement

    extras = {name: {Requirement(r).name for r in reqs}
              for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
    found = _imported_packages()
    assert {"matplotlib", "transformers", "lightning", "wandb", "optuna", "triton", "tensorboard"} <= set(found)
    unplaced = {top: sorted(where) for top, where in found.items() if top not in EXTRA_OF and top not in NO_EXTRA}
    assert not unplaced, f"imported, but in no extra and not in NO_EXTRA: {unplaced}"
    wrong = {top: (extra, dist) for top, (extra, dist) in EXTRA_OF.items() if dist not in extras.get(extra, ())}
    assert not wrong, f"the extra does not list the distribution: {wrong}"
