"""What the declared minimum versions (torch 2.4, numpy 1.24, Python 3.10) needed of the library itself;
run there by tools/check_floors.sh, and here on the development versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator


class _Tagged(torch.Tensor):
    """A tensor subclass that is not a DTensor (what a library's own tensor type, a FakeTensor, ... looks like)."""


def test_a_tensor_subclass_is_measured_when_torch_distributed_tensor_is_imported():
    # torch 2.4: the DTensor check read torch.distributed.tensor.DTensor, which is not there: every tensor
    # subclass (and every DTensor) reached update raised AttributeError instead of being measured (refused)
    pytest.importorskip("torch.distributed.tensor")  # torch 2.4: a package without DTensor (its parallel only)
    rows = np.random.default_rng(0).standard_normal((40, 5)) * [1, 2, 3, 4, 5] + 7
    acc = ActivationCovarianceAccumulator(precision="float64")
    acc.update(torch.from_numpy(rows).as_subclass(_Tagged))
    assert acc.n_rows == 40
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(rows, rowvar=False), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not hasattr(torch.compiler, "_is_exporting_flag"), reason="torch without the export flag")
def test_a_compiled_forward_is_not_taken_for_an_export_where_dynamo_folds_is_exporting(monkeypatch):
    """torch 2.7 to 2.12: Dynamo folds ``torch.compiler.is_exporting()`` to True under ``torch.compile`` as well
    (fixed in later torch by reading the flag), so the capture hooks took every compiled forward for an export and
    read nothing: 0 rows from any model run under ``torch.compile`` (seen on torch 2.8.0, eager, aot_eager and
    inductor backends). What the hook sees there is imitated: compiling, ``is_exporting()`` True, the flag False."""
    from spectral_lens.capture import transformed_forward

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", False)
    assert not transformed_forward()  # a compiled forward: the hooks read it
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)  # what torch.export sets
    assert transformed_forward()


def test_the_compiled_feed_operator_is_defined_with_torch_2_4s_custom_op(monkeypatch):
    """torch 2.4's ``torch.library.custom_op`` takes no ``tags`` and cannot read a schema from string annotations
    (``from __future__ import annotations``): defining ``spectral_lens::feed_rows`` raised there, so the capture
    hooks under ``torch.compile`` broke the graph and ``fullgraph=True`` failed at the floor (the fallback meant for
    torch < 2.4). Its signature and its schema inference's refusal are imitated here; the real check is
    tests/core/test_compiled_model.py under tools/check_floors.sh."""
    from types import SimpleNamespace

    from spectral_lens import _compiled_feed

    defined = {}

    def custom_op_2_4(name, fn=None, /, *, mutates_args, device_types=None, schema=None):
        def inner(fn):
            if schema is None and any(isinstance(a, str) for a in fn.__annotations__.values()):
                raise ValueError(f"infer_schema(func): unsupported annotations {fn.__annotations__}")
            defined.update(name=name, schema=schema, mutates_args=set(mutates_args), fn=fn)
            return SimpleNamespace(register_fake=lambda f: f)
        return inner

    monkeypatch.setattr(torch.library, "custom_op", custom_op_2_4)
    monkeypatch.setattr(torch, "Tag", SimpleNamespace())  # torch 2.4 has no cudagraph_unsafe tag
    assert _compiled_feed._define() is not None
    assert defined["name"] == "spectral_lens::feed_rows" and defined["mutates_args"] == {"token"}
    schema = torch._C.parse_schema(defined["name"] + defined["schema"])
    assert [(a.name, str(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments] == [
        ("rows", "Tensor", False), ("token", "Tensor", True), ("key", "int", False)]
    assert not schema.returns


def _stage_built_under_a_capture(rank: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) + 3
    with sl.attach(model, "0") as capture:
        stage = PipelineStage(model, 0, 1, torch.device("cpu"), input_args=(x[:2],))
        built = capture.accumulators["0"].n_rows
        with torch.no_grad():
            ScheduleGPipe(stage, n_microbatches=4).step(x)
    s = capture.compute()["0"]
    with torch.no_grad():
        rows = model[0](x)
    ref = torch.linalg.eigvalsh(torch.cov(rows.T)).flip(0)
    return {"built": built, "rows": s.n_rows, "err": float(((s.values - ref).abs() / ref[0]).max())}


def test_a_pipeline_stage_built_while_a_capture_is_attached_adds_no_rows(tmp_path):
    """torch < 2.6: ``PipelineStage(module, ..., input_args=...)`` without ``output_args`` runs the module in its
    constructor on ``torch.empty`` copies of ``input_args`` (uninitialized memory): a capture attached before the
    stage was built read them (10 rows of 8 on torch 2.4.1, 2 of them garbage). One gloo rank, one stage."""
    from support.ranks import checked_case, run_gloo_cases

    results = run_gloo_cases(tmp_path, {"built": _stage_built_under_a_capture}, 1, pg_timeout_s=20, join_s=240.0,
                             preload="torch.distributed.pipelining")
    [got] = checked_case(results, "built", None)
    assert got["error"] is None, got
    assert (got["value"]["built"], got["value"]["rows"]) == (0, 8), got
    assert got["value"]["err"] < 1e-12, got
