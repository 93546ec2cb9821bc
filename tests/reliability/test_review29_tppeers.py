"""Review 29 (tppeers): failures that one rank of a tensor-parallel mesh raised between the collectives of a
measurement, where the lens's ``group`` holds one rank of the mesh (each rank's own group here, 2 gloo ranks, a
1-D mesh of both), so that its own agreement does not reach the mesh peer.

Before (process-group timeout 20 s here):

* a failure of rank 1's activation ``compute`` (the float64 solve after the pass; a ``NonFiniteError`` here) was
  agreed over its own group only: rank 0 returned the activation spectra and waited in the gradient protocol's
  check of the peers (or, without one, in the training's next collective) until the timeout;
* ``gradient_spectra()`` with ``params=()`` on rank 1 only returned ``({}, {})`` there at once, while rank 0
  waited in the gradient protocol's check of the peers until the timeout (``measure`` compared the peers' settings
  in the activation pass's check already);
* a bad argument of ``measure`` on rank 1 only (``tokens=1.5``), refused before any pass, left rank 0 waiting in
  the activation pass's check of the peers until the timeout.

Now every rank raises at once: the failed rank its own error, its peer a ``RuntimeError`` (a ``NonFiniteError``
for one) naming global rank 1 and quoting its error, or both the same ``ValueError`` naming the settings that
differ. Cost: one ``all_reduce`` more per measurement of a tensor-parallel model under such a group (the round after
the activation ``compute``), one in ``gradient_spectra()`` without a gradient protocol there, none for a plain model
or one replica (the counts of ``test_review28_revtp``, unchanged).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from reliability.test_review28_revtp import _counted, _no_new_collective
from reliability.test_tensor_parallel import LAYERS, _mesh, _plain, _pool, _tp, _values
from support.lens_faults import compute_raises
from support.ranks import checked_case, run_gloo_cases

from spectral_lens import SpectralLens
from spectral_lens._warnings import NonFiniteError

WORLD = 2
PG_TIMEOUT_S = 20  # a collective left waiting fails after this (before the fix: rank 0's error after 20 s)
DEADLINE_S = 15.0  # an agreed error comes at once
JOIN_S = 400.0
BEFORE = ("a tensor-parallel rank's work before its peers' check of their pools and settings (measure()'s arguments, "
          "the lens, a pool's len)")  # what the peer names (it cannot tell which step failed)
SOLVE = ("ActivationCovarianceAccumulator(h.1): the covariance is not finite (simulated on one rank: a non-finite "
         "float64 solve)")


def _lens(rank: int, **kwargs) -> SpectralLens:
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    kwargs.setdefault("params", ())
    return SpectralLens(_tp(_plain(), _mesh()), _pool(2), layers=LAYERS, precision="float64", mask_fn=None,
                        progress=False, group=groups[rank], **kwargs)


def _counts(rank: int) -> dict:
    """This rank's collectives: a measurement without and with a gradient protocol, ``gradient_spectra()``
    without one; the spectra of the second measurement."""
    act = _lens(rank)
    both = _lens(rank, params="lm_head.weight")
    values = {}
    out = {"act": _counted(functools.partial(act.measure, 1, 1)),
           "both": _counted(lambda: values.update(_values(both.measure(1, 1)))),
           "gradient_spectra_empty": _counted(act.gradient_spectra)}
    return {**out, "values": sorted(values)}


def _with_failing_solve(rank: int, **kwargs) -> None:
    """A measurement in which rank 1's activation ``compute`` raises, as a non-finite covariance's solve does."""
    lens = _lens(rank, **kwargs)
    with compute_raises(rank, {1: NonFiniteError(SOLVE)}):
        lens.measure(1, 1)
    lens.model(_pool(1)[0][0])  # the training's next step: a forward, whose all-reduces are the mesh's collectives


def _activation_compute_fails_on_rank1(rank: int) -> None:
    _with_failing_solve(rank, params="lm_head.weight")


def _activation_compute_fails_on_rank1_no_gradients(rank: int) -> None:
    """Before: rank 0 returned the measurement and waited in the next step's forward until the timeout."""
    _with_failing_solve(rank)


def _gradient_spectra_params_on_rank0_only(rank: int) -> None:
    _lens(rank, params="lm_head.weight" if rank == 0 else ()).gradient_spectra()


def _measure_bad_tokens_on_rank1(rank: int) -> None:
    _lens(rank).measure(1, 1.5 if rank == 1 else 1)


def _gradient_spectra_unattached_probe_settings_alike(rank: int) -> list:
    """gradient_spectra() without a gradient protocol on both peers: nothing measured, no error."""
    return list(_lens(rank).gradient_spectra())


