"""Review 28 (revtp): an adversarial review of the tensor-parallel peers' rounds (``_tensor_parallel.PeerRounds``),
2 gloo ranks, a 1-D mesh of both, the lens's ``group`` each rank's own group (one rank of the mesh) unless said.

* Cost: a plain model (world group, own group) and a tensor-parallel model under the default group (one replica)
  make exactly the collectives they made before review 28 (counted by name, numbers from commit 94df5df).
* A lens measuring again after agreed failures (its activation pool's loading on rank 1, then its gradient pool's)
  is in step: the third measurement equals a fresh lens's, on both ranks; its ``mask_fn`` and the probe's
  ``loss_fn`` are lambdas defined in each rank's process (other addresses): the peers' settings checksum is equal.
* Before the fix: a failure of one rank's probe ``compute`` (an eigendecomposition out of memory), after the
  peers' last round, raised on that rank alone; its peer returned the measurement and went on into training
  alone (its next collective waited until the process-group timeout). A failure on one rank after the activation
  pass's forwards (leaving its eval mode) left the peer waiting in the check of the layers until the timeout
  (20 s here). Now the last round comes after that work: the peer raises a ``RuntimeError`` quoting it, at once.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from reliability.test_review28_tpagree import Sized
from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import PerSampleGradientProbe, SpectralLens

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: rank 0's error after 20 s)
DEADLINE_S = 15.0  # an agreed error comes at once
JOIN_S = 300.0
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast_object_list", "barrier", "reduce_scatter_tensor", "gather", "scatter")


def _counted(fn) -> dict:
    """The collectives ``fn()`` called on this rank, by name (DTensor's own are functional ones, not these)."""
    calls: dict = {}
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return saved[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        fn()
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
    return calls


def _no_new_collective(rank: int) -> dict:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    out = {}
    for where, group in (("plain_world", None), ("plain_own", groups[rank])):
        lens = SpectralLens(_plain(), _pool(2), layers=LAYERS, params="lm_head.weight", precision="float64",
                            mask_fn=None, progress=False, group=group)
        out[where] = _counted(functools.partial(lens.measure, 1, 1))
    for where, params in (("replica", "lm_head.weight"), ("replica_act", ())):
        lens = SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, params=params, precision="float64",
                            mask_fn=None, progress=False)
        out[where] = _counted(functools.partial(lens.measure, 1, 1))
    return out


class _Once(Sized):
    """:class:`Sized` whose loading fails once (at its first iteration reaching ``fail_at``)."""

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                self.fail_at = None
                raise OSError(f"batch {i} could not be read")
            yield batch


def _lambda_lens(rank: int, pool, gradient_pool) -> SpectralLens:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    probe = PerSampleGradientProbe(params="lm_head.weight", chunk_size=2,  # a lambda of this process
                                   loss_fn=lambda out, b: F.cross_entropy(out.transpose(1, 2), b[1],
                                                                          reduction="none").mean(1))
    return SpectralLens(_tp(_plain(), _mesh()), pool, layers=LAYERS, probe=probe, precision="float64",
                        progress=False, group=groups[rank], gradient_pool=gradient_pool,
                        mask_fn=lambda b: torch.ones(b[0].shape, dtype=torch.bool))


def _measure_again_after_agreed_failures(rank: int) -> dict:
    lens = _lambda_lens(rank, _Once(_pool(3), fail_at=2 if rank == 1 else None),
                        _Once(_pool(3, seed=5), fail_at=1 if rank == 1 else None))
    errors, values = [], None
    for step in (1, 2, 3):  # the activation pool fails on rank 1, then its gradient pool, then neither
        try:
            values = _values(lens.measure(step, step))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - compared below
            errors.append(f"{type(exc).__name__}: {exc}")
    fresh = _values(_lambda_lens(rank, _pool(3), _pool(3, seed=5)).measure(1, 1))
    return {"errors": errors, "values": values, "fresh": fresh}


def _tp_lens(rank: int, **kwargs) -> SpectralLens:
    groups = [dist.new_group([r]) for r in range(WORLD)]
    return SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, precision="float64", mask_fn=None,
                        progress=False, group=groups[rank], **kwargs)


