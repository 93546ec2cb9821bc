"""The library never imports a framework; a missing framework is an error naming the extra."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.slow  # the fast tier checks this in tests/core/test_packaging.py::test_import_loads_no_optional_or_heavy_package
def test_import_spectral_lens_imports_no_framework():
    code = (
        "import sys, spectral_lens, spectral_lens.integrations as i; i.measurement_scalars; i.TensorBoardSink; "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'tensorboard', 'wandb', "
        "'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, framework, extra",
    [("hf", "transformers", "hf"), ("lightning", "lightning.pytorch", "lightning"),
     ("pytorch_lightning", "pytorch_lightning", "lightning"), ("wandb", "wandb", "wandb")],
)
def test_missing_framework_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    monkeypatch.delitem(sys.modules, f"spectral_lens.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'spectral-lens\[{extra}\]'"):
        mod = importlib.import_module(f"spectral_lens.integrations.{module}")
        if module == "wandb":
            mod.WandbSink()


def test_tensorboard_sink_names_its_extra(monkeypatch, tmp_path):
    from spectral_lens.integrations import TensorBoardSink

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'spectral-lens\[tensorboard\]'"):
        TensorBoardSink(tmp_path)


def test_sinks_with_figures_need_matplotlib_when_built(monkeypatch, tmp_path):
    """Figures need the plot extra: the old code built the sink and raised at the first measurement, mid-training
    (TensorBoardSink draws figures by default, and the tensorboard extra does not install matplotlib)."""
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard extra is not installed")
    from spectral_lens.integrations import TensorBoardSink

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'spectral-lens\[plot\]'"):
        TensorBoardSink(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()  # no writer was opened
    TensorBoardSink(tmp_path / "tb", figures=False).close()
    if importlib.util.find_spec("wandb") is not None:
        from spectral_lens.integrations import WandbSink

        class Run:
            def define_metric(self, *args, **kwargs):
                pass

        with pytest.raises(ImportError, match=r"pip install 'spectral-lens\[plot\]'"):
            WandbSink(Run(), figures=True)
        WandbSink(Run())
