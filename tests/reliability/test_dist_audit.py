"""``SpectralLens`` across 2 gloo ranks as a multi-GPU user meets it: other layer sets on one rank, a
failure after the sync, Ctrl-C on one rank, a rank killed outright, a ``DistributedDataParallel``
training loop around it or the wrapper itself given to it, a pool sharded by a ``DistributedSampler``; a named
and an unnamed accumulator synced, a tensor-parallel (``DTensor``) module output reaching a capture.

All cases run in one process group of 2 plain processes with a short process-group timeout, joined
with a deadline, so a hang fails the test instead of blocking CI; after every case the ranks meet in a
barrier, so a case that left them in mismatched collectives shows up there.

Before the fixes: ranks whose lens measured another number of layers all-reduced width vectors of
different lengths (rank 0 raised "pools gave different numbers of batches (-4 to 32)", rank 1 waited
until the process-group timeout, and the group was broken); ranks measuring other layers of the same
width summed one rank's layer into the other's and returned it under this rank's name, silently; an error of the activation spectra's ``compute`` on one rank (an
eigendecomposition out of memory), and a ``KeyboardInterrupt`` (Ctrl-C, SIGINT) on one rank anywhere in
``measure``, left the other ranks waiting in the next collective until the process-group timeout.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import spectral_lens as sl
from spectral_lens import ActivationCovarianceAccumulator, PerSampleGradientProbe, SpectralLens

from support.models import TinyLM, lm_pool
from support.ranks import checked_case, run_gloo_cases

WORLD = 2
PG_TIMEOUT_S = 30  # a collective left waiting fails after this (the default is 30 min for gloo)
DEADLINE_S = 20.0  # the promise: every rank has returned or raised within this many seconds, well before the
# 30 s process-group timeout a waiting rank would reach (10 s was exceeded at 10.07 s on a loaded 2-core machine)
JOIN_S = 240.0  # process start-up plus every case; a hang fails the test here


def _model():
    torch.manual_seed(0)
    return TinyLM().double()


def _spectra(m) -> dict:
    return {k: {"values": v.values.tolist(), "n_rows": v.n_rows} for k, v in m.spectra.items()}


def _uneven_pool():  # batches of 1, 5 and 2 sequences: rank 0 forwards 3 of them (batches 0 and 2), rank 1 5
    x, y = torch.cat([x for x, _ in lm_pool(n_batches=3)]), torch.cat([y for _, y in lm_pool(n_batches=3)])
    return [(x[:1], y[:1]), (x[1:6], y[1:6]), (x[6:8], y[6:8])]


def _interrupt() -> None:
    """Ctrl-C on this rank alone (a SIGINT from ``kill -INT``): Python raises ``KeyboardInterrupt`` here.
    The rank's process is a child of pytest's: Python's own SIGINT handler and an unblocked SIGINT are
    set first, as a user's script has them, whatever the test process passed down."""
    before = (signal.getsignal(signal.SIGINT), sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # interrupted by the KeyboardInterrupt
    raise AssertionError(f"no KeyboardInterrupt after SIGINT (handler and blocked signals before: {before})")


def _ddp_wrapper(rank):  # a DDP wrapper given to the lens or the probe: refused on every rank
    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    errors = []
    for build in (lambda: SpectralLens(ddp, lm_pool(n_batches=2), params=()),
                  lambda: SpectralLens(pool=lm_pool(n_batches=2)).attach(ddp),
                  lambda: PerSampleGradientProbe(ddp),
                  lambda: PerSampleGradientProbe(params="module.h.2.attn.c_proj.weight").attach(ddp)):
        try:
            build()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _ddp_training_unchanged(rank):  # regression guard: a measurement between or inside DDP's steps
    def train(measure_at):
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        lens = SpectralLens(model, lm_pool(n_batches=3), precision="float64", progress=False)
        torch.manual_seed(1)  # TinyLM's dropout: the same masks in both runs unless the lens draws
        grads = []
        for step, (x, y) in enumerate(lm_pool(n_batches=3, seed=1 + rank), start=1):
            loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
            if step == measure_at == 2:  # between DDP's forward (its prepare_for_backward) and backward
                lens.measure(step, 0)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
            if step == measure_at == 1:
                lens.measure(step, 0)
        return grads, torch.cat([p.detach().flatten() for p in model.parameters()])

    plain_grads, plain_params = train(None)
    same = {}
    for at in (1, 2):
        grads, params = train(at)
        same[at] = all(torch.equal(a, b) for a, b in zip(grads, plain_grads)) and torch.equal(params, plain_params)
    rank0 = plain_grads[-1].clone()
    dist.broadcast(rank0, 0)
    return {"same": [same[1], same[2]], "synced": torch.equal(rank0, plain_grads[-1])}


def _uneven_batches(rank):  # regression guard: batches of different sizes, 3 on 2 ranks
    return _spectra(SpectralLens(_model(), _uneven_pool(), precision="float64", progress=False).measure(1, 1))


def _accumulator_updates_per_rank(rank):  # regression guard: 1 update on rank 0, 4 (of 0 to 3 rows) on rank 1
    rows = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e3 + 5e3
    acc = ActivationCovarianceAccumulator(precision="float64")
    for a, b in ([(0, 7)] if rank == 0 else [(7, 7), (7, 10), (10, 12), (12, 13)]):
        acc.update(rows[a:b])
    acc.sync()
    return {"values": acc.compute().values.tolist(), "n_rows": acc.n_rows}


def _layers_in_other_orders(rank):
    layers = ["h.1", "h.2"] if rank == 0 else ["h.2", "h.1"]
    return _spectra(SpectralLens(_model(), lm_pool(n_batches=4), layers=layers, precision="float64",
                                 params=(), progress=False).measure(1, 1))


def _other_layers_of_the_same_width(rank):
    SpectralLens(_model(), lm_pool(n_batches=4), layers="h.2" if rank == 0 else "h.1", params=(),
                 progress=False).measure(1, 1)


def _another_number_of_layers(rank):
    SpectralLens(_model(), lm_pool(n_batches=4), layers=["h.2"] if rank == 0 else ["h.1", "h.2"], params=(),
                 progress=False).measure(1, 1)


def _compute_fails_on_rank1(rank):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("eigvalsh: out of memory (rank 1 only)")

    compute = ActivationCovarianceAccumulator.compute
    if rank == 1:
        ActivationCovarianceAccumulator.compute = out_of_memory
    try:
        SpectralLens(_model(), lm_pool(n_batches=4), params=(), progress=False).measure(1, 1)
    finally:
        ActivationCovarianceAccumulator.compute = compute


def _ctrl_c_in_a_forward_on_rank1(rank):
    def forward(model, batch):
        if rank == 1:
            _interrupt()
        return model(batch[0])

    SpectralLens(_model(), lm_pool(n_batches=4), forward_fn=forward, params=(), progress=False).measure(1, 1)


def _ctrl_c_in_the_gradient_protocol_on_rank0(rank):
    lens = SpectralLens(_model(), lm_pool(n_batches=4), progress=False)
    lens._gradient_pass = _interrupt  # the gradient protocol runs on rank 0 alone
    lens.measure(1, 1)


class _InterruptedWriter:
    """Rank 0's run record (every other rank has ``writer=None``), Ctrl-C while it writes."""

    tail_window = head_window = None

    def log_measurement(self, *args, **kwargs):
        _interrupt()


def _ctrl_c_in_the_record_write_on_rank0(rank):
    writer = _InterruptedWriter() if rank == 0 else None
    SpectralLens(_model(), lm_pool(n_batches=4), params=(), writer=writer, progress=False).measure(1, 1)


def _ctrl_c_in_a_sink_on_rank0(rank):  # a callback's measurement: the integrations call sinks on rank 0 alone
    from spectral_lens.integrations._driver import LensDriver

    class Sink:
        def log_measurement(self, measurement, tail=None, head=None):
            _interrupt()

    LensDriver(SpectralLens(_model(), lm_pool(n_batches=4), params=(), progress=False), [Sink()], None).measure(1, 1)


def _rank1_killed(rank):
    def forward(model, batch):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, a node lost: nothing is agreed
        return model(batch[0])

    SpectralLens(_model(), lm_pool(n_batches=4), forward_fn=forward, params=(), progress=False).measure(1, 1)


# ---- the fourteenth audit (it had its own 2 ranks in test_dist_audit14.py; these ranks import DTensor with
# torch._dynamo anyway): ``sync`` of a named accumulator on one rank and an unnamed one on the other, and a
# tensor-parallel (``DTensor``) module output reaching a capture. Before the fixes: the names were compared only
# when every rank's accumulator had one, so a named and an unnamed accumulator (most likely other layers of one
# width) were summed silently; a ``DTensor`` output failed deep inside the accumulator with ``RuntimeError:
# .numpy() is not supported for tensor subclasses`` (naming neither the module nor what to do).
DEADLINE14_S = 10.0  # a refused sync: every rank raises at once


def _rows14(rank: int) -> torch.Tensor:
    return torch.randn(5 + rank, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)


def _named_and_unnamed(rank: int) -> dict:
    acc = ActivationCovarianceAccumulator(name="h.1" if rank == 0 else None)
    acc.update(_rows14(rank))
    error = None
    try:
        acc.sync()
    except ValueError as exc:
        error = str(exc)
    return {"error": error, "n": acc.n_rows, "synced": acc._synced}


def _both_unnamed(rank: int) -> int:
    acc = ActivationCovarianceAccumulator()
    acc.update(_rows14(rank))
    return acc.sync().n_rows


def _dtensor_api() -> tuple:
    """``(DeviceMesh, Shard, distribute_tensor)``: public in ``torch.distributed.tensor`` from torch 2.5, in
    ``torch.distributed._tensor`` in torch 2.4 (tools/check_floors.sh)."""
    try:
        from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DeviceMesh, Shard, distribute_tensor
    return DeviceMesh, Shard, distribute_tensor


class _Sharded(nn.Module):
    """A tensor-parallel layer in miniature: a linear map whose output is a DTensor sharded over the features."""

    def __init__(self, mesh) -> None:
        super().__init__()
        self.mesh = mesh
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 6).double()

    def forward(self, x):
        _, Shard, distribute_tensor = _dtensor_api()
        return distribute_tensor(self.lin(x), self.mesh, [Shard(1)])


