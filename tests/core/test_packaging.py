"""The package as a new user installs and meets it: metadata (one version, a shipped license, extras
that cover their feature), ``python -m spectral_lens``, an ``import spectral_lens`` that loads no
optional or heavy package, and one-line errors that name the extra when an optional package is missing.

Building a wheel and installing it into a fresh venv (the whole new-user path) is slow: the wheel's
contents are checked under ``pytest -m slow``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import spectral_lens
from support.pyproject import PYPROJECT, needs_pyproject

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("matplotlib", "transformers", "accelerate", "lightning", "pytorch_lightning", "tensorboard",
            "wandb", "optuna", "pandas", "triton", "peft")


def _run(args, *, code=None, cwd=None, timeout=300):
    """``python [-c code] args`` with this checkout first on the path, from a directory outside it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable] + (["-c", code] if code is not None else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------------------- metadata
@needs_pyproject
def test_version_is_written_once():
    """pyproject.toml had its own ``version = "0.1.0"`` beside ``spectral_lens.__version__``: a
    release bump in one place left the other stale. The build now reads the package's."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project.get("dynamic", [])
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "spectral_lens.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", spectral_lens.__version__)


@needs_pyproject
def test_license_is_an_spdx_string_and_its_file_ships():
    """``license = {text = ...}`` is deprecated by setuptools (builds stop being supported after
    2027-02-18) and no license file was shipped, though Apache-2.0 asks for its text with every copy."""
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    files = project["license-files"]
    assert files and all((ROOT / f).is_file() for f in files)
    assert "Apache License" in (ROOT / files[0]).read_text(encoding="utf-8")[:200]
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    assert int(re.search(r"setuptools>=(\d+)", requires).group(1)) >= 77  # SPDX license + license-files


@needs_pyproject
def test_sink_extras_install_what_the_default_sink_needs():
    """``TensorBoardSink`` draws spectrum figures by default (matplotlib): with only
    ``pip install 'spectral-lens[tensorboard]'`` the sink refused to be built."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(req.startswith("matplotlib") for req in extras["tensorboard"])


@needs_pyproject
def test_only_spectral_lens_is_packaged():
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["spectral_lens*"]
    assert PYPROJECT["project"]["scripts"] == {"spectral-lens": "spectral_lens.cli:main"}


@needs_pyproject
def test_typed_package_and_classifiers():
    """The package is annotated but shipped no ``py.typed`` (PEP 561), so mypy and pyright ignored its
    annotations in a user's code; and pyproject had no classifiers. The marker is package data (the wheel
    test checks it ships); the Python classifiers follow ``requires-python``; no ``License ::``
    classifier beside the SPDX license (setuptools refuses both)."""
    assert (ROOT / "spectral_lens" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["spectral_lens"]
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]
    low = int(re.fullmatch(r">=3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1))
    minors = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert minors and minors[0] == low and minors == list(range(low, minors[-1] + 1))
    try:  # the canonical list, where installed (pip install trove-classifiers)
        from trove_classifiers import classifiers as known
    except ImportError:
        return
    assert set(classifiers) <= known, set(classifiers) - known


# ------------------------------------------------------------------------------ python -m and CLI
def test_python_m_spectral_lens_runs_the_cli(tmp_path, capsys):
    """There was no ``spectral_lens/__main__.py``: ``python -m spectral_lens`` failed with
    'No module named spectral_lens.__main__'."""
    out = _run(["-m", "spectral_lens", "--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: spectral-lens ")
    for command in ("report", "predict", "inspect"):
        assert command in out.stdout
    out = _run(["-m", "spectral_lens"], cwd=tmp_path)  # no command: one line, status 2
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["spectral-lens: error: the following arguments are required: command"]
    # a subcommand's own behaviour: spectral_lens/__main__.py is ``sys.exit(main())``, which the two runs above
    # show reaching main() with and without arguments; in-process (each interpreter start imports torch, ~2.5 s)
    from spectral_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: spectral-lens inspect ")
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"spectral-lens inspect: error: {tmp_path / 'nothing'}: no such file or directory"]


def test_cli_version(capsys):
    from spectral_lens.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"spectral-lens {spectral_lens.__version__}\n"



def test_cli_help_explains_every_argument(capsys):
    """Followed as a new user from a wheel: ``spectral-lens predict --help`` listed RUN_DIR with no word on
    what it is (a sweep root works too), ``inspect`` called its argument FILE though it takes a run directory
    (the docs write FILE_OR_RUN_DIR), ``report --format`` had no help, ``--transition`` did not say that it
    takes run ids and needs --target-loss, and ``spectral-lens --help`` showed no example."""
    import argparse

    from spectral_lens.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    synopsis = (ROOT / "docs" / "analysis.md").read_text(encoding="utf-8")
    for command, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = action.option_strings or action.metavar
            assert action.help and action.help.strip(), f"spectral-lens {command}: {name} has no help text"
            if not action.option_strings:  # the positional's name is the one the docs' synopsis uses
                assert f"spectral-lens {command} {action.metavar}" in synopsis, (command, action.metavar)
    assert "run id" in sub.choices["report"]._option_string_actions["--transition"].help
    assert "--target-loss" in sub.choices["report"]._option_string_actions["--transition"].help
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = [line.split()[1:] for line in out.split("\nexamples:\n", 1)[1].splitlines()
                if line.startswith("  spectral-lens ")]
    assert len(examples) >= 3
    for args in examples:  # each example is a valid command line
        assert parser.parse_args(args).command == args[0]

# ------------------------------------------------------------------------------- what imports what
def test_import_loads_no_optional_or_heavy_package(fresh):
    """``import spectral_lens`` (and every public module, the CLI, reports and plots, the integrations'
    ``measurement_scalars`` and ``TensorBoardSink``) imports neither an optional extra (no framework:
    transformers, lightning, tensorboard - ``torch.utils.tensorboard`` included -, wandb) nor scipy: each
    is imported where it is first used. The fast tier's check for test_stack_conv1d's and
    test_optional_imports' fresh-interpreter import tests (marked slow)."""
    out = fresh["import"]
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[], []]


_BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # `import name` raises ImportError\n"

# the fresh-interpreter cases of the tests below (run by the ``fresh`` fixture)
_IMPORT_CODE = (
    "import importlib, json, sys\n"
    "import spectral_lens\n"
    "at_import = sorted(m for m in sys.modules if m.split('.')[0] in ('scipy',) + tuple(sys.argv[1:]))\n"
    "for mod in ('records', 'analysis', 'spectra', 'gradients', 'integrations', 'cli', 'report', 'plot', "
    "'weights', 'summaries'):\n"
    "    importlib.import_module('spectral_lens.' + mod)\n"
    "import spectral_lens.integrations as integ\n"
    "integ.measurement_scalars, integ.TensorBoardSink  # lazy attributes: their modules load here\n"
    "later = sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in sys.argv[1:]}\n"
    "               | ({'torch.utils.tensorboard'} & set(sys.modules)))\n"
    "print(json.dumps([at_import, later]))\n"
)
_OPTIONAL_CODE = _BLOCK.format(names=OPTIONAL + ("torch.utils.tensorboard",)) + (
    "import json, spectral_lens.plot as plot, spectral_lens.integrations as integ\n"
    "cases = {name: (lambda f=getattr(plot, name): f([])) for name in plot.__all__ if name.startswith('plot_')}\n"
    "cases['save_figure'] = lambda: plot.require_matplotlib()\n"
    "cases['SpectralLensCallback'] = lambda: integ.SpectralLensCallback\n"
    "cases['SpectralLensLightningCallback'] = lambda: integ.SpectralLensLightningCallback\n"
    "cases['pytorch_lightning'] = lambda: __import__('spectral_lens.integrations.pytorch_lightning')\n"
    "cases['TensorBoardSink'] = lambda: integ.TensorBoardSink('tb', figures=False)\n"
    "cases['TensorBoardSink figures'] = lambda: integ.TensorBoardSink('tb')\n"
    "cases['WandbSink'] = lambda: integ.WandbSink()\n"
    "out = {}\n"
    "for name, case in cases.items():\n"
    "    try:\n"
    "        case()\n"
    "        out[name] = None\n"
    "    except ImportError as exc:\n"
    "        out[name] = str(exc)\n"
    "print(json.dumps(out))\n"
    )
_CLI_CODE = _BLOCK.format(names=OPTIONAL) + (
    "import torch\n"
    "from spectral_lens import Spectrum\n"
    "from spectral_lens.records import RunInfo, RunWriter\n"
    "from spectral_lens.cli import main\n"
    "for tier in (4, 8):\n"
    "    with RunWriter(f'runs/b{tier}', RunInfo(f'b{tier}', family='f', batch_tier=tier, total_tokens=100)) as w:\n"
    "        for step in (0, 1):\n"
    "            w.log_measurement(step=step, tokens=10 * (step + 1), spectra={'act': Spectrum(torch.arange(8.0, 0, -1, dtype=torch.float64), n_rows=64, dim=8)})\n"
    "sys.exit(main(['report', 'runs', '--out', 'rep']))\n"
    )
_TUNER_CODE = _BLOCK.format(names=("optuna",)) + (
    "from examples.tune.__main__ import main\n"
    "sys.exit(main(['synthetic', '--tiers', '1', '2', '--rungs', '3', '9', '--workdir', 'tune']))\n"
    )

_FORKS = r"""
import json, os, sys, traceback
import torch  # imported once; every case imports it first (torch imports no watched package: checked below)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in json.loads(sys.argv[1]))
print(json.dumps(loaded), flush=True)
for code, args, cwd in json.loads(sys.argv[2]):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the case: ``python -c code *args`` run from cwd, in a process of its own
        os.chdir(cwd)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["-c", *args]
        status = 0
        try:
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(status)
    _, wait = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(wait)), flush=True)
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The cases above, each as ``python -c CODE ARGS`` from a directory outside the checkout: one interpreter
    imports torch, then forks one process per case (four interpreter starts, each importing torch, cost
    ~10 s of the CI tier). Per case: a ``CompletedProcess`` with ``cwd`` (its directory) added."""
    cases = {"import": (_IMPORT_CODE, OPTIONAL), "optional": (_OPTIONAL_CODE, ()), "cli": (_CLI_CODE, ()),
             "tuner": (_TUNER_CODE, ())}
    dirs = {name: tmp_path_factory.mktemp(name) for name in cases}
    out = _run([json.dumps(("scipy",) + OPTIONAL),
                json.dumps([[code, list(args), str(dirs[name])] for name, (code, args) in cases.items()])],
               code=_FORKS, cwd=tmp_path_factory.mktemp("forks"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert json.loads(lines[0]) == []  # what a fresh interpreter's ``import torch`` loads of the watched packages
    results = {}
    for (name, (code, args)), status in zip(cases.items(), lines[1:]):
        d = dirs[name]
        results[name] = subprocess.CompletedProcess(["python", "-c", code, *args], json.loads(status),
                                                    (d / "stdout").read_text(), (d / "stderr").read_text())
        results[name].cwd = d
        (d / "stdout").unlink()
        (d / "stderr").unlink()
    assert len(results) == len(cases), out.stdout
    return results



def test_every_optional_feature_names_its_extra_without_it(fresh):
    """With every optional package missing (as after ``pip install spectral-lens``), each feature
    that needs one raises a one-line ``ImportError`` naming the package and the pip extra."""
    out = fresh["optional"]
    assert out.returncode == 0, out.stderr
    messages = json.loads(out.stdout)
    # TensorBoardSink named 'torch' (the first part of torch.utils.tensorboard) as the missing package
    # with figures and neither package: tensorboard first (its extra brings matplotlib; review 27 named [plot]
    # first, and a user who installed it met a second ImportError)
    expect = {"TensorBoardSink": ("tensorboard", "tensorboard"), "TensorBoardSink figures": ("tensorboard", "tensorboard"),
              "WandbSink": ("wandb", "wandb"),
              "SpectralLensCallback": ("transformers", "hf"),
              "SpectralLensLightningCallback": ("lightning", "lightning"),
              "pytorch_lightning": ("pytorch_lightning", "lightning")}
    assert len(messages) >= 12
    for name, message in messages.items():
        package, extra = expect.get(name, ("matplotlib", "plot"))
        assert message is not None, f"{name} did not raise without {package}"
        phrase = "plotting needs matplotlib" if package == "matplotlib" else f"needs the optional package {package!r}"
        assert "\n" not in message and phrase in message, (name, message)
        assert f"pip install 'spectral-lens[{extra}]'" in message, (name, message)
    assert not (out.cwd / "tb").exists()  # the sinks failed before creating a log directory


def test_cli_without_optional_packages(fresh):
    """``spectral-lens report`` without matplotlib writes tables only and says how to get figures."""
    out = fresh["cli"]
    assert out.returncode == 0, out.stderr
    assert (out.cwd / "rep" / "report.md").is_file()
    assert "note: matplotlib is not installed: tables only (pip install 'spectral-lens[plot]' for figures)" in out.stdout
    assert "Traceback" not in out.stderr


def test_tuner_without_optuna_names_the_extra(fresh):
    """``python -m examples.tune`` (run from a checkout) imported optuna itself: without the extra it
    printed 'error: No module named 'optuna'' and no way to get it."""
    out = fresh["tuner"]
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["python -m examples.tune: error: examples.tune needs Optuna: "
                                       "pip install 'spectral-lens[tune]'"]
    assert not (out.cwd / "tune").exists()


# --------------------------------------------------------------------------------------- the wheel
@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """The wheel a user installs: ``spectral_lens`` alone at the top level (no tests, examples or
    benchmarks), the README as long description, the license file, the console script, one version."""
    # a copy of the checkout: setuptools leaves build/ and an .egg-info in the tree it builds
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "reports", "site"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("spectral_lens-*.whl")
    version = spectral_lens.__version__
    assert wheel.name == f"spectral_lens-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"spectral_lens-{version}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert {n.split("/")[0] for n in names} == {"spectral_lens", info}
    assert "spectral_lens/__main__.py" in names
    assert "spectral_lens/py.typed" in names  # PEP 561
    assert "\nClassifier: Typing :: Typed\n" in metadata
    assert not [n for n in names if n.endswith((".pyc", ".so")) or "__pycache__" in n]
    assert f"\nVersion: {version}\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata
    assert metadata.split("\n\n", 1)[1].strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    assert "spectral-lens = spectral_lens.cli:main" in entry_points
    assert license_text.startswith((ROOT / "LICENSE").read_text(encoding="utf-8")[:100])