def _gradient_compute_fails_on_rank1(rank: int) -> None:
    lens = _tp_lens(rank, params="lm_head.weight")
    if rank == 1:
        def compute(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (the probe's eigendecomposition, simulated)")
        lens.probe.compute = compute
    lens.measure(1, 1)


def _leaving_eval_mode_fails_on_rank1(rank: int) -> None:
    """A failure on rank 1 after its last forward, in the activation pass's own exit (restoring the modes)."""
    lens = _tp_lens(rank, params=())
    if rank == 1:
        eval_mode = lens._eval_mode

        @contextlib.contextmanager
        def failing():
            with eval_mode():
                yield
            raise RuntimeError("restoring the model's modes failed (simulated)")
        lens._eval_mode = failing
    lens.measure(1, 1)


CASES = {  # the case the old code fails by the timeout last: it leaves the process group unusable
    "no_new_collective": _no_new_collective,
    "measure_again": _measure_again_after_agreed_failures,
    "gradient_compute_fails_on_rank1": _gradient_compute_fails_on_rank1,
    "leaving_eval_mode_fails_on_rank1": _leaving_eval_mode_fails_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("revtp"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _errors(results, case) -> list[str]:
    return [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_plain_model_and_one_replica_make_the_collectives_they_made_before(results):
    got = checked_case(results, "no_new_collective", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    # before review 28 (commit 94df5df), counted alike: the settings agreement, the activation pass's agreements
    # and syncs, the gradient protocol's agreement and broadcast; the world group of a plain model sums its ranks
    before = {"plain_world": {"all_reduce": 17, "broadcast_object_list": 2},
              "plain_own": {},
              "replica": {"all_reduce": 14, "broadcast_object_list": 2},
              "replica_act": {"all_reduce": 10, "broadcast_object_list": 1}}
    for r in got:
        assert r["value"] == before, r


@pytest.mark.slow
@pytest.mark.distributed
def test_a_lens_measures_in_step_again_after_agreed_failures_with_lambdas_of_each_process(results):
    got = checked_case(results, "measure_again", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    r0, r1 = (r["value"] for r in got)
    assert r1["errors"][:2] == ["OSError: batch 2 could not be read", "OSError: batch 1 could not be read"], r1
    assert r0["errors"][0].startswith("RuntimeError: SpectralLens: the activation pass of a tensor-parallel rank "
                                      "outside its forwards"), r0
    assert r0["errors"][1].startswith("RuntimeError: SpectralLens: the gradient protocol of a tensor-parallel "
                                      "rank outside its passes"), r0
    assert r0["errors"][2] is None and r1["errors"][2] is None, (r0, r1)
    assert r0["values"] == r1["values"] == r0["fresh"] == r1["fresh"]
    assert sorted(r0["values"]) == ["act:h.0", "act:h.1", "grad:lm_head.weight"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_probe_compute_failure_on_one_rank_of_the_mesh_is_agreed_by_its_peer(results):
    r0, r1 = _errors(results, "gradient_compute_fails_on_rank1")
    cause = "RuntimeError: CUDA out of memory (the probe's eigendecomposition, simulated)"
    assert r1 == cause, r1
    assert r0.startswith("RuntimeError: SpectralLens: the gradient protocol of a tensor-parallel rank outside its "
                         f"passes (loading a batch of the gradient pool) failed on global rank(s) [1] (global rank 1: "
                         f"{cause})"), r0


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failure_after_the_last_forward_on_one_rank_of_the_mesh_is_agreed_by_its_peer(results):
    r0, r1 = _errors(results, "leaving_eval_mode_fails_on_rank1")
    cause = "RuntimeError: restoring the model's modes failed (simulated)"
    assert r1 == cause, r1
    assert r0.startswith("RuntimeError: SpectralLens: the activation pass of a tensor-parallel rank outside its "
                         f"forwards (loading a batch of the pool, its mask_fn) failed on global rank(s) [1] "
                         f"(global rank 1: {cause})"), r0
