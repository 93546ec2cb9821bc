"""Review 27 (revtpdt): adversarial review of the tensor-parallel mesh peers' agreement (68269af), 2 gloo ranks.

* Gradient pools of as many samples but other batches on the two ranks of one mesh, under each rank's own
  group: rank 0 two batches of 4 sequences, rank 1 one batch of 8 (the same sequences). The merged check compared
  the sample counts only (8 and 8): rank 0 ran a second forward alone, its all-reduce met rank 1's next
  collective, and gloo aborted a process ("collective mismatch") or a rank waited until the process-group
  timeout. Now the batches' sizes are compared too (the same ValueError on both ranks, before the protocol).
* Regression guard: a plain model (no DTensor parameters) under the default group (DDP-style) and under each
  rank's own group runs none of the peers' checks (patched to raise here), so no new collective or cost.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens

WORLD = 2
PG_TIMEOUT_S = 20
JOIN_S = 300.0


def _refuse(*args, **kwargs):
    raise AssertionError("a tensor-parallel peers' check ran on a model without tensor parallelism")


def _plain_no_peer_checks(rank: int) -> dict:
    import spectral_lens._tensor_parallel as tp_mod
    import spectral_lens.lens as lens_mod

    saved = (lens_mod.check_same_forwards, lens_mod.check_replicated, tp_mod._check_same_layers)
    lens_mod.check_same_forwards = lens_mod.check_replicated = tp_mod._check_same_layers = _refuse
    try:
        groups = [dist.new_group([r]) for r in range(WORLD)]
        out = {}
        for where, group in (("world", None), ("own", groups[rank])):
            lens = SpectralLens(_plain(), _pool(), layers=LAYERS, params="lm_head.weight", precision="float64",
                                mask_fn=None, progress=False, group=group)
            out[where] = _values(lens.measure(1, 1))
        return out
    finally:
        lens_mod.check_same_forwards, lens_mod.check_replicated, tp_mod._check_same_layers = saved


def _other_gradient_batches_own_groups(rank: int) -> dict:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    two = _pool(2, seed=5)
    one = [(torch.cat([two[0][0], two[1][0]]), torch.cat([two[0][1], two[1][1]]))]  # the same 8 sequences
    lens = SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, params="lm_head.weight",
                        gradient_pool=two if rank == 0 else one, precision="float64", mask_fn=None,
                        progress=False, group=groups[rank])
    return _values(lens.measure(1, 1))


CASES = {
    "plain_no_peer_checks": _plain_no_peer_checks,
    "other_gradient_batches_own_groups": _other_gradient_batches_own_groups,  # last: old code, gloo abort/timeout
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtpdt"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


@pytest.mark.slow
@pytest.mark.distributed
def test_a_plain_model_runs_none_of_the_tensor_parallel_peers_checks(results):
    got = checked_case(results, "plain_no_peer_checks", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    for r in got:
        assert sorted(r["value"]["world"]) == sorted(r["value"]["own"]) and "grad:lm_head.weight" in r["value"]["own"]


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_pools_of_other_batches_on_the_ranks_of_one_mesh_are_refused_before_the_protocol(results):
    got = checked_case(results, "other_gradient_batches_own_groups", 15.0)
    for rank, r in enumerate(got):
        assert r["error"] is not None and r["error"].startswith(
            "ValueError: SpectralLens: the tensor-parallel ranks [0, 1] would run gradient batches of other "
            "sizes"), (rank, r)