CASES = {  # the cases the old code fails by the timeout last: a timeout leaves the process group unusable
    "counts": _counts,
    "no_new_collective": _no_new_collective,
    "gradient_spectra_empty_alike": _gradient_spectra_unattached_probe_settings_alike,
    "activation_compute_fails_on_rank1_no_gradients": _activation_compute_fails_on_rank1_no_gradients,
    "gradient_spectra_params_on_rank0_only": _gradient_spectra_params_on_rank0_only,
    "measure_bad_tokens_on_rank1": _measure_bad_tokens_on_rank1,
    "activation_compute_fails_on_rank1": _activation_compute_fails_on_rank1,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_gloo_cases(tmp_path_factory.mktemp("tppeers"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch.distributed.tensor.parallel")


def _errors(results, case) -> list[str]:
    return [r["error"] or "" for r in checked_case(results, case, DEADLINE_S)]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_all_reduce_more_per_measurement_of_the_mesh_and_none_for_a_plain_model_or_one_replica(results):
    got = checked_case(results, "counts", None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    # before: 6 all_reduces without a gradient protocol (as test_review28_tpagree counts them: 3, and a round per
    # batch and one at the end, 2 batches here) and 10 with one; none in gradient_spectra() without a gradient
    # protocol. Now one more round after the activation compute, and the peers' check in gradient_spectra()
    # (review 30: and one round after rank 0's record write, test_review30_tplens)
    assert [r["value"]["act"] for r in got] == [{"all_reduce": 8}] * WORLD, got
    assert [r["value"]["both"] for r in got] == [{"all_reduce": 12}] * WORLD, got
    assert [r["value"]["gradient_spectra_empty"] for r in got] == [{"all_reduce": 1}] * WORLD, got
    assert [r["value"]["values"] for r in got] == [["act:h.0", "act:h.1", "grad:lm_head.weight"]] * WORLD
    same = checked_case(results, "no_new_collective", None)
    assert [r["value"] for r in same] == [{"plain_world": {"all_reduce": 17, "broadcast_object_list": 2},
                                           "plain_own": {},
                                           "replica": {"all_reduce": 14, "broadcast_object_list": 2},
                                           "replica_act": {"all_reduce": 10, "broadcast_object_list": 1}}] * WORLD
    alike = checked_case(results, "gradient_spectra_empty_alike", None)
    assert [(r["error"], r["value"]) for r in alike] == [(None, [{}, {}])] * WORLD, alike


def _peer_error(error: str, kind: str, what: str, cause: str) -> None:
    assert error.startswith(f"{kind}: SpectralLens: {what} failed on global rank(s) [1] (global rank 1: {cause}"), \
        error
    assert "; this rank stopped too" in error, error


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["activation_compute_fails_on_rank1", "activation_compute_fails_on_rank1_no_gradients"])
def test_an_activation_compute_failure_on_one_rank_of_the_mesh_stops_its_peer_at_once(results, case):
    r0, r1 = _errors(results, case)
    assert r1.startswith(f"NonFiniteError: {SOLVE} (SpectralLens has no nonfinite= option"), r1
    _peer_error(r0, "NonFiniteError", "computing the activation spectra of a tensor-parallel rank",
                f"NonFiniteError: {SOLVE}")


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_spectra_with_params_on_one_rank_of_the_mesh_only_is_refused_on_both_naming_the_difference(results):
    r0, r1 = _errors(results, "gradient_spectra_params_on_rank0_only")
    assert r0 == r1, (r0, r1)
    assert r0.startswith("ValueError: SpectralLens: the tensor-parallel ranks [0, 1] run the gradient protocol with "
                         "other settings (params=<probed matrices> on global rank 0, params=() (no gradient protocol) "
                         "on global rank 1)"), r0


@pytest.mark.slow
@pytest.mark.distributed
def test_a_bad_argument_of_measure_on_one_rank_of_the_mesh_stops_its_peer_at_once(results):
    r0, r1 = _errors(results, "measure_bad_tokens_on_rank1")
    cause = "TypeError: SpectralLens.measure: step and tokens must be integers"
    assert r1.startswith(cause), r1
    _peer_error(r0, "RuntimeError", BEFORE, cause)


class _LenFails(list):
    """A list of batches whose ``len`` raises on this rank once ``broken`` is set (an index file unreadable on one
    host), after the lens was built."""

    broken = False

    def __len__(self):
        if self.broken:
            raise OSError("the pool's index could not be read")
        return super().__len__()


class _Samples(torch.utils.data.Dataset):
    """The samples of :func:`_pool`'s batches, one ``(input, target)`` pair each; its ``len`` as :class:`_LenFails`'s."""

    broken = False

    def __init__(self, batches):
        self.items = [(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]

    def __len__(self):
        if self.broken:
            raise OSError("the gradient pool's index could not be read")
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pool_len_fails_on_rank1(rank: int) -> None:
    pool = _LenFails(_pool(2))
    lens = SpectralLens(_tp(_plain(), _mesh()), pool, layers=LAYERS, precision="float64", mask_fn=None, params=(),
                        progress=False, group=[dist.new_group([r]) for r in range(WORLD)][rank])
    pool.broken = rank == 1
    lens.measure(1, 1)


def _gradient_pool_len_fails_on_rank1(rank: int) -> None:
    data = _Samples(_pool(2, seed=5))
    lens = _lens(rank, params="lm_head.weight", gradient_pool=torch.utils.data.DataLoader(data, batch_size=4))
    data.broken = rank == 1
    lens.measure(1, 1)


CASES.update({
    "pool_len_fails_on_rank1": _pool_len_fails_on_rank1,
    "gradient_pool_len_fails_on_rank1": _gradient_pool_len_fails_on_rank1,
})


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case, cause", [
    ("pool_len_fails_on_rank1", "OSError: the pool's index could not be read"),
    ("gradient_pool_len_fails_on_rank1", "OSError: the gradient pool's index could not be read"),
])
def test_a_pool_length_failing_on_one_rank_of_the_mesh_before_the_peers_check_stops_its_peer_at_once(results, case,
                                                                                                      cause):
    r0, r1 = _errors(results, case)
    assert r1 == cause, r1
    _peer_error(r0, "RuntimeError", BEFORE, cause)
