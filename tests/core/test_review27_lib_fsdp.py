"""Review 27 (lib): FSDP1 around a model without matrix parameters (norms, biases, scales only).

``weight_spectra`` said its 1-D parameters were "views of this rank's shard" (``use_orig_params=True``, sharded, or
the module inside the wrapper under any strategy) or "flat 1-D parameters" to gather with ``summon_full_params``
(``use_orig_params=False``), where gathering gives no matrix either. Now the original shapes decide (the wrapper's
handle, the flat parameter's ``_shapes``, or, given the module inside the wrapper, the flat parameter found through
its views): no matrix parameter is "has no matrix parameter"; a model with matrices is still refused outside
``summon_full_params`` and exact inside it (float64 references).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_lens.weights import weight_spectra

from support.wrapped import net, svd_ref


class Norms(nn.Module):
    """Parameters that are all 1-D: a LayerNorm and a scale."""

    def __init__(self):
        super().__init__()
        self.norm, self.scale = nn.LayerNorm(5), nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.norm(x)


def _fsdp1(model: nn.Module, use_orig_params: bool):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # world size 1: NO_SHARD
        return FSDP(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


NO_MATRIX = r"has no matrix parameter .*1-D"


def test_fsdp1_of_a_model_without_matrices_says_no_matrix_parameter_not_shard_views(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (True, False):
        wrapped = _fsdp1(Norms(), orig)
        for model in (wrapped, wrapped.module):
            with pytest.raises(ValueError, match=NO_MATRIX) as info:
                weight_spectra(model)
            assert "summon_full_params" not in str(info.value) and "shard" not in str(info.value), info.value
        with FSDP.summon_full_params(wrapped), pytest.raises(ValueError, match=NO_MATRIX):
            weight_spectra(wrapped.module)


def test_the_module_inside_fsdp1_with_whole_matrices_is_measured(one_rank):
    """NO_SHARD: the module inside the wrapper holds its whole matrices: measured as before (exact spectra, float64
    reference; a regression guard of the shape lookup)."""
    wrapped = _fsdp1(net(), True)
    got = weight_spectra(wrapped.module)
    assert list(got) == ["a.weight", "b.weight", "head.weight"]
    np.testing.assert_allclose(np.sort(got["b.weight"].values.numpy())[::-1], svd_ref(net().b.weight), rtol=1e-12)


def test_sharded_one_dimensional_views_are_not_refused_as_matrices():
    """Stand-in for use_orig_params=True on several ranks: 1-D parameters whose views differ from their original
    (1-D) shapes are no matrices to gather; a sharded matrix beside them still is."""
    model = Norms()

    class Flat(nn.Parameter):
        _is_flat_param = True

    class Handle:
        flat_param = Flat(torch.zeros(3))

    model.norm.weight = nn.Parameter(model.norm.weight.detach()[:2])  # this rank's part of a 1-D weight
    Handle.flat_param._params = [model.norm.weight, model.norm.bias, model.scale]
    Handle.flat_param._shapes = (torch.Size([5]), torch.Size([5]), torch.Size([3]))
    model._handle = Handle()
    with pytest.raises(ValueError, match=NO_MATRIX):  # before: "1 FullyShardedDataParallel parameter(s) as views"
        weight_spectra(model)
    model.w = nn.Parameter(torch.zeros(4))  # a (2, 4) matrix's part on this rank
    Handle.flat_param._params = Handle.flat_param._params + [model.w]
    Handle.flat_param._shapes = Handle.flat_param._shapes + (torch.Size([2, 4]),)
    with pytest.raises(ValueError, match=r"1 FullyShardedDataParallel parameter\(s\) as views of this rank's shard.*"
                                         r"\['w'\]"):
        weight_spectra(model)


def _norms_rank(rank: int, port: int, out: str) -> None:
    """Real FSDP1 on 2 gloo ranks (FULL_SHARD): a model without matrices, and the module inside a sharded wrapper."""
    from support.ranks import gloo_group, write_case
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def outcome(call):
        try:
            call()
            return None
        except ValueError as exc:
            return str(exc)

    with gloo_group(rank, port, 2, 60):
        result = {}
        for orig in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = FSDP(Norms(), use_orig_params=orig, device_id=torch.device("cpu"))
                matrices = FSDP(net(), use_orig_params=True, device_id=torch.device("cpu"))
            result[f"norms {orig}"] = outcome(lambda: weight_spectra(wrapped))
            result[f"norms inner {orig}"] = outcome(lambda: weight_spectra(wrapped.module))
            with FSDP.summon_full_params(wrapped):
                result[f"norms inside {orig}"] = outcome(lambda: weight_spectra(wrapped))
            result[f"net inner {orig}"] = outcome(lambda: weight_spectra(matrices.module))
            with FSDP.summon_full_params(matrices):
                result[f"net inside {orig}"] = {k: s.values.tolist() for k, s in weight_spectra(matrices.module).items()}
        write_case(out, "norms", rank, result)


@pytest.mark.slow
@pytest.mark.distributed
def test_real_fsdp1_sharded_without_matrices_says_no_matrix_parameter(tmp_path):
    from support.ranks import case_results, run_ranks

    hung = run_ranks(_norms_rank, 2, tmp_path, 180.0)
    got = case_results(tmp_path, ["norms"], 2)["norms"]
    assert hung == [] and None not in got, (hung, got)
    want = {k: s.values.tolist() for k, s in weight_spectra(net()).items()}
    for r in got:
        for orig in (True, False):
            for case in ("norms", "norms inner", "norms inside"):
                msg = r[f"{case} {orig}"]
                assert msg is not None and "has no matrix parameter" in msg and "shard" not in msg, (case, orig, msg)
            assert "as views of this rank's shard" in r[f"net inner {orig}"], r  # matrices sharded: still refused
            assert r[f"net inside {orig}"] == want, r
