"""The public surface as a new user meets it: every exported name documented, docstring ``Args:``
matching the signatures, useful reprs, and clear errors for common misuse."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import spectral_lens as sl
from spectral_lens.records import RunInfo, RunWriter, open_runs

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = [
    "spectral_lens",
    "spectral_lens.records",
    "spectral_lens.analysis",
    "spectral_lens.integrations",
    "spectral_lens.gradients",
    "spectral_lens.spectra",
]


def _reference_modules() -> set[str]:
    out = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        out |= set(re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), re.M))
    return out


def test_every_exported_name_is_on_a_reference_page():
    """mkdocstrings renders a member only if its module is on a page and it has a docstring
    (``#:`` comments are not read): ``Attachment`` and the exported constants were missing."""
    griffe = pytest.importorskip("griffe")
    pkg = griffe.load("spectral_lens", search_paths=[str(ROOT)], docstring_parser="google")
    pages = _reference_modules()
    missing = []
    for modname in PUBLIC:
        mod = importlib.import_module(modname)
        gmod = pkg if modname == "spectral_lens" else pkg[modname.removeprefix("spectral_lens.")]
        for name in mod.__all__:
            value = getattr(mod, name)  # imports (integrations: lazily, through __getattr__)
            if name in gmod.members:
                obj = gmod.members[name]
            else:  # a lazy export: look it up where it is defined
                obj = pkg[f"{value.__module__}.{value.__qualname__}".removeprefix("spectral_lens.")]
            target = obj.final_target if obj.is_alias else obj
            home = target.parent.path
            if home not in pages or not target.docstring or not target.is_public:
                missing.append(f"{modname}.{name} (defined in {home})")
    assert not missing, f"exported but not rendered in docs/reference: {missing}"


_SECTION = re.compile(r"^(\s*)Args:\s*$")


def _documented_args(doc: str) -> list[str] | None:
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if not m:
            continue
        base, names, indent = len(m.group(1)), [], None
        for line in lines[i + 1:]:
            if not line.strip():
                continue
            cur = len(line) - len(line.lstrip())
            if cur <= base:
                break
            indent = cur if indent is None else indent
            entry = re.match(r"\s*([\w ,`*]+?)(\s*\([^)]*\))?\s*:", line)
            if cur == indent and entry:
                names += [n.strip(" `*") for n in entry.group(1).split(",")]
        return names
    return None


def _public_callables():
    seen = set()
    for modname in PUBLIC:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            try:
                obj = getattr(mod, name)
            except ImportError as exc:  # an integration whose optional extra is not installed
                if "pip install 'spectral-lens[" not in str(exc):
                    raise
                continue
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{modname}.{name}", obj
            elif inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                    if not attr.startswith("_") and inspect.isfunction(fn):
                        yield f"{modname}.{name}.{attr}", fn


def test_args_sections_match_signatures():
    """Where a public function has an ``Args:`` section, it names every parameter and nothing else."""
    bad = []
    for qual, fn in _public_callables():
        documented = _documented_args(inspect.getdoc(fn) or "")
        if documented is None:
            continue
        params = inspect.signature(fn).parameters
        real = [p.name for p in params.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "cls")]
        absent = [d for d in documented if d not in params]
        undocumented = [p for p in real if p not in documented]
        if absent or undocumented:
            bad.append(f"{qual}: documented but absent {absent}, undocumented {undocumented}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------------------- reprs
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 30))


def test_capture_repr_names_modules_and_state():
    model = _model()
    capture = sl.attach(model, ["1", "2"])
    assert repr(capture) == "ActivationCapture(['1', '2'], active=True)"
    capture.remove()
    assert repr(capture) == "ActivationCapture(['1', '2'], active=False)"


def test_writer_repr(tmp_path):
    writer = RunWriter(tmp_path / "r", RunInfo("r", family="F", batch_tier=8))
    assert repr(writer) == f"RunWriter({str(tmp_path / 'r')!r}, run_id='r', closed=False)"
    writer.close()
    assert repr(writer).endswith("closed=True)")


def test_unattached_lens_repr_shows_its_configuration():
    lens = sl.SpectralLens(pool=[torch.zeros(2, 4, dtype=torch.long)], layers="1", params="1.weight")
    assert repr(lens) == "SpectralLens(layers='1', params='1.weight', precision='exact')"
    with lens.attach(_model()):
        assert repr(lens) == "SpectralLens(layers='1', params=['1.weight'], precision='exact')"


# ----------------------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("call", [
    lambda m: sl.attach("model", "1"),
    lambda m: sl.ActivationCovarianceAccumulator().attach([m], "1"),
    lambda m: sl.select_modules("model", "1"),
])
def test_attach_to_something_not_a_module_is_a_type_error(call):
    with pytest.raises(TypeError, match="expected the model as an nn.Module, got (str|list)"):
        call(_model())


def test_lens_refuses_a_non_module_model():
    with pytest.raises(TypeError, match="SpectralLens needs the model as an nn.Module, got str"):
        sl.SpectralLens(pool=[torch.zeros(2, 4, dtype=torch.long)], layers="1", params="1.weight").attach("model")


def test_lens_checks_precision_and_layers_when_built():
    pool = [torch.zeros(2, 4, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"SpectralLens: precision must be one of .*got 'fp8'"):
        sl.SpectralLens(pool=pool, precision="fp8")
    with pytest.raises(ValueError, match=r"SpectralLens layers='blk': .*closest names|SpectralLens layers='blk'"):
        sl.SpectralLens(_model(), pool=pool, layers="blk", params="1.weight")


def test_meta_rows_and_meta_parameters_are_refused_clearly():
    acc = sl.ActivationCovarianceAccumulator()
    acc.update(torch.randn(4, 8, device="meta"))  # shapes only (tests/core/test_update_paths.py uses this)
    with pytest.raises(ValueError, match="ActivationCovarianceAccumulator: its rows were on the meta device"):
        acc.compute()
    meta = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30)).to("meta")
    probe = sl.PerSampleGradientProbe(meta, params="1.weight")
    with pytest.raises(RuntimeError, match="'1.weight' is on the meta device"):
        probe.update(torch.randint(0, 30, (2, 5)))


def test_summaries_that_need_a_spectrum_say_so():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    with pytest.raises(TypeError, match="BandAlphaFitter.fit needs a Spectrum.*got Tensor"):
        sl.BandAlphaFitter((1, 3)).fit(values)
    with pytest.raises(TypeError, match="crossover_rank needs a Spectrum"):
        sl.crossover_rank(values)


def test_open_runs_refuses_a_single_path(tmp_path):
    with pytest.raises(TypeError, match="open_runs takes a list"):
        open_runs(str(tmp_path))
    with pytest.raises(TypeError, match="open_runs takes a list"):
        open_runs(tmp_path)


def test_default_loss_names_a_one_dimensional_batch():
    """A 1-D input_ids (one sequence, or a pool given as the tensor itself) used to die with
    ``IndexError: too many indices`` inside the loss."""
    model = _model()
    probe = sl.PerSampleGradientProbe(model, params="1.weight")
    with pytest.raises(ValueError, match=r"input_ids of shape \(M, T\).*got shape \(6,\)"):
        probe.update(torch.randint(0, 30, (6,)))
    assert probe.n_samples_ == 0