def _dtensor_output(rank: int) -> dict:
    DeviceMesh = _dtensor_api()[0]

    model = nn.Sequential(_Sharded(DeviceMesh("cpu", list(range(WORLD)))))
    x = _rows14(0)  # the same input on every rank, as tensor parallelism runs it
    out = {}
    with sl.attach(model, "0") as capture:
        try:
            with torch.no_grad():
                model(x)
        except TypeError as exc:
            out["hook"] = str(exc)
        out["hook_rows"] = capture.accumulators["0"].n_rows
    try:
        with torch.no_grad():
            ActivationCovarianceAccumulator(name="direct").update(model(x))
    except TypeError as exc:
        out["update"] = str(exc)
    # the remedy the error names: the whole tensor, gathered in the pick (every rank runs the forward)
    with sl.attach(model, "0", pick=lambda o: o.full_tensor(), precision="float64") as capture:
        with torch.no_grad():
            model(x)
        out["full"] = capture.compute()["0"].values.tolist()
    with torch.no_grad():
        y = model[0].lin(x)
    out["want"] = np.linalg.eigvalsh(np.cov(y.numpy().T))[::-1].tolist()
    return out


def _lens_in_a_tensor_parallel_mesh(rank: int) -> dict:
    """A lens on each rank of one tensor-parallel mesh (one replica: its data-parallel group is the rank
    alone), reading the sharded output whole with pick=full_tensor (the ranks run the same batches)."""
    DeviceMesh = _dtensor_api()[0]

    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    model = nn.Sequential(_Sharded(DeviceMesh("cpu", list(range(WORLD)))))
    pool = [_rows14(0), _rows14(1)]
    out = {}
    lens = sl.SpectralLens(model, pool, layers="0", params=(), mask_fn=None, progress=False, group=groups[rank])
    try:
        lens.measure(0, 0)
    except TypeError as exc:
        out["refused"] = str(exc)
    lens = sl.SpectralLens(model, pool, layers="0", params=(), mask_fn=None, progress=False, group=groups[rank],
                           pick=lambda o: o.full_tensor())
    out["full"] = lens.measure(0, 0).spectra["act:0"].values.tolist()
    with torch.no_grad():
        y = model[0].lin(torch.cat(pool))
    out["want"] = np.linalg.eigvalsh(np.cov(y.numpy().T))[::-1].tolist()
    return out


# regression guards first: the cases that left the ranks in mismatched collectives before the fixes run last
# (and the killed rank at the very end: it ends the process group)
CASES = {
    "ddp_training_unchanged": _ddp_training_unchanged,
    "ddp_wrapper": _ddp_wrapper,
    "named_and_unnamed": _named_and_unnamed,  # the fourteenth audit's: errors alike on every rank, even before
    "both_unnamed": _both_unnamed,
    "dtensor_output": _dtensor_output,
    "lens_in_a_tensor_parallel_mesh": _lens_in_a_tensor_parallel_mesh,
    "uneven_batches": _uneven_batches,
    "accumulator_updates_per_rank": _accumulator_updates_per_rank,
    "layers_in_other_orders": _layers_in_other_orders,
    "other_layers_of_the_same_width": _other_layers_of_the_same_width,
    "compute_fails_on_rank1": _compute_fails_on_rank1,
    "ctrl_c_in_a_forward_on_rank1": _ctrl_c_in_a_forward_on_rank1,
    "ctrl_c_in_the_gradient_protocol_on_rank0": _ctrl_c_in_the_gradient_protocol_on_rank0,
    "ctrl_c_in_the_record_write_on_rank0": _ctrl_c_in_the_record_write_on_rank0,
    "ctrl_c_in_a_sink_on_rank0": _ctrl_c_in_a_sink_on_rank0,
    "another_number_of_layers": _another_number_of_layers,
    "rank1_killed": _rank1_killed,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    # DDP's first construction imports torch._dynamo (seconds; DTensor with it): preloaded, not in a case's deadline
    return run_gloo_cases(tmp_path_factory.mktemp("dist_audit"), CASES, WORLD, pg_timeout_s=PG_TIMEOUT_S,
                          join_s=JOIN_S, preload="torch._dynamo")


def _case(results, case) -> list[dict]:
    return checked_case(results, case, DEADLINE_S)


def _values(case_got) -> list:
    assert [r["error"] for r in case_got] == [None] * WORLD, case_got
    return [r["value"] for r in case_got]


def _assert_equal_spectra(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k]["n_rows"] == want[k]["n_rows"], k
        np.testing.assert_allclose(got[k]["values"], want[k]["values"], rtol=1e-10, atol=1e-12 * want[k]["values"][0])


@pytest.mark.distributed
def test_ddp_training_steps_are_unchanged_by_measuring(results):
    """Regression guard: the lens on ``ddp.module`` (probe included, on rank 0 alone) measured after a
    step or between DDP's forward and backward: every later ``.grad`` (synced by DDP) and the weights
    are bit-identical to the run without the measurement, and the ranks' gradients are equal."""
    for value in _values(_case(results, "ddp_training_unchanged")):
        assert value == {"same": [True, True], "synced": True}


@pytest.mark.distributed
def test_ddp_wrapper_is_refused(results):
    """A ``DistributedDataParallel`` wrapper was accepted and its backward cross-talked with the lens's
    broadcast: now the lens and the probe refuse it (built or attached) on every rank, naming
    ``model.module``. (Moved here from test_lens_distributed.py: these ranks import torch._dynamo for
    DDP anyway, those no longer do.)"""
    for r in _case(results, "ddp_wrapper"):
        assert r["error"] is None, r
        for msg in r["value"]:
            assert msg is not None and "DistributedDataParallel wrapper" in msg and "model.module" in msg, r["value"]


def _values14(results, case, deadline: bool = True) -> list:
    # with deadline: a refused sync, so every rank raises at once, none waits for the process-group timeout
    got = checked_case(results, case, DEADLINE14_S if deadline else None)
    assert [r["error"] for r in got] == [None] * WORLD, got
    return [r["value"] for r in got]


@pytest.mark.distributed
def test_a_named_and_an_unnamed_accumulator_are_refused_on_every_rank(results):
    got = _values14(results, "named_and_unnamed")
    for rank, r in enumerate(got):
        assert r["error"] is not None, f"rank {rank} summed a named and an unnamed accumulator: {r}"
        assert "have a name and others none" in r["error"], r
        assert f"(this rank's: {'h.1' if rank == 0 else None!r})" in r["error"], r
        assert r["n"] == 5 + rank and not r["synced"]  # the refused sync left the state as it was
    assert _values14(results, "both_unnamed") == [11, 11]  # unnamed on every rank: summed as before


@pytest.mark.distributed
def test_a_dtensor_output_is_refused_naming_the_module_and_full_tensor_measures_it(results):
    for r in _values14(results, "dtensor_output", deadline=False):  # DTensor's first use takes seconds
        assert r["hook"].startswith("0: the module output is a DTensor"), r["hook"]
        assert "pick=lambda out: out.full_tensor()" in r["hook"] and "Shard(dim=1)" in r["hook"]
        assert r["hook_rows"] == 0
        assert r["update"].startswith("direct: the input is a DTensor") and "update(x.full_tensor())" in r["update"]
        np.testing.assert_allclose(r["full"], r["want"], rtol=1e-10, atol=1e-12 * r["want"][0])


@pytest.mark.distributed
def test_a_lens_per_rank_of_a_tensor_parallel_mesh_measures_the_whole_output_with_full_tensor(results):
    for r in _values14(results, "lens_in_a_tensor_parallel_mesh", deadline=False):
        assert r["refused"].startswith("0: the module output is a DTensor"), r["refused"]
        np.testing.assert_allclose(r["full"], r["want"], rtol=1e-10, atol=1e-12 * r["want"][0])


@pytest.mark.distributed
def test_uneven_batches_on_two_ranks_equal_one_process(results):
    """Regression guard: batches of 1, 5 and 2 sequences (rank 0: 3 of them, rank 1: 5)."""
    want = _spectra(SpectralLens(_model(), _uneven_pool(), precision="float64", progress=False).measure(1, 1))
    for value in _values(_case(results, "uneven_batches")):
        _assert_equal_spectra(value, want)


@pytest.mark.distributed
def test_different_numbers_of_updates_per_rank_sync_to_one_pass(results):
    """Regression guard: rows far from zero, 1 update on one rank, 4 (one empty) on the other."""
    rows = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1e3 + 5e3
    centered = rows - rows.mean(0)
    want = torch.linalg.eigvalsh(centered.T @ centered / 12).flip(0)  # the unbiased covariance
    for value in _values(_case(results, "accumulator_updates_per_rank")):
        assert value["n_rows"] == 13
        np.testing.assert_allclose(value["values"], want.numpy(), rtol=1e-9, atol=1e-12 * float(want[0]))


@pytest.mark.distributed
def test_layers_listed_in_other_orders_equal_one_process(results):
    """Regression guard: rank 1 lists ``layers=["h.2", "h.1"]`` (``attach`` keeps the model's order, and the
    lens now syncs the layers sorted by name)."""
    want = _spectra(SpectralLens(_model(), lm_pool(n_batches=4), layers=["h.1", "h.2"], precision="float64",
                                 params=(), progress=False).measure(1, 1))
    for value in _values(_case(results, "layers_in_other_orders")):
        _assert_equal_spectra(value, want)


@pytest.mark.distributed
@pytest.mark.parametrize("case, mine", [("other_layers_of_the_same_width", (["h.2"], ["h.1"])),
                                        ("another_number_of_layers", (["h.2"], ["h.1", "h.2"]))])
def test_other_layers_on_one_rank_are_refused_on_every_rank(results, case, mine):
    """Another layer of the same width was summed into this rank's layer silently; another number of
    layers garbled the batch count check on one rank and left the other waiting until the timeout."""
    for rank, r in enumerate(_case(results, case)):
        assert r["error"] is not None and r["error"].startswith("ValueError"), r
        assert f"the ranks measure different layers (this rank: {mine[rank]})" in r["error"], r


@pytest.mark.distributed
def test_a_compute_failure_on_one_rank_is_agreed(results):
    errors = [r["error"] for r in _case(results, "compute_fails_on_rank1")]
    assert errors[1] is not None and errors[1].startswith("OutOfMemoryError"), errors
    assert errors[0] is not None and errors[0].startswith("RuntimeError"), errors
    assert "computing the activation spectra failed on global rank(s) [1]" in errors[0], errors


@pytest.mark.distributed
@pytest.mark.parametrize("case, failed, what", [
    ("ctrl_c_in_a_forward_on_rank1", 1, "the activation pass"),
    ("ctrl_c_in_the_gradient_protocol_on_rank0", 0, "the gradient protocol"),
    ("ctrl_c_in_the_record_write_on_rank0", 0, "writing the run record"),
    ("ctrl_c_in_a_sink_on_rank0", 0, "a sink's log_measurement"),
])
def test_ctrl_c_on_one_rank_stops_every_rank(results, case, failed, what):
    """SIGINT on one rank: that rank raises ``KeyboardInterrupt``, the other a ``RuntimeError`` naming
    it, at once and in step (they used to wait in the next collective until the process-group timeout)."""
    errors = [r["error"] for r in _case(results, case)]
    assert errors[failed] is not None and errors[failed].startswith("KeyboardInterrupt"), errors
    other = errors[1 - failed]
    assert other is not None and other.startswith("RuntimeError"), errors
    assert what in other and f"failed on global rank(s) [{failed}]" in other, errors


@pytest.mark.parametrize("what", ["pool", "gradient_pool"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_pool_sharded_by_a_distributed_sampler_is_refused(what, batched):
    """A multi-GPU script's usual loader (``DistributedSampler``) as the pool: each rank passed its own
    shard and the lens sharded it again (batch i on rank i % world), so 2 ranks measured half the pool's
    rows (rank 0's gradient protocol half its gradient pool) and returned it as the whole pool's
    spectrum, silently. No process group is needed to show it: the sampler is built for 2 replicas."""
    data = torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*lm_pool(n_batches=4))))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    loader = (torch.utils.data.DataLoader(data, batch_sampler=torch.utils.data.BatchSampler(sampler, 3, False))
              if batched else torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler))
    pools = {"pool": loader} if what == "pool" else {"pool": lm_pool(n_batches=2), "gradient_pool": loader}
    with pytest.raises(ValueError, match=rf"SpectralLens: {what} is a DataLoader over a DistributedSampler "
                                         r"\(rank 1 of 2 replicas\): each rank would pass its own shard"):
        SpectralLens(_model(), **pools, progress=False)
    one = torch.utils.data.DataLoader(data, batch_size=3,  # one replica: the whole pool, accepted
                                      sampler=torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0,
                                                                                  shuffle=False))
    SpectralLens(_model(), one, progress=False)



@pytest.mark.distributed
def test_a_killed_rank_fails_the_others_next_collective_at_once(results):
    """Regression guard for what the guide says of a rank that dies outright (SIGKILL): on gloo the
    other rank's next collective (here the activation pass's agreement) fails within seconds with gloo's
    error about the remote worker (a connection closed or reset by the peer), not after the process-group
    timeout."""
    got = results["rank1_killed"]
    assert got[1] is None  # killed before it could write anything
    assert got[0] is not None and got[0]["error"].startswith("RuntimeError"), got
    # torch 2.4's gloo says only "Read error [...]: Connection reset by peer" (tools/check_floors.sh)
    assert any(s in got[0]["error"] for s in ("Check the logs of the remote worker", "by peer")), got
    assert got[0]["seconds"] < DEADLINE_S, got
